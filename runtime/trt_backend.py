"""TensorRT backend: engines from `ppx-export engines`, state resident on the GPU.

Same interface as the ONNX Runtime backend (runtime/backend.py). Per network:

- Every state tensor lives in device memory for the whole conversation: ring KV
  caches (one buffer each) and conv tails (two buffers each, see below). Only
  per-call inputs (tokens, sampling settings and noise, audio) and per-call
  outputs (tokens, audio, hidden/logits) cross host <-> device, through pinned
  host buffers; the offset is one pinned int64.
- Tensor addresses are bound once when an engine is loaded. Cache updates
  (`new_k.i` [1,H,D,T], `new_v.i` [1,H,T,D]) are written into the ring slot
  (offset + t) % C on the device with cudaMemcpy2DAsync: K (slot axis 3) is a
  strided column - H*D rows of T elements, destination pitch C elements - and
  V (slot axis 2) is H blocks of T*D contiguous elements, pitch C*D. A call that
  wraps the ring is two copies.
- state_out -> state_in is double-buffered: each conv tail has buffers A and B;
  even calls read A and write B, odd calls read B and write A. Nothing is
  copied; the addresses alternate.
- CUDA graphs: a static-shape call is captured once per parity - the pinned
  H2D input copies, execute_async_v3 and the D2H output copies on a
  non-blocking stream - after one eager warm-up call of that parity, and later
  calls are a single cudaGraphLaunch. Double buffering makes the addresses
  alternate, so a network with conv state keeps two graphs (even and odd calls)
  rather than copying state_out back into state_in every call: two small graph
  executables cost nothing per frame, a copy per state tensor costs a memcpy
  node each. Networks without conv state (temporal, depformer) have one. The
  ring-slot copies stay outside the graph: their destination moves with the
  offset every call. Dynamic-shape calls (temporal prefill) run eagerly. An
  engine whose enqueue cannot be captured falls back to eager calls.
- The temporal prefill engine holds the same weights as the step engine and is
  only needed to compile a persona snapshot: it is loaded on the first prefill
  call and released at the next step call (engines/README.md).

Why cuda-python and not pycuda: NVIDIA's TensorRT samples moved to cuda-python
(10.13-10.14); it is a thin, maintained binding of the CUDA runtime API that
works with the primary context TensorRT itself uses, and ships wheels per CUDA
major. pycuda has to be compiled against each CUDA release, creates its own
context (autoinit) that competes with TensorRT's, and is not maintained for
JetPack.

tensorrt and cuda-python are imported when the backend is first used, so this
module imports without them (tests inject stand-ins for both).
"""

from __future__ import annotations

import ctypes
import mmap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import NETWORKS, initial_value
from .engine_manifest import (
    DeviceInfo,
    EngineManifest,
    engine_manifest,
    ensure_compatible,
    import_cudart,
    query_device,
)
from .errors import PpxError
from .manifest import GraphInfo, Manifest, TensorInfo

PREFILL_GRAPH = "temporal_prefill"
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "UINT8": np.uint8}


# -- device copy planning (pure; tested on CPU) -----------------------------------------

@dataclass(frozen=True)
class Copy2D:
    """One cudaMemcpy2D: `height` rows of `width` bytes, at byte offsets with pitches."""

    dst_offset: int
    dpitch: int
    src_offset: int
    spitch: int
    width: int
    height: int


