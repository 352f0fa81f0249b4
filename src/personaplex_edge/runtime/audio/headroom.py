"""Can the configured buffers hold the jitter measured on this device? One line when not.

Two jitters decide whether audio flows unbroken:

- **the audio threads' wake-up lateness.** When the playback device has room for a period, it
  still holds buffer_periods - 1 periods; the playback thread must wake and write the next one
  before they have played (the capture side mirrors it: a period is read while the rest of the
  buffer fills). `WakeupProbe` measures how late a thread scheduled like the audio threads
  (SCHED_FIFO at rt_priority where granted) wakes from a timed sleep, GIL included, while the
  model runs its warm-up frames beside it: the load it will meet on the road.
- **the frame loop's compute jitter** (p99 - p50 of the warm-up frames), which a fixed
  `audio.preroll_ms` must cover; `auto` covers whatever is measured, live.

`check` and `serve` refuse a period size, buffer depth or pre-roll that cannot hold what was
measured, naming the field and the smallest value that works. One slow moment must not keep the
cabin silent (a refusal is exit 78, never restarted): a config is refused only when a second
measurement agrees, and the milder of the two is the one named.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from personaplex_edge.runtime.audio.realtime import enter_realtime
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.yaml_schema import settings_of

PROBE_INTERVAL_S = 0.002  # a wake-up every 2 ms: hundreds of samples in a second of warm-up
WORK_MS = 1.0  # a period's own work after the wake-up (canceller, resampler: ~0.4 ms per 10 ms)
_RANGES = {s.name: s.hi for s in settings_of(AudioSettings)}
MAX_BUFFER_PERIODS = int(_RANGES["buffer_periods"])
MAX_PERIOD_FRAMES = int(_RANGES["period_frames"])


@dataclass(frozen=True)
class Wakeups:
    """How late the probe thread woke: the largest lateness, over how many wake-ups."""

    late_ms: float
    count: int
    realtime: bool

    def milder(self, other: Wakeups) -> Wakeups:
        """Of two measurements, the one with the smaller worst case: a refusal needs both."""
        return self if self.late_ms <= other.late_ms else other


class WakeupProbe:
    """A thread that sleeps to a 2 ms grid and records how late it wakes, until stop()."""

    def __init__(self, rt_priority: int) -> None:
        self._prio = rt_priority
        self._stop = threading.Event()
        self._late: list[float] = []
        self._realtime = False
        self._thread = threading.Thread(target=self._run, name="ppx-wakeup-probe", daemon=True)

    def __enter__(self) -> WakeupProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> Wakeups:
        late = self._late[1:]  # the first wake-up pays for the thread's start
        return Wakeups(max(late, default=0.0), len(late), self._realtime)

    def _run(self) -> None:
        self._realtime = enter_realtime(self._prio) is None
        deadline = time.monotonic()
        while not self._stop.is_set():
            deadline += PROBE_INTERVAL_S
            wait = deadline - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            now = time.monotonic()
            self._late.append(max(0.0, now - deadline) * 1e3)
            deadline = max(deadline, now)  # late: the next wake-up counts from now


def probe_wakeups(rt_priority: int, seconds: float = 1.0) -> Wakeups:
    """The probe alone for `seconds` (check, when no model runs beside it): a lower bound of
    what serve measures beside the warm-up frames."""
    with WakeupProbe(rt_priority) as probe:
        time.sleep(seconds)
    return probe.result()


def probe_buffer(audio: AudioSettings, seconds: float = 0.5) -> tuple[Wakeups, str | None]:
    """The probe alone against the configured buffer, as `check` runs it without the model: a
    refusal needs a second probe to agree, and names the milder (as serve's warm-up does)."""
    wakeups = probe_wakeups(audio.rt_priority, seconds)
    if buffer_problem(audio, wakeups):
        wakeups = wakeups.milder(probe_wakeups(audio.rt_priority, seconds))
    return wakeups, buffer_problem(audio, wakeups)


def buffer_problem(audio: AudioSettings, wakeups: Wakeups) -> str | None:
    """None when the ALSA buffer leaves the audio threads time to wake as late as measured;
    else one line naming audio.buffer_periods (or audio.period_frames, where no buffer depth
    in range would do) and the smallest value that works."""
    rate = max(audio.capture_rate, audio.playback_rate)  # the shorter period is the tighter
    need_ms = wakeups.late_ms + WORK_MS

    def holds(frames: int, periods: int) -> bool:
        return (periods - 1) * 1e3 * frames / rate >= need_ms

    if holds(audio.period_frames, audio.buffer_periods):
        return None
    period_ms = 1e3 * audio.period_frames / rate
    measured = (f"leave the audio threads {(audio.buffer_periods - 1) * period_ms:.1f} ms to wake "
                f"and write, and a thread scheduled like them woke up to {wakeups.late_ms:.1f} ms "
                f"late here (the most of {wakeups.count} wake-ups"
                f"{', SCHED_FIFO' if wakeups.realtime else ''}; + {WORK_MS:g} ms for the period's work)")
    periods = _smallest(lambda n: holds(audio.period_frames, n),
                        math.ceil(need_ms / period_ms) + 1, audio.buffer_periods + 1, MAX_BUFFER_PERIODS)
    if periods is not None:
        return (f"audio.buffer_periods: {audio.buffer_periods} periods of {period_ms:.2f} ms "
                f"{measured}: the smallest that works is {periods}")
    frames = _smallest(lambda f: holds(f, audio.buffer_periods),
                       math.ceil(need_ms / (audio.buffer_periods - 1) * rate / 1e3),
                       audio.period_frames + 1, MAX_PERIOD_FRAMES)
    if frames is None:
        return (f"audio.period_frames: {audio.period_frames} x {audio.buffer_periods} periods "
                f"{measured}: no period up to {MAX_PERIOD_FRAMES} frames would do; give the audio "
                "threads real-time scheduling (audio.rt_priority and the unit's LimitRTPRIO)")
    return (f"audio.period_frames: {audio.period_frames} x {audio.buffer_periods} periods "
            f"{measured}: the smallest that works is {frames}")


def _smallest(works: Callable[[int], bool], guess: int, lo: int, hi: int) -> int | None:
    """The smallest n in lo..hi for which works(n) (monotonic), from a guess; None if none."""
    n = max(lo, min(hi, guess))
    while n > lo and works(n - 1):
        n -= 1
    while n <= hi and not works(n):
        n += 1
    return n if n <= hi else None


def preroll_problem(audio: AudioSettings, jitter_ms: float, frames: int) -> str | None:
    """None when audio.preroll_ms is auto or covers the measured compute jitter; else one line
    naming it and the smallest value that works."""
    fixed = audio.preroll_ms
    if fixed is None or fixed >= jitter_ms:
        return None
    return (f"audio.preroll_ms: {fixed:g} ms cannot hold the frame loop's measured jitter "
            f"({jitter_ms:.1f} ms, p99 - p50 of {frames} warm-up frames): the smallest that works "
            f"is {math.ceil(jitter_ms)}, or auto (follows the jitter live)")
