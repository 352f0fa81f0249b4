"""`ppx-export engines`: a build directory -> TensorRT engines for one target GPU, on that GPU.

One engine per graph (TensorRT 10 builder API: OnnxParser.parse_from_file so
external weight data resolves, a strongly typed network where the graph's types
are final - Q/DQ graphs (from an fp16 export) and 16-bit graphs - else precision
flags on a weakly typed one; static shapes except the temporal prefill's T in 1..prefill_max_steps).
The builder's timing cache is kept next to the engines (`timing.cache`) and
reused by the next build in the same place, which makes rebuilds fast.

The output directory is itself a runnable build: `manifest.json` in the build
format (model, tokenizer, voices, graphs pointing at `.engine` files with their
engine I/O dtypes, sha256 of every file) plus an `engines` section binding it
to this GPU and TensorRT version (runtime/core/engine_manifest.py checks it). Built
in a temporary directory and renamed into place: nothing half-written.

Everything about the target, the build and the device is checked before the
first engine is built; with no GPU it fails at once with one line.

Prefill policy: `temporal_prefill` holds the same weights as `temporal_step`.
It is only needed to compile a persona snapshot (rare: snapshots are cached),
so the TensorRT backend loads it on demand and releases it at the next step;
the memory budget counts both engines because they overlap during a compile.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from personaplex_edge.runtime.backends.tensorrt.backend import (
    capturing_logger,
    create,
    last_error,
)
from personaplex_edge.runtime.backends.tensorrt.cuda_versions import tensorrt_missing
from personaplex_edge.runtime.backends.tensorrt.device import query_device
from personaplex_edge.runtime.core.engine_manifest import (
    ENGINE_SUFFIX,
    ENGINES_FORMAT_VERSION,
    ENGINES_KEY,
    PRODUCER,
    DeviceInfo,
    is_engines_build,
)
from personaplex_edge.runtime.core.manifest import (
    GRAPH_KEYS,
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from personaplex_edge.runtime.errors import PpxError

from .atomic import atomic_output_dir, refuse_overlap
from .config import ModelConfig
from .onnx_precision import GraphPrecision, graph_precision
from .progress import bar, note
from .roofline import lm_params, resident_bytes
from .targets import NETWORK_GRAPHS, PRECISIONS, Target, check_device, load_target

TIMING_CACHE = "timing.cache"
PHASE_DELAY = 1.0  # seconds before a nested TensorRT build phase gets a progress bar
_STATE_ROLES_IN = ("cache", "state_in")
_STATE_ROLES_OUT = ("cache_update", "state_out")
_NP_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8e4m3", "INT4": "int4"}


@dataclass(frozen=True)
class EnginePlan:
    """How one graph becomes an engine."""

    key: str
    onnx: Path
    precision: str  # what the target asks for
    graph: GraphPrecision  # what the graph carries
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag names for a weakly typed network
    half_state: bool  # weakly typed FP16: caches and state tensors as FP16 engine I/O
    dynamic_steps: int | None  # prefill: T in 1..this
    roles: dict[str, str]  # tensor name -> manifest role


def build_engines(build_dir: Path, target_ref: str | Path, out_dir: Path, force: bool = False,
                  timing_cache: Path | None = None, quiet: bool = False,
                  device: DeviceInfo | None = None, trt: Any = None) -> Path:
    """Build every graph of `build_dir` for the target into `out_dir` (see the module doc).
    `device` and `trt` are injectable for tests; by default the live GPU and `import tensorrt`."""
    refuse_overlap(Path(out_dir), {"--build": Path(build_dir)})
    target = load_target(target_ref)
    manifest = load_manifest(Path(build_dir))
    if is_engines_build(manifest):
        raise PpxError(f"{build_dir}: already TensorRT engines; --build takes an ONNX build "
                       "(from `ppx-export onnx` or `ppx-export quantize`)")
    plans = plan_engines(manifest, target)
    check_memory_budget(manifest, target)
    _check_out_dir(Path(out_dir), force)
    trt = trt or import_tensorrt()
    if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: strongly typed networks only
        plans = plan_engines(manifest, target, weak_typing=False)
    logger = capturing_logger(trt, lambda msg: note(f"engines: TensorRT warning: {msg}"))
    builder = make_builder(trt, logger)
    device = device or query_device(tensorrt_version=trt.__version__)
    check_device(target, device.compute_capability, device.gpu, trt.__version__)
    say = (lambda msg: None) if quiet else (lambda msg: note(f"engines: {msg}"))
    say(f"{target.name} on {device.describe()}: verifying {build_dir}")
    manifest.verify_files()
    cache_in = timing_cache if timing_cache is not None else Path(out_dir) / TIMING_CACHE
    cache_bytes = cache_in.read_bytes() if cache_in.is_file() else b""
    with bar("engines", len(plans), quiet=quiet, unit=" engines") as progress, \
            atomic_output_dir(Path(out_dir), force=force) as tmp:
        cache = None
        records: dict[str, dict[str, Any]] = {}
        for plan in plans:
            mode = "strongly typed" if plan.strongly_typed else "+".join(plan.flags)
            progress.set_postfix_str(f"{plan.key} ({plan.precision}, {mode})")
            t0 = time.monotonic()
            io, cache = _build_one(trt, builder, logger, plan, target, tmp / f"{plan.key}{ENGINE_SUFFIX}",
                                   cache, cache_bytes, progress_monitor(trt, quiet))
            seconds = time.monotonic() - t0
            records[plan.key] = {"file": f"{plan.key}{ENGINE_SUFFIX}", "precision": plan.precision,
                                 "graph_precision": plan.graph.name, "strongly_typed": plan.strongly_typed,
                                 "flags": list(plan.flags), "io": io, "build_seconds": round(seconds, 1),
                                 "bytes": (tmp / f"{plan.key}{ENGINE_SUFFIX}").stat().st_size}
            say(f"built {plan.key} in {seconds:.0f} s ({records[plan.key]['bytes'] / 1e6:.1f} MB)")
            progress.update(1)
        if cache is not None:
            (tmp / TIMING_CACHE).write_bytes(bytes(memoryview(cache.serialize())))
        if timing_cache is not None and cache is not None:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp / TIMING_CACHE, timing_cache)
        _copy_assets(manifest, tmp)
        out_manifest = engines_manifest(manifest, target, device, trt.__version__, records, tmp)
        write_manifest(tmp, out_manifest)
    say(f"wrote {out_dir}")
    return Path(out_dir)


# -- checks before any work -------------------------------------------------------------

def plan_engines(manifest: Manifest, target: Target, weak_typing: bool = True) -> list[EnginePlan]:
    """One plan per graph, or a one-line refusal when the build does not fit the target."""
    missing = [k for k in GRAPH_KEYS if k not in manifest.graphs]
    if missing:
        raise PpxError(f"{manifest.root}: build lacks graphs {', '.join(missing)}: re-export it")
    context = int(manifest.model["lm"]["context"])
    if context != target.context:
        raise PpxError(f"target {target.name}: context {target.context}, but {manifest.root}'s graphs hold a "
                       f"{context}-step cache: re-export with that context or edit {target.source}")
    recorded = manifest.data.get("quantization", {}).get("networks", {})  # from `ppx-export quantize`
    plans = []
    for key in GRAPH_KEYS:
        info = manifest.graph(key)
        onnx_path = manifest.path(info.file)
        want = target.precision_of_graph(key)
        has = graph_precision(onnx_path)
        if manifest.data.get("dtype") in ("fp32", "fp16", "bf16"):
            # The export's compute dtype (kept by `ppx-export quantize`) is authoritative: an fp16
            # export keeps some small tensors (codebooks, norms) in fp32 on purpose.
            has = GraphPrecision(manifest.data["dtype"], has.quant)
        network = next(n for n, keys in NETWORK_GRAPHS.items() if key in keys)
        if recorded.get(network, "none") != "none" and has.quant:
            has = GraphPrecision(has.float_dtype, recorded[network])  # names int8 vs int8-sq exactly
        strongly, flags, half = _typing_mode(key, want, has, weak_typing, manifest.root, target)
        steps = target.prefill_max_steps if key == "temporal_prefill" else None
        roles = {t.name: t.role for t in (*info.inputs, *info.outputs)}
        plans.append(EnginePlan(key, onnx_path, want, has, strongly, flags, half, steps, roles))
    return plans


def _check_out_dir(out: Path, force: bool) -> None:
    """The atomic writer's refusal, early: before hashing the build and building engines."""
    if out.exists() and not out.is_dir():
        raise PpxError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PpxError(f"{out}: directory exists and is not empty (use --force to replace it)")


