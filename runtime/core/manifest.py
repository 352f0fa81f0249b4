"""The build manifest: the contract between `ppx-export` and the runtime.

A build directory holds one graph per network plus `manifest.json`, which
records every file with its sha256, every graph tensor with its shape, dtype
and role, the model config, and the hashes of the source checkpoint files.
The runtime trusts nothing else about a build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import PpxError

FORMAT = "personaplex-edge/build"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

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

    def path(self, name: str) -> Path:
        return self.root / name

    def graph(self, key: str) -> GraphInfo:
        if key not in self.graphs:
            raise PpxError(f"{self.root / MANIFEST_NAME}: graphs: no {key!r} graph in this build")
        return self.graphs[key]

    def verify_files(self) -> None:
        """Check every listed file exists with its recorded sha256."""
        for name, digest in self.files.items():
            path = self.root / name
            if not path.is_file():
                raise PpxError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != digest:
                raise PpxError(f"{path}: sha256 differs from the manifest (modified or corrupt)")


def graph_info_to_dict(key: str, file: str, data_file: str | None, specs: list[dict[str, Any]],
                       input_names: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    inputs = [s for s in specs if s["name"] in input_names]
    outputs = [s for s in specs if s["name"] not in input_names]
    return {"file": file, "data_file": data_file, "inputs": inputs, "outputs": outputs, "meta": meta}


def load_manifest(build_dir: Path) -> Manifest:
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PpxError(f"{path}: not found (is {build_dir} a build directory from `ppx-export onnx`?)") from None
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


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