def _split(shape: tuple[int, ...], axis: int, itemsize: int) -> tuple[int, int]:
    """(rows before the axis, bytes per slot) of a C-contiguous tensor."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) * itemsize
    return outer, inner


def ring_copies(cache_shape: tuple[int, ...], axis: int, offset: int, steps: int, itemsize: int) -> list[Copy2D]:
    """Copies writing a packed update (cache_shape with `steps` along `axis`) into the ring
    slots (offset + t) % capacity: one copy, or two when the slots wrap."""
    capacity = cache_shape[axis]
    if not 0 < steps <= capacity:
        raise ValueError(f"{steps} steps do not fit a ring of {capacity}")
    outer, inner = _split(cache_shape, axis, itemsize)
    start = offset % capacity
    first = min(steps, capacity - start)
    copies = [Copy2D(start * inner, capacity * inner, 0, steps * inner, first * inner, outer)]
    if first < steps:
        copies.append(Copy2D(0, capacity * inner, first * inner, steps * inner, (steps - first) * inner, outer))
    return copies


def slots_copy(cache_shape: tuple[int, ...], axis: int, slots: int, itemsize: int) -> Copy2D:
    """The first `slots` ring slots of a cache (dst) <-> a packed array with `slots` along
    `axis` (src): used for partial snapshots; swap the roles for restores."""
    outer, inner = _split(cache_shape, axis, itemsize)
    return Copy2D(0, cache_shape[axis] * inner, 0, slots * inner, slots * inner, outer)


def apply_copy_2d(dst: np.ndarray, src: np.ndarray, c: Copy2D) -> None:
    """What cudaMemcpy2D does, on byte arrays (the CPU reference of the copy plans)."""
    d = dst.reshape(-1).view(np.uint8)
    s = src.reshape(-1).view(np.uint8)
    for row in range(c.height):
        d[c.dst_offset + row * c.dpitch: c.dst_offset + row * c.dpitch + c.width] = \
            s[c.src_offset + row * c.spitch: c.src_offset + row * c.spitch + c.width]


# -- CUDA through cuda-python ------------------------------------------------------------

class Cuda:
    """The few CUDA runtime calls the backend makes, with errors as one-line PpxErrors."""

    def __init__(self, cudart: Any):
        self.rt = cudart
        self._blocking_sync()
        self.H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.D2D = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def _blocking_sync(self) -> None:
        """Wait for the GPU by sleeping, not spinning: on a Jetson the spinning core is one the
        audio threads need. Best effort: it only takes before the context exists."""
        set_flags = getattr(self.rt, "cudaSetDeviceFlags", None)
        flag = getattr(self.rt, "cudaDeviceScheduleBlockingSync", None)
        if set_flags is not None and flag is not None:
            set_flags(int(flag))  # an error (context already active) just keeps the default

    def call(self, what: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            try:
                name = self.rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                name = f"error {int(err)}"
            raise PpxError(f"CUDA {what} failed: {name}")
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else (result[1:] if len(result) > 2 else None)
        return None

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)  # best effort at teardown

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> tuple[int, np.ndarray]:
        """Page-locked host memory as a numpy array: async copies and graph-captured copies
        need it (pageable memory cannot be captured)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * dtype.itemsize, 1)
        ptr = int(self.call("cudaMallocHost", self.rt.cudaMallocHost(nbytes)))
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return ptr, np.frombuffer(raw, dtype=np.uint8)[: count * dtype.itemsize].view(dtype).reshape(shape)

    def free_host(self, ptr: int) -> None:
        self.rt.cudaFreeHost(ptr)

    def stream(self) -> Any:
        return self.call("cudaStreamCreateWithFlags",
                         self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def sync(self, stream: Any) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def copy(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> None:
        self.call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream))

    def copy_2d(self, dst: int, src: int, c: Copy2D, kind: Any, stream: Any) -> None:
        self.call("cudaMemcpy2DAsync", self.rt.cudaMemcpy2DAsync(
            dst + c.dst_offset, c.dpitch, src + c.src_offset, c.spitch, c.width, c.height, kind, stream))

    def memset(self, ptr: int, nbytes: int, stream: Any) -> None:
        self.call("cudaMemsetAsync", self.rt.cudaMemsetAsync(ptr, 0, nbytes, stream))

    def begin_capture(self, stream: Any) -> None:
        # Thread-local: CUDA calls of other threads (audio I/O, a second network) neither
        # invalidate this capture nor get refused while it runs.
        self.call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(
            stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self, stream: Any) -> Any | None:
        """The graph executable, or None when the capture failed (as trtexec handles it)."""
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if int(err) != 0 or graph is None:
            self.rt.cudaGetLastError()
            return None
        err, exec_ = self.rt.cudaGraphInstantiate(graph, 0)
        self.rt.cudaGraphDestroy(graph)
        if int(err) != 0:
            self.rt.cudaGetLastError()
            return None
        return exec_

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.call("cudaGraphLaunch", self.rt.cudaGraphLaunch(graph_exec, stream))

    def destroy_graph(self, graph_exec: Any) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)


class _Buffer:
    """A device tensor, optionally with a pinned host mirror."""

    def __init__(self, cuda: Cuda, shape: tuple[int, ...], dtype: Any, host: bool):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = cuda.malloc(self.nbytes)
        self.host_ptr, self.host = cuda.pinned(shape, self.dtype) if host else (0, None)

    def free(self, cuda: Cuda) -> None:
        cuda.free(self.ptr)
        if self.host_ptr:
            cuda.free_host(self.host_ptr)


