"""TensorRT backend: engines from `ppx-export engines`, state resident on the GPU.

Same interface as the ONNX Runtime backend (`core.network`). Per network:

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
package imports without them (tests inject stand-ins for both).

Modules: `copies` plans the ring and snapshot copies (pure, tested on CPU),
`cuda` wraps the CUDA runtime calls and device buffers, `engine` runs one
deserialized engine (it sees its network through the `EngineHost` protocol),
`backend` holds a network's state and opens engines. `cuda_versions` checks
the driver against cuda-python and TensorRT (and loads cuda-python), `device`
finds this GPU for the engines manifest's comparison, `kit` is the GPU kit's
`plan|verify` (run with `python -m`, imported by nothing here).
"""

from personaplex_edge.runtime.backends.tensorrt.backend import (
    TrtBackend,
    TrtNetwork,
    capturing_logger,
)

__all__ = ["TrtBackend", "TrtNetwork", "capturing_logger"]
