"""Engines builds: their manifest, and whether this device can run them.

`ppx-export engines` writes a directory that is itself a build (`manifest.json`
in the build format: model, tokenizer, voices, graphs pointing at `.engine`
files, sha256 of every file) plus an `engines` section recording what the
engines are bound to: TensorRT version, GPU name, compute capability, Jetson
board and L4T release, the target profile, precisions, each engine's I/O
tensors, and the hash of the ONNX build they came from.

TensorRT engines are not portable across GPU models or TensorRT versions (and
JetPack has no hardware-compatibility mode), so the runtime compares that
record with a device and refuses with one line before loading anything. This
module only reads the record and compares: probing this device (cuda-python,
nvidia-smi, the Jetson device tree) belongs to the TensorRT backend
(`backends.tensorrt.device.query_device`), which callers pass in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from personaplex_edge.runtime.errors import PpxError

ENGINES_KEY = "engines"
ENGINES_FORMAT_VERSION = 1
PRODUCER = "ppx-export engines"
ENGINE_SUFFIX = ".engine"



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
    version / GPU against this device: `device`, else `query()` (on a real machine
    `backends.tensorrt.device.query_device`). One of the two is required."""
    try:
        engines = engine_manifest(source)
    except PpxError as exc:
        return [str(exc)]
    problems = check_files(engines, hash_files)
    if device is None:
        if query is None:
            raise TypeError("check_engines: pass the device, or the query that finds it")
        try:
            device = query()
        except PpxError as exc:
            return problems + [str(exc)]
    return problems + compare_device(engines, device)


def ensure_compatible(engines: EngineManifest, device: DeviceInfo) -> None:
    """Raise the first problem (the runtime's refusal) - sizes only, no hashing at start-up."""
    problems = check_files(engines, hash_files=False) + compare_device(engines, device)
    if problems:
        raise PpxError(problems[0])
