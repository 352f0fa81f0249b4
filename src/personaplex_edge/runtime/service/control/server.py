"""The control socket's server: a Unix stream socket, many clients, one selector thread.

The server runs in its own thread with a selector (non-blocking sockets, many
clients). It never buffers more than `max_line` bytes of a request: a longer
line gets an error reply and is skipped up to its newline, the connection
stays usable. Controller calls run on a small worker pool, so a slow call
never stalls other clients. A request routed through the frame loop
(FrameCommands) that times out has a definite outcome: withdrawn before the
loop took it ({"ok": false, "applied": false}), or taken, in which case its
worker goes free and the reply, sent when the loop has finished it, says what
happened. A call that does not return at all gets an error after
`reply_timeout` (plus a short grace).
A client with no call running and no reply going out for `idle_timeout`
seconds is closed: forgotten connections cannot hold every slot and lock the
head unit and `ctl` out. Nothing that happens here raises into the caller's
threads.
"""

from __future__ import annotations

import errno
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from personaplex_edge.runtime.service.config import ControlConfig
from personaplex_edge.runtime.service.control.protocol import (
    MAX_LINE,
    STATE_CHANGES,
    Controller,
    Request,
    RequestError,
    dispatch,
    encode_reply,
    parse_request,
    reply_to,
)
from personaplex_edge.runtime.service.control.socket_file import bind_socket, remove_if_ours

log = logging.getLogger("personaplex.control")

REPLY_GRACE_S = 0.25  # the backstop's wait beyond reply_timeout (see _await)
MAX_PENDING_OUTPUT = 1 << 20  # a client that stops reading its replies is dropped past this

T = TypeVar("T")


# -- the server -------------------------------------------------------------------------

@dataclass
class _Client:
    sock: socket.socket
    peer: str
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # skipping the rest of an oversized line
    eof: bool = False  # the peer finished sending
    pending: Future | None = None
    pending_request: Request | None = None
    deadline: float = 0.0
    taken: bool = False  # the frame loop took the pending request (see _await)
    events: int = selectors.EVENT_READ  # what the selector watches (0: unregistered)
    # Last request taken or reply bytes sent; half a request line is not activity, so a
    # client trickling bytes cannot keep its slot either.
    active: float = field(default_factory=time.monotonic)


