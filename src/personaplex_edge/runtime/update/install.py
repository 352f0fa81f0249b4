"""`ppx-runtime update install`: a bundle streamed into the inactive slot, checked on the way.

Order matters: tar's extended headers are capped (MAX_TAR_EXTENDED_BYTES) before anything is
trusted; the header's signature, target and versions are checked before the slot is touched;
the manifest is checked against the signed digest before any build file is written; each
member's size is checked against the size the signed header gives before a byte of it is
written, no more than that is read, and it is hashed while it is written;
names, types and links are refused before they reach the disk. The slot is written under a
temporary name and renamed whole, after everything is fsynced, and only then recorded in the
state file. The good slot and the trial slot are never written. Peak memory is one 1 MiB
buffer (plus the manifest); the bundle is read once and the build is written once.

The members come from bundle_reader.py (tar stream or unpacked directory).

`$PPX_UPDATE_KILL_AT=<step>` kills the process with SIGKILL at that step (STEPS): a test hook,
kept in the shipped code because the interruption tests must kill the real install at each
step (tests/test_update_slots.py, test_update_daemon.py); unset, it costs one getenv per step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import signal
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.core.durable import open_dir
from personaplex_edge.runtime.core.engine_manifest import trt_release
from personaplex_edge.runtime.core.integrity import record_verified
from personaplex_edge.runtime.core.manifest import (
    MANIFEST_NAME,
    SELF_DIGEST,
    load_manifest,
    manifest_digest,
)
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.update.bundle_format import (
    ANY_TARGET,
    BUILD_PREFIX,
    HEADER_NAME,
    MAX_HEADER_BYTES,
    SIGNATURE_NAME,
    BundleHeader,
    build_member_name,
    check_relative_path,
    version_key,
)
from personaplex_edge.runtime.update.bundle_reader import Member, open_bundle, read_small
from personaplex_edge.runtime.update.slots import (
    PARTIAL_MARK,
    SLOTS,
    Slots,
    SlotState,
    now_utc,
    open_lock,
    other,
    remove_tree,
)
from personaplex_edge.runtime.update.trust import trusted_keys, verify_signature

KILL_ENV = "PPX_UPDATE_KILL_AT"
STEPS = ("verified", "forgotten", "removed", "manifest", "first-file", "written", "renamed",
         "recorded", "activated")
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20


def _step(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Installed:
    slot: str
    header: BundleHeader
    files: int
    bytes: int
    activated: bool


# -- the checks -------------------------------------------------------------------------------

def check_header(members: Iterator[Member], where: str, keys: dict[str, bytes]) -> BundleHeader:
    """The first two members: the header and its signature, verified."""
    first = next(members, None)
    if first is None or first.name != HEADER_NAME:
        raise PpxError(f"{where}: not a signed bundle: the first member is "
                       f"{first.name if first else 'missing'!r}, not {HEADER_NAME}")
    if first.kind != "file":
        raise PpxError(f"{where}: {HEADER_NAME}: a {first.kind}, not a file")
    raw = read_small(first, MAX_HEADER_BYTES, where)
    header = BundleHeader.from_bytes(raw, where)
    second = next(members, None)
    if second is None or second.name != SIGNATURE_NAME:
        raise PpxError(f"{where}: unsigned bundle: no {SIGNATURE_NAME} after the header")
    if second.kind != "file":
        raise PpxError(f"{where}: {SIGNATURE_NAME}: a {second.kind}, not a file")
    signature = read_small(second, 1024, where)
    verify_signature(keys, header.key_id, raw, signature, where)
    return header


def check_fits(header: BundleHeader, where: str, device_target: str | None,
               runtime_version: str, active: dict[str, Any] | None, allow_downgrade: bool,
               device_tensorrt: Callable[[], str | None] | None = None) -> None:
    if header.target != ANY_TARGET and header.target != device_target:
        here = device_target or "not set (update.target)"
        raise PpxError(f"{where}: built for target {header.target!r}, this device's target is "
                       f"{here}")
    if header.tensorrt and device_tensorrt is not None:
        # Engines deserialise only on the TensorRT release they were built with.
        raw = device_tensorrt()
        found = trt_release(raw) if raw else None
        if found != header.tensorrt:
            here = f"has TensorRT {found}" if found else "has no TensorRT"
            raise PpxError(f"{where}: engines built for TensorRT {header.tensorrt}, this device "
                           f"{here}")
    if version_key(runtime_version) < version_key(header.min_runtime):
        raise PpxError(f"{where}: needs runtime {header.min_runtime} or newer, this is "
                       f"{runtime_version}: update the runtime first")
    if active and not allow_downgrade and version_key(header.version) < version_key(active["version"]):
        raise PpxError(f"{where}: version {header.version} is older than {active['version']}, the "
                       "newest build committed on this car (--allow-downgrade installs it anyway)")


def _floor(state: SlotState) -> dict[str, Any] | None:
    """The version a bundle may not go below: the newest ever committed here, so a rollback
    (to build.path or an older slot) does not open the door to older signed bundles."""
    versions = [v for v in (state.highest, (state.info(state.good) or {}).get("version")
                            if state.good else None) if isinstance(v, str)]
    return {"version": max(versions, key=version_key)} if versions else None


def _check_manifest(raw: bytes, header: BundleHeader, where: str) -> dict[str, str]:
    try:
        data = json.loads(raw)
        files = data["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise PpxError(f"{where}: build/{MANIFEST_NAME}: not a build manifest") from None
    if data.get(SELF_DIGEST) != manifest_digest(data) or data[SELF_DIGEST] != header.manifest_sha256:
        raise PpxError(f"{where}: build/{MANIFEST_NAME}: differs from the signed manifest digest "
                       "(edited after signing)")
    for name in files:
        check_relative_path(name, f"{where}: build/{MANIFEST_NAME}")
    if set(header.sizes) != set(files):
        raise PpxError(f"{where}: {HEADER_NAME}: sizes: not the manifest's files")
    return files


def _copy_hashed(member: Member, out: int, expected: str, where: str, size: int) -> int:
    """Copy the `size` bytes of `member` (never more) into the open file `out` while hashing
    them; fsynced, mode 0644."""
    assert member.open is not None
    digest = hashlib.sha256()
    left = size
    with member.open() as src:
        while left and (block := src.read(min(CHUNK, left))):
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(out, view):]
            left -= len(block)
    if left:
        raise PpxError(f"{where}: truncated bundle: build/{member.name[len(BUILD_PREFIX):]} ends "
                       f"after {size - left} of its {size} bytes")
    os.fsync(out)
    if digest.hexdigest() != expected:
        raise PpxError(f"{where}: build/{member.name[len(BUILD_PREFIX):]}: sha256 differs from the "
                       "signed manifest (tampered or corrupt)")
    os.fchmod(out, 0o644)
    return size


class _Tree:
    """The slot being written, reached only through descriptors.

    Root writes it inside the slots directory, which the daemon's user owns: that user could
    swap a name there for a link at any moment. So the folder is made under a random name,
    opened once with O_NOFOLLOW, and everything inside is created relative to descriptors
    (O_EXCL|O_NOFOLLOW): a name swapped meanwhile is never followed. Only the final rename
    goes by name, after checking the name still is this folder."""

    def __init__(self, parent_fd: int, prefix: str):
        for _ in range(16):
            self.name = f"{prefix}{secrets.token_hex(6)}"
            try:
                os.mkdir(self.name, 0o700, dir_fd=parent_fd)  # root only until it is complete
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "cannot make a temporary slot folder")
        self.parent_fd = parent_fd
        self.dirs: dict[str, int] = {"": open_dir(self.name, dir_fd=parent_fd)}
        self.files = 0

    def folder(self, rel: str) -> int:
        """The descriptor of folder `rel` (made, part by part, if needed)."""
        if rel in self.dirs:
            return self.dirs[rel]
        up, _, name = rel.rpartition("/")
        parent = self.folder(up)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        self.dirs[rel] = open_dir(name, dir_fd=parent)  # a file or link there: refused
        return self.dirs[rel]

    @contextlib.contextmanager
    def create(self, rel: str) -> Iterator[int]:
        up, _, name = rel.rpartition("/")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.folder(up))
        try:
            yield fd
        finally:
            os.close(fd)

    def seal(self) -> None:
        """Every folder readable by the daemon's user and fsynced, the deepest first, so the
        whole tree is on disk before the rename makes it the slot."""
        for rel in sorted(self.dirs, key=lambda r: -r.count("/") - (r != "")):
            os.fchmod(self.dirs[rel], 0o755)
            os.fsync(self.dirs[rel])

    def rename_to(self, slot: str) -> None:
        here = os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)
        mine = os.fstat(self.dirs[""])
        if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            raise OSError(errno.EXDEV, f"{self.name} was replaced while it was written (refused)")
        os.replace(self.name, slot, src_dir_fd=self.parent_fd, dst_dir_fd=self.parent_fd)
        os.fsync(self.parent_fd)

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs = {}


# -- install ---------------------------------------------------------------------------------

def install(source: Path, slots: Slots, keys_dir: Path, device_target: str | None,
            runtime_version: str, allow_downgrade: bool = False, activate: bool = False,
            progress: Callable[[str], None] | None = None,
            stamp_dir: Path | None = None,
            device_tensorrt: Callable[[], str | None] | None = None) -> Installed:
    """`stamp_dir`: the daemon's snapshots directory; the files hashed here are stamped there
    as verified (core/integrity.py), so the switch does not hash 15 GB again.
    `device_tensorrt`: this device's TensorRT version (asked only for an engines bundle)."""
    keys = trusted_keys(keys_dir)  # no keys: refuse before reading anything
    where = str(source)
    with _install_lock(slots), open_bundle(source) as members:
        slots.clean_partials()
        header = check_header(members, where, keys)
        state = slots.read()
        if state.trial:
            raise PpxError(f"slot {state.trial} is on trial: wait for its health check or "
                           "`update rollback` before installing another build")
        check_fits(header, where, device_target, runtime_version, _floor(state), allow_downgrade,
                   device_tensorrt)
        _step("verified")
        with slots.locked() as state:
            if state.trial:
                raise PpxError(f"slot {state.trial} went on trial meanwhile: install again later")
            slot = other(state.good) if state.good else SLOTS[0]
            slots.forget(state, slot)
        _step("forgotten")
        remove_tree(slots.path(slot))
        _step("removed")
        try:
            slots_fd = open_dir(slots.dir)  # the slots directory itself, never a link to one
        except OSError as exc:
            raise PpxError(f"{slots.dir}: cannot use the slots directory: {exc.strerror}") from None
        tree: _Tree | None = None
        try:
            tree = _Tree(slots_fd, f".{slot}{PARTIAL_MARK}")
            files, size = _unpack(members, tree, header, where, progress)
            tree.seal()
            _step("written")
            tree.rename_to(slot)
            _step("renamed")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise PpxError(f"{slots.dir}: disk full while installing slot {slot}; the active "
                               "build is untouched") from None
            raise PpxError(f"{slots.dir}: cannot write slot {slot}: {exc.strerror}") from None
        except (tarfile.TarError, EOFError) as exc:
            raise PpxError(f"{where}: truncated or corrupt bundle ({exc})") from None
        except Exception as exc:  # zstandard.ZstdError and friends: a damaged stream
            if isinstance(exc, PpxError) or type(exc).__module__.split(".")[0] != "zstandard":
                raise
            raise PpxError(f"{where}: truncated or corrupt bundle ({exc})") from None
        finally:
            if tree is not None:
                tree.close()
                remove_tree(slots.dir / tree.name)  # gone after the rename: nothing to remove
            os.close(slots_fd)
        with slots.locked() as state:
            state.slots[slot] = {"version": header.version, "target": header.target,
                                 "tensorrt": header.tensorrt, "min_runtime": header.min_runtime,
                                 "manifest_sha256": header.manifest_sha256, "key_id": header.key_id,
                                 "files": files, "bytes": size, "health": "installed",
                                 "installed_at": now_utc()}
        _step("recorded")
        if stamp_dir is not None:
            record_verified(load_manifest(slots.path(slot)), stamp_dir)
    if activate:
        slots.activate(slot)
        _step("activated")
    return Installed(slot, header, files, size, activate)


