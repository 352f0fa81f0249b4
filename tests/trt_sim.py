"""A CPU stand-in for TensorRT's Python API and cuda-python's runtime API (no GPU here).

It lets the CPU suite drive the real engine builder (export/engines.py) and the
real TensorRT backend (runtime/trt_backend.py) end to end: "device" memory is
host memory at real addresses, streams queue their work until synchronised,
stream capture records it into replayable graphs, and an "engine" is a JSON plan
naming its ONNX graph, executed on ONNX Runtime with the addresses and shapes
bound at enqueue time (what a captured CUDA graph bakes in). Engine I/O dtypes
that differ from the graph's (FP16 state I/O) are converted at the boundary.

It checks what the real thing would refuse: copies outside an allocation, the
wrong memcpy kind, pageable host memory in a capture, unbound tensor addresses,
an output aliasing an input, a dynamic input without a profile, an engine from
another TensorRT version. Call signatures follow TensorRT 10.3-11.1
(python/src/infer/pyCore.cpp) and cuda-python 12.9/13.x (checked by calling the
real bindings without a driver).
"""

from __future__ import annotations

import ctypes
import enum
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# -- cuda-python runtime -----------------------------------------------------------------

class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


OK = cudaError_t.cudaSuccess


class SimError(AssertionError):
    """A use of the API the real CUDA or TensorRT would reject or corrupt memory with."""


