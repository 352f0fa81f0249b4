"""SmoothQuant for the ONNX graphs (modelopt 0.47's ONNX path has none): activation outliers moved into the weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .quantize_modelopt import linear_nodes

# For each activation X feeding linear layers (weights W [K, N]):
#   s_k = max|X_k| ** alpha / max_n |W_kn| ** (1 - alpha);  X' = X / s;  W' = diag(s) W
# so X' W' = X W with X's per-channel range flattened. X / s is one Mul by a constant [K]
# vector before the layers sharing X (TensorRT folds it into the following Quantize).
# Factors are computed once per network from all its graphs' samples (keyed by the weights
# a group feeds) so the step and prefill graphs keep identical weights.
GroupKey = tuple[str, ...]


def _linear_groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in linear_nodes(model):
        groups.setdefault(node.input[0], []).append(node)
    return groups


def _group_key(nodes: Sequence[onnx.NodeProto]) -> GroupKey:
    return tuple(sorted(n.input[1] for n in nodes))


def activation_maxima(model_path: Path, samples: Sequence[Mapping[str, np.ndarray]],
                       providers: list[str], maxima: dict[GroupKey, np.ndarray]) -> None:
    """Fold per-channel max |X| of every linear group's input over `samples` into `maxima`."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    groups = _linear_groups(model)
    outputs = {o.name for o in model.graph.output}
    for act in groups:
        if act not in outputs:
            model.graph.output.append(helper.make_empty_tensor_value_info(act))
    probe = model_path.with_name(f"{model_path.stem}.probe.onnx")
    onnx.save(model, str(probe))  # the weights stay in the data file next to it
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe), sess_options=options, providers=providers)
        names = list(groups)
        for feeds in samples:
            for act, value in zip(names, session.run(names, dict(feeds)), strict=True):
                value = np.abs(np.asarray(value, np.float32))
                flat = value.reshape(-1, value.shape[-1]).max(axis=0)
                key = _group_key(groups[act])
                maxima[key] = np.maximum(maxima[key], flat) if key in maxima else flat
    finally:
        probe.unlink(missing_ok=True)


def smoothing_factors(model: onnx.ModelProto, maxima: Mapping[GroupKey, np.ndarray],
                       alpha: float) -> dict[GroupKey, np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    factors: dict[GroupKey, np.ndarray] = {}
    for nodes in _linear_groups(model).values():
        key = _group_key(nodes)
        if key in maxima:
            w_max = np.max([np.abs(numpy_helper.to_array(inits[n]).astype(np.float32)).max(axis=1)
                            for n in key], axis=0)
            s = np.maximum(maxima[key], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
            factors[key] = np.clip(s, 1e-4, 1e4).astype(np.float32)
    return factors


def apply_smoothing(model: onnx.ModelProto, factors: Mapping[GroupKey, np.ndarray]) -> int:
    """Rewrite `model` (loaded with its weights) in place; returns the groups smoothed."""
    inits = {t.name: t for t in model.graph.initializer}
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for act, nodes in _linear_groups(model).items():
        key = _group_key(nodes)
        if key not in factors:
            continue
        s = factors[key]
        for name in key:
            w = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array((w.astype(np.float32) * s[:, None]).astype(w.dtype), name))
        dtype = numpy_helper.to_array(inits[key[0]]).dtype
        inv, smoothed = f"{act}.smooth_inv", f"{act}.smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(dtype), inv))
        for node in nodes:
            node.input[0] = smoothed
        mul = helper.make_node("Mul", [act, inv], [smoothed], name=f"{act}.smooth_mul")
        inserts.append((min(position[n.name] for n in nodes), mul))
    for index, node in sorted(inserts, key=lambda p: p[0], reverse=True):
        model.graph.node.insert(index, node)  # right before the first reader: stays sorted
    return len(inserts)
