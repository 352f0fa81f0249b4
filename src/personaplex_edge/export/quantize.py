"""`ppx-export quantize`: a full-precision build -> a quantized build (explicit Q/DQ graphs).

NVIDIA TensorRT Model Optimizer's ONNX PTQ (`modelopt.onnx.quantization.quantize`)
does the quantizing; this module picks the recipe per network, feeds it the
calibration data recorded from the build itself (`calibration.py`), and
assembles a new build directory that the runtime loads like any other.

Precisions (per network; the Mimi codec stays at the build's precision unless
`networks` says otherwise - it is small, compute-bound, and its audio is what
the driver hears):

- `int8`: weight-only INT8, per output channel, symmetric round-to-nearest, DQ
  on the weights (activations stay high precision). For the bandwidth-bound
  temporal transformer and depformer at batch 1 this halves the bytes read per
  frame vs FP16, which is what matters on Orin. modelopt's int4 path with every
  linear layer in `layers_8bit` does exactly this (it needs no calibration).
- `int8-sq`: SmoothQuant W8A8: activation outliers moved into the weights (the
  SmoothQuant section below), then modelopt's INT8 with `max` calibration on the
  linear layers only (attention matmuls over the KV cache stay high precision).
- `fp8`: W8A8 FP8 E4M3 (modelopt `fp8`, `max` calibration, linear layers only);
  Ada/Hopper/Thor only. Calibration runs on CPU too (modelopt calibrates in high
  precision on ONNX Runtime, then writes FP8 Q/DQ); ORT's CPU kernels run it.
- `int4-awq`: INT4 weight-only, blocks of 128 along K, AWQ with clipping search
  (modelopt `awq_clip`, its default); the output heads (text head, depformer
  heads) stay INT8 per channel, as modelopt keeps `lm_head` out of INT4.
  `awq_lite` is not offered: in modelopt 0.47 it fails without CuPy/CUDA
  (`AttributeError: 'numpy.ndarray' object has no attribute 'get'`).

All linear layers are quantized although they are GEMVs at batch 1 (modelopt
skips GEMVs by default, `enable_gemv_detection_for_trt`, a rule for compute-bound
models; here the point is the weight bytes). Graph inputs and outputs keep their
names, dtypes and shapes (`direct_io_types=False`), so state roles are unchanged;
compute stays at the build's dtype (`high_precision_dtype`: fp32 builds stay fp32
and run on ONNX Runtime CPU). Opsets are raised as modelopt needs (INT8/FP8 Q/DQ
19, INT4 21).

The temporal step and prefill graphs hold the same weights: the step graph (whose
calibration samples are conversation frames) is quantized first and its
quantized weight tensors are carried into the prefill graph, so both compute
with identical weights, which the data file then stores once.

The 7B (a workstation, not CI): calibration records one conversation of the
shipped clips (~230 frames) through the fp32 or fp16 build - on ONNX Runtime
CPU that is seconds per frame, so use `device="cuda"` (ORT CUDA for recording
and modelopt's calibration) on a GPU that holds the build. Temporal samples
share one KV-cache copy (3.1 GB at fp32, see calibration.py), so memory is
about three times the build (the source, modelopt's in-memory copy, its ORT
session) plus that copy. `int8` needs no activations and is the quickest;
`int4-awq`'s clip search is the slowest part (install CuPy on the GPU machine:
modelopt then runs it on CUDA). Lower the sample counts (`samples=`) to trade
calibration quality for time; `verify` afterwards says whether it was enough.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from personaplex_edge.runtime.core.manifest import (
    GRAPH_KEYS,
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from personaplex_edge.runtime.core.network import NETWORKS
from personaplex_edge.runtime.errors import PpxError

from .atomic import atomic_output_dir, refuse_overlap
from .calibration import (
    CalibrationSet,
    calibration_persona,
    graphs_of_networks,
    record_calibration,
)
from .progress import bar

PRECISIONS = ("int8", "int8-sq", "fp8", "int4-awq")
NETWORK_CHOICES = ("none", *PRECISIONS)
HEAD_WEIGHT = re.compile(r"^(text_linear|linears\.\d+)\.weight$")  # output heads: INT8 under int4-awq
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx
ALIGN = 64
HIGH_PRECISION = {"fp32": "fp32", "fp16": "fp16"}
# Weight-only RTN needs no activations; modelopt still runs one sample through the graph
# (its attention-pattern pass), so a couple of samples are enough.
RTN_SAMPLES = 2


@dataclass(frozen=True)
class QuantizeOptions:
    block_size: int = 128  # INT4 block along K (modelopt's default; 7B dims are multiples)
    alpha: float = 0.5  # SmoothQuant migration strength
    device: str = "cpu"  # cpu: ORT CPU calibration; cuda: ORT CUDA (a workstation GPU, for the 7B)
    samples: Mapping[str, int] = field(default_factory=dict)  # per graph key, overrides the defaults
    # The calibration conversation's persona (NAME or YAML); None: the default persona, with a
    # voice of the build when it lacks the default's (calibration.calibration_persona).
    persona: str | None = None


def network_precisions(precision: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The default per-network map for `precision`, with `overrides` applied."""
    if precision not in PRECISIONS:
        raise PpxError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    plan = {"mimi_encoder": "none", "mimi_decoder": "none", "temporal": precision, "depformer": precision}
    for net, value in (overrides or {}).items():
        if net not in NETWORKS:
            raise PpxError(f"--network: {net!r} is not a network ({', '.join(NETWORKS)})")
        if value not in NETWORK_CHOICES:
            raise PpxError(f"--network {net}: {value!r} is not one of {', '.join(NETWORK_CHOICES)}")
        plan[net] = value
    return plan


