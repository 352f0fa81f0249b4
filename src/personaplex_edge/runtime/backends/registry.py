"""Pick a backend by name: the one module that knows every implementation.

It sits above the interface (`base`) and the implementations (`ort`,
`tensorrt`), so none of them imports another; each implementation is imported
only when asked for, which keeps tensorrt and onnxruntime optional.
"""

from __future__ import annotations

from personaplex_edge.runtime.core.network import Backend
from personaplex_edge.runtime.errors import PpxError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")


def make_backend(name: str, threads: int | None = None) -> Backend:
    """`ort-cpu` (development, CI, demo), `ort-cuda` / `ort-tensorrt` (ONNX Runtime on a device),
    `tensorrt` (engines built by `ppx-export engines`)."""
    if name.startswith("ort-"):
        from personaplex_edge.runtime.backends.ort import OrtBackend

        return OrtBackend(device=name[4:], threads=threads)
    if name == "tensorrt":
        from personaplex_edge.runtime.backends.tensorrt import TrtBackend

        return TrtBackend()
    raise PpxError(f"--backend: {name!r} is not one of {', '.join(BACKENDS)}")