class ControlServer:
    """Serve `controller` on a Unix socket at `path` until `stop()`."""

    def __init__(self, path: Path, controller: Controller, *, mode: int = 0o660,
                 group: str | None = None, reply_timeout: float = 2.0, max_clients: int = 16,
                 max_line: int = MAX_LINE, workers: int = 4, idle_timeout: float = 30.0,
                 on_reply: Callable[[bool], None] | None = None):
        self.path = Path(path)
        self.controller = controller
        self.on_reply = on_reply  # told whether each reply was ok (the daemon's metrics)
        self.mode, self.group = mode, group
        self.reply_timeout, self.max_clients, self.max_line = reply_timeout, max_clients, max_line
        self.idle_timeout = idle_timeout
        self._workers = workers
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._executor: _Workers | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_config(cls, cfg: ControlConfig, controller: Controller,
                    on_reply: Callable[[bool], None] | None = None) -> ControlServer:
        return cls(cfg.socket, controller, mode=cfg.mode, group=cfg.group,
                   reply_timeout=cfg.reply_timeout_s, max_clients=cfg.max_clients,
                   idle_timeout=cfg.idle_timeout_s, on_reply=on_reply)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Create the socket (mode, group) and start serving; PpxError/ConfigError if it cannot."""
        listener, self._inode = bind_socket(self.path, self.mode, self.group)
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (listener, self._wake_r, self._wake_w):
            s.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._executor = _Workers(self._workers)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ppx-control", daemon=True)
        self._thread.start()
        log.info("control: listening on %s (mode %s, group %s)", self.path, oct(self.mode),
                 self.group or "unchanged")

    def stop(self, timeout: float = 1.0) -> None:
        """Stop serving, close every connection and remove the socket file (if still ours)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        self._thread = None
        if self._executor is not None:
            self._executor.shutdown()
        for client in list(self._clients.values()):
            self._close(client)
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._selector is not None:
            self._selector.close()
        remove_if_ours(self.path, self._inode)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- socket file ----------------------------------------------------------------------
    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._selector is not None
        while not self._stopping.is_set():
            try:
                self._once()
            except Exception as exc:  # noqa: BLE001 - keep serving whatever went wrong
                log.error("control: server loop error", exc_info=exc)
                time.sleep(0.05)

    def _once(self) -> None:
        assert self._selector is not None
        now = time.monotonic()
        deadlines = [c.deadline if c.pending is not None else c.active + self.idle_timeout
                     for c in self._clients.values()]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
        for key, mask in self._selector.select(timeout):
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                _drain(key.fileobj)
            else:
                client = self._clients.get(key.fd)
                if client is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(client)
                    if mask & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                        self._flush(client)
                except OSError:
                    self._close(client)
        for client in list(self._clients.values()):
            try:
                self._advance(client)
            except OSError:
                self._close(client)
        self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            # A running call is not idle (its reply is bounded by reply_timeout); a reply
            # that stops draining is, like a silent client.
            if client.pending is None and now - client.active >= self.idle_timeout:
                log.info("control: closing %s: idle for %g s", client.peer, self.idle_timeout)
                self._close(client)

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control: cannot accept a connection: %s", exc.strerror)
                    return
                raise
            sock.setblocking(False)
            peer = _peer(sock)
            if len(self._clients) >= self.max_clients:
                log.warning("control: refusing %s: %d clients already connected", peer, self.max_clients)
                try:
                    sock.send(encode_reply({"ok": False, "error": "too many clients connected"}))
                except OSError:
                    pass
                sock.close()
                continue
            client = _Client(sock, peer)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ)
            log.debug("control: %s connected", peer)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(self.max_line)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._close(client)
            return
        if not data:
            client.eof = True
            return
        client.inbuf += data

    def _advance(self, client: _Client) -> None:
        """Finish a pending call, start the next request, update interest, close when done."""
        if client.sock.fileno() < 0:
            return
        if client.pending is not None:
            if client.pending.done():
                try:
                    reply = client.pending.result()
                except BaseException as exc:  # noqa: BLE001 - dispatch() catches Exception itself
                    reply = reply_to(client.pending_request, {
                        "ok": False, "error": f"internal error: {type(exc).__name__}"})
                if isinstance(reply, Future):
                    # The frame loop took the request and is finishing it: its worker is free,
                    # the reply (what happened) waits here, bounded once more.
                    self._await(client, reply)
                else:
                    self._queue_reply(client, reply)
                    client.pending = client.pending_request = None
            elif time.monotonic() >= client.deadline:
                request = client.pending_request
                log.warning("control: %s from %s: no answer from the daemon within %g s",
                            request.cmd if request else "request", client.peer, self.reply_timeout)
                self._queue_reply(client, reply_to(request, {"ok": False, "error": self._late(client)}))
                client.pending = client.pending_request = None
        while client.pending is None and len(client.outbuf) < MAX_PENDING_OUTPUT:
            line = self._next_line(client)
            if line is None:
                break
            self._start(client, line)
        if client.outbuf:
            self._flush(client)
        if client.sock.fileno() < 0:
            return
        done = client.eof and client.pending is None and not client.outbuf and not client.inbuf
        if done:
            self._close(client)
            return
        if len(client.outbuf) > MAX_PENDING_OUTPUT:
            log.warning("control: dropping %s: it does not read its replies", client.peer)
            self._close(client)
            return
        # Requests are taken one at a time (replies stay in order); reading stops
        # once a line's worth is buffered, so a client that floods requests is
        # held back by its own socket buffer, not by our memory.
        events = 0
        if not client.eof and len(client.inbuf) <= self.max_line:
            events |= selectors.EVENT_READ
        if client.outbuf:
            events |= selectors.EVENT_WRITE
        if events == 0 and client.pending is None:
            self._close(client)  # nothing to read, nothing to write, no call running
            return
        self._watch(client, events)

    def _watch(self, client: _Client, events: int) -> None:
        assert self._selector is not None
        if events == client.events:
            return
        if client.events == 0:
            self._selector.register(client.sock, events)
        elif events == 0:
            self._selector.unregister(client.sock)  # a completed call wakes the loop
        else:
            self._selector.modify(client.sock, events)
        client.events = events

    def _next_line(self, client: _Client) -> bytes | bytearray | None:
        """The next complete request line, handling oversized lines and a final unterminated one."""
        while True:
            newline = client.inbuf.find(b"\n")
            if client.discarding:
                if newline < 0:
                    client.inbuf.clear()
                    if client.eof:
                        client.discarding = False
                    return None
                del client.inbuf[:newline + 1]
                client.discarding = False
                continue
            if newline < 0:
                if len(client.inbuf) > self.max_line:
                    client.inbuf.clear()
                    client.discarding = True
                    self._queue_reply(client, self._too_long())
                    continue
                if client.eof and client.inbuf:  # the last request may lack its newline
                    line = bytes(client.inbuf)
                    client.inbuf.clear()
                    return line
                return None
            line = bytes(client.inbuf[:newline])
            del client.inbuf[:newline + 1]
            if len(line) + 1 > self.max_line:
                self._queue_reply(client, self._too_long())
                continue
            line = line.rstrip(b"\r")
            if line.strip():
                return line

    def _too_long(self) -> dict[str, Any]:
        return {"ok": False, "error": f"request line longer than {self.max_line} bytes"}

    def _start(self, client: _Client, line: bytes) -> None:
        try:
            request = parse_request(line)
        except RequestError as exc:
            log.info("control: bad request from %s: %s", client.peer, exc)
            reply = {"ok": False, "error": str(exc)}
            self._queue_reply(client, reply if exc.req_id is None else {**reply, "id": exc.req_id})
            return
        level = logging.INFO if request.cmd in STATE_CHANGES else logging.DEBUG
        log.log(level, "control: %s%s from %s", request.cmd,
                "".join(f" {k}={v!r}" for k, v in request.args.items()), client.peer)
        assert self._executor is not None
        client.pending_request, client.taken = request, False
        self._await(client, self._executor.submit(dispatch, self.controller, request))

    def _await(self, client: _Client, future: Future) -> None:
        """Wait (in this loop, not a worker) for `future`, the call's or the frame loop's."""
        client.taken = client.pending is not None  # the second wait: the frame loop's
        future.add_done_callback(lambda _f: self._wake())
        client.pending = future
        now = time.monotonic()
        # A call's own timeout is reply_timeout (FrameCommands.call): the grace lets its
        # definite answer (withdrawn, or taken) arrive before this backstop fires.
        client.deadline, client.active = now + self.reply_timeout + REPLY_GRACE_S, now

    def _late(self, client: _Client) -> str:
        """The backstop's error line: what is known about a request with no answer."""
        if client.taken:
            return (f"the frame loop took the request and had not finished it "
                    f"{self.reply_timeout:g} s later (it takes effect when the loop finishes, "
                    "unless it fails: see the log)")
        # A controller call stuck before any frame-loop hand-off: nothing here knows more.
        return (f"the daemon did not answer within {self.reply_timeout:g} s (a call stuck "
                "outside the frame loop: whether it took effect is unknown, see the log)")

    def _queue_reply(self, client: _Client, reply: dict[str, Any]) -> None:
        if self.on_reply is not None:
            self.on_reply(reply.get("ok") is True)
        client.outbuf += encode_reply(reply)
        client.active = time.monotonic()

    def _flush(self, client: _Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                self._close(client)
                return
            del client.outbuf[:sent]
            if sent:
                client.active = time.monotonic()

    def _close(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            if self._selector is not None and client.events:
                try:
                    self._selector.unregister(client.sock)
                except (KeyError, ValueError):
                    pass
            self._clients.pop(fd, None)
            client.sock.close()
            log.debug("control: %s disconnected", client.peer)

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:
            pass  # full (a wake-up is already pending) or closed


class _Workers:
    """A few daemon threads for controller calls: a call that never returns cannot hold up
    the process's exit (ThreadPoolExecutor joins its threads at exit)."""

    def __init__(self, count: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"ppx-control-call-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((fn, args, future))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting side
                future.set_exception(exc)


def _peer(sock: socket.socket) -> str:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"pid {pid} uid {uid}"
    except OSError:
        return "a client"


def _drain(sock: Any) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass
