"""This device's GPU and TensorRT, as the `DeviceInfo` an engines build is compared with.

The GPU name and compute capability come from cuda-python (`cuda_versions.import_cudart`); without
a usable one (none, no libcuda, a runtime newer than the driver) from nvidia-smi (dGPU) or the
Jetson device tree. The Jetson board and L4T release come from the device tree and
/etc/nv_tegra_release, the TensorRT version from the installed package. The comparison itself is
backend-neutral and lives in `core.engine_manifest`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from personaplex_edge.runtime.backends.tensorrt.cuda_versions import import_cudart
from personaplex_edge.runtime.core.engine_manifest import DeviceInfo
from personaplex_edge.runtime.errors import PpxError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

# Jetson modules by device-tree model -> (CUDA device name, compute capability), for when
# cuda-python is not installed. Thor reports SM 10.1 under CUDA 12 and 11.0 under CUDA 13;
# JetPack 7 ships CUDA 13.
_JETSON_GPUS = (("Orin", ("Orin", "8.7")), ("Thor", ("NVIDIA Thor", "11.0")),
                ("Xavier", ("Xavier", "7.2")))


def query_device(tensorrt_version: str | None = None) -> DeviceInfo:
    """The GPU (device 0) and TensorRT of this machine.

    GPU name and compute capability from cuda-python's cudaGetDeviceProperties;
    without a usable cuda-python (none, no libcuda, a runtime newer than the driver), from
    nvidia-smi (dGPU) or the Jetson device tree. The
    TensorRT version from the installed package (no import of the library)."""
    board = _device_tree_model()
    l4t = parse_nv_tegra_release(NV_TEGRA_RELEASE.read_text()) if NV_TEGRA_RELEASE.is_file() else None
    trt = tensorrt_version or installed_tensorrt_version()
    found = _cuda_properties() or _nvidia_smi() or _jetson_gpu(board)
    if found is None:
        raise PpxError("no CUDA GPU found (no cuda-python device, no nvidia-smi, not a Jetson): TensorRT "
                       "engines run only on the GPU they were built on")
    gpu, cc, memory, source = found
    return DeviceInfo(gpu, cc, trt, board, l4t, memory, source)


def installed_tensorrt_version() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_lean", "tensorrt-cu12-bindings"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # JetPack's apt package may carry no dist metadata
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        return None


def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, GCID: ...' -> '36.4.0'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def _device_tree_model() -> str | None:
    try:
        return DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        return None


def _cuda_properties() -> tuple[str, str, int, str] | None:
    cudart = import_cudart(required=False)
    if cudart is None:
        return None
    try:  # cuda-python 12.5 and older raise RuntimeError where there is no usable libcuda
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            return None
        err, prop = cudart.cudaGetDeviceProperties(0)
    except RuntimeError:
        return None
    if int(err) != 0:
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\0").strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem), "cuda"


def _nvidia_smi() -> tuple[str, str, int, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        name, cc, mem = (s.strip() for s in out.splitlines()[0].split(","))
        return name, cc, int(float(mem)) << 20, "nvidia-smi"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _jetson_gpu(board: str | None) -> tuple[str, str, int, str] | None:
    if not board:
        return None
    for key, (gpu, cc) in _JETSON_GPUS:
        if key in board:
            return gpu, cc, 0, "device-tree"
    return None