class FakeCudart:
    """cuda.bindings.runtime, on host memory.

    `driver` is the CUDA version libcuda supports (None: no libcuda) and `runtime` the one the
    bindings link. A runtime of a newer major than the driver's, or no libcuda, fails every call
    as the real bindings do: error 35 (cudaDriverGetVersion says 0 without libcuda), or with
    `legacy` (cuda-python 12.5 and older) RuntimeError 'Failed to dlopen libcuda.so.1' first and
    'Function "cuInit" not found' after."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1
    cudaDeviceScheduleBlockingSync = 4

    def __init__(self, driver: int | None = 12090, runtime: int = 12090, legacy: bool = False) -> None:
        self.driver, self.runtime, self.legacy = driver, runtime, legacy
        if driver is None or runtime // 1000 > driver // 1000:
            self._fail_every_call()
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.queues: dict[int, list[Any]] = {}
        self.capturing: dict[int, list[Any]] = {}
        self.stats: Counter[str] = Counter()
        self._next_stream = 1

    def _fail_every_call(self) -> None:
        dlopen_failed = [False]

        def fail(*args: Any) -> tuple[cudaError_t, None]:
            if self.legacy and self.driver is None:
                if not dlopen_failed[0]:
                    dlopen_failed[0] = True
                    raise RuntimeError("Failed to dlopen libcuda.so.1")
                raise RuntimeError('Function "cuInit" not found')
            return cudaError_t.cudaErrorInsufficientDriver, None

        for name in dir(type(self)):
            if name.startswith("cuda") and callable(getattr(type(self), name)) and name not in (
                    "cudaRuntimeGetVersion", "cudaGetErrorName") and not isinstance(getattr(type(self), name), type):
                setattr(self, name, fail)
        if not (self.legacy and self.driver is None):
            self.cudaDriverGetVersion = lambda: (OK, self.driver or 0)  # type: ignore[method-assign]

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return OK, self.runtime

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return OK, self.driver or 0

    def cudaSetDeviceFlags(self, flags: int) -> tuple[cudaError_t]:  # noqa: N802
        self.stats["set_device_flags"] += 1
        return (OK,)

    # memory
    def _alloc(self, n: int, table: dict[int, np.ndarray]) -> tuple[cudaError_t, int]:
        arr = np.full(n, 0xA5, np.uint8)  # like cudaMalloc: not zeroed
        table[arr.ctypes.data] = arr
        return OK, arr.ctypes.data

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:  # noqa: N802
        return self._alloc(int(size), self.device)

    def cudaMallocHost(self, size: int) -> tuple[cudaError_t, int]:  # noqa: N802
        return self._alloc(int(size), self.pinned)

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if self.device.pop(int(ptr), None) is None:
            raise SimError(f"cudaFree of {ptr:#x}: not a device allocation")
        return (OK,)

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if self.pinned.pop(int(ptr), None) is None:
            raise SimError(f"cudaFreeHost of {ptr:#x}: not a pinned allocation")
        return (OK,)

    def where(self, ptr: int, n: int) -> str:
        """'device', 'pinned' or 'pageable'; a range crossing an allocation's end is an error."""
        for kind, table in (("device", self.device), ("pinned", self.pinned)):
            for base, arr in table.items():
                if base <= ptr < base + arr.size:
                    if ptr + n > base + arr.size:
                        raise SimError(f"{kind} access [{ptr - base}, {ptr - base + n}) past the end of "
                                       f"a {arr.size}-byte allocation")
                    return kind
        return "pageable"

    def _check_kind(self, dst: int, dst_n: int, src: int, src_n: int, kind: cudaMemcpyKind) -> tuple[str, str]:
        d, s = self.where(dst, dst_n), self.where(src, src_n)
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: ("device", "host"),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: ("host", "device"),
                cudaMemcpyKind.cudaMemcpyDeviceToDevice: ("device", "device")}[kind]
        got = tuple("device" if w == "device" else "host" for w in (d, s))
        if got != want:
            raise SimError(f"{kind.name}: destination is {d} memory, source is {s} memory")
        return d, s

    # streams and work
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, int]:  # noqa: N802
        sid = self._next_stream
        self._next_stream += 1
        self.queues[sid] = []
        return OK, sid

    def _submit(self, stream: int, op: Any, pageable: bool = False) -> cudaError_t:
        stream = int(stream)
        if stream in self.capturing:
            if self.capturing[stream] is None:
                return cudaError_t.cudaErrorStreamCaptureInvalidated
            if pageable:  # not capturable: the capture is invalidated
                self.capturing[stream] = None
                return cudaError_t.cudaErrorStreamCaptureUnsupported
            self.capturing[stream].append(op)
            return OK
        if pageable:  # pageable copies are synchronous for the host
            self.cudaStreamSynchronize(stream)
            op()
            return OK
        self.queues[stream].append(op)
        return OK

    def cudaStreamDestroy(self, stream: int) -> tuple[cudaError_t]:  # noqa: N802
        self.cudaStreamSynchronize(stream)
        del self.queues[int(stream)]
        return (OK,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[cudaError_t]:  # noqa: N802
        queue = self.queues[int(stream)]
        while queue:
            queue.pop(0)()
        return (OK,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: int):  # noqa: N802
        d, s = self._check_kind(int(dst), count, int(src), count, kind)
        self.stats["memcpy"] += 1
        return (self._submit(stream, lambda: ctypes.memmove(int(dst), int(src), count),
                             pageable="pageable" in (d, s)),)

    def cudaMemcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,  # noqa: N802
                          kind: cudaMemcpyKind, stream: int):
        if width > dpitch or width > spitch:
            return (cudaError_t.cudaErrorInvalidValue,)
        dst, src = int(dst), int(src)
        d, s = self._check_kind(dst, (height - 1) * dpitch + width, src, (height - 1) * spitch + width, kind)
        self.stats["memcpy2d"] += 1

        def op() -> None:
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (self._submit(stream, op, pageable="pageable" in (d, s)),)

    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: int):  # noqa: N802
        self.where(int(ptr), count)
        return (self._submit(stream, lambda: ctypes.memset(int(ptr), value, count)),)

    # capture and graphs
    def cudaStreamBeginCapture(self, stream: int, mode: cudaStreamCaptureMode):  # noqa: N802
        if self.queues[int(stream)]:
            raise SimError("capture begun with work pending on the stream")
        self.capturing[int(stream)] = []
        return (OK,)

    def cudaStreamEndCapture(self, stream: int):  # noqa: N802
        ops = self.capturing.pop(int(stream))
        if ops is None:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        return OK, list(ops)

    def cudaGraphInstantiate(self, graph: list, flags: int):  # noqa: N802
        self.stats["instantiate"] += 1
        return OK, list(graph)

    def cudaGraphDestroy(self, graph: Any):  # noqa: N802
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec: Any):  # noqa: N802
        return (OK,)

    def cudaGraphLaunch(self, graph_exec: list, stream: int):  # noqa: N802
        self.stats["graph_launch"] += 1
        for op in graph_exec:
            self._submit(stream, op)
        return (OK,)

    def cudaGetLastError(self):  # noqa: N802
        return (OK,)

    def cudaGetErrorName(self, err: cudaError_t):  # noqa: N802
        return OK, cudaError_t(int(err)).name.encode()

    def cudaGetDeviceCount(self):  # noqa: N802
        return OK, 1

    def cudaGetDeviceProperties(self, device: int):  # noqa: N802
        class Props:
            name = b"NVIDIA Sim GPU"
            major, minor = 8, 9
            totalGlobalMem = 8 << 30  # noqa: N815
        return OK, Props()

    def leaks(self) -> int:
        return len(self.device) + len(self.pinned)


