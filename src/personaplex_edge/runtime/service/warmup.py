"""The warm-up frames `serve` runs before READY, and what they measure: the frame loop's time
(p50, p99: the jitter the playback FIFO covers) and, beside it, how late a thread scheduled like
the audio threads wakes (the jitter the ALSA buffer covers). `check` runs the same frames when
the config fixes `audio.preroll_ms`, so both refuse the same configs with the same line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from personaplex_edge.runtime.audio.headroom import (
    WakeupProbe,
    Wakeups,
    buffer_problem,
    preroll_problem,
)
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.core.conversation import Conversation

WARMUP_FRAMES = 24
STEADY_AFTER = 4  # the first calls pay for allocations and kernel selection


@dataclass(frozen=True)
class Warmup:
    """What the warm-up measured."""

    p50_ms: float
    p99_ms: float
    frames: int  # the steady frames the percentiles come from
    wakeups: Wakeups

    @property
    def jitter_ms(self) -> float:
        return self.p99_ms - self.p50_ms

    def milder(self, other: Warmup) -> Warmup:
        """Of two warm-ups, the smaller jitter and the smaller wake-up lateness."""
        frames = self if self.jitter_ms <= other.jitter_ms else other
        return Warmup(frames.p50_ms, frames.p99_ms, frames.frames,
                      self.wakeups.milder(other.wakeups))

    def problems(self, audio: AudioSettings) -> list[str]:
        """The config's period, buffer depth or pre-roll that cannot hold what was measured."""
        found = [buffer_problem(audio, self.wakeups),
                 preroll_problem(audio, self.jitter_ms, self.frames)]
        return [line for line in found if line]


def measure(conversation: Conversation, audio: AudioSettings,
            stop: threading.Event | None = None) -> Warmup | None:
    """warm_up(); where what it measured refuses the config, once more, keeping the milder of
    the two (a refusal stops the car's assistant until the config is edited)."""
    warm = warm_up(conversation, audio.rt_priority, stop)
    if warm is None or not warm.problems(audio):
        return warm
    again = warm_up(conversation, audio.rt_priority, stop)
    return None if again is None else warm.milder(again)


def warm_up(conversation: Conversation, rt_priority: int,
            stop: threading.Event | None = None) -> Warmup | None:
    """WARMUP_FRAMES frames of silence through `conversation` (on its persona), the wake-up
    probe running beside them; None if `stop` was set meanwhile."""
    silence = np.zeros(conversation.session.frame_samples, np.float32)
    times = []
    with WakeupProbe(rt_priority) as probe:
        for _ in range(WARMUP_FRAMES):
            if stop is not None and stop.is_set():
                return None
            t0 = time.perf_counter()
            conversation.step(silence)
            times.append((time.perf_counter() - t0) * 1e3)
    steady = times[STEADY_AFTER:]
    return Warmup(float(np.percentile(steady, 50)), float(np.percentile(steady, 99)), len(steady),
                  probe.result())
