"""The control socket's file on disk: bound with its mode and group, stale ones replaced, removed
only while it is still ours.

The socket is bound under a temporary name, given its mode and group, then renamed into place,
so it never appears at its real path with looser permissions. A socket file left by a dead
daemon is replaced; anything else at that path (a regular file, a live daemon's socket) is a
one-line error.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
from pathlib import Path

from personaplex_edge.runtime.errors import ConfigError, PpxError

log = logging.getLogger("personaplex.control")


def bind_socket(path: Path, mode: int, group: str | None) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at `path` with `mode` and `group`, and its (device, inode)."""
    gid = group_id(group)
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"control.socket: {path}: longer than 107 bytes (a Unix socket limit)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PpxError(f"control.socket: cannot create {path.parent}: {exc.strerror}") from None
    clear_stale(path)
    # Bind under a temporary name, set mode and group, then rename into place:
    # the socket never appears at its real path with looser permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > 107:
        tmp = path  # no room for a temporary name: bind in place
    if tmp != path:
        unlink_quiet(tmp)  # left by a crashed daemon with our pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        if gid is not None:
            try:
                os.chown(tmp, -1, gid)
            except PermissionError:
                raise ConfigError(
                    f"control.group: cannot give {path} to group {group!r}: the daemon's "
                    "user is not a member of it (add it, or change control.group)") from None
        if tmp != path:
            os.rename(tmp, path)
        sock.listen(16)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        unlink_quiet(tmp)
        raise PpxError(f"control.socket: cannot create {path}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        unlink_quiet(tmp)
        raise
    return sock, (st.st_dev, st.st_ino)


def clear_stale(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PpxError(f"control.socket: {path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        unlink_quiet(path)  # nobody listens: stale
        log.info("control: replaced a stale socket file at %s", path)
        return
    except OSError as exc:
        raise PpxError(f"control.socket: {path} exists and cannot be probed ({exc.strerror}); "
                       "is another daemon running?") from None
    finally:
        probe.close()
    raise PpxError(f"control.socket: another daemon is already listening on {path}")


def remove_if_ours(path: Path, inode: tuple[int, int] | None) -> None:
    """Remove the socket file unless a newer daemon has replaced it since we bound it."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if inode == (st.st_dev, st.st_ino):  # not a newer daemon's socket
        unlink_quiet(path)


def group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"control.group: group {group!r} does not exist (create it, e.g. with "
                          "the package's sysusers.d entry, or set control.group)") from None


def unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
