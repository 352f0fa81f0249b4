"""Are a build's files the ones its manifest names? Hash once, then trust a stamp until they change.

Hashing a 7-14 GB build with sha256 takes 10-30 s (about 0.6 GB/s on one x86 core here; the
Jetson's cores are no faster and the first read comes from NVMe), too long for every start of
the daemon. So after a file's sha256 matched the manifest, its identity is stamped: device,
inode, size, mtime and ctime. Any write through the file system - an edit, a copy over it, a
`touch -d` to fake the old time - changes the ctime or the inode, which the kernel sets and a
user cannot set back, so a stamped file that still matches its stamp has not been written since
it was hashed. What a stamp cannot see is the medium changing bits under the file system (bit
rot): `ppx-runtime check` always hashes everything, ignoring stamps.

The stamp lives next to the persona snapshots (a directory the runtime may write), named by the
manifest's own digest, so two builds never share one. A stamp that cannot be written only costs
the next start a full hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from personaplex_edge.runtime.core.durable import write_atomic
from personaplex_edge.runtime.errors import PpxError

log = logging.getLogger("personaplex.integrity")


class Listing(Protocol):
    """What is checked: the files a build lists with their sha256. A `core.manifest.Manifest` is
    one; it calls in here (`Manifest.verify_files`), and this module does not import it."""

    @property
    def root(self) -> Path: ...

    @property
    def files(self) -> Mapping[str, str]: ...

    @property
    def digest(self) -> str: ...


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def stamp_path(manifest: Listing, stamp_dir: Path) -> Path:
    return Path(stamp_dir) / f"build-{manifest.digest[:16]}.verified.json"


def verify_build(manifest: Listing, stamp_dir: Path | None) -> int:
    """Raise PpxError naming the first file that is missing or differs from the manifest.

    Files whose stamp in `stamp_dir` still matches are not hashed again; with `stamp_dir=None`
    everything is hashed. Returns how many files were hashed."""
    stamps: dict[str, list[int]] = {}
    path = stamp_path(manifest, stamp_dir) if stamp_dir is not None else None
    if path is not None:
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                stamps = loaded
        except (OSError, ValueError):
            pass  # no stamp yet, or an unreadable one: hash
    fresh: dict[str, list[int]] = {}
    hashed = 0
    for name, digest in manifest.files.items():
        file = manifest.root / name
        try:
            identity = _identity(file.stat())
        except OSError:
            raise PpxError(f"{file}: listed in the manifest but missing") from None
        if not file.is_file():
            raise PpxError(f"{file}: listed in the manifest but not a file")
        if stamps.get(name) != identity:
            hashed += 1
            if sha256_file(file) != digest:
                raise PpxError(f"{file}: sha256 differs from the manifest (modified or corrupt): "
                               "re-export or copy the build again")
        fresh[name] = identity
    if path is not None and (hashed or fresh != stamps):
        _write_stamp(path, fresh)
    return hashed


def record_verified(manifest: Listing, stamp_dir: Path) -> None:
    """Stamp files the caller has just hashed itself while writing them (`ppx-runtime update
    install`), so the daemon's first start on them does not hash them again."""
    fresh = {name: _identity((manifest.root / name).stat()) for name in manifest.files}
    _write_stamp(stamp_path(manifest, stamp_dir), fresh)


def _write_stamp(path: Path, stamps: dict[str, list[int]]) -> None:
    # Root writes stamps too (`update install`), into the daemon's folder: never through a link.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(stamps).encode())
    except OSError as exc:
        log.warning("%s: cannot record the verified build (%s): the next start hashes it again",
                    path, exc.strerror)
    except PpxError as exc:
        log.warning("%s: the next start hashes it again", exc)