# -- TensorRT ------------------------------------------------------------------------------

class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: _Severity, msg: str) -> None:  # overridden
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(_Severity)

    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        super().__init__()


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 3: DataType.INT8, 6: DataType.INT32,
               7: DataType.INT64, 9: DataType.BOOL, 2: DataType.UINT8}


class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType, network: INetworkDefinition):
        self.name, self.shape, self._dtype, self._network = name, shape, dtype, network

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @dtype.setter
    def dtype(self, value: DataType) -> None:
        if self._network.strongly_typed:
            raise SimError(f"{self.name}: setting a tensor type in a strongly typed network")
        self._dtype = value


class INetworkDefinition:
    def __init__(self, flags: int):
        self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx: str | None = None
        self.graph_dtypes: dict[str, str] = {}

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]

    def get_output(self, i: int) -> ITensor:
        return self.outputs[i]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger):
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            proto = onnx.load(model, load_external_data=False)
        except Exception as exc:
            self.errors.append(f"cannot read {model}: {exc}")
            return False
        inits = {t.name for t in proto.graph.initializer}
        net = self.network
        net.onnx = str(Path(model).resolve())
        for value, dest in [(v, net.inputs) for v in proto.graph.input if v.name not in inits] + \
                           [(v, net.outputs) for v in proto.graph.output]:
            t = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            dtype = _ONNX_TYPES[t.elem_type]
            net.graph_dtypes[value.name] = dtype.value
            dest.append(ITensor(value.name, shape, dtype, net))
        return True


