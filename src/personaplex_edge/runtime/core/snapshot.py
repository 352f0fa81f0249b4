"""Persona snapshots: the LM state right after the system prompt, restored in milliseconds.

Compiling a persona runs its whole prompt prefix once (one batched prefill)
and stores what the conversation starts from: the filled part of the temporal
KV cache, the token ring, and the positions. A snapshot is keyed by the build
(sha256 of its manifest) and the persona's content hash; it also carries a
sha256 of its own arrays. A snapshot that is stale (other build or persona),
truncated or corrupt is detected and rebuilt, never used. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SNAPSHOT_FORMAT = 1


@dataclass
class Snapshot:
    key: dict[str, str]  # build, persona, format
    arrays: dict[str, np.ndarray]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def snapshot_key(build_id: str, persona_hash: str) -> dict[str, str]:
    return {"build": build_id, "persona": persona_hash, "format": str(SNAPSHOT_FORMAT)}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_snapshot(path: Path, snap: Snapshot) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": snap.key, "sha256": _digest(snap.arrays)}
    # A unique temporary name: two writers of the same snapshot must not clobber each other.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **snap.arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_snapshot(path: Path, key: dict[str, str]) -> tuple[Snapshot | None, str]:
    """(snapshot, "") if valid for `key`; else (None, why it cannot be used)."""
    if not path.exists():
        return None, "no snapshot yet"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            arrays = {name: data[name] for name in data.files if name != "__meta__"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError,
            UnicodeDecodeError, io.UnsupportedOperation) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if meta.get("key") != key:
        return None, "stale (made for another build or persona version)"
    if meta.get("sha256") != _digest(arrays):
        return None, "corrupt (checksum mismatch)"
    return Snapshot(key, arrays), ""
