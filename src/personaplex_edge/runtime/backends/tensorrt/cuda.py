"""The CUDA runtime through cuda-python: the few calls the TensorRT backend makes.

Errors become one-line PpxErrors; `DeviceBuffer` is a device tensor with an
optional pinned host mirror.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from personaplex_edge.runtime.backends.tensorrt.copies import Copy2D
from personaplex_edge.runtime.backends.tensorrt.cuda_versions import check_cudart, no_driver
from personaplex_edge.runtime.errors import PpxError


class Cuda:
    """The few CUDA runtime calls the backend makes, with errors as one-line PpxErrors."""

    def __init__(self, cudart: Any):
        check_cudart(cudart)  # a runtime newer than the driver would fail at the first stream
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
            try:
                set_flags(int(flag))  # an error (context already active) just keeps the default
            except RuntimeError as exc:  # cuda-python 12.5 and older without a usable libcuda
                raise no_driver(exc) from None

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


class DeviceBuffer:
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


