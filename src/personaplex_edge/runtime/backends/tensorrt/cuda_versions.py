"""Which CUDA this machine's driver runs, and whether cuda-python and TensorRT match it.

cuda-python (cuda-bindings) links the CUDA runtime statically: a runtime of a newer CUDA major
than the driver's makes every call fail with error 35 (insufficient driver), so that mismatch is
refused up front. TensorRT's pip wheels come per CUDA major (tensorrt-cu12, tensorrt-cu13);
JetPack's TensorRT matches JetPack's CUDA. Each problem is one line naming both sides and the
fix. `import_cudart` is the one way the runtime loads cuda-python. The GPU kit's check
(`python -m personaplex_edge.runtime.backends.tensorrt.kit plan|verify`) is built from these.
Nothing here imports tensorrt or cuda-python at module level.
"""

from __future__ import annotations

import ctypes
from importlib import metadata
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import PpxError

NVIDIA_INDEX = "https://pypi.nvidia.com"
JETSON_RELEASE = Path("/etc/nv_tegra_release")
# pyproject.toml's extras (tests/test_cuda_versions.py keeps the two equal): TensorRT wheels and
# cuda-python of one CUDA major; on a Jetson cuda-python only, TensorRT comes with JetPack.
EXTRAS = {(12, False): "tensorrt-cu12", (13, False): "tensorrt-cu13", (12, True): "jetpack6",
          (13, True): "jetpack7"}
TENSORRT_WHEELS = {12: "tensorrt-cu12>=10.3,<11", 13: "tensorrt-cu13>=10.13.2,<11"}
MIN_DRIVER = {12: "525", 13: "580"}  # the first Linux driver of each CUDA major
NO_DRIVER = ("no CUDA driver: libcuda.so.1 cannot be loaded (in a container, start it with the NVIDIA "
             "runtime: `--runtime nvidia` on a Jetson, `--gpus all` elsewhere)")


def version_text(version: int) -> str:
    """12040 -> '12.4' (the CUDA API's version encoding)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def is_jetson() -> bool:
    return JETSON_RELEASE.is_file()


def driver_version() -> int | None:
    """The CUDA version the driver supports (12040 for 12.4), from libcuda itself, so without
    cuda-python. None: no libcuda (no driver, or a container without the NVIDIA runtime)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value or None


