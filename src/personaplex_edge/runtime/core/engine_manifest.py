"""Engines builds: their manifest, and whether this device can run them.

`ppx-export engines` writes a directory that is itself a build (`manifest.json`
in the build format: model, tokenizer, voices, graphs pointing at `.engine`
files, sha256 of every file) plus an `engines` section recording what the
engines are bound to: TensorRT version, GPU name, compute capability, Jetson
board and L4T release, the target profile, precisions, each engine's I/O
tensors, and the hash of the ONNX build they came from.

TensorRT engines are not portable across GPU models or TensorRT versions (and
JetPack has no hardware-compatibility mode), so the runtime compares that
record with this device and refuses with one line before loading anything.
The device query is injectable: tests pass a fake `DeviceInfo`. Nothing here
imports tensorrt or CUDA at module level.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.core import cuda_versions
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from personaplex_edge.runtime.errors import PpxError

ENGINES_KEY = "engines"
ENGINES_FORMAT_VERSION = 1
PRODUCER = "ppx-export engines"
ENGINE_SUFFIX = ".engine"
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

# Jetson modules by device-tree model -> (CUDA device name, compute capability), for when
# cuda-python is not installed. Thor reports SM 10.1 under CUDA 12 and 11.0 under CUDA 13;
# JetPack 7 ships CUDA 13.
_JETSON_GPUS = (("Orin", ("Orin", "8.7")), ("Thor", ("NVIDIA Thor", "11.0")),
                ("Xavier", ("Xavier", "7.2")))


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU and TensorRT an engine is built for, or that the runtime finds."""

    gpu: str  # CUDA device name: "Orin", "NVIDIA GeForce RTX 4090"
    compute_capability: str  # "8.7"
    tensorrt: str | None = None  # "10.3.0"
    board: str | None = None  # Jetson device-tree model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None = None  # L4T release from /etc/nv_tegra_release, e.g. "36.4.0"
    memory_bytes: int | None = None
    source: str = "cuda"  # how gpu/compute_capability were found: cuda, nvidia-smi, device-tree

    @property
    def jetpack(self) -> str | None:
        """JetPack major release of the L4T release (R35 -> 5, R36 -> 6, R38 -> 7)."""
        if not self.l4t:
            return None
        return {"35": "5", "36": "6", "38": "7"}.get(self.l4t.split(".")[0])

    def describe(self) -> str:
        trt = f", TensorRT {trt_release(self.tensorrt)}" if self.tensorrt else ""
        name = self.board or self.gpu
        return f"{name} (SM {self.compute_capability}{trt})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["jetpack"] = self.jetpack
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DeviceInfo:
        return DeviceInfo(str(d["gpu"]), str(d["compute_capability"]), d.get("tensorrt"), d.get("board"),
                          d.get("l4t"), d.get("memory_bytes"), d.get("source", "cuda"))


@dataclass(frozen=True)
class EngineInfo:
    graph: str
    file: str
    precision: str
    bytes: int
    io: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class EngineManifest:
    manifest: Manifest
    built_on: DeviceInfo
    target: str
    precision: dict[str, str]
    engines: dict[str, EngineInfo]  # graph key -> engine
    source_build: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.manifest.root


def trt_release(version: str | None) -> str:
    """major.minor.patch of a TensorRT version string ('10.3.0.30' -> '10.3.0')."""
    if not version:
        return "unknown"
    parts = re.findall(r"\d+", str(version))[:3]
    return ".".join(parts + ["0"] * (3 - len(parts)))


def is_engines_build(manifest: Manifest) -> bool:
    return ENGINES_KEY in manifest.data


