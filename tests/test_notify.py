"""sd_notify over a real AF_UNIX datagram socket: exact datagrams, path and abstract addresses."""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from personaplex_edge.runtime.service.notify import Notifier, socket_address, watchdog_interval


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting for more."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = _receiver(path)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"ppx-notify-test-{uuid.uuid4().hex}"
    sock = _receiver(b"\0" + name.encode())
    yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_each_message_is_one_exact_datagram(kind: str, request: pytest.FixtureRequest) -> None:
    address, sock = request.getfixturevalue(kind)
    n = Notifier(address)
    assert n.enabled
    assert n.extend_timeout(12.5)
    assert n.ready("Listening: persona copilot")
    assert n.status("Degraded: 12 deadline misses\nin 5 s")
    assert n.watchdog()
    assert n.watchdog_trigger()
    assert n.mainpid(4242)
    assert n.stopping("Stopping")
    assert n.ready()
    assert n.stopping()
    assert n.notify(STATUS="x", ERRNO=5)
    got = [sock.recv(4096) for _ in range(10)]
    assert got == [
        b"EXTEND_TIMEOUT_USEC=12500000",
        b"READY=1\nSTATUS=Listening: persona copilot",
        b"STATUS=Degraded: 12 deadline misses in 5 s",  # one line: a newline starts a field
        b"WATCHDOG=1",
        b"WATCHDOG=trigger",
        b"MAINPID=4242",
        b"STOPPING=1\nSTATUS=Stopping",
        b"READY=1",
        b"STOPPING=1",
        b"STATUS=x\nERRNO=5",
    ]
    assert n.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", sock.recv(4096))
    assert n.sent == 11 and n.failures == 0
    n.close()


def test_from_env_reads_socket_and_watchdog(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "5000000",
                           "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_s == 5.0 and n.ping_interval == 2.5
    assert n.ready("ok")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_unset_socket_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for n in (Notifier.from_env({}), Notifier(None), Notifier("")):
        assert not n.enabled and n.watchdog_s is None
        assert not any((n.ready("x"), n.status("x"), n.watchdog(), n.kick(), n.stopping(),
                        n.extend_timeout(1), n.reloading(), n.mainpid(1), n.send("X=1")))
        n.close()
    assert caplog.records == []


def test_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/1") == \
        b"\0/org/freedesktop/systemd1/notify/1"
    for value in (None, "", "@", "relative/path", "vsock:2:1234"):
        assert socket_address(value) is None


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "5000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": me}) == 5.0
    # The watchdog belongs to another process (this one inherited the environment).
    assert watchdog_interval({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}) is None
    for bad in ({}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "-5"},
                {"WATCHDOG_USEC": "5s"}, {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "me"}):
        assert watchdog_interval(bad) is None, bad


def test_kick_pings_at_half_the_interval(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    n = Notifier(address, watchdog_s=5.0)
    # A frame every 80 ms for 12 s: a ping on the first frame at least 2.5 s after the last.
    sent_at = [t / 1000 for t in range(0, 12_000, 80) if n.kick(now=t / 1000)]
    assert sent_at == [0.0, 2.56, 5.12, 7.68, 10.24]
    assert _drain(sock) == [b"WATCHDOG=1"] * 5
    # Without a watchdog interval, kick() sends nothing.
    assert not Notifier(address).kick(now=100.0)
    assert _drain(sock) == []


def test_failures_never_raise_and_log_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="personaplex.notify")
    path = tmp_path / "later.sock"
    n = Notifier(str(path), watchdog_s=1.0)
    for i in range(50):  # nobody listening: ENOENT every time
        assert not n.kick(now=float(i))
        assert not n.status("x")
    assert n.failures == 100
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    # The manager comes back: messages flow, and a later outage is reported once more.
    sock = _receiver(str(path))
    assert n.status("back")
    assert sock.recv(4096) == b"STATUS=back"
    sock.close()
    path.unlink()
    assert not n.status("gone again") and not n.status("still gone")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_unsupported_address_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="personaplex.notify")
    n = Notifier("vsock:2:1234")
    assert not n.enabled and not n.ready()
    assert len(caplog.records) == 1 and "vsock:2:1234" in caplog.records[0].getMessage()


def test_full_receive_queue_drops_instead_of_blocking(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # smallest queue the kernel allows
    n = Notifier(address)
    results = [n.status("x" * 1000) for _ in range(10_000)]  # would block a blocking socket
    assert results[0] and not all(results)
    assert n.failures > 0 and n.sent + n.failures == 10_000


def test_a_thread_sends_with_the_process_credentials(path_socket: tuple[str, socket.socket]) -> None:
    """NotifyAccess=main checks the sender's pid: a frame-loop thread must carry the process id."""
    address, sock = path_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    n = Notifier(address)
    worker = threading.Thread(target=n.watchdog)
    worker.start()
    worker.join()
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"WATCHDOG=1"
    creds = [struct.unpack("3i", d[:12]) for level, kind, d in ancillary
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds and creds[0][0] == os.getpid()


def test_a_child_process_notifies_from_its_environment(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    code = ("from personaplex_edge.runtime.service.notify import Notifier\n"
            "n = Notifier.from_env()\n"
            "assert n.ping_interval == 1.5, n.ping_interval\n"
            "assert n.ready('warm') and n.kick() and not n.kick() and n.stopping()\n")
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _drain(sock) == [b"READY=1\nSTATUS=warm", b"WATCHDOG=1", b"STOPPING=1"]
