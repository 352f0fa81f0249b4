"""Reading a bundle, member by member, whether a tar stream (plain or zstd) or an unpacked
directory (what an OTA client that unpacks delivers): same order, same names, same kinds.
Nothing here trusts a member; install.py checks each one. What tarfile would read whole before
anything is verified (pax and GNU long-name headers) is capped here.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from personaplex_edge.runtime.core.manifest import MANIFEST_NAME
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.extras import missing_extra
from personaplex_edge.runtime.update.bundle_format import (
    BUILD_PREFIX,
    HEADER_NAME,
    MAX_TAR_EXTENDED_BYTES,
    SIGNATURE_NAME,
    ZSTD_MAGIC,
)


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # file, dir, symlink, hardlink, device, other
    open: Callable[[], IO[bytes]] | None = None
    size: int = 0  # what the tar header (or the file system) says


# -- reading a bundle: a tar stream or an unpacked directory --------------------------------

_TAR_KINDS = ((tarfile.TarInfo.isreg, "file"), (tarfile.TarInfo.isdir, "dir"),
              (tarfile.TarInfo.issym, "symlink"), (tarfile.TarInfo.islnk, "hardlink"),
              (tarfile.TarInfo.isdev, "device"))


class _ExtendedHeaderTooLarge(Exception):
    pass


_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole, unverified: cap them (and a chain of
    them) before it does, so a small zstd file cannot make the install hold gigabytes."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED:
            used = getattr(tar, "_ppx_extended", 0) + self.size
            if used > MAX_TAR_EXTENDED_BYTES:
                raise _ExtendedHeaderTooLarge(used)
            tar._ppx_extended = used  # type: ignore[attr-defined]
        else:
            tar._ppx_extended = 0  # type: ignore[attr-defined]
        return super()._proc_member(tar)  # type: ignore[misc]


@contextlib.contextmanager
def _tar_members(path: Path) -> Iterator[Iterator[Member]]:
    try:
        raw = open(path, "rb")  # closed by the `with raw` below
    except OSError as exc:
        raise PpxError(f"{path}: cannot read: {exc.strerror}") from None
    with raw:
        stream: IO[bytes] = raw
        if raw.read(4) == ZSTD_MAGIC:
            try:
                import zstandard
            except ModuleNotFoundError as exc:
                raise missing_extra(exc) or exc from None
            raw.seek(0)
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            raw.seek(0)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo)
        except _ExtendedHeaderTooLarge as exc:
            raise PpxError(f"{path}: tar extended headers of {exc.args[0]} bytes (more than "
                           f"{MAX_TAR_EXTENDED_BYTES}): not a bundle from ppx-export") from None
        except tarfile.TarError:
            raise PpxError(f"{path}: not a bundle (neither a tar file nor a zstd-compressed one)"
                           ) from None

        def members() -> Iterator[Member]:
            while True:
                try:
                    info = tar.next()
                except _ExtendedHeaderTooLarge as exc:
                    raise PpxError(f"{path}: tar extended headers of {exc.args[0]} bytes (more "
                                   f"than {MAX_TAR_EXTENDED_BYTES}): not a bundle from ppx-export"
                                   ) from None
                if info is None:
                    return
                kind = next((k for test, k in _TAR_KINDS if test(info)), "other")
                opener = (lambda info=info: tar.extractfile(info)) if kind == "file" else None
                yield Member(info.name.removeprefix("./"), kind, opener, info.size)

        yield members()


@contextlib.contextmanager
def _dir_members(root: Path) -> Iterator[Iterator[Member]]:
    """An unpacked bundle (what an OTA client that unpacks delivers): same order, same checks."""

    def entry(path: Path, name: str) -> Member:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            return Member(name, "symlink")
        if stat.S_ISDIR(mode):
            return Member(name, "dir")
        if stat.S_ISREG(mode):
            return Member(name, "file", lambda: open(path, "rb"), path.lstat().st_size)
        return Member(name, "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "other")

    def members() -> Iterator[Member]:
        for name in (HEADER_NAME, SIGNATURE_NAME):
            if (root / name).exists() or (root / name).is_symlink():
                yield entry(root / name, name)
        build = root / BUILD_PREFIX.rstrip("/")
        if build.is_symlink():  # os.walk would follow it out of the bundle
            raise PpxError(f"{build}: a symlink (only regular files may be in a bundle)")
        if (build / MANIFEST_NAME).exists():
            yield entry(build / MANIFEST_NAME, BUILD_PREFIX + MANIFEST_NAME)
        for top, dirs, files in os.walk(build):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(top) / name
                rel = path.relative_to(root).as_posix()
                if rel != BUILD_PREFIX + MANIFEST_NAME:
                    yield entry(path, rel)
        for path in sorted(root.iterdir()):
            if path.name not in (HEADER_NAME, SIGNATURE_NAME, BUILD_PREFIX.rstrip("/")):
                yield entry(path, path.name)

    yield members()


def open_bundle(source: Path) -> contextlib.AbstractContextManager[Iterator[Member]]:
    source = Path(source)
    if source.is_dir():
        return _dir_members(source)
    if not source.exists():
        raise PpxError(f"{source}: bundle not found")
    return _tar_members(source)


def read_small(member: Member, limit: int, where: str) -> bytes:
    assert member.open is not None
    if member.size > limit:  # refused before a byte of it is read
        raise PpxError(f"{where}: {member.name}: larger than {limit} bytes")
    with member.open() as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PpxError(f"{where}: {member.name}: larger than {limit} bytes")
    return data