def engine_manifest(source: Manifest | Path | str) -> EngineManifest:
    """Read and validate the engines section of an engines build directory (or its manifest)."""
    manifest = source if isinstance(source, Manifest) else load_manifest(Path(source))
    path = manifest.root / MANIFEST_NAME
    section = manifest.data.get(ENGINES_KEY)
    if section is None:
        raise PpxError(f"{path}: this is an ONNX build, not TensorRT engines: build them on the device "
                       f"with `ppx-export engines --build {manifest.root} --target NAME --out DIR`")
    if not isinstance(section, dict) or section.get("format_version") != ENGINES_FORMAT_VERSION:
        raise PpxError(f"{path}: engines.format_version: {section.get('format_version') if isinstance(section, dict) else section!r}"
                       f", this runtime reads {ENGINES_FORMAT_VERSION}; rebuild the engines")
    try:
        built_on = DeviceInfo.from_dict(section["device"])
        engines = {}
        for key, e in section["networks"].items():
            engines[key] = EngineInfo(key, e["file"], e["precision"], int(e["bytes"]), tuple(e["io"]))
            if manifest.graphs.get(key) is None or manifest.graphs[key].file != e["file"]:
                raise PpxError(f"{path}: engines.networks.{key}: no graph entry for {e['file']}")
        return EngineManifest(manifest, built_on, str(section["target"]["name"]), dict(section["precision"]),
                              engines, dict(section.get("source_build", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise PpxError(f"{path}: engines: malformed section ({type(exc).__name__}: {exc})") from None


def compare_device(engines: EngineManifest, device: DeviceInfo) -> list[str]:
    """Problems running `engines` on `device`: one line naming both, or none."""
    built = engines.built_on
    if device.tensorrt is None:
        return [f"{engines.root}: TensorRT is not installed here; these engines need TensorRT "
                f"{trt_release(built.tensorrt)} (on a Jetson it comes with JetPack)"]
    differs = []
    if trt_release(built.tensorrt) != trt_release(device.tensorrt):
        differs.append("TensorRT version")
    if built.compute_capability != device.compute_capability:
        differs.append("compute capability")
    elif built.source == device.source and built.gpu != device.gpu:
        differs.append("GPU model")  # names compare only when found the same way
    elif built.board and device.board and built.board != device.board:
        differs.append("board")
    if not differs:
        return []
    return [f"{engines.root}: engines were built for {built.describe()} but this device is "
            f"{device.describe()} ({' and '.join(differs)} {'differs' if len(differs) == 1 else 'differ'}): rebuild with `ppx-export engines` "
            "on this device"]


def check_files(engines: EngineManifest, hash_files: bool = True) -> list[str]:
    """Every file present with its size (engines) and, with `hash_files`, its sha256."""
    problems = []
    for info in engines.engines.values():
        path = engines.root / info.file
        if not path.is_file():
            problems.append(f"{path}: engine listed in the manifest but missing")
        elif path.stat().st_size != info.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes} "
                            "(truncated or replaced)")
    if hash_files and not problems:
        try:
            engines.manifest.verify_files()
        except PpxError as exc:
            problems.append(str(exc))
    return problems


def check_engines(source: Manifest | Path | str, device: DeviceInfo | None = None,
                  query: Callable[[], DeviceInfo] | None = None, hash_files: bool = True) -> list[str]:
    """Everything that stops these engines from running here, one line each (empty: fine).

    For `ppx-runtime check`: the manifest, every file's sha256, and the TensorRT
    version / GPU against this device (`device`, else `query()`, else `query_device()`)."""
    try:
        engines = engine_manifest(source)
    except PpxError as exc:
        return [str(exc)]
    problems = check_files(engines, hash_files)
    if device is None:
        try:
            device = (query or query_device)()
        except PpxError as exc:
            return problems + [str(exc)]
    return problems + compare_device(engines, device)


def ensure_compatible(engines: EngineManifest, device: DeviceInfo) -> None:
    """Raise the first problem (the runtime's refusal) - sizes only, no hashing at start-up."""
    problems = check_files(engines, hash_files=False) + compare_device(engines, device)
    if problems:
        raise PpxError(problems[0])


# -- this device ------------------------------------------------------------------

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
    from importlib import metadata

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
            driver = cuda_versions.driver_version()
            want = (cuda_versions.cuda_python_requirement(driver, cuda_versions.is_jetson()) if driver
                    else "cuda-python>=12.2")
            raise PpxError(f"cuda-python is not installed: pip install '{want}' (the TensorRT backend uses "
                           "the CUDA runtime API through it)") from None
    try:
        cuda_versions.check_cudart(cudart)
    except PpxError:
        if required:
            raise
        return None
    return cudart
