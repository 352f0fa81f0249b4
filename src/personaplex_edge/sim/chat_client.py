"""A Python client of the daemon's network endpoint (PersonaPlex's protocol), for tests and bench.

    client = ChatClient.connect("ws://127.0.0.1:8998/api/chat?seed=42")
    client.wait_handshake()
    client.send_pcm(audio)          # 24 kHz float32: Ogg/Opus pages, one per 80 ms frame
    ... client.reply_pcm(), client.text, client.errors, client.closed

A reader thread collects everything the server sends: decoded reply audio (with the arrival
time of each page), text pieces, error messages, and the close code.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.runtime.network import protocol
from personaplex_edge.runtime.network.opus import OpusDecoder, OpusEncoder
from personaplex_edge.runtime.network.protocol import Kind


class Refused(Exception):
    pass


@dataclass
class ChatClient:
    ws: object
    handshake_at: float | None = None
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, 24 kHz pcm)
    pages: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    closed: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def connect(cls, url: str, headers: dict[str, str] | None = None, ssl=None,
                timeout: float = 30.0) -> ChatClient:
        from websockets.sync.client import connect

        # Entered here and closed by close(): the client outlives this call.
        ws = connect(url, additional_headers=headers, open_timeout=timeout, max_size=None,
                     ssl=ssl, compression=None).__enter__()
        client = cls(ws)
        client._decoder = OpusDecoder()
        client._encoder = OpusEncoder()
        client._handshake = threading.Event()
        threading.Thread(target=client._read, daemon=True).start()
        return client

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                data = self.ws.recv()
                now = time.monotonic()
                kind, payload = Kind(data[0]), data[1:]
                if kind == Kind.HANDSHAKE:
                    self.handshake_at = now
                    self._handshake.set()
                elif kind == Kind.AUDIO:
                    self.pages.append(payload)
                    self.audio.append((now, self._decoder.feed(payload)))
                elif kind == Kind.TEXT:
                    self.text.append(payload.decode())
                elif kind == Kind.ERROR:
                    self.errors.append(payload.decode())
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        finally:
            self.closed.set()
            self._handshake.set()

    def wait_handshake(self, timeout: float = 60.0) -> float:
        if not self._handshake.wait(timeout):
            raise TimeoutError("no handshake")
        if self.handshake_at is None:
            raise Refused("; ".join(self.errors) or f"closed ({self.close_code})")
        return self.handshake_at

    def encode(self, pcm: np.ndarray) -> list[bytes]:
        """24 kHz float32 -> Ogg pages, one per 80 ms (the first carries the headers too)."""
        pcm = np.asarray(pcm, np.float32)
        return [self._encoder.encode(pcm[i:i + FRAME_SAMPLES])
                for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]

    def send(self, data: bytes) -> None:
        self.ws.send(data)

    def send_audio(self, page: bytes) -> None:
        self.ws.send(protocol.message(Kind.AUDIO, page))

    def reply_pcm(self) -> np.ndarray:
        parts = [pcm for _, pcm in list(self.audio)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        return self.closed.wait(timeout)

    def close(self) -> None:
        self.ws.close()
