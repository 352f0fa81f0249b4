"""Files that survive a power cut and links that are never followed.

Root runs `ppx-runtime update` (Mender does), and it writes into folders the daemon's user owns
(the slots directory, the snapshots directory). Anything in such a folder may be a link that
user planted, so every write here: opens the folder itself with O_NOFOLLOW, creates the
temporary file with O_CREAT|O_EXCL|O_NOFOLLOW under an unpredictable name relative to that
folder's descriptor, sets its mode on the descriptor (never by path), fsyncs it, renames it
within the same folder and fsyncs the folder. A power cut leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from personaplex_edge.runtime.errors import PpxError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(directory: Path, dir_fd: int | None = None) -> int:
    """A descriptor of `directory` itself; OSError (ELOOP/ENOTDIR) if it is a symlink."""
    return os.open(directory, DIR_FLAGS, dir_fd=dir_fd)


def fsync_dir(directory: Path) -> None:
    fd = open_dir(directory)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a power cut leaves the old file or the new one, whole;
    PpxError naming the file if it cannot. A link at `path` is replaced, never followed."""
    path = Path(path)
    try:
        dfd = open_dir(path.parent)
    except OSError as exc:
        raise PpxError(f"{path}: cannot write: {path.parent}: {exc.strerror}") from None
    tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)  # past the umask, on the file we made: never through a path
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise PpxError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        os.close(dfd)


def open_lock(path: Path, mode: int = 0o644) -> int:
    """A lock file root and the daemon's user can both flock (read access is enough). A link
    there or in place of its folder is refused (O_NOFOLLOW), and the mode is set only on a
    regular file (not a FIFO or a device someone put there)."""
    path = Path(path)
    dfd = open_dir(path.parent)  # a folder swapped for a link: refused, nothing made there
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, mode, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (refused)")
        if stat.S_IMODE(st.st_mode) != mode:
            with contextlib.suppress(OSError):  # not the owner: the owner already set it
                os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
