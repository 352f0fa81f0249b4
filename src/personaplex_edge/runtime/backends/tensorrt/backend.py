"""The TensorRT backend: a network's state resident on the GPU, its engines opened on demand.

See the package docstring for how state, ring caches and CUDA graphs are laid out.
tensorrt and cuda-python are imported when the backend is first used, so this
module imports without them (tests inject stand-ins for both).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.backends.base import initial_value
from personaplex_edge.runtime.backends.tensorrt.copies import Copy2D, slots_copy
from personaplex_edge.runtime.backends.tensorrt.cuda import Cuda, DeviceBuffer
from personaplex_edge.runtime.backends.tensorrt.cuda_versions import (
    import_cudart,
    tensorrt_failure,
    tensorrt_missing,
)
from personaplex_edge.runtime.backends.tensorrt.device import query_device
from personaplex_edge.runtime.backends.tensorrt.engine import LoadedEngine
from personaplex_edge.runtime.core.engine_manifest import (
    DeviceInfo,
    EngineManifest,
    engine_manifest,
    ensure_compatible,
)
from personaplex_edge.runtime.core.manifest import Manifest, TensorInfo
from personaplex_edge.runtime.core.network import NETWORKS
from personaplex_edge.runtime.errors import PpxError

PREFILL_GRAPH = "temporal_prefill"


class TrtNetwork:
    """One network (one or more engines sharing state) on TensorRT."""

    def __init__(self, backend: TrtBackend, name: str, engines: EngineManifest):
        self.backend, self.name = backend, name
        self.trt, self.cuda = backend.trt, backend.cuda
        manifest = engines.manifest
        self._graphs = {key: manifest.graph(key) for key in NETWORKS[name] if key in manifest.graphs}
        if not self._graphs:
            raise PpxError(f"{manifest.root}: build has no engine for network {name!r}")
        self._paths = {key: manifest.path(g.file) for key, g in self._graphs.items()}
        self._closed = True  # until every buffer below exists
        self.stream = self.cuda.stream()
        self._specs: dict[str, TensorInfo] = {}
        for g in self._graphs.values():
            for t in g.inputs:
                if t.role in ("state_in", "cache"):
                    self._specs.setdefault(t.name, t)
        self.caches: dict[str, DeviceBuffer] = {}
        self.state: dict[str, tuple[DeviceBuffer, DeviceBuffer]] = {}  # state_in name -> parity buffers
        for name_, spec in self._specs.items():
            shape = tuple(int(d) for d in spec.shape)
            if spec.role == "cache":
                self.caches[name_] = DeviceBuffer(self.cuda, shape, spec.dtype, host=False)
            else:
                self.state[name_] = (DeviceBuffer(self.cuda, shape, spec.dtype, host=False),
                                     DeviceBuffer(self.cuda, shape, spec.dtype, host=False))
        self.offset_buf = DeviceBuffer(self.cuda, (1,), np.int64, host=True)
        self._initial = {n: initial_value(s.shape, s.dtype, s.init) for n, s in self._specs.items()
                         if s.role == "state_in"}
        self._engines: dict[str, LoadedEngine] = {}
        for key in self._graphs:
            if key != PREFILL_GRAPH:  # loaded on demand (persona compiles only)
                self._engines[key] = LoadedEngine(self, self._graphs[key], self._paths[key])
        self._parity = 0
        self._offset = 0
        self.run_ms = 0.0
        self._closed = False
        self.reset()

    @property
    def offset(self) -> int:
        return self._offset

    def _engine(self, graph: str) -> LoadedEngine:
        if graph not in self._graphs:
            raise PpxError(f"{self.name}: no engine for graph {graph!r}")
        if graph != PREFILL_GRAPH and PREFILL_GRAPH in self._engines:
            self._engines.pop(PREFILL_GRAPH).release()  # the compile is over: give the memory back
        if graph not in self._engines:
            self._engines[graph] = LoadedEngine(self, self._graphs[graph], self._paths[graph])
        return self._engines[graph]

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        eng = self._engine(graph)
        eng.stage(inputs)
        self.offset_buf.host[0] = self._offset
        parity = self._parity if self.state else 0
        eng.run(self.stream, parity)
        added = eng.write_caches(self.stream, self._offset) if eng.cache_updates else 0
        self.cuda.sync(self.stream)
        if eng.state_out:
            self._parity ^= 1
        results = eng.results()
        self._offset += added
        self.run_ms = (time.perf_counter() - t0) * 1e3
        return results

    def reset(self) -> None:
        for buf in self.caches.values():
            self.cuda.memset(buf.ptr, buf.nbytes, self.stream)
        self._parity = 0
        for name, value in self._initial.items():
            self._upload(self.state[name][0], value)
        self.cuda.sync(self.stream)
        self._offset = 0

    def _upload(self, buf: DeviceBuffer, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=buf.dtype)
        self.cuda.copy(buf.ptr, value.ctypes.data, buf.nbytes, self.cuda.H2D, self.stream)
        self.cuda.sync(self.stream)  # `value` is pageable and may go away

    def snapshot(self, slots: int | None = None) -> dict[str, np.ndarray]:
        snap: dict[str, np.ndarray] = {}
        for name, spec in self._specs.items():
            if spec.role == "cache":
                buf = self.caches[name]
                n = buf.shape[spec.slot_axis] if slots is None else min(slots, buf.shape[spec.slot_axis])
                shape = list(buf.shape)
                shape[spec.slot_axis] = n
                host = np.empty(shape, buf.dtype)
                c = slots_copy(buf.shape, spec.slot_axis, n, buf.dtype.itemsize)
                # Device slots (pitched) -> packed host: the plan's dst/src roles swapped.
                swapped = Copy2D(c.src_offset, c.spitch, c.dst_offset, c.dpitch, c.width, c.height)
                self.cuda.copy_2d(host.ctypes.data, buf.ptr, swapped, self.cuda.D2H, self.stream)
            else:
                buf = self.state[name][self._parity]
                host = np.empty(buf.shape, buf.dtype)
                self.cuda.copy(host.ctypes.data, buf.ptr, buf.nbytes, self.cuda.D2H, self.stream)
            self.cuda.sync(self.stream)
            snap[name] = host
        snap["__offset__"] = np.array(self._offset, np.int64)
        return snap

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a snapshot. Partial caches fill their first slots; the rest stays as is (the
        offset masks every slot not yet written), as in the ONNX Runtime backend."""
        self._parity = 0
        for name, spec in self._specs.items():
            if name not in state:
                raise PpxError(f"snapshot: {self.name}: missing state {name}")
            value = np.ascontiguousarray(state[name])
            buf = self.caches[name] if spec.role == "cache" else self.state[name][0]
            want = list(buf.shape)
            if spec.role == "cache" and value.ndim == len(want):
                want[spec.slot_axis] = min(max(value.shape[spec.slot_axis], 1), buf.shape[spec.slot_axis])
            if value.shape != tuple(want) or value.dtype != buf.dtype:
                raise PpxError(f"snapshot: {self.name}: {name} has shape {value.shape} {value.dtype}, "
                               f"the engines need {tuple(want)} {buf.dtype}")
            if spec.role == "cache":
                c = slots_copy(buf.shape, spec.slot_axis, value.shape[spec.slot_axis], buf.dtype.itemsize)
                self.cuda.copy_2d(buf.ptr, value.ctypes.data, c, self.cuda.H2D, self.stream)
            else:
                self.cuda.copy(buf.ptr, value.ctypes.data, buf.nbytes, self.cuda.H2D, self.stream)
            self.cuda.sync(self.stream)
        self._offset = int(state["__offset__"])

    def close(self) -> None:
        """Free the engines and every device and pinned buffer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for eng in self._engines.values():
            eng.release()
        self._engines.clear()
        for buf in (*self.caches.values(), *(b for pair in self.state.values() for b in pair), self.offset_buf):
            buf.free(self.cuda)
        self.caches.clear()
        self.state.clear()
        self.cuda.rt.cudaStreamDestroy(self.stream)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone; the driver frees it all
            pass


# -- the backend ---------------------------------------------------------------------

class TrtBackend:
    """`make_backend("tensorrt")`. `trt` / `cudart` / `device` are injectable (tests)."""

    name = "tensorrt"

    def __init__(self, trt: Any = None, cudart: Any = None, device: DeviceInfo | None = None,
                 cuda_graphs: bool = True):
        self._trt, self._cudart, self._device = trt, cudart, device
        self.cuda_graphs = cuda_graphs
        self._runtime: Any = None
        self._checked: set[Path] = set()

    @property
    def trt(self) -> Any:
        if self._trt is None:
            try:
                import tensorrt
            except ImportError:
                raise PpxError(tensorrt_missing()) from None
            self._trt = tensorrt
        return self._trt

    @property
    def cuda(self) -> Cuda:
        if not isinstance(self._cudart, Cuda):
            self._cudart = Cuda(self._cudart if self._cudart is not None else import_cudart())
        return self._cudart

    def open(self, manifest: Manifest, network: str) -> TrtNetwork:
        if network not in NETWORKS:
            raise PpxError(f"backend: unknown network {network!r}")
        engines = engine_manifest(manifest)
        if manifest.root not in self._checked:
            device = self._device or query_device(tensorrt_version=str(self.trt.__version__))
            ensure_compatible(engines, device)
            self._checked.add(manifest.root)
        return TrtNetwork(self, network, engines)

    def deserialize(self, path: Path) -> Any:
        trt = self.trt
        if self._runtime is None:
            self._logger = capturing_logger(trt)
            self._runtime = make_runtime(trt, self._logger)
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                engine = self._runtime.deserialize_cuda_engine(data)  # mapped: no second copy in RAM
        except (OSError, ValueError) as exc:
            raise PpxError(f"{path}: cannot read the engine ({exc})") from None
        if engine is None:
            errors = getattr(self._logger, "errors", [])
            detail = errors[-1].splitlines()[0] if errors else "corrupt, or built by another TensorRT"
            raise PpxError(f"{path}: TensorRT cannot load the engine ({detail}): rebuild it with "
                           "`ppx-export engines` on this device")
        return engine


def make_runtime(trt: Any, logger: Any) -> Any:
    """trt.Runtime needs a usable CUDA driver (see `create`)."""
    return create(trt, logger, "runtime", trt.Runtime)


def create(trt: Any, logger: Any, what: str, factory: Callable[[Any], Any],
           otherwise: str = "") -> Any:
    """A TensorRT `factory(logger)` object (Runtime, Builder), or one-line PpxError. Without a
    usable CUDA driver TensorRT logs 'CUDA initialization failure with error: 35' and pybind's
    factory raises TypeError (older bindings return None). The refusal names the driver against
    TensorRT's CUDA major when that is the cause; `otherwise` (with `{detail}`) when it is not."""
    try:
        made = factory(logger)
    except Exception as exc:  # noqa: BLE001 - pybind's TypeError, or whatever the bindings raise
        made = None
        detail = last_error(logger, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    else:
        detail = last_error(logger, f"TensorRT could not create a {what}")
    if made is None:
        raise tensorrt_failure(what, detail, str(getattr(trt, "__version__", "")),
                               otherwise.format(detail=detail))
    return made


def last_error(logger: Any, default: str) -> str:
    """The first line of the last error a capturing logger kept, else `default`."""
    return logger.errors[-1].splitlines()[0] if getattr(logger, "errors", None) else default


def capturing_logger(trt: Any, on_warning: Callable[[str], None] | None = None) -> Any:
    """A TensorRT logger that keeps errors (for one-line messages) and hands warnings on."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())
            elif severity == trt.ILogger.Severity.WARNING and on_warning is not None:
                on_warning(msg.strip())

    return _Logger()