def _typing_mode(key: str, want: str, has: GraphPrecision, weak_typing: bool, root: Path,
                 target: Target) -> tuple[bool, tuple[str, ...], bool]:
    """(strongly typed, builder flags, FP16 state I/O) for building `has` at `want`."""
    needs = PRECISIONS[want]
    where = f"target {target.name}: {key} ({root / (key + '.onnx')})"
    if needs.quantized:
        if has.quant != want:
            now = f"quantized {has.quant}" if has.quant else f"unquantized {has.float_dtype}"
            raise PpxError(f"{where} is {now}, the target wants {want}: run `ppx-export quantize "
                           f"--precision {want}` on the build first, or change precision in {target.source}")
        if has.float_dtype == "fp32":
            # Weak typing would only add FP16 around the Q/DQ (kFP8/kINT4 merely enable plugins):
            # quantized graphs are built strongly typed, from an fp16 export.
            raise PpxError(f"{where} is quantized {want} with fp32 compute: quantize an fp16 export "
                           f"instead (`ppx-export onnx --dtype fp16`, then `ppx-export quantize --precision "
                           f"{want}`)")
        return True, (), False  # the graph's types are final
    if has.quant:
        raise PpxError(f"{where} is quantized {has.quant}, the target wants {want}: use the unquantized "
                       f"build or change precision in {target.source}")
    if has.float_dtype == want:
        return True, (), False
    if has.float_dtype == "fp32" and want in ("fp16", "bf16"):
        if not weak_typing:
            raise PpxError(f"{where} is fp32 and this TensorRT builds strongly typed networks only: export "
                           f"with `ppx-export onnx --dtype fp16` for a {want} target")
        return False, (want.upper(),), want == "fp16"
    raise PpxError(f"{where} is {has.float_dtype}, the target wants {want}: re-export with --dtype {want} "
                   f"or change precision in {target.source}")



def check_memory_budget(manifest: Manifest, target: Target) -> None:
    """Refuse engines that cannot fit the target's memory budget at persona-compile peak."""
    lm = ModelConfig.from_dict(manifest.model, where=str(manifest.root / MANIFEST_NAME)).lm
    steps = int(manifest.graph("depformer").meta.get("steps", lm.dep_q))
    params = lm_params(lm, steps)
    lm_bytes = resident_bytes(params, target.precision["temporal"], target.precision["depformer"])
    mimi = 0.0
    for key in ("mimi_encoder", "mimi_decoder"):
        stored = float(manifest.graph(key).meta.get("weight_bytes", 0))
        source_width = 4.0 if manifest.data.get("dtype", "fp32") == "fp32" else 2.0
        mimi += stored * PRECISIONS[target.precision[key]].bytes_per_weight / source_width
    workspace = target.workspace_mb * 2**20
    total = lm_bytes + mimi + workspace
    if total > target.memory_budget_gb * 1e9:
        raise PpxError(f"target {target.name}: the engines need ~{total / 1e9:.1f} GB at persona compile (LM "
                       f"{lm_bytes / 1e9:.1f} GB with step and prefill engines and the KV cache, Mimi "
                       f"{mimi / 1e9:.2f} GB, workspace {workspace / 1e9:.1f} GB), more than memory_budget_gb "
                       f"{target.memory_budget_gb:g}: quantize further or raise the budget in {target.source}")


