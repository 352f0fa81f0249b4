"""The websocket endpoint: `/api/chat` speaking PersonaPlex's protocol, and a client's static files.

One asyncio loop on its own thread (websockets). For each client: check access (loopback, or
the token), parse the query, ask the daemon for the model (`Host.network_open`, which runs
between frames on the frame loop's thread and answers with a `Link`), send the handshake once
the persona is ready, then three tasks until one ends: receive (Ogg/Opus -> jitter buffer),
send (model replies -> Ogg/Opus pages and text pieces, paced by the model's frames) and watch
(timeouts, the round trip, an end from the frame loop's side). Whatever ends a session ends
only that session: the client gets an error message with the reason, and a close.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from personaplex_edge.runtime.constants import SAMPLE_RATE
from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.network import protocol
from personaplex_edge.runtime.network.access import allowed, tls_context
from personaplex_edge.runtime.network.flood import FloodGuard
from personaplex_edge.runtime.network.link import Link
from personaplex_edge.runtime.network.opus import OpusDecoder, OpusEncoder
from personaplex_edge.runtime.network.protocol import ChatRequest, Kind, ProtocolError

log = logging.getLogger("personaplex.network")

WATCH_S = 0.2  # how often timeouts and ends from the frame loop are looked at
SEND_TIMEOUT_S = 2.0  # a send (and the final error message) that waits longer: a slow reader
MAX_STATIC_BYTES = 32 << 20
POLICY_VIOLATION, NORMAL = 1008, 1000


class Host(Protocol):
    """The daemon, as the endpoint sees it."""

    def network_open(self, request: ChatRequest, peer: str) -> Future[Link]:
        """Ask for the model (runs between frames); the Link, or PpxError with the reason."""
        ...

    def network_refused(self) -> None: ...

    def network_bytes(self, direction: str, count: int) -> None: ...

    def network_decode_error(self) -> None: ...

    def network_rtt(self, seconds: float | None) -> None: ...


@dataclass(frozen=True)
class EndpointSettings:
    host: str
    port: int
    token: str | None
    tls_cert: Path | None
    tls_key: Path | None
    static_dir: Path | None
    idle_timeout_s: float
    max_session_s: float
    start_timeout_s: float
    max_message_bytes: int
    max_clients: int
    ping_interval_s: float


def _end_when_open(future: Future[Link]) -> None:
    """A start that finished after its client stopped waiting: end that session at once."""
    if not future.cancelled() and future.exception() is None:
        future.result().end("the client's start timed out")


def _abandon(future: Future[Link]) -> bool:
    """Stop waiting for a start: True if it was withdrawn (it never runs), False if the frame
    loop had taken it (the session is ended once it exists, and counted when it ends)."""
    if future.cancel():
        return True
    future.add_done_callback(_end_when_open)
    return False


def _static_file(root: Path, path: str) -> tuple[str, bytes] | str:
    """(file name, contents) of a URL path under `root`, or why not ("not found", "too large")."""
    try:
        base = root.resolve()
        target = (base / (unquote(path).lstrip("/") or "index.html")).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            return "not found"
        if target.stat().st_size > MAX_STATIC_BYTES:
            return "too large"
        return target.name, target.read_bytes()
    except (ValueError, OSError):  # a NUL in the path, no permission, a file gone meanwhile
        return "not found"


class NetworkServer:
    def __init__(self, settings: EndpointSettings, host: Host) -> None:
        self.settings = settings
        self.host = host
        self.port: int | None = None
        self.clients = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._links: set[Link] = set()
        self._stopping = asyncio.Event()  # set on the loop: clients waiting in _open are told
        self._opening = 0  # clients waiting for the model
        import av  # noqa: F401 - missing: one line at start-up (extras.py), not per client
        import websockets  # noqa: F401

        s = settings
        self._ssl = tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None

    # -- life ---------------------------------------------------------------------------
    def start(self) -> int:
        """Listen (ConfigError when the address cannot be had); returns the bound port."""
        self._thread = threading.Thread(target=self._main, name="ppx-network", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            s = self.settings
            why = getattr(self._failure, "strerror", None) or str(self._failure)
            raise ConfigError(f"network: cannot listen on {s.host}:{s.port}: {why}")
        scheme = "https" if self._ssl else "http"
        log.info("network endpoint on %s://%s:%d%s%s", scheme, self.settings.host, self.port,
                 protocol.CHAT_PATH, f", static files from {self.settings.static_dir}"
                 if self.settings.static_dir else "")
        return int(self.port or 0)

    def stop(self, reason: str = "the daemon is stopping") -> None:
        for link in list(self._links):
            link.end(reason)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            thread.join(5.0)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # noqa: BLE001 - told to start(), which says it in one line
            self._failure = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        from websockets.asyncio.server import serve

        s = self.settings
        self._server = await serve(
            self._chat, s.host, s.port, ssl=self._ssl, process_request=self._http,
            # Messages up to 4x the limit reach _receive, which says what was too big; beyond
            # that websockets closes with 1009 itself before buffering them.
            max_size=4 * s.max_message_bytes, max_queue=16, compression=None,
            ping_interval=s.ping_interval_s, ping_timeout=max(10.0, 2 * s.ping_interval_s),
            close_timeout=2.0, open_timeout=10.0, write_limit=64 * 1024,
            logger=logging.getLogger("personaplex.network.websockets"))
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        self._stopping.set()
        for _ in range(int((SEND_TIMEOUT_S + 1.0) / 0.05)):  # their refusal goes out first
            if not self._opening:
                break
            await asyncio.sleep(0.05)
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 4.0)
            except asyncio.TimeoutError:
                pass
        asyncio.get_running_loop().stop()

    # -- HTTP before the upgrade: access, static files ------------------------------------
    async def _http(self, connection, request):
        path = urlsplit(request.path).path
        if path == protocol.CHAT_PATH:
            peer = str(connection.remote_address[0])
            why = allowed(peer, request.path, request.headers.get("Authorization"),
                          self.settings.token)
            if why is not None:
                log.warning("network client %s refused: %s", peer, why)
                self.host.network_refused()
                return connection.respond(401, why + "\n")
            if self.clients >= self.settings.max_clients:
                self.host.network_refused()
                return connection.respond(503, f"busy: {self.clients} clients connected "
                                               "(network.max_clients)\n")
            return None
        root = self.settings.static_dir
        if root is None:
            return connection.respond(404, "not found (no static files: serve --static DIR)\n")
        # Read off the loop's thread: a large file, or a slow disk, must not stall the sessions.
        found = await asyncio.to_thread(_static_file, root, path)
        if isinstance(found, str):
            return connection.respond(404 if found == "not found" else 413, found + "\n")
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        name, body = found
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")])
        return Response(200, "OK", headers, body)

    # -- a client -------------------------------------------------------------------------
    async def _chat(self, ws) -> None:
        self.clients += 1
        peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        try:
            try:
                request = ChatRequest.from_query(urlsplit(ws.request.path).query)
            except ProtocolError as exc:
                await self._refuse(ws, peer, str(exc))
                return
            link = await self._open(ws, peer, request)
            if link is not None:
                self._links.add(link)
                try:
                    await self._converse(ws, link)
                finally:
                    # Whatever happened here, the model goes back: never a session without
                    # its client (the frame loop ends it at its next frame).
                    link.end("connection lost")
                    self._links.discard(link)
        finally:
            self.clients -= 1

    async def _open(self, ws, peer: str, request: ChatRequest) -> Link | None:
        future = self.host.network_open(request, peer)
        opened = asyncio.wrap_future(future)
        stopping = asyncio.ensure_future(self._stopping.wait())
        self._opening += 1
        try:
            done, _ = await asyncio.wait({opened, stopping}, timeout=self.settings.start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the handler itself: never a session without its client
            _abandon(future)
            opened.cancel()
            self._opening -= 1
            raise
        finally:
            stopping.cancel()
        try:
            if opened in done:
                try:
                    return opened.result()
                except PpxError as exc:
                    why = str(exc)
                except Exception as exc:  # noqa: BLE001 - a bug: said in one line, the cabin runs on
                    log.error("network session from %s could not start: %s: %s", peer,
                              type(exc).__name__, exc)
                    why = f"the model could not start the session ({type(exc).__name__})"
                await self._refuse(ws, peer, why)
                return None
            withdrawn = _abandon(future)
            opened.cancel()  # a late outcome is _end_when_open's, not an unread exception here
            why = "the daemon is stopping" if self._stopping.is_set() else (
                f"the model was not ready within {self.settings.start_timeout_s:g} s "
                "(network.start_timeout_s)")
            # Taken by the frame loop: the session starts and ends, and is counted then.
            await self._refuse(ws, peer, why, count=withdrawn)
            return None
        finally:
            self._opening -= 1

    async def _refuse(self, ws, peer: str, why: str, count: bool = True) -> None:
        log.warning("network client %s refused: %s", peer, why)
        if count:
            self.host.network_refused()
        await self._say_and_close(ws, why, POLICY_VIOLATION)

    async def _say_and_close(self, ws, why: str | None, code: int) -> None:
        try:
            if why is not None:
                await asyncio.wait_for(ws.send(protocol.error(why)), SEND_TIMEOUT_S)
            await asyncio.wait_for(ws.close(code, protocol.close_reason(why or "")),
                                   SEND_TIMEOUT_S + 2.0)
        except Exception:  # noqa: BLE001 - a client that is gone or does not read: drop it
            ws.transport.abort()

    async def _converse(self, ws, link: Link) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        link.wake = lambda: loop.call_soon_threadsafe(wake.set)
        if link.closed:
            wake.set()
        decoder, encoder = OpusDecoder(), OpusEncoder()
        last_audio = time.monotonic()
        code = NORMAL

        async def receive() -> None:
            nonlocal last_audio, code
            from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

            limit = self.settings.max_message_bytes
            # A burst of what the jitter buffer holds and 2 s more (and websockets' queue of
            # messages), then at most twice real time: decoding shares the frame loop's CPUs.
            flood = FloodGuard(link.jitter.max / SAMPLE_RATE + 2.0, 16 * limit)
            try:
                async for data in ws:
                    if len(data) > limit:
                        raise ProtocolError(f"message: {len(data)} bytes, more than "
                                            f"network.max_message_bytes ({limit})")
                    kind, payload = protocol.split(data)
                    link.bytes_in += len(data)
                    self.host.network_bytes("in", len(data))
                    pcm = None
                    if kind == Kind.AUDIO:
                        try:
                            pcm = decoder.feed(payload)
                        except ProtocolError:
                            self.host.network_decode_error()
                            raise
                        link.jitter.push(pcm)
                        last_audio = time.monotonic()
                    elif kind not in (Kind.PING, Kind.CONTROL):  # harmless: nothing to do
                        raise ProtocolError(f"message: kind {int(kind)} ({kind.name.lower()}) "
                                            "is not one a client sends (audio, control, ping)")
                    flood.check(time.monotonic(), len(data),
                                0.0 if pcm is None else len(pcm) / SAMPLE_RATE)
            except ProtocolError as exc:
                code = POLICY_VIOLATION
                link.end(str(exc))
                return
            except ConnectionClosedOK:
                pass
            except ConnectionClosed:
                link.end("connection lost")
                return
            link.end(None)  # the client closed

        async def send() -> None:
            while True:
                await wake.wait()
                wake.clear()
                for pcm, text in link.take():
                    page = encoder.encode(pcm)
                    for data in ((protocol.message(Kind.AUDIO, page),) if page else ()) + (
                            (protocol.message(Kind.TEXT, text.encode()),) if text else ()):
                        await asyncio.wait_for(ws.send(data), SEND_TIMEOUT_S)
                        link.bytes_out += len(data)
                        self.host.network_bytes("out", len(data))
                if link.closed:
                    return

        async def watch() -> None:
            nonlocal last_audio
            s = self.settings
            while not link.closed:
                await asyncio.sleep(WATCH_S)
                now = time.monotonic()
                # Idle counts from the last audio the model has yet to hear: not from the depth,
                # which keeps a remnant shorter than a frame for good.
                if link.jitter.playable:
                    last_audio = now
                if now - last_audio > s.idle_timeout_s:
                    link.end(f"idle: no audio for {s.idle_timeout_s:g} s (network.idle_timeout_s)")
                elif now - link.started > s.max_session_s:
                    link.end(f"time: the session reached network.max_session_s ({s.max_session_s:g} s)")
                self.host.network_rtt(ws.latency or None)

        try:
            await asyncio.wait_for(ws.send(protocol.handshake()), SEND_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - gone while the model got ready: end the session
            link.end("connection lost")
            ws.transport.abort()
            return
        tasks = [asyncio.create_task(t()) for t in (receive, send, watch)]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.TimeoutError):
                link.end("slow reader: a send did not complete within "
                         f"{SEND_TIMEOUT_S:g} s")
            elif isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                link.end(f"connection: {type(result).__name__}")
        link.end(None)
        self.host.network_rtt(None)
        if link.reason is not None:
            log.info("network session from %s: %s", link.peer, link.reason)
        await self._say_and_close(ws, link.reason, code)
