"""The build manifest: the contract between `ppx-export` and the runtime.

A build directory holds one graph per network plus `manifest.json`, which
records every file with its sha256, every graph tensor with its shape, dtype
and role, the model config, and the hashes of the source checkpoint files.
The runtime trusts nothing else about a build.

The manifest carries its own digest (`manifest_sha256`, over its canonical JSON
without that field), so an edited or damaged manifest is refused like a damaged
graph file. `write_manifest` is the one way the export toolchain writes one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# sha256_file is re-exported: the export toolchain hashes its files through this module.
from personaplex_edge.runtime.core.integrity import sha256_file as sha256_file
from personaplex_edge.runtime.core.integrity import verify_build
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.utf8 import decode_utf8

FORMAT = "personaplex-edge/build"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SELF_DIGEST = "manifest_sha256"

# The networks a complete build has, by manifest key.
GRAPH_KEYS = ("mimi_encoder", "mimi_decoder", "temporal_step", "temporal_prefill", "depformer")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    role: str
    pair: str | None = None
    slot_axis: int | None = None
    doc: str = ""
    init: float | bool | None = None  # initial fill of a state input (None: zeros)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorInfo:
        return TensorInfo(d["name"], d["dtype"], tuple(d["shape"]), d["role"], d.get("pair"),
                          d.get("slot_axis"), d.get("doc", ""), d.get("init"))


@dataclass(frozen=True)
class GraphInfo:
    key: str
    file: str
    data_file: str | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def by_role(self, role: str) -> list[TensorInfo]:
        return [t for t in (*self.inputs, *self.outputs) if t.role == role]


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]
    graphs: dict[str, GraphInfo]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def files(self) -> dict[str, str]:
        return self.data["files"]

    @property
    def digest(self) -> str:
        """The manifest's own sha256: names this exact build (stamps, snapshots)."""
        return self.data[SELF_DIGEST]

    def path(self, name: str) -> Path:
        return self.root / name

    def graph(self, key: str) -> GraphInfo:
        if key not in self.graphs:
            raise PpxError(f"{self.root / MANIFEST_NAME}: graphs: no {key!r} graph in this build")
        return self.graphs[key]

    def verify_files(self, stamp_dir: Path | None = None) -> int:
        """Check every listed file exists with its recorded sha256 (PpxError naming the first
        that does not). With `stamp_dir`, files unchanged since they were last hashed are trusted
        (core/integrity.py says why that is safe); returns how many files were hashed."""
        return verify_build(self, stamp_dir)


def graph_info_to_dict(key: str, file: str, data_file: str | None, specs: list[dict[str, Any]],
                       input_names: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    inputs = [s for s in specs if s["name"] in input_names]
    outputs = [s for s in specs if s["name"] not in input_names]
    return {"file": file, "data_file": data_file, "inputs": inputs, "outputs": outputs, "meta": meta}


def load_manifest(build_dir: Path) -> Manifest:
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME
    if build_dir.exists() and not build_dir.is_dir():
        raise PpxError(f"{build_dir}: not a directory (--build takes the build directory from "
                       "`ppx-export onnx`)")
    try:
        data = json.loads(decode_utf8(path.read_bytes(), path))
    except FileNotFoundError:
        raise PpxError(f"{path}: not found (is {build_dir} a build directory from `ppx-export onnx`?)") from None
    except OSError as exc:
        raise PpxError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PpxError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PpxError(f"{path}: format: not a PersonaPlex Edge build manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise PpxError(f"{path}: format_version: {data.get('format_version')!r}, this runtime reads "
                       f"{FORMAT_VERSION}; re-export the build")
    for key in ("model", "files", "graphs"):
        if key not in data:
            raise PpxError(f"{path}: missing field {key!r}")
    if SELF_DIGEST not in data:
        raise PpxError(f"{path}: {SELF_DIGEST}: missing (written by an older ppx-export): re-export "
                       "the build")
    if data[SELF_DIGEST] != manifest_digest(data):
        raise PpxError(f"{path}: {SELF_DIGEST}: the manifest was modified or is corrupt (its digest "
                       "does not match its content): re-export or copy the build again")
    graphs: dict[str, GraphInfo] = {}
    for key, g in data["graphs"].items():
        try:
            graphs[key] = GraphInfo(
                key, g["file"], g.get("data_file"),
                tuple(TensorInfo.from_dict(t) for t in g["inputs"]),
                tuple(TensorInfo.from_dict(t) for t in g["outputs"]), g.get("meta", {}))
        except (KeyError, TypeError) as exc:
            raise PpxError(f"{path}: graphs.{key}: malformed entry ({exc})") from None
    return Manifest(build_dir, data, graphs)


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, compact), its own digest left out."""
    body = {k: v for k, v in data.items() if k != SELF_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(directory: Path, data: dict[str, Any]) -> Path:
    """Write `manifest.json` into `directory` (a build being assembled), sealed with its digest."""
    sealed = {**{k: v for k, v in data.items() if k != SELF_DIGEST}}
    sealed[SELF_DIGEST] = manifest_digest(sealed)
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(sealed, indent=2))
    return path