# -- TensorRT --------------------------------------------------------------------------

def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise PpxError(tensorrt_missing()) from None
    return trt


def make_builder(trt: Any, logger: Any) -> Any:
    """trt.Builder needs a CUDA GPU (see the backend's `create`)."""
    return create(trt, logger, "builder", trt.Builder,
                  "no CUDA GPU: engines must be built on the target device ({detail})")


def progress_monitor(trt: Any, quiet: bool = False) -> Any:
    """A `trt.IProgressMonitor` showing one bar per phase of an engine build (TensorRT 10 and
    later), or None: under `quiet` or with a TensorRT that has no progress monitor. Ctrl-C
    during the build cancels it through the monitor; `_build_one` then re-raises it."""
    if quiet or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}
            self.interrupted = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:  # phases shorter than PHASE_DELAY draw no bar
                self.bars[phase_name] = bar(f"engines: {phase_name}", num_steps, unit=" steps",
                                            nested=True, delay=PHASE_DELAY if parent_phase else 0)
            except KeyboardInterrupt:
                self.interrupted = True

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                phase = self.bars.get(phase_name)
                if phase is not None:  # `step` counts from 0
                    phase.update(max(min(step + 1, phase.total) - phase.n, 0))
            except KeyboardInterrupt:
                self.interrupted = True
            return not self.interrupted

        def phase_finish(self, phase_name: str) -> None:
            try:
                phase = self.bars.pop(phase_name, None)
                if phase is not None:
                    phase.close()
            except KeyboardInterrupt:
                self.interrupted = True

        def close(self) -> None:
            """Close what a failed or cancelled build left open."""
            while self.bars:
                self.bars.popitem()[1].close()

    return Monitor()


def _build_one(trt: Any, builder: Any, logger: Any, plan: EnginePlan, target: Target, out: Path,
               cache: Any, cache_bytes: bytes, monitor: Any = None) -> tuple[list[dict[str, Any]], Any]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise PpxError(f"{plan.onnx}: TensorRT cannot parse the graph: {errors or last_error(logger, '?')}")
    config = builder.create_builder_config()
    config.builder_optimization_level = target.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_mb << 20)
    if plan.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # bit-for-bit-ish parity builds: no TF32 GEMMs
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.half_state:
        _half_state_io(trt, network, plan)
    if plan.dynamic_steps is not None:
        config.add_optimization_profile(_steps_profile(builder, network, plan.dynamic_steps))
    elif any(d < 0 for i in range(network.num_inputs) for d in network.get_input(i).shape):
        raise PpxError(f"{plan.onnx}: {plan.key} has dynamic input shapes; only the prefill graph may")
    if cache is None:
        try:
            cache = config.create_timing_cache(cache_bytes)
        except Exception:  # noqa: BLE001 - a corrupt cache file: TensorRT raises its own types
            cache = None
        if cache is None or (not config.set_timing_cache(cache, False) and cache_bytes):
            # A cache from another GPU or TensorRT version: start a fresh one.
            note("engines: the timing cache is from another device or TensorRT; starting afresh")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    else:
        config.set_timing_cache(cache, False)
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        plan_bytes = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    if monitor is not None and monitor.interrupted:
        raise KeyboardInterrupt
    if plan_bytes is None:
        raise PpxError(f"{plan.onnx}: TensorRT could not build {plan.key} "
                       f"({last_error(logger, 'no error logged')})")
    with open(out, "wb") as f:
        f.write(memoryview(plan_bytes))
    io = _network_io(trt, network, plan)
    del plan_bytes, parser, network, config
    return io, cache