# -- one engine of a network -----------------------------------------------------------

class _Engine:
    """A deserialized engine with its context, per-call buffers and captured graphs."""

    def __init__(self, net: TrtNetwork, graph: GraphInfo, path: Path):
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
        self.inputs: dict[str, _Buffer] = {}  # per-call inputs (host mirrored)
        self.outputs: dict[str, _Buffer] = {}  # per-call outputs (host mirrored)
        self.updates: dict[str, _Buffer] = {}  # cache updates (device only)
        self.dynamic = False
        max_steps = self._max_steps(names, graph)
        for name in names:
            spec = specs[name]
            if self.engine.is_shape_inference_io(name):
                raise PpxError(f"{path}: {name} is a shape tensor in this engine; the runtime feeds "
                               "device tensors only")
            dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(name), path, name)
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
                self.updates[name] = _Buffer(cuda, shape, dtype, host=False)
            elif spec in graph.inputs:
                self.inputs[name] = _Buffer(cuda, shape, dtype, host=True)
            else:
                self.outputs[name] = _Buffer(cuda, shape, dtype, host=True)
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
        if not self.context.execute_async_v3(_handle(stream)):
            raise PpxError(f"{self.key}: TensorRT enqueue failed")
        for name, buf in self.outputs.items():
            cuda.copy(buf.host_ptr, buf.ptr, self._nbytes(name, buf), cuda.D2H, stream)

    def _nbytes(self, name: str, buf: _Buffer) -> int:
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


def _numpy_dtype(trt: Any, dtype: Any, path: Path, name: str) -> Any:
    key = str(getattr(dtype, "name", dtype)).split(".")[-1]
    if key not in _NUMPY:
        raise PpxError(f"{path}: {name} is {key} in the engine; the runtime feeds FP32/FP16/INT/BOOL tensors "
                       "(keep engine I/O in those types)")
    return _NUMPY[key]


def _handle(stream: Any) -> int:
    """TensorRT takes the stream as an integer handle; cuda-python's cudaStream_t converts."""
    return int(stream)


# -- the network -----------------------------------------------------------------------

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
        self.caches: dict[str, _Buffer] = {}
        self.state: dict[str, tuple[_Buffer, _Buffer]] = {}  # state_in name -> parity buffers
        for name_, spec in self._specs.items():
            shape = tuple(int(d) for d in spec.shape)
            if spec.role == "cache":
                self.caches[name_] = _Buffer(self.cuda, shape, spec.dtype, host=False)
            else:
                self.state[name_] = (_Buffer(self.cuda, shape, spec.dtype, host=False),
                                     _Buffer(self.cuda, shape, spec.dtype, host=False))
        self.offset_buf = _Buffer(self.cuda, (1,), np.int64, host=True)
        self._initial = {n: initial_value(s.shape, s.dtype, s.init) for n, s in self._specs.items()
                         if s.role == "state_in"}
        self._engines: dict[str, _Engine] = {}
        for key in self._graphs:
            if key != PREFILL_GRAPH:  # loaded on demand (persona compiles only)
                self._engines[key] = _Engine(self, self._graphs[key], self._paths[key])
        self._parity = 0
        self._offset = 0
        self.run_ms = 0.0
        self._closed = False
        self.reset()

    @property
    def offset(self) -> int:
        return self._offset

    def _engine(self, graph: str) -> _Engine:
        if graph not in self._graphs:
            raise PpxError(f"{self.name}: no engine for graph {graph!r}")
        if graph != PREFILL_GRAPH and PREFILL_GRAPH in self._engines:
            self._engines.pop(PREFILL_GRAPH).release()  # the compile is over: give the memory back
        if graph not in self._engines:
            self._engines[graph] = _Engine(self, self._graphs[graph], self._paths[graph])
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

    def _upload(self, buf: _Buffer, value: np.ndarray) -> None:
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
                raise PpxError("tensorrt is not installed: on a Jetson it comes with JetPack "
                               "(python3-libnvinfer); elsewhere pip install 'personaplex-edge[tensorrt]'") from None
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
            self._runtime = trt.Runtime(self._logger)
            if self._runtime is None:
                raise PpxError("TensorRT cannot create a runtime (no CUDA GPU?)")
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
