"""The GPU kit's check: what to install for this machine's driver, and whether what is installed matches.

`python -m personaplex_edge.runtime.backends.tensorrt.kit plan` prints what scripts/gpu_kit.sh
removes and installs (`extra NAME`, `remove DIST...`, `install REQUIREMENT`); `verify` prints one
line describing the match, or the refusal on stderr (exit 1). The version rules themselves live in
`cuda_versions`; this module is not imported by the backend, so `python -m` runs it cleanly.
"""

from __future__ import annotations

import sys

from personaplex_edge.runtime.backends.tensorrt import cuda_versions as cv
from personaplex_edge.runtime.errors import PpxError


def plan(driver: int | None, jetson: bool, cudart_problem: str | None, tensorrt: str | None,
         majors: set[int]) -> list[str]:
    """What the kit does on this machine, as lines `extra NAME`, `remove DIST...`,
    `install REQUIREMENT` (none of the last two when everything matches already)."""
    extra = cv.extra_for(driver, jetson)
    assert driver is not None  # extra_for refused no driver
    lines = [f"extra {extra}"]
    trt_problem = cv.check_tensorrt(driver, majors, tensorrt or "")
    if jetson:
        if tensorrt is None:
            raise PpxError(cv.tensorrt_missing())
        if trt_problem:  # pip wheels shadowing JetPack's TensorRT
            raise PpxError(trt_problem)
    elif tensorrt is None or trt_problem:
        if majors:  # the wheels of every major share the `tensorrt` package: remove them all first
            lines.append(f"remove {cv.tensorrt_dists(majors)}")
        lines.append(f"install {cv.TENSORRT_WHEELS[driver // 1000]}")
    if cudart_problem is not None or any(line.startswith("install") for line in lines):
        lines.append(f"install {cv.cuda_python_requirement(driver, jetson)}")
    return lines


def _cudart() -> tuple[str | None, int]:
    """(the one-line problem of cuda-python here or None, its runtime version)."""
    try:
        cudart = cv.import_cudart()
    except PpxError as exc:
        return str(exc), 0
    return None, cv.runtime_version(cudart)


def _tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def main(argv: list[str] | None = None) -> int:
    """`plan`: print what to remove and install for this driver (see `plan`); `verify`: one line
    describing the match, or the refusal on stderr (exit 1)."""
    args = sys.argv[1:] if argv is None else argv
    driver, jetson = cv.driver_version(), cv.is_jetson()
    try:
        problem, runtime = _cudart()
        trt = _tensorrt_version()
        lines = plan(driver, jetson, problem, trt, cv.tensorrt_cuda_majors())
        if args[:1] == ["plan"]:
            print("\n".join(lines))
            return 0
        if trt is None:
            raise PpxError(cv.tensorrt_missing())
        if problem:
            raise PpxError(problem)
        mismatch = cv.check_tensorrt(driver, cv.tensorrt_cuda_majors(), trt)
        if mismatch:
            raise PpxError(mismatch)
    except PpxError as exc:
        print(f"gpu_kit: {exc}", file=sys.stderr)
        return 1
    source = "JetPack's" if jetson else f"pip extra {lines[0].split()[1]}"
    print(f"CUDA driver {cv.version_text(driver or 0)}, cuda-python runtime {cv.version_text(runtime)}, "
          f"TensorRT {trt} ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
