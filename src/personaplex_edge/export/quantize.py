"""`ppx-export quantize`: turns a full-precision build into a quantized build (explicit Q/DQ graphs).

NVIDIA TensorRT Model Optimizer's ONNX PTQ (`modelopt.onnx.quantization.quantize`)
does the quantizing (quantize_modelopt.py); this module picks the precision per
network, feeds it the calibration data recorded from the build itself
(`calibration.py`), applies SmoothQuant where asked (smoothquant.py) and assembles
a new build directory that the runtime loads like any other (quantize_output.py).

Precisions (per network; the Mimi codec stays at the build's precision unless
`networks` says otherwise - it is small, compute-bound, and its audio is what
the driver hears):

- `int8`: weight-only INT8, per output channel, symmetric round-to-nearest, DQ
  on the weights (activations stay high precision). For the bandwidth-bound
  temporal transformer and depformer at batch 1 this halves the bytes read per
  frame vs FP16, which is what matters on Orin. modelopt's int4 path with every
  linear layer in `layers_8bit` does exactly this (it needs no calibration).
- `int8-sq`: SmoothQuant W8A8: activation outliers moved into the weights
  (smoothquant.py), then modelopt's INT8 with `max` calibration on the
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

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from personaplex_edge.runtime.core.manifest import (
    GRAPH_KEYS,
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    write_manifest,
)
from personaplex_edge.runtime.core.network import NETWORKS
from personaplex_edge.runtime.errors import PpxError

from .atomic import atomic_output_dir, refuse_overlap
from .calibration import CalibrationSet, calibration_persona, graphs_of_networks, record_calibration
from .progress import bar
from .quantize_modelopt import linear_nodes, load_modelopt, recipe_for, run_modelopt
from .quantize_output import (
    EXTERNAL_MIN_BYTES,
    DedupStore,
    copy_files,
    opset_of,
    quantized_manifest,
    save_graph,
    signature,
    smoke_run,
    transplant,
)
from .smoothquant import GroupKey, activation_maxima, apply_smoothing, smoothing_factors

PRECISIONS = ("int8", "int8-sq", "fp8", "int4-awq")
NETWORK_CHOICES = ("none", *PRECISIONS)
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
            activation_maxima(inputs[key], calib.samples[key], providers, maxima)
        for key in keys:
            model = onnx.load(str(inputs[key]), load_external_data=True)
            factors = smoothing_factors(model, maxima, opts.alpha)
            groups = apply_smoothing(model, factors)
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
        recipe = recipe_for(precision, index == 0, source, opts.block_size)
        samples = calib.samples[key]
        if precision == "int8" or (precision == "int4-awq" and index > 0):
            samples = samples[:RTN_SAMPLES]  # RTN: no activations needed
        model = run_modelopt(quantize, inputs[key], work / "out" / key / f"{key}.onnx", recipe,
                              samples, eps, high_precision)
        if signature(model) != signature(source):
            raise PpxError(f"{key}: quantization changed the graph's inputs or outputs; refusing the result")
        if index > 0:
            weights = {n.input[1] for n in linear_nodes(source)}
            transplant(models[keys[0]], model, weights)
        models[key] = model
        recipes[key] = {k: v for k, v in recipe.items() if k not in ("nodes_to_quantize", "layers_8bit")}
        recipes[key].update(method_note.get(key, {}))
        progress.update(1)

    data_file = manifest.graph(keys[0]).data_file or f"{net}.onnx.data"
    store = DedupStore(tmp / data_file)
    updates: dict[str, dict[str, Any]] = {}
    try:
        for key in keys:
            graph = manifest.graph(key)
            weight_bytes = save_graph(models[key], tmp / graph.file, store)
            updates[key] = {"data_file": data_file, "weight_bytes": weight_bytes,
                            "opset": opset_of(models[key]), "recipe": recipes[key]}
    finally:
        store.close()
    for key in keys:
        smoke_run(tmp / manifest.graph(key).file, calib.samples[key][0])
    return updates



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
    version, quantize = load_modelopt()

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
        copy_files(manifest, tmp, replaced)
        progress.set_postfix_str("hashing the build")
        data = quantized_manifest(manifest, precision, plan, updates, calib, version, opts.device, tmp)
        write_manifest(tmp, data)
        progress.update(1)
    return out_dir
