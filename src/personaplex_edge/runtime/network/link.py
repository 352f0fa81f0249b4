"""One network session's hand-over between the network thread and the frame loop.

The network thread pushes decoded audio into `jitter` and drains `replies`; the frame loop pops
a frame, steps the model and `deliver`s the reply. Either side may `end` the session with the
reason the client is told (None: a clean end, nothing to tell); the other side sees `closed`.
The reply queue is bounded: a client that does not read its replies is ended, never waited for.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from personaplex_edge.runtime.network.jitter import JitterBuffer

_ids = itertools.count(1)


class Link:
    def __init__(self, peer: str, persona: str, jitter: JitterBuffer, max_replies: int) -> None:
        self.id = next(_ids)
        self.peer = peer
        self.persona = persona
        self.jitter = jitter
        self.started = time.monotonic()
        self.max_replies = max_replies
        self.replies: deque[tuple[np.ndarray, str]] = deque()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.reason: str | None = None
        self.wake: Callable[[], None] = lambda: None  # the network thread's "replies waiting"
        self.bytes_in = self.bytes_out = 0
        self.frames_out = 0
        self.ready: dict = {}  # how the persona got ready: {"compiled": bool, "ms": float}

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def end(self, reason: str | None = None) -> None:
        """End the session (first caller's reason wins); the other side notices."""
        with self._lock:
            if self._closed.is_set():
                return
            self.reason = reason
            self._closed.set()
        self.wake()

    def deliver(self, pcm: np.ndarray, text: str) -> None:
        """The frame loop's reply to one frame; a full queue ends a client that does not read."""
        with self._lock:
            if len(self.replies) >= self.max_replies:
                full = True
            else:
                full = False
                self.replies.append((pcm, text))
                self.frames_out += 1
        if full:
            self.end(f"slow reader: {self.max_replies} reply frames "
                     f"({self.max_replies * 80} ms) not taken by the client")
            return
        self.wake()

    def take(self) -> list[tuple[np.ndarray, str]]:
        with self._lock:
            items = list(self.replies)
            self.replies.clear()
        return items

    def stats(self) -> dict:
        return {"id": self.id, "peer": self.peer, "persona": self.persona,
                "ready": self.ready,
                "age_s": round(time.monotonic() - self.started, 1), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "reply_frames": self.frames_out,
                "reply_queue": len(self.replies), "jitter": self.jitter.stats()}