def extra_for(driver: int | None, jetson: bool) -> str:
    """The pip extra for this driver; one line refusing a driver without one."""
    if not driver:
        raise PpxError(NO_DRIVER)
    if (driver // 1000, jetson) not in EXTRAS:
        raise PpxError(f"the driver supports CUDA {version_text(driver)}, and TensorRT 10 and cuda-python "
                       f"here need CUDA 12 or 13: update the driver to {MIN_DRIVER[12]} or newer")
    return EXTRAS[(driver // 1000, jetson)]


def cuda_python_requirement(driver: int, jetson: bool) -> str:
    """cuda-python of the driver's CUDA major (the extras' pin). On a Jetson also no newer minor
    than JetPack's CUDA, as docker/Dockerfile.jetson pins it: 12.6 -> 'cuda-python>=12.2,<12.7'."""
    major, minor = driver // 1000, driver % 1000 // 10
    low = "12.2" if major == 12 else str(major)
    return f"cuda-python>={low},<{major}.{minor + 1}" if jetson else f"cuda-python>={low},<{major + 1}"


def install_hint(driver: int | None = None, jetson: bool | None = None) -> str:
    """`pip install` of the extra that fits this machine (both majors when there is no driver)."""
    jetson = is_jetson() if jetson is None else jetson
    driver = driver_version() if driver is None else driver
    try:
        extra = extra_for(driver, jetson)
    except PpxError:
        if jetson:
            return "pip install 'personaplex-edge[jetpack6]' (JetPack 6) or '[jetpack7]' (JetPack 7)"
        return (f"pip install 'personaplex-edge[tensorrt-cu12]' for a CUDA 12 driver, '[tensorrt-cu13]' "
                f"for CUDA 13 (driver {MIN_DRIVER[13]} or newer)")
    index = "" if jetson else f" --extra-index-url {NVIDIA_INDEX}"
    return f"pip install 'personaplex-edge[{extra}]'{index}"


def tensorrt_missing() -> str:
    """`import tensorrt` failed: what to install on this machine, in one line."""
    if is_jetson():
        return ("tensorrt is not installed: on a Jetson it comes with JetPack (apt install python3-libnvinfer, "
                f"and a venv made with --system-site-packages), then {install_hint(jetson=True)}")
    return ("tensorrt is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); "
            f"here {install_hint()}")


# -- cuda-python ---------------------------------------------------------------------------

def import_cudart(required: bool = True) -> Any:
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6, 13), else the
    older `cuda.cudart`, checked against the driver (`check_cudart`): no libcuda, or a runtime of
    a newer CUDA major than the driver's. With `required` each is a one-line error; without, None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[attr-defined,no-redef]
        except ImportError:
            if not required:
                return None
            driver = driver_version()
            want = (cuda_python_requirement(driver, is_jetson()) if driver
                    else "cuda-python>=12.2")
            raise PpxError(f"cuda-python is not installed: pip install '{want}' (the TensorRT backend uses "
                           "the CUDA runtime API through it)") from None
    try:
        check_cudart(cudart)
    except PpxError:
        if required:
            raise
        return None
    return cudart


def no_driver(exc: BaseException) -> PpxError:
    """cuda-python 12.5 and older raise RuntimeError ('Failed to dlopen libcuda.so.1', then
    'Function "cuInit" not found') instead of returning an error where there is no libcuda."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return PpxError(f"{NO_DRIVER}; cuda-python: {detail}")


def _value(result: Any) -> int:
    err, value = result
    return int(value) if int(err) == 0 and value is not None else 0


def runtime_version(cudart: Any) -> int:
    """The CUDA runtime cuda-python links (13000 for 13.0); needs no driver."""
    return _value(cudart.cudaRuntimeGetVersion())


def check_cudart(cudart: Any, jetson: bool | None = None) -> None:
    """Refuse, in one line, a cuda-python that cannot talk to this driver: no libcuda (cuda-python
    12.5 and older raise RuntimeError 'Failed to dlopen libcuda.so.1', newer ones report driver 0)
    or a runtime of a newer CUDA major than the driver's (error 35 on every call)."""
    try:
        runtime = runtime_version(cudart)
        driver = _value(cudart.cudaDriverGetVersion())
    except RuntimeError as exc:
        raise no_driver(exc) from None
    if not driver:
        raise PpxError(NO_DRIVER)
    if runtime and runtime // 1000 > driver // 1000:
        jetson = is_jetson() if jetson is None else jetson
        raise PpxError(f"cuda-python's CUDA runtime is {version_text(runtime)} but the driver supports CUDA "
                       f"{version_text(driver)}, so every CUDA call fails with error 35 (insufficient driver): "
                       f"pip install '{cuda_python_requirement(driver, jetson)}', or update the driver to "
                       f"{MIN_DRIVER.get(runtime // 1000, 'a newer one')} or newer")


# -- TensorRT -------------------------------------------------------------------------------

def tensorrt_cuda_majors() -> set[int]:
    """CUDA majors of the pip-installed TensorRT wheels (empty: JetPack's TensorRT, or none)."""
    found = set()
    for major in (11, 12, 13):
        for dist in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs"):
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            found.add(major)
    return found


def tensorrt_dists(majors: set[int]) -> str:
    """What these CUDA majors' TensorRT wheels installed (the `tensorrt` metapackage pulls cu13)."""
    names = ["tensorrt"] + [f"tensorrt-cu{m}{part}" for m in sorted(majors) for part in ("", "-libs", "-bindings")]
    return " ".join(names)


def check_tensorrt(driver: int | None, majors: set[int], version: str = "") -> str | None:
    """The one-line problem of pip TensorRT wheels against the driver, or None."""
    if not driver or not majors:
        return None
    name = f"TensorRT {version}" if version else "TensorRT"
    if len(majors) > 1:
        both = " and ".join(f"tensorrt-cu{m}" for m in sorted(majors))
        return (f"{both} are both installed and overwrite one `tensorrt` package (the driver supports "
                f"CUDA {version_text(driver)}): pip uninstall -y {tensorrt_dists(majors)}, then "
                f"{install_hint(driver, False)}")
    (major,) = majors
    if major <= driver // 1000:
        return None
    return (f"{name} is built for CUDA {major} but the driver supports CUDA {version_text(driver)}: "
            f"pip uninstall -y {tensorrt_dists(majors)}, then {install_hint(driver, False)}; "
            f"or update the driver to {MIN_DRIVER.get(major, 'a newer one')} or newer")


def tensorrt_failure(what: str, detail: str, version: str = "", otherwise: str = "") -> PpxError:
    """TensorRT could not create a builder or runtime (a TypeError from pybind, or None): no
    driver, or the driver against TensorRT's CUDA major when that is the cause, else `otherwise`
    (by default: no usable GPU). `detail` is TensorRT's own first error line."""
    driver = driver_version()
    if driver is None:
        return PpxError(f"{NO_DRIVER}; TensorRT cannot create a {what} ({detail})")
    mismatch = check_tensorrt(driver, tensorrt_cuda_majors(), version)
    if mismatch:
        return PpxError(mismatch)
    return PpxError(otherwise or f"no CUDA GPU: TensorRT cannot create a {what} ({detail})")
