"""The systemd notify protocol (sd_notify(3)), spoken directly: a few datagrams on a socket.

Under `Type=notify`, systemd passes the path of its notification socket in
`$NOTIFY_SOCKET` (a file path, or `@name` for the abstract namespace). Each
message is one AF_UNIX datagram of newline-separated `KEY=value` lines:
`READY=1` when warm-up is done, `STATUS=...` for `systemctl status`,
`WATCHDOG=1` pings, `STOPPING=1`, `EXTEND_TIMEOUT_USEC=...`. With
`NotifyAccess=main` the manager accepts them from the main process only: any
of its threads may send (the kernel stamps the datagram with the process id).

Without `$NOTIFY_SOCKET` (a terminal, a container, the tests) every call is a
no-op that returns False. Nothing here ever raises into the caller, and the
socket is non-blocking, so the audio loop can call it every frame: a failed
send is logged once (again only after a send has succeeded in between).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("personaplex.notify")


def socket_address(value: str | None) -> bytes | None:
    """`$NOTIFY_SOCKET` -> the sendto() address; None when unset, empty or unsupported.

    `/path` is a filesystem socket, `@name` the abstract namespace (a leading NUL
    byte on the wire). Other forms (systemd 254's `vsock:`) are not supported here.
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from `$WATCHDOG_USEC`, or None when none applies.

    As sd_watchdog_enabled(3): `$WATCHDOG_PID`, when set, must be this process
    (a child that inherited the environment must not ping for its parent).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def _clean(value: object) -> str:
    # One field per line on the wire: a newline inside a value would start a new field.
    return " ".join(str(value).splitlines()).strip()


class Notifier:
    """Messages to the service manager; harmless (all methods return False) without one.

    The daemon's calls, in order:
      `extend_timeout(s)` while a slow warm-up step runs (persona compile),
      `ready("Listening: persona copilot")` once frames can flow,
      `kick()` from the frame loop after every frame (sends WATCHDOG=1 at most every
      half watchdog interval), `status(...)` when something a person should see changes
      (degraded, device lost, persona switched), `stopping()` on SIGTERM.
    """

    def __init__(self, address: str | None = None, *, watchdog_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.address_text = address or ""
        self._address = socket_address(address)
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._failing = False
        self.sent = 0
        self.failures = 0
        if address and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name: not notifying", address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> Notifier:
        """The manager's socket and watchdog interval from the environment (`$NOTIFY_SOCKET`,
        `$WATCHDOG_USEC`, `$WATCHDOG_PID`)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_s=watchdog_interval(env), clock=clock)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def ping_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_s is None else self.watchdog_s / 2

    # -- messages -----------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up finished), with an optional STATUS line in the same datagram."""
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """STATUS=<one line> shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1 now (prefer `kick()` in a loop)."""
        ok = self.notify(WATCHDOG="1")
        if ok:
            with self._lock:
                self._last_ping = self._clock()
        return ok

    def kick(self, now: float | None = None) -> bool:
        """Call after every frame: sends WATCHDOG=1 if half the interval has passed.

        Returns True when a ping went out. Without a watchdog (no `$WATCHDOG_USEC`) it
        does nothing, so it costs one comparison per frame.
        """
        interval = self.ping_interval
        if interval is None or self._address is None:
            return False
        t = self._clock() if now is None else now
        with self._lock:
            if self._last_ping is not None and t - self._last_ping < interval:
                return False
            self._last_ping = t  # even when the send fails: retry next interval, not per frame
        return self.notify(WATCHDOG="1")

    def watchdog_trigger(self) -> bool:
        """WATCHDOG=trigger: ask the manager to act as if the watchdog expired (restart)."""
        return self.notify(WATCHDOG="trigger")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 (shutdown began), with an optional STATUS line."""
        fields = {"STOPPING": "1"}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (what Type=notify-reload expects); READY=1 ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING="1", MONOTONIC_USEC=str(usec))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: the current start/stop step needs `seconds` more (from now)."""
        return self.notify(EXTEND_TIMEOUT_USEC=str(max(0, int(seconds * 1_000_000))))

    def mainpid(self, pid: int) -> bool:
        """MAINPID=<pid>: only for a daemon whose main process is not the one systemd started."""
        return self.notify(MAINPID=str(int(pid)))

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` fields (in the order given) as one datagram; True if it went out."""
        if self._address is None or not fields:
            return False
        return self.send("\n".join(f"{key}={_clean(value)}" for key, value in fields.items()))

    def send(self, message: str) -> bool:
        """Send one raw datagram; never raises."""
        if self._address is None:
            return False
        try:
            sock = self._socket()
            sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("cannot notify the service manager at %s: %s (further failures "
                            "are not logged until a message gets through)", self.address_text,
                            exc.strerror or exc)
            return False
        self.sent += 1
        if self._failing:
            self._failing = False
            log.info("service manager notifications get through again")
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                # Non-blocking: a full receive queue drops the message instead of stalling
                # the frame loop. Python sockets are close-on-exec already.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            return self._sock
