"""The incoming side's jitter buffer: decoded network audio in, one 80 ms frame per model step out.

The network delivers audio in bursts (Ogg pages of 20..100 ms, late packets, a Wi-Fi hiccup);
the frame loop takes a frame every 80 ms on the cabin's clock. The buffer starts handing out
frames once it holds `target_ms` beyond a frame, and when it runs dry it hands out nothing
(the model hears silence for that frame, counted as an underrun) and buffers `target_ms`
again before it goes on. Above `max_ms` the oldest audio is dropped at once (an overflow): a
client that sends faster than real time cannot grow the memory. Below it, a standing excess is
trimmed: when even the lowest depth after a frame stayed above `target_ms` plus a frame plus a
margin for `trim_s` (a burst that was never played down, a client clock faster than
the cabin's), the oldest audio above `target_ms` goes (a drop, counted), so the latency comes
back to the start level instead of staying late for the rest of the session.

Every sample's wait is measured (push time to the pop that hands it to the model, for the
first sample of each frame): `wait_ms` is this buffer's share of the mic-to-speaker latency.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from personaplex_edge.runtime.constants import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE

WAIT_WINDOW = 125  # frames the mean wait follows (10 s)
TRIM_MARGIN = FRAME_SAMPLES // 2  # 40 ms of slack above target + one frame: jitter, not excess


class JitterBuffer:
    """Thread-safe: `push` from the network thread, `pop` from the frame loop."""

    def __init__(self, target_ms: float = 40.0, max_ms: float = 1000.0,
                 trim_s: float = 2.0) -> None:
        self.target = int(target_ms * SAMPLE_RATE / 1000)
        self.trim_frames = round(trim_s * FRAME_RATE)  # 0: never trim
        self.max = max(int(max_ms * SAMPLE_RATE / 1000), self.target + FRAME_SAMPLES)
        self._chunks: deque[tuple[np.ndarray, float]] = deque()  # (samples, push time)
        self._depth = 0
        self._head = 0  # samples of the first chunk already handed out
        self._lock = threading.Lock()
        self.started = False  # playing out (False: buffering up to the target)
        self.ever_started = False
        self.underruns = self.overflows = self.drops = 0
        self.dropped_samples = 0
        self._high = 0  # frames in a row whose depth after the pop was above the trim level
        self._low = 0  # the lowest of those depths: the excess that was never needed
        self._waits: deque[float] = deque(maxlen=WAIT_WINDOW)

    def push(self, pcm: np.ndarray) -> None:
        if not len(pcm):
            return
        with self._lock:
            self._chunks.append((np.asarray(pcm, np.float32), time.monotonic()))
            self._depth += len(pcm)
            if self._depth > self.max:
                self.overflows += 1
                extra = self._depth - self.max
                self._take(extra)  # the oldest go: the latency stays bounded
                self.dropped_samples += extra

    def pop(self) -> np.ndarray | None:
        """The next 80 ms frame, or None (buffering, or an underrun)."""
        with self._lock:
            if not self.started:
                if self._depth < FRAME_SAMPLES + self.target:
                    return None
                self.started = self.ever_started = True
            if self._depth < FRAME_SAMPLES:
                self.started = False
                self.underruns += 1
                return None
            self._waits.append((time.monotonic() - self._chunks[0][1]) * 1e3)
            frame = self._take(FRAME_SAMPLES)
            self._trim()
            return frame

    def _trim(self) -> None:
        """Drop a standing excess: the depth's minimum over trim_frames, less the target."""
        if not self.trim_frames or self._depth <= self.target + FRAME_SAMPLES + TRIM_MARGIN:
            self._high = 0
            return
        self._low = self._depth if self._high == 0 else min(self._low, self._depth)
        self._high += 1
        if self._high >= self.trim_frames:
            excess = self._low - self.target
            self._take(excess)  # the oldest: what arrived earliest is the latency
            self.dropped_samples += excess
            self.drops += 1
            self._high = 0

    def _take(self, count: int) -> np.ndarray:
        out = np.empty(count, np.float32)
        at = 0
        while at < count:
            chunk, _ = self._chunks[0]
            n = min(count - at, len(chunk) - self._head)
            out[at:at + n] = chunk[self._head:self._head + n]
            at += n
            self._head += n
            if self._head == len(chunk):
                self._chunks.popleft()
                self._head = 0
        self._depth -= count
        return out

    @property
    def playable(self) -> bool:
        """Whether the next pop hands out a frame: audio the model has yet to hear (a remnant
        shorter than a frame, or than the start level, is not: it may stay for good)."""
        return self._depth >= FRAME_SAMPLES + (0 if self.started else self.target)

    @property
    def depth_ms(self) -> float:
        return self._depth * 1000 / SAMPLE_RATE

    @property
    def wait_ms(self) -> float | None:
        """Mean time a frame's first sample waited here (the last 10 s of frames)."""
        waits = list(self._waits)
        return float(np.mean(waits)) if waits else None

    def stats(self) -> dict[str, float | int | None]:
        wait = self.wait_ms
        return {"depth_ms": round(self.depth_ms, 1), "wait_ms": None if wait is None else round(wait, 1),
                "underruns": self.underruns, "overflows": self.overflows, "drops": self.drops}
