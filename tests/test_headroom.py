"""audio/headroom.py: the wake-up probe sees what delays the audio threads (the GIL included),
and the value a refusal names is the smallest that works: one less is refused again."""

from __future__ import annotations

import sys
import time

import pytest

from personaplex_edge.runtime.audio.headroom import (
    MAX_BUFFER_PERIODS,
    WakeupProbe,
    Wakeups,
    buffer_problem,
    preroll_problem,
)
from personaplex_edge.runtime.audio.settings import AudioSettings


def _named(line: str) -> tuple[str, int]:
    field = line.split(":", 1)[0].removeprefix("audio.")
    return field, int(line.rsplit("the smallest that works is ", 1)[1].split(",")[0])


def test_the_shipped_buffer_holds_a_real_time_thread() -> None:
    assert buffer_problem(AudioSettings(), Wakeups(late_ms=2.0, count=500, realtime=True)) is None


@pytest.mark.parametrize("late_ms", [0.2, 3.0, 9.5])
def test_a_shallow_buffer_names_the_smallest_depth_that_works(late_ms: float) -> None:
    audio = AudioSettings(period_frames=48, buffer_periods=2)  # 1 ms periods at 48 kHz
    wakeups = Wakeups(late_ms, 500, True)
    line = buffer_problem(audio, wakeups)
    assert line is not None and "\n" not in line
    field, value = _named(line)
    assert field == "buffer_periods" and f"up to {late_ms:.1f} ms late" in line
    assert buffer_problem(audio.replace(buffer_periods=value), wakeups) is None
    assert buffer_problem(audio.replace(buffer_periods=value - 1), wakeups) is not None


def test_where_no_depth_would_do_the_period_is_named() -> None:
    audio = AudioSettings(period_frames=32, buffer_periods=2)
    wakeups = Wakeups(40.0, 500, False)  # (32 - 1) periods of 0.67 ms hold 20.7 ms
    line = buffer_problem(audio, wakeups)
    assert line is not None
    field, value = _named(line)
    assert field == "period_frames" and audio.buffer_periods - 1 < MAX_BUFFER_PERIODS
    assert buffer_problem(audio.replace(period_frames=value), wakeups) is None
    assert buffer_problem(audio.replace(period_frames=value - 1), wakeups) is not None


def test_a_fixed_preroll_must_cover_the_measured_jitter() -> None:
    assert preroll_problem(AudioSettings(), 250.0, 20) is None  # auto follows it live
    assert preroll_problem(AudioSettings(preroll_ms=12.0), 12.0, 20) is None
    line = preroll_problem(AudioSettings(preroll_ms=5.0), 12.3, 20)
    assert line is not None and _named(line) == ("preroll_ms", 13)
    assert "12.3 ms" in line and "auto" in line


def test_the_probe_sees_a_thread_that_holds_the_gil() -> None:
    """Real time or not, a Python audio thread waits for the GIL: the probe must see it."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default: a holder keeps the GIL up to 5 ms
    try:
        with WakeupProbe(rt_priority=20) as probe:
            end = time.monotonic() + 0.4
            x = 0
            while time.monotonic() < end:  # pure Python: holds the GIL between switches
                x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    finally:
        sys.setswitchinterval(interval)
    busy = probe.result()
    assert busy.count >= 20 and busy.late_ms >= 1.0, busy


def test_a_refusal_needs_both_measurements() -> None:
    """serve and check measure again before refusing and keep the milder of the two."""
    slow, fast = Wakeups(30.0, 500, True), Wakeups(0.5, 500, True)
    assert slow.milder(fast) is fast and fast.milder(slow) is fast
    audio = AudioSettings(period_frames=96, buffer_periods=2)  # 2 ms: holds 0.5 ms + 1 ms of work
    assert buffer_problem(audio, slow) is not None and buffer_problem(audio, slow.milder(fast)) is None


def test_where_no_period_would_do_the_line_says_what_would() -> None:
    line = buffer_problem(AudioSettings(period_frames=32, buffer_periods=2), Wakeups(500.0, 500, False))
    assert line is not None and line.startswith("audio.period_frames: 32 x 2 periods")
    assert "no period up to 16384 frames would do" in line and "rt_priority" in line