def _unpack(members: Iterator[Member], tree: _Tree, header: BundleHeader, where: str,
            progress: Callable[[str], None] | None) -> tuple[int, int]:
    first = next(members, None)
    if first is None or first.name != BUILD_PREFIX + MANIFEST_NAME or first.kind != "file":
        raise PpxError(f"{where}: truncated or malformed bundle: no build/{MANIFEST_NAME} after "
                       "the signature")
    raw = read_small(first, MAX_MANIFEST_BYTES, where)
    expected = _check_manifest(raw, header, where)
    with tree.create(MANIFEST_NAME) as out:
        view = memoryview(raw)
        while view:
            view = view[os.write(out, view):]
        os.fchmod(out, 0o644)
        os.fsync(out)
    _step("manifest")
    done: set[str] = set()
    total = 0
    for member in members:
        check_relative_path(member.name, where)
        name = build_member_name(member.name)
        if name is None:
            raise PpxError(f"{where}: {member.name!r}: not part of a bundle (outside build/)")
        check_relative_path(name, where)
        if member.kind == "dir":
            tree.folder(name)
            continue
        if member.kind != "file":
            raise PpxError(f"{where}: build/{name}: a {member.kind} (only regular files may be in "
                           "a bundle; a link or device could reach outside the slot)")
        if name not in expected:
            raise PpxError(f"{where}: build/{name}: not listed in the signed manifest (added file)")
        if name in done:
            raise PpxError(f"{where}: build/{name}: appears twice")
        if member.size != header.sizes[name]:  # before a byte is written: no disk filled
            raise PpxError(f"{where}: build/{name}: {member.size} bytes in the bundle, the signed "
                           f"header says {header.sizes[name]} (tampered or corrupt)")
        with tree.create(name) as out:
            total += _copy_hashed(member, out, expected[name], where, header.sizes[name])
        done.add(name)
        if len(done) == 1:
            _step("first-file")
        if progress is not None:
            progress(name)
    missing = sorted(set(expected) - done)
    if missing:
        raise PpxError(f"{where}: truncated bundle: {len(missing)} file(s) of the manifest missing "
                       f"(first: {missing[0]})")
    return len(done) + 1, total


@contextlib.contextmanager
def _install_lock(slots: Slots) -> Iterator[None]:
    """One install at a time; the state lock is only held for the short state changes."""
    try:
        slots.dir.mkdir(parents=True, exist_ok=True)
        fd = open_lock(slots.dir / ".install.lock")
    except OSError as exc:
        raise PpxError(f"{slots.dir}: cannot use the slots directory: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PpxError(f"{slots.dir}: another install is running") from None
        yield
    finally:
        os.close(fd)