def parse_network_overrides(items: Sequence[str] | None) -> dict[str, str]:
    """`["mimi_decoder=int8", ...]` (the CLI's repeated --network) -> dict."""
    out: dict[str, str] = {}
    for item in items or []:
        net, sep, value = item.partition("=")
        if not sep:
            raise PpxError(f"--network: {item!r}: expected NETWORK=PRECISION, e.g. mimi_decoder=int8")
        out[net.strip()] = value.strip()
    return out


# -- modelopt --------------------------------------------------------------------------
def _modelopt() -> tuple[str, Any]:
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise PpxError(f"nvidia-modelopt is not usable ({exc}); install it with the export extras "
                       "(pip install -e '.[export]')") from None
    # modelopt logs to stdout at INFO (and an NVML error on machines without a GPU): keep the
    # CLI's output ours; failures still surface as exceptions.
    logging.getLogger("modelopt").setLevel(logging.CRITICAL)
    return modelopt.__version__, quantize


def _reader(samples: Sequence[Mapping[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        """Recorded feed dicts, one calibration step each (shapes may differ: prefill T)."""

        def __init__(self) -> None:
            self._items = [dict(s) for s in samples]
            self._it = iter(self._items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def get_first(self) -> dict[str, np.ndarray]:
            return self._items[0]

        def rewind(self) -> None:
            self._it = iter(self._items)

    return ListReader()


def _linear_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls with a constant 2-D weight: the linear layers (not attention over the cache)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def _recipe(precision: str, primary: bool, model: onnx.ModelProto, block_size: int) -> dict[str, Any]:
    linears = _linear_nodes(model)
    names = [n.name for n in linears]
    if precision == "int8":
        return {"quantize_mode": "int4", "calibration_method": "rtn_dq", "block_size": -1,
                "layers_8bit": ",".join(names)}
    if precision == "int4-awq":
        heads = [n.name for n in linears if HEAD_WEIGHT.match(n.input[1])]
        # The prefill graph gets RTN (same layout); its weights are replaced by the step's AWQ ones.
        recipe: dict[str, Any] = {"quantize_mode": "int4", "block_size": block_size,
                                  "calibration_method": "awq_clip" if primary else "rtn_dq"}
        if heads:
            recipe["layers_8bit"] = ",".join(heads)
        return recipe
    mode = "fp8" if precision == "fp8" else "int8"
    return {"quantize_mode": mode, "calibration_method": "max", "dq_only": True,
            "nodes_to_quantize": [f"^{re.escape(n)}$" for n in names],
            "enable_gemv_detection_for_trt": False}


def _run_modelopt(quantize: Any, src: Path, out: Path, recipe: Mapping[str, Any],
                  samples: Sequence[Mapping[str, np.ndarray]], eps: list[str], high_precision: str) -> onnx.ModelProto:
    out.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()  # tqdm bars and graphsurgeon/polygraphy notes: not for our users
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            quantize(str(src), calibration_data_reader=_reader(samples), calibration_eps=eps,
                     high_precision_dtype=high_precision, use_external_data_format=True,
                     output_path=str(out), log_level="CRITICAL", **recipe)
    except PpxError:
        raise
    except Exception as exc:  # modelopt/ORT raise many types; the user needs one line
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = "; calibrating on CUDA needs a working GPU (try --device cpu)" if eps[0].startswith("cuda") else ""
        raise PpxError(f"{src.name}: modelopt {recipe['quantize_mode']}/{recipe['calibration_method']} "
                       f"failed: {type(exc).__name__}: {first}{hint}") from None
    if not out.is_file():
        raise PpxError(f"{src.name}: modelopt wrote no quantized graph")
    return onnx.load(str(out), load_external_data=True)


# -- SmoothQuant (modelopt 0.47's ONNX path has none) ------------------------------------
# For each activation X feeding linear layers (weights W [K, N]):
#   s_k = max|X_k| ** alpha / max_n |W_kn| ** (1 - alpha);  X' = X / s;  W' = diag(s) W
# so X' W' = X W with X's per-channel range flattened. X / s is one Mul by a constant [K]
# vector before the layers sharing X (TensorRT folds it into the following Quantize).
# Factors are computed once per network from all its graphs' samples (keyed by the weights
# a group feeds) so the step and prefill graphs keep identical weights.
GroupKey = tuple[str, ...]


def _linear_groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in _linear_nodes(model):
        groups.setdefault(node.input[0], []).append(node)
    return groups


def _group_key(nodes: Sequence[onnx.NodeProto]) -> GroupKey:
    return tuple(sorted(n.input[1] for n in nodes))


def _activation_maxima(model_path: Path, samples: Sequence[Mapping[str, np.ndarray]],
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


def _smoothing_factors(model: onnx.ModelProto, maxima: Mapping[GroupKey, np.ndarray],
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


def _apply_smoothing(model: onnx.ModelProto, factors: Mapping[GroupKey, np.ndarray]) -> int:
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


# -- writing graphs ------------------------------------------------------------------------
class _DedupStore:
    """One external-data file for a network's graphs; identical tensors are stored once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._index: dict[tuple[int, tuple[int, ...], bytes], tuple[int, int]] = {}

    def put(self, tensor: onnx.TensorProto) -> None:
        data = tensor.raw_data
        key = (tensor.data_type, tuple(tensor.dims), _digest(data))
        if key not in self._index:
            offset = self._file.tell()
            pad = (-offset) % ALIGN
            self._file.write(b"\0" * pad)
            self._file.write(data)
            self._index[key] = (offset + pad, len(data))
        offset, length = self._index[key]
        onnx.external_data_helper.set_external_data(tensor, self.path.name, offset, length)
        tensor.ClearField("raw_data")

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _save_graph(model: onnx.ModelProto, path: Path, store: _DedupStore) -> int:
    """Write `model` with its large tensors in `store`; returns its weight bytes."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
            if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                store.put(tensor)
        else:
            total += numpy_helper.to_array(tensor).nbytes
    onnx.save(model, str(path))
    return total


def _signature(model: onnx.ModelProto) -> list[tuple[str, int, tuple[Any, ...]]]:
    def one(v: onnx.ValueInfoProto) -> tuple[str, int, tuple[Any, ...]]:
        t = v.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
        return v.name, t.elem_type, dims
    return [one(v) for v in model.graph.input] + [("->", 0, ())] + [one(v) for v in model.graph.output]


def _transplant(primary: onnx.ModelProto, secondary: onnx.ModelProto, weights: set[str]) -> int:
    """Give `secondary` the primary's quantized weight tensors (same name, dtype and shape):
    the weight itself and what modelopt derives from its name (`<w>_i4`, `<w>_scale`, ...)."""
    source = {t.name: t for t in primary.graph.initializer}
    moved = 0
    for tensor in secondary.graph.initializer:
        other = source.get(tensor.name)
        if other is None or not any(tensor.name == w or tensor.name.startswith(w + "_") for w in weights):
            continue
        if other.data_type != tensor.data_type or list(other.dims) != list(tensor.dims):
            raise PpxError(f"quantize: shared weight {tensor.name} was quantized differently in the "
                           "graphs of one network")
        tensor.CopyFrom(other)
        moved += 1
    return moved


def _opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _smoke_run(path: Path, sample: Mapping[str, np.ndarray] | None) -> None:
    """The quantized graph loads in ONNX Runtime CPU and gives finite outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        if sample is None:
            return
        for meta, value in zip(session.get_outputs(), session.run(None, dict(sample)), strict=True):
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise PpxError(f"{path.name}: output {meta.name} is not finite after quantization")
    except PpxError:
        raise
    except Exception as exc:
        raise PpxError(f"{path.name}: the quantized graph does not run on ONNX Runtime CPU "
                       f"({str(exc).splitlines()[0]})") from None


# -- the build -----------------------------------------------------------------------------
def _quantize_network(net: str, precision: str, manifest: Manifest, calib: CalibrationSet, work: Path,
                      tmp: Path, quantize: Any, opts: QuantizeOptions, high_precision: str,
                      progress: tqdm) -> dict[str, dict[str, Any]]:
    """Quantize the graphs of `net` into `tmp`; returns per-graph manifest updates."""
    keys = [k for k in NETWORKS[net] if k in manifest.graphs]
    eps = ["cuda:0", "cpu"] if opts.device == "cuda" else ["cpu"]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if opts.device == "cuda" \
        else ["CPUExecutionProvider"]
    # Work on copies: modelopt rewrites its input graph in place (seen with fp8), and a hard
    # link would let that reach the source build.
    src_dir = work / net
    src_dir.mkdir(parents=True)
    for key in keys:
        graph = manifest.graph(key)
        shutil.copyfile(manifest.path(graph.file), src_dir / graph.file)
        if graph.data_file and not (src_dir / graph.data_file).exists():
            shutil.copyfile(manifest.path(graph.data_file), src_dir / graph.data_file)
    for key in keys:
        if not calib.samples.get(key):
            raise PpxError(f"calibration: the conversation never ran {key}; use longer speech clips")

    inputs = {k: src_dir / manifest.graph(k).file for k in keys}
    method_note: dict[str, Any] = {}
    if precision == "int8-sq":
        maxima: dict[GroupKey, np.ndarray] = {}
        for key in keys:
            _activation_maxima(inputs[key], calib.samples[key], providers, maxima)
        for key in keys:
            model = onnx.load(str(inputs[key]), load_external_data=True)
            factors = _smoothing_factors(model, maxima, opts.alpha)
            groups = _apply_smoothing(model, factors)
            smoothed = src_dir / f"{key}.smoothed.onnx"
            onnx.save(model, str(smoothed), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{key}.smoothed.onnx.data", size_threshold=EXTERNAL_MIN_BYTES)
            inputs[key] = smoothed
            method_note[key] = {"smoothquant_alpha": opts.alpha, "smoothed_groups": groups}

    models: dict[str, onnx.ModelProto] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for index, key in enumerate(keys):
        progress.set_postfix_str(f"{key}: {precision}")
        source = onnx.load(str(src_dir / manifest.graph(key).file), load_external_data=False)
        recipe = _recipe(precision, index == 0, source, opts.block_size)
        samples = calib.samples[key]
        if precision == "int8" or (precision == "int4-awq" and index > 0):
            samples = samples[:RTN_SAMPLES]  # RTN: no activations needed
        model = _run_modelopt(quantize, inputs[key], work / "out" / key / f"{key}.onnx", recipe,
                              samples, eps, high_precision)
        if _signature(model) != _signature(source):
            raise PpxError(f"{key}: quantization changed the graph's inputs or outputs; refusing the result")
        if index > 0:
            weights = {n.input[1] for n in _linear_nodes(source)}
            _transplant(models[keys[0]], model, weights)
        models[key] = model
        recipes[key] = {k: v for k, v in recipe.items() if k not in ("nodes_to_quantize", "layers_8bit")}
        recipes[key].update(method_note.get(key, {}))
        progress.update(1)

    data_file = manifest.graph(keys[0]).data_file or f"{net}.onnx.data"
    store = _DedupStore(tmp / data_file)
    updates: dict[str, dict[str, Any]] = {}
    try:
        for key in keys:
            graph = manifest.graph(key)
            weight_bytes = _save_graph(models[key], tmp / graph.file, store)
            updates[key] = {"data_file": data_file, "weight_bytes": weight_bytes,
                            "opset": _opset(models[key]), "recipe": recipes[key]}
    finally:
        store.close()
    for key in keys:
        _smoke_run(tmp / manifest.graph(key).file, calib.samples[key][0])
    return updates


def _copy_files(manifest: Manifest, tmp: Path, skip: set[str]) -> None:
    for name in manifest.files:
        if name in skip:
            continue
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.root / name, dst)


def quantize_build(build_dir: Path, precision: str, calib_dir: Path | None, out_dir: Path, *,
                   networks: Mapping[str, str] | None = None, options: QuantizeOptions | None = None,
                   force: bool = False, quiet: bool = False) -> Path:
    """Quantize the full-precision build `build_dir` into a new build `out_dir` (atomically)."""
    opts = options or QuantizeOptions()
    plan = network_precisions(precision, networks)
    if opts.device not in ("cpu", "cuda"):
        raise PpxError(f"--device: {opts.device!r} is not one of cpu, cuda")
    if opts.block_size != -1 and (opts.block_size < 16 or opts.block_size & (opts.block_size - 1)):
        raise PpxError(f"--block-size: {opts.block_size} must be a power of two >= 16 (or -1: per channel)")
    if not 0.0 < opts.alpha < 1.0:
        raise PpxError(f"--alpha: {opts.alpha} must be within (0, 1)")
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    refuse_overlap(out_dir, {"--build": build_dir, "--calib": calib_dir})
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:  # before minutes of calibration
        raise PpxError(f"{out_dir}: directory exists and is not empty (use --force to replace it)")
    manifest = load_manifest(build_dir)
    persona = calibration_persona(opts.persona, manifest)  # a persona that cannot start: now
    manifest.verify_files()
    if "quantization" in manifest.data:
        raise PpxError(f"{build_dir / MANIFEST_NAME}: already a quantized build "
                       f"({manifest.data['quantization'].get('precision')}); quantize the full-precision build")
    missing = [k for k in GRAPH_KEYS if k not in manifest.graphs]
    if missing:
        raise PpxError(f"{build_dir / MANIFEST_NAME}: graphs: missing {', '.join(missing)}")
    high_precision = HIGH_PRECISION.get(manifest.data.get("dtype", "fp32"))
    if high_precision is None:
        raise PpxError(f"{build_dir / MANIFEST_NAME}: dtype {manifest.data.get('dtype')!r} is not fp32/fp16")
    version, quantize = _modelopt()

    quantized = [net for net, p in plan.items() if p != "none"]
    if not quantized:
        raise PpxError("--network: every network is 'none'; nothing to quantize")
    graph_keys = graphs_of_networks(quantized)
    calib = record_calibration(build_dir, calib_dir, samples=opts.samples, graphs=graph_keys,
                               persona=persona, backend=f"ort-{opts.device}", quiet=quiet)
    with bar("quantize", len(graph_keys) + 1, quiet=quiet, unit=" steps") as progress, \
            atomic_output_dir(out_dir, force=force) as tmp:
        work = tmp / ".work"
        work.mkdir()
        updates: dict[str, dict[str, Any]] = {}
        for net in quantized:
            updates.update(_quantize_network(net, plan[net], manifest, calib, work, tmp, quantize, opts,
                                             high_precision, progress))
        shutil.rmtree(work)
        replaced = {manifest.graph(k).file for k in updates} | \
            {manifest.graph(k).data_file for k in updates if manifest.graph(k).data_file}
        _copy_files(manifest, tmp, replaced)
        progress.set_postfix_str("hashing the build")
        data = _new_manifest(manifest, precision, plan, updates, calib, version, opts, tmp)
        write_manifest(tmp, data)
        progress.update(1)
    return out_dir


def _new_manifest(manifest: Manifest, precision: str, plan: Mapping[str, str], updates: Mapping[str, dict[str, Any]],
                  calib: CalibrationSet, version: str, opts: QuantizeOptions, tmp: Path) -> dict[str, Any]:
    data = json.loads(json.dumps(manifest.data))  # deep copy
    opsets = [int(data.get("opset", 17))]
    for key, update in updates.items():
        graph = data["graphs"][key]
        graph["data_file"] = update["data_file"]
        graph["meta"]["weight_bytes"] = update["weight_bytes"]
        graph["meta"]["opset"] = update["opset"]
        opsets.append(update["opset"])
    data["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["producer"] = "ppx-export quantize"
    data["opset"] = max(opsets)
    data["quantization"] = {
        "precision": precision,
        "networks": dict(plan),
        "tool": "nvidia-modelopt",
        "modelopt_version": version,
        "recipes": {key: update["recipe"] for key, update in updates.items()},
        "calibration": {**calib.summary(), "device": opts.device},
        "source_build": {"path": str(manifest.root.resolve()),
                         "manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME)},
    }
    data["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                     if p.is_file() and p.name != MANIFEST_NAME}
    return data