def _half_state_io(trt: Any, network: Any, plan: EnginePlan) -> None:
    """FP16 caches and state across calls: half the KV memory and bandwidth. Cache inputs and
    their updates change together, so the runtime's device-side ring copies stay same-typed."""
    roles = plan.roles
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if roles.get(t.name) in _STATE_ROLES_IN and t.dtype == trt.DataType.FLOAT:
            t.dtype = trt.DataType.HALF
    for i in range(network.num_outputs):
        t = network.get_output(i)
        if roles.get(t.name) in _STATE_ROLES_OUT and t.dtype == trt.DataType.FLOAT:
            t.dtype = trt.DataType.HALF


def _steps_profile(builder: Any, network: Any, max_steps: int) -> Any:
    """Every dynamic dimension (the prefill's T) in 1..max_steps, tuned for full chunks."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if any(d < 0 for d in shape):
            lo = tuple(1 if d < 0 else d for d in shape)
            hi = tuple(max_steps if d < 0 else d for d in shape)
            profile.set_shape(t.name, lo, hi, hi)
    return profile


def _network_io(trt: Any, network: Any, plan: EnginePlan) -> list[dict[str, Any]]:
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            entry = {"name": t.name, "mode": mode, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            if plan.dynamic_steps is not None and any(d < 0 for d in entry["shape"]):
                entry["max_steps"] = plan.dynamic_steps
            io.append(entry)
    return io


def dtype_name(dtype: Any) -> str:
    name = str(getattr(dtype, "name", dtype)).split(".")[-1]
    return _NP_NAMES.get(name, name.lower())


# -- the output build -------------------------------------------------------------------

def _copy_assets(manifest: Manifest, out: Path) -> None:
    """Tokenizer and voices: what the runtime needs besides the engines."""
    names = [manifest.data["tokenizer"], *manifest.data.get("voices", {}).values()]
    for name in names:
        dst = out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.path(name), dst)


def engines_manifest(manifest: Manifest, target: Target, device: DeviceInfo, trt_version: str,
                     records: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """The build manifest of the engines directory `out` (engines, tokenizer, voices written)."""
    data = {k: v for k, v in manifest.data.items() if k not in ("graphs", "files", "created", "producer")}
    data.update({
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "producer": PRODUCER,
        "graphs": {key: _engine_graph_entry(manifest, key, rec, target) for key, rec in records.items()},
        # The timing cache is a builder artefact, not part of what the runtime loads.
        "files": {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*"))
                  if p.is_file() and p.name not in (MANIFEST_NAME, TIMING_CACHE)},
    })
    data[ENGINES_KEY] = {
        "format_version": ENGINES_FORMAT_VERSION,
        "tensorrt": trt_version,
        "device": {**device.to_dict(), "tensorrt": trt_version},
        "target": {"name": target.name, "source": str(target.source), "sha256": sha256_file(target.source),
                   "profile": target.to_dict()},
        "precision": dict(target.precision),
        "networks": records,
        "source_build": {"path": str(manifest.root.resolve()),
                         "manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME)},
        "timing_cache": TIMING_CACHE,
        "prefill": "loaded on demand for persona compiles, released at the next step",
    }
    return data


def _engine_graph_entry(manifest: Manifest, key: str, rec: dict[str, Any], target: Target) -> dict[str, Any]:
    """The build's graph entry with the engine's I/O dtypes and file."""
    src = manifest.data["graphs"][key]
    dtypes = {t["name"]: t["dtype"] for t in rec["io"]}
    entry = json.loads(json.dumps(src))  # deep copy
    for spec in (*entry["inputs"], *entry["outputs"]):
        if spec["name"] not in dtypes:
            raise PpxError(f"{rec['file']}: engine lacks tensor {spec['name']!r} of graph {key}")
        spec["dtype"] = dtypes[spec["name"]]
    entry["file"] = rec["file"]
    entry["data_file"] = None
    entry["meta"] = dict(entry.get("meta", {}))
    if key == "temporal_prefill":
        entry["meta"]["max_steps"] = target.prefill_max_steps
    entry["meta"]["engine_bytes"] = rec["bytes"]
    return entry