class ITimingCache:
    def __init__(self, entries: dict[str, int]):
        self.entries = entries

    def serialize(self) -> bytes:
        return json.dumps({"sim-timing-cache": 1, "entries": self.entries}).encode()


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 (TensorRT's names)
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class IProgressMonitor:
    """TensorRT 10's build progress interface: subclasses define phase_start, step_complete
    (False cancels the build) and phase_finish."""

    def __init__(self) -> None:
        pass


class IBuilderConfig:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.progress_monitor: IProgressMonitor | None = None
        self.builder_optimization_level = 3
        self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default
        self.pools: dict[MemoryPoolType, int] = {}
        self.cache: ITimingCache | None = None
        self.profiles: list[IOptimizationProfile] = []

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = int(pool_size)

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache({})
        parsed = json.loads(data)
        return ITimingCache(dict(parsed["entries"]) if parsed.get("device") != "other" else {"__mismatch__": 1})

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if "__mismatch__" in cache.entries and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.cache

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: ILogger, trt: FakeTensorRT):
        if trt.no_gpu:
            logger.log(_Severity.ERROR, "createInferBuilder: CUDA initialization failure with error: 35. "
                                        "Please check your CUDA installation")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger, self.trt = logger, trt

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self.trt)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if network.strongly_typed and any(f.name in ("FP16", "BF16", "INT8", "FP8", "INT4") for f in config.flags):
            raise SimError("precision flags on a strongly typed network")
        shapes = {p: s for prof in config.profiles for p, s in prof.shapes.items()}
        for t in network.inputs:
            if any(d < 0 for d in t.shape) and t.name not in shapes:
                self.logger.log(_Severity.ERROR, f"{t.name}: dynamic input without an optimization profile")
                return None
        if config.progress_monitor is not None and not self._report_progress(config.progress_monitor, network):
            self.logger.log(_Severity.ERROR, "Build was cancelled by the progress monitor")
            return None
        if config.cache is not None:
            key = Path(network.onnx).name
            config.cache.entries[key] = config.cache.entries.get(key, 0) + 1
            self.trt.stats["timing_cache_hits"] += int(config.cache.entries[key] > 1)
        plan = {
            "sim-engine": 1, "tensorrt": self.trt.__version__, "onnx": network.onnx,
            "strongly_typed": network.strongly_typed, "flags": sorted(f.name for f in config.flags),
            "level": config.builder_optimization_level, "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
            "io": [{"name": t.name, "mode": mode, "shape": list(t.shape), "dtype": t.dtype.value,
                    "graph_dtype": network.graph_dtypes[t.name], "profile": [list(s) for s in shapes.get(t.name, ())]}
                   for mode, ts in (("input", network.inputs), ("output", network.outputs)) for t in ts],
        }
        return json.dumps(plan).encode()

    def _report_progress(self, monitor: IProgressMonitor, network: INetworkDefinition) -> bool:
        """A top phase with a nested one, a step per network input; False: cancelled (the
        phases are then left unfinished)."""
        self.trt.stats["monitored_builds"] += 1
        monitor.phase_start("Building engine", None, 2)
        monitor.phase_start("Tactic selection", "Building engine", len(network.inputs))
        for step in range(len(network.inputs)):
            if not monitor.step_complete("Tactic selection", step):
                return False
        monitor.phase_finish("Tactic selection")
        for step in range(2):
            if not monitor.step_complete("Building engine", step):
                return False
        monitor.phase_finish("Building engine")
        return True


