"""How much model audio the playback FIFO keeps ahead of the speaker.

Frames arrive every 80 ms, each when the model has it; the speaker takes a period at a time. The
FIFO's low point, just before a period is taken, must still hold that period plus how late a
frame can come against the average (the compute jitter, p99 - p50 of the frame loop, measured
live under the real load), plus what the playback resampler may hold back, plus a small margin
for the threads' own wake-ups. Anything above that is latency the driver hears for the rest of
the drive, so the playback thread trims the FIFO down to the target while the output is silent
(playback.py). An underrun means the target was too low for this cabin: it grows by a period,
and the growth fades out slowly (a minute per period) while no underrun comes back.
"""

from __future__ import annotations

import threading

# The capture read's and the playback thread's wake-up jitter: real-time threads woke at most
# 0.2 to 0.6 ms late beside the warm-up on a quiet 2-vCPU Xeon (headroom.py's probe); the GIL's
# longer waits under load raise it: the margin is at least what the daemon's warm-up measured.
MARGIN_MS = 1.0
MARGIN_NO_RT_MS = 10.0  # the same where the kernel refused real-time scheduling
GROWTH_DECAY_S = 60.0  # an underrun's growth of one period fades over this long
GROWTH_MAX_MS = 80.0  # at most a frame's worth of growth


class FifoTarget:
    """The FIFO's target above the period being taken, in milliseconds (thread-safe)."""

    def __init__(self, jitter_ms: float, hold_ms: float, margin_ms: float = MARGIN_MS) -> None:
        self._lock = threading.Lock()
        self._jitter_ms = max(0.0, float(jitter_ms))
        self.hold_ms = float(hold_ms)
        self.margin_ms = float(margin_ms)
        self._growth_ms = 0.0
        self._growth_at = 0.0  # when _growth_ms was last set (monotonic seconds)
        self._period_ms = 0.0

    @property
    def jitter_ms(self) -> float:
        return self._jitter_ms

    def set_jitter_ms(self, ms: float) -> None:
        """The frame loop's live p99 - p50 (the daemon, about once a second)."""
        with self._lock:
            self._jitter_ms = max(0.0, float(ms))

    def underrun(self, period_ms: float, now: float) -> None:
        """The model was late for a period: keep a period more from now on."""
        with self._lock:
            self._growth_ms = min(GROWTH_MAX_MS, self._growth(now) + period_ms)
            self._growth_at, self._period_ms = now, period_ms

    def growth_ms(self, now: float) -> float:
        with self._lock:
            return self._growth(now)

    def ms(self, now: float) -> float:
        """What the FIFO keeps above the period being taken."""
        with self._lock:
            return self._jitter_ms + self.hold_ms + self.margin_ms + self._growth(now)

    def _growth(self, now: float) -> float:
        if self._growth_ms <= 0.0:
            return 0.0
        faded = (now - self._growth_at) / GROWTH_DECAY_S * max(self._period_ms, 1.0)
        return max(0.0, self._growth_ms - faded)
