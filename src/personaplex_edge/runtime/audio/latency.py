"""Microphone-to-speaker latency of the daemon's audio path, traced frame by frame.

While playback runs unbroken, every sample the microphone takes reaches the speaker the same
time D later, as if the model echoed its input: the frame it lands in is complete 80 ms after the
frame's first sample, and the reply to that frame plays out sample for sample as the input came
in. The model's own response time counts that frame too, so in the car a reply comes the
model's figure plus D - 80 ms after what prompted it. Each frame is followed through the
daemon, and D is the sum of what it met on the way:

    frame        80 ms: the frame's first sample waits for its last one
    capture      ALSA: how long the read that completed the frame came after its last sample
                 was captured (`(buffered - read) / rate`, the capture buffer's level after the
                 read, plus the read's own processing)
    reframing    the audio past the frame's end that came out with it and waits in the FIFO
                 for the next frame: reads come a period at a time (a 10 ms block at a time
                 through the echo canceller), and soxr gives its output in blocks (about 35
                 ms at HQ; the default FIR gives it at once)
    resampling   what the capture resampler holds back: input taken, not yet given out (the
                 FIR's constant 1.3 ms; soxr's blocks)
    echo_cancel  webrtc: the part of a 10 ms block that waits for the next read, plus AEC3's own
                 processing delay (about 9 ms, measured once per canceller); 0 otherwise
    compute      the frame loop: from the frame's delivery to its reply (the model's step)
    preroll      the reply in the playback FIFO behind earlier audio: the pre-roll that absorbs
                 compute jitter and the playback resampler's bursts
    playback     the ALSA playback buffer: frames queued ahead of the period that starts the
                 reply (buffer size minus avail, measured just before that period is written)

Every part is a buffer level or a timestamp taken on the way, none a configured value, so the
sum is the real D for that frame (what ALSA's levels say; tests/test_latency.py checks it against
clicks timed by a clocked virtual device). The parts vary from frame to frame (soxr hands audio
over in ~35 ms blocks; compute jitters) while their sum stays put; the figures are means over
the last WINDOW frames. A playback underrun or a latency trim moves D, and the window follows.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
PARTS = ("frame", "capture", "reframing", "resampling", "echo_cancel", "compute", "preroll",
         "playback")
WINDOW = 64  # frames (5 s) the figures are averaged over


@dataclass
class FrameTrace:
    """One frame on its way: the capture side's parts (s) and the times it was handed on."""

    capture: float
    reframing: float
    resampling: float
    echo_cancel: float
    delivered: float  # time.monotonic() when the capture thread queued it
    written: float | None = None  # when the frame loop handed its reply to the playback side
    first: int = 0  # the reply's first sample in the playback FIFO's stream (device samples)


def capture_trace(now: float, measured: float, buffered: int | None, read: int, rate: int,
                  left_s: float, held_s: float, echo_s: float) -> FrameTrace:
    """The capture side of a frame delivered now, from the read that completed it.

    buffered: frames waiting in the ALSA capture buffer before the read (None: unknown), taken
    at `measured`; read: frames that read took; left_s: capture FIFO audio beyond the frame;
    held_s: what the capture resampler holds back; echo_s: the canceller's part."""
    waited = max(0, (buffered or 0) - read) / rate + (now - measured)
    return FrameTrace(capture=waited, reframing=left_s, resampling=held_s, echo_cancel=echo_s,
                      delivered=now)


class LatencyEstimate:
    """Means of the parts over the last WINDOW frames whose reply reached the speaker buffer."""

    def __init__(self, window: int = WINDOW) -> None:
        self._lock = threading.Lock()
        self._frames: deque[tuple[float, ...]] = deque(maxlen=window)

    def record(self, trace: FrameTrace, now: float, offset_s: float, queued_s: float) -> None:
        """The reply's first sample goes to ALSA `offset_s` into the period written at `now`,
        with `queued_s` of audio queued ahead of that period."""
        if trace.written is None:
            return
        parts = (FRAME_S, trace.capture, trace.reframing, trace.resampling, trace.echo_cancel,
                 trace.written - trace.delivered, now - trace.written + offset_s, queued_s)
        with self._lock:
            self._frames.append(parts)

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()

    def parts_ms(self) -> dict[str, float] | None:
        """{"total": ms, part: ms, ...} (rounded to 0.1 ms), or None before the first reply."""
        with self._lock:
            if not self._frames:
                return None
            means = np.mean(np.asarray(self._frames), axis=0) * 1000.0
        parts = {name: round(float(ms), 1) for name, ms in zip(PARTS, means, strict=True)}
        return {"total": round(float(means.sum()), 1), **parts}


def echo_processing_delay(make_canceller, rate: int) -> int:
    """Samples an echo canceller delays the mic by, measured on a fresh one: a click through it
    with a silent far end (WebRTC AEC3: 430 at 48 kHz, 224 at 24 kHz, about 9 ms)."""
    c = make_canceller()
    block = rate // 100
    x = np.zeros(30 * block, np.float32)
    at = 20 * block + block // 2
    x[at] = 0.5
    out = np.concatenate([c.process_near(x[i : i + block]) for i in range(0, len(x), block)])
    return max(0, int(np.argmax(np.abs(out))) - at)