class Runtime:
    def __init__(self, logger: ILogger, trt: FakeTensorRT):
        if trt.no_gpu:  # as real TensorRT: a log line, then pybind's null factory
            logger.log(_Severity.ERROR, "createInferRuntime: CUDA initialization failure with error: 35. "
                                        "Please check your CUDA installation")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger, self.trt = logger, trt

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        try:
            plan = json.loads(bytes(memoryview(serialized_engine)))
            assert plan.get("sim-engine") == 1
        except Exception:
            self.logger.log(_Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                             "(Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
            return None
        if plan["tensorrt"] != self.trt.__version__:
            self.logger.log(_Severity.ERROR, "The engine plan file is not compatible with this version of "
                                             "TensorRT")
            return None
        return ICudaEngine(plan, self.trt)


class ICudaEngine:
    def __init__(self, plan: dict[str, Any], trt: FakeTensorRT):
        self.plan, self.trt = plan, trt
        self.io = {t["name"]: t for t in plan["io"]}
        self.names = [t["name"] for t in plan["io"]]
        self._session = None
        trt.stats["engines_loaded"] += 1
        trt.live_engines += 1

    def __del__(self) -> None:
        self.trt.live_engines -= 1

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.io[name]["mode"] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.io[name]["dtype"])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.io[name]["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.io[name]["profile"]]

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            from personaplex_edge.runtime.backends.ort import session_options

            opts = session_options(1, 0)  # as the ONNX Runtime backend runs small graphs: outputs compare bit for bit
            self._session = ort.InferenceSession(self.plan["onnx"], opts, providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes = {n: tuple(t["shape"]) for n, t in engine.io.items() if t["mode"] == "input"}

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io:
            return False
        self.addresses[name] = int(memory)
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        io = self.engine.io[name]
        shape = tuple(int(d) for d in shape)
        lo, _, hi = io["profile"] or (io["shape"],) * 3
        if len(shape) != len(io["shape"]) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def _steps(self) -> int | None:
        for name, io in self.engine.io.items():
            if io["mode"] == "input":
                for d, s in zip(io["shape"], self.shapes[name], strict=True):
                    if d < 0:
                        return s
        return None

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        io = self.engine.io[name]
        if io["mode"] == "input":
            return self.shapes[name]
        steps = self._steps()
        return tuple(steps if d < 0 else d for d in io["shape"])

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): stream_handle must be an int")
        missing = [n for n in self.engine.names if n not in self.addresses]
        if missing:
            return False
        bound = dict(self.addresses)  # what a captured graph bakes in
        shapes = {n: self.get_tensor_shape(n) for n in self.engine.names}
        ins = {bound[n] for n, t in self.engine.io.items() if t["mode"] == "input"}
        outs = [bound[n] for n, t in self.engine.io.items() if t["mode"] == "output"]
        if ins & set(outs) or len(set(outs)) != len(outs):
            raise SimError("an engine output aliases an input or another output")
        cudart = self.engine.trt.cudart
        for n in self.engine.names:
            nbytes = int(np.prod(shapes[n], dtype=np.int64)) * np.dtype(self.engine.io[n]["dtype"]).itemsize
            if cudart.where(bound[n], nbytes) != "device":
                raise SimError(f"{n}: engine tensor address is not device memory")
        self.engine.trt.stats["enqueue"] += 1
        return cudart._submit(stream_handle, lambda: self._execute(bound, shapes)) == OK

    def _execute(self, bound: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        self.engine.trt.stats["execute"] += 1
        feeds = {}
        io = self.engine.io
        for n, t in io.items():
            if t["mode"] == "input":
                feeds[n] = _view(bound[n], shapes[n], t["dtype"]).astype(t["graph_dtype"])
        names = [n for n, t in io.items() if t["mode"] == "output"]
        for n, value in zip(names, self.engine.session().run(names, feeds), strict=True):
            if tuple(value.shape) != shapes[n]:
                raise SimError(f"{n}: ran to shape {value.shape}, the context says {shapes[n]}")
            _view(bound[n], shapes[n], io[n]["dtype"])[...] = value.astype(io[n]["dtype"])


def _view(ptr: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_uint8 * max(n * dt.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, np.uint8)[: n * dt.itemsize].view(dt).reshape(shape)


class FakeTensorRT:
    """The `tensorrt` module: TensorRT 10 (weak typing flags present) or 11 (`strongly_typed_only`).
    Built for CUDA `cuda_major`: no GPU (`no_gpu`, or a driver of an older major) fails
    trt.Builder and trt.Runtime as the real one does."""

    DataType = DataType
    TensorIOMode = TensorIOMode
    ILogger = ILogger
    Logger = Logger
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType

    def __init__(self, cudart: FakeCudart, version: str = "10.3.0.30", no_gpu: bool = False,
                 strongly_typed_only: bool = False, progress_monitor: bool = True, cuda_major: int = 12):
        self.cudart, self.__version__, self._no_gpu, self.cuda_major = cudart, version, no_gpu, cuda_major
        if progress_monitor:  # TensorRT 10.0 and later
            self.IProgressMonitor = IProgressMonitor
        names = ["TF32", "DEBUG"] if strongly_typed_only else ["FP16", "BF16", "INT8", "TF32", "FP8", "INT4",
                                                               "DEBUG"]
        self.BuilderFlag = enum.Enum("BuilderFlag", names)
        self.stats: Counter[str] = Counter()
        self.live_engines = 0

    @property
    def no_gpu(self) -> bool:
        driver = self.cudart.driver
        return self._no_gpu or driver is None or driver // 1000 < self.cuda_major

    def Builder(self, logger: ILogger) -> Builder:  # noqa: N802
        return Builder(logger, self)

    def Runtime(self, logger: ILogger) -> Runtime:  # noqa: N802
        return Runtime(logger, self)

    def OnnxParser(self, network: INetworkDefinition, logger: ILogger) -> OnnxParser:  # noqa: N802
        return OnnxParser(network, logger)
