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
from pathlib import Path
from typing import Any

from tqdm import tqdm

from personaplex_edge.runtime.backends.tensorrt.backend import (
    capturing_logger,
)
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
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from personaplex_edge.runtime.errors import PpxError

from .atomic import atomic_output_dir, refuse_overlap
from .engine_build import build_one, import_tensorrt, make_builder
from .engine_plan import check_memory_budget, check_out_dir, plan_engines
from .progress import bar, note
from .targets import Target, check_device, load_target

TIMING_CACHE = "timing.cache"
PHASE_DELAY = 1.0  # seconds before a nested TensorRT build phase gets a progress bar


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
    check_out_dir(Path(out_dir), force)
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
            io, cache = build_one(trt, builder, logger, plan, target, tmp / f"{plan.key}{ENGINE_SUFFIX}",
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


def progress_monitor(trt: Any, quiet: bool = False) -> Any:
    """A `trt.IProgressMonitor` showing one bar per phase of an engine build (TensorRT 10 and
    later), or None: under `quiet` or with a TensorRT that has no progress monitor. Ctrl-C
    during the build cancels it through the monitor; `build_one` then re-raises it."""
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
