"""One deserialized TensorRT engine: its context, per-call buffers and captured CUDA graphs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from personaplex_edge.runtime.backends.tensorrt.copies import ring_copies
from personaplex_edge.runtime.backends.tensorrt.cuda import Cuda, DeviceBuffer
from personaplex_edge.runtime.core.manifest import GraphInfo
from personaplex_edge.runtime.errors import PpxError


class EngineLoader(Protocol):
    """What opens engines (the backend): deserializes them and says whether to capture graphs."""

    @property
    def cuda_graphs(self) -> bool: ...

    def deserialize(self, path: Path) -> Any: ...


class EngineHost(Protocol):
    """The network an engine runs in (`backend.TrtNetwork`, which imports this module, not the
    reverse): the state and caches its engines share, and the offset they read."""

    @property
    def backend(self) -> EngineLoader: ...

    @property
    def trt(self) -> Any: ...

    @property
    def cuda(self) -> Cuda: ...

    @property
    def caches(self) -> Mapping[str, DeviceBuffer]: ...

    @property
    def state(self) -> Mapping[str, tuple[DeviceBuffer, DeviceBuffer]]: ...

    @property
    def offset_buf(self) -> DeviceBuffer: ...

_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "UINT8": np.uint8}


class LoadedEngine:
    """A deserialized engine with its context, per-call buffers and captured graphs."""

    def __init__(self, net: EngineHost, graph: GraphInfo, path: Path):
        self.net, self.graph, self.key = net, graph, graph.key
        trt, cuda = net.trt, net.cuda
        self.engine = net.backend.deserialize(path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PpxError(f"{path}: TensorRT cannot create an execution context (out of GPU memory?)")
        specs = {t.name: t for t in (*graph.inputs, *graph.outputs)}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if set(names) != set(specs):
            raise PpxError(f"{path}: engine tensors {sorted(set(names) ^ set(specs))} do not match the "
                           f"manifest's {graph.key} graph: rebuild the engines")
        self.inputs: dict[str, DeviceBuffer] = {}  # per-call inputs (host mirrored)
        self.outputs: dict[str, DeviceBuffer] = {}  # per-call outputs (host mirrored)
        self.updates: dict[str, DeviceBuffer] = {}  # cache updates (device only)
        self.dynamic = False
        max_steps = self._max_steps(names, graph)
        for name in names:
            spec = specs[name]
            if self.engine.is_shape_inference_io(name):
                raise PpxError(f"{path}: {name} is a shape tensor in this engine; the runtime feeds "
                               "device tensors only")
            dtype = numpy_dtype(trt, self.engine.get_tensor_dtype(name), path, name)
            if np.dtype(dtype) != np.dtype(spec.dtype):
                raise PpxError(f"{path}: {name} is {np.dtype(dtype)} in the engine, {spec.dtype} in the "
                               "manifest: rebuild the engines")
            dims = tuple(self.engine.get_tensor_shape(name))
            self.dynamic |= any(d < 0 for d in dims)
            shape = tuple(max_steps if d < 0 else int(d) for d in dims)
            role = spec.role
            if role in ("state_in", "cache", "offset", "state_out"):
                continue  # network-owned, bound below
            if role == "cache_update":
                self.updates[name] = DeviceBuffer(cuda, shape, dtype, host=False)
            elif spec in graph.inputs:
                self.inputs[name] = DeviceBuffer(cuda, shape, dtype, host=True)
            else:
                self.outputs[name] = DeviceBuffer(cuda, shape, dtype, host=True)
        self.has_offset = any(t.role == "offset" for t in graph.inputs)
        self.state_in = [t for t in graph.inputs if t.role == "state_in"]
        self.state_out = [t for t in graph.outputs if t.role == "state_out"]
        self.cache_updates = [t for t in graph.outputs if t.role == "cache_update"]
        for name, buf in (*self.inputs.items(), *self.outputs.items(), *self.updates.items()):
            self._bind(name, buf.ptr)
        for t in graph.inputs:
            if t.role == "cache":
                self._bind(t.name, net.caches[t.name].ptr)
            elif t.role == "offset":
                self._bind(t.name, net.offset_buf.ptr)
        self.bound_parity: int | None = None
        self.graphs: dict[int, Any] = {}  # parity -> graph executable
        self.warm: set[int] = set()
        self.capturable = net.backend.cuda_graphs and not self.dynamic

    def _max_steps(self, names: list[str], graph: GraphInfo) -> int:
        """Largest T of a dynamic engine: its optimization profile's max (else the manifest's)."""
        steps = int(graph.meta.get("max_steps", 1))
        for name in names:
            dims = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in dims) and self.engine.get_tensor_mode(name) == self.net.trt.TensorIOMode.INPUT:
                hi = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
                steps = max(int(hi[i]) for i, d in enumerate(dims) if d < 0)
        return steps

    def _bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise PpxError(f"{self.key}: TensorRT refused the address of {name}")

    def bind_state(self, parity: int) -> None:
        """Point state_in at this parity's buffers and state_out at the other parity's."""
        if self.bound_parity == parity:
            return
        for t in self.state_in:
            self._bind(t.name, self.net.state[t.name][parity].ptr)
        for t in self.state_out:
            self._bind(t.name, self.net.state[t.pair][1 - parity].ptr)
        self.bound_parity = parity

    def stage(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Per-call inputs into their pinned buffers (and, for a dynamic call, their shapes)."""
        for name, buf in self.inputs.items():
            if name not in inputs:
                raise PpxError(f"{self.key}: missing input {name!r}")
            value = np.asarray(inputs[name])
            spec_shape = self.graph.input(name).shape
            if self.dynamic and any(isinstance(d, str) for d in spec_shape):
                axis = next(i for i, d in enumerate(spec_shape) if isinstance(d, str))
                steps = value.shape[axis] if value.ndim == len(spec_shape) else -1
                if not 0 < steps <= buf.shape[axis]:
                    raise PpxError(f"{self.key}: {name} has {steps} steps; the engine takes 1..{buf.shape[axis]}")
                if not self.context.set_input_shape(name, value.shape):
                    raise PpxError(f"{self.key}: TensorRT refused shape {value.shape} for {name}")
                flat = buf.host.reshape(-1)[: value.size]
                np.copyto(flat, value.reshape(-1), casting="same_kind")
            else:
                if value.shape != buf.shape:
                    raise PpxError(f"{self.key}: input {name} has shape {value.shape}, the engine takes {buf.shape}")
                np.copyto(buf.host, value, casting="same_kind")

    def enqueue(self, stream: Any) -> None:
        """H2D inputs, the engine, D2H outputs: the sequence a CUDA graph captures."""
        cuda = self.net.cuda
        if self.has_offset:
            cuda.copy(self.net.offset_buf.ptr, self.net.offset_buf.host_ptr, 8, cuda.H2D, stream)
        for name, buf in self.inputs.items():
            cuda.copy(buf.ptr, buf.host_ptr, self._nbytes(name, buf), cuda.H2D, stream)
        if not self.context.execute_async_v3(stream_handle(stream)):
            raise PpxError(f"{self.key}: TensorRT enqueue failed")
        for name, buf in self.outputs.items():
            cuda.copy(buf.host_ptr, buf.ptr, self._nbytes(name, buf), cuda.D2H, stream)

    def _nbytes(self, name: str, buf: DeviceBuffer) -> int:
        if not self.dynamic:
            return buf.nbytes
        shape = tuple(self.context.get_tensor_shape(name))
        return int(np.prod(shape, dtype=np.int64)) * buf.dtype.itemsize

    def run(self, stream: Any, parity: int) -> None:
        cuda = self.net.cuda
        if parity in self.graphs:
            cuda.launch(self.graphs[parity], stream)
            return
        self.bind_state(parity)
        if not self.capturable or parity not in self.warm:
            self.enqueue(stream)  # eager; the first call of a parity warms TensorRT up
            self.warm.add(parity)
            return
        cuda.sync(stream)
        cuda.begin_capture(stream)
        try:
            ok = self._capture_enqueue(stream)
        finally:
            graph_exec = cuda.end_capture(stream)
        if ok and graph_exec is not None:
            self.graphs[parity] = graph_exec
            cuda.launch(graph_exec, stream)
        else:
            if graph_exec is not None:
                cuda.destroy_graph(graph_exec)
            self.capturable = False  # this engine cannot be captured: eager from now on
            self.enqueue(stream)

    def _capture_enqueue(self, stream: Any) -> bool:
        try:
            self.enqueue(stream)
        except PpxError:
            return False
        return True

    def write_caches(self, stream: Any, offset: int) -> int:
        """Each cache update into its ring slots; returns the steps the call added (the
        update's extent along the slot axis: 2 per Mimi call, T per prefill call)."""
        cuda = self.net.cuda
        steps = 0
        for t in self.cache_updates:
            cache, update = self.net.caches[t.pair], self.updates[t.name]
            shape = tuple(self.context.get_tensor_shape(t.name)) if self.dynamic else update.shape
            steps = int(shape[t.slot_axis])
            for c in ring_copies(cache.shape, t.slot_axis, offset, steps, cache.dtype.itemsize):
                cuda.copy_2d(cache.ptr, update.ptr, c, cuda.D2D, stream)
        return steps

    def results(self) -> dict[str, np.ndarray]:
        out = {}
        for name, buf in self.outputs.items():
            if self.dynamic:
                shape = tuple(self.context.get_tensor_shape(name))
                out[name] = buf.host.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].reshape(shape).copy()
            else:
                out[name] = buf.host.copy()
        return out

    def release(self) -> None:
        cuda = self.net.cuda
        for g in self.graphs.values():
            cuda.destroy_graph(g)
        self.graphs.clear()
        for buf in (*self.inputs.values(), *self.outputs.values(), *self.updates.values()):
            buf.free(cuda)
        self.inputs.clear()
        self.outputs.clear()
        self.updates.clear()
        del self.context
        del self.engine


def numpy_dtype(trt: Any, dtype: Any, path: Path, name: str) -> Any:
    key = str(getattr(dtype, "name", dtype)).split(".")[-1]
    if key not in _NUMPY:
        raise PpxError(f"{path}: {name} is {key} in the engine; the runtime feeds FP32/FP16/INT/BOOL tensors "
                       "(keep engine I/O in those types)")
    return _NUMPY[key]


def stream_handle(stream: Any) -> int:
    """TensorRT takes the stream as an integer handle; cuda-python's cudaStream_t converts."""
    return int(stream)


