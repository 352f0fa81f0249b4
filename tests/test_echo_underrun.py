"""A playback underrun keeps the echo reference of what did play (house issue 15).

EchoPath with the real WebRTC AEC3, driven the way the playback and capture threads drive it,
on a simulated clock: the speaker plays 20 ms periods with 60 ms queued ahead, the mic is
read 40 ms behind its capture; then the playback thread is 5 ms late, the buffer drains
(everything it held played) and the next write fails with an underrun."""

from __future__ import annotations

import time

import numpy as np
import pytest

from personaplex_edge.runtime.audio.echo_path import EchoPath
from personaplex_edge.runtime.audio.settings import AudioSettings

pytest.importorskip("pywebrtc_audio")

RATE, P = 48000, 960  # 20 ms periods
AHEAD = 3 * P  # frames queued ahead of each period written
BACKLOG = int(0.04 * RATE)  # the mic is read 40 ms after its capture
ECHO = int(0.003 * RATE)  # speaker to mic
GAP = int(0.005 * RATE)  # the playback thread is 5 ms late: the speaker drained, silent
UNDERRUN = 150  # the period whose write fails (3 s in: AEC3 has converged)
PERIODS = 200


def _far(n: int) -> np.ndarray:
    """Speech-like: noise under a syllable-rate envelope."""
    rng = np.random.default_rng(7)
    t = np.arange(n) / RATE
    env = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 3.0 * t))
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


def _run(drop: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Mic in, mic out (same sample grid) and the underrun's time in samples from t0."""
    # 20 ms periods x 4: the canceller's lead is its largest, 30 ms (echo_path.jitter_ms).
    path = EchoPath(AudioSettings(echo_cancel="webrtc", period_frames=960, buffer_periods=4))
    t0 = time.monotonic()
    far = _far(PERIODS * P)
    speaker = np.zeros((PERIODS + 10) * P + GAP, np.float32)
    events: list[tuple[int, int, str]] = []  # (sample time, order, what)
    writes = []  # (write time, period index, queued)
    for k in range(PERIODS):
        if k < UNDERRUN:
            writes.append((k * P, k, AHEAD))
            speaker[AHEAD + k * P : AHEAD + (k + 1) * P] = far[k * P : (k + 1) * P]
    drained = AHEAD + UNDERRUN * P  # the buffer ran dry here
    late = drained + GAP  # the playback thread comes back: the device is in underrun
    for j, k in enumerate(range(UNDERRUN, PERIODS)):
        start = late + j * P  # the retried period plays at once, the rest follow it
        speaker[start : start + P] = far[k * P : (k + 1) * P]
        if j > 0:
            writes.append((max(late, start - AHEAD), k, start - max(late, start - AHEAD)))
    mic = np.zeros_like(speaker)
    mic[ECHO:] = 0.5 * speaker[:-ECHO]
    for when, k, q in writes:
        events.append((when, 0, f"w{k}:{q}"))
    events.append((late, 0, "underrun"))
    chunks = len(mic) // P - 4
    for c in range(chunks):
        events.append(((c + 1) * P + BACKLOG, 1, f"r{c}"))
    out = np.zeros_like(mic)
    for when, _, what in sorted(events):
        now = t0 + when / RATE
        if what == "underrun":  # as playback.py does: the period is handed over, the write fails
            k = UNDERRUN
            path.far(far[k * P : (k + 1) * P], RATE, None, now)
            if drop:
                path.drop_far("playback underrun", unplayed=P, now=now)
                path.far(far[k * P : (k + 1) * P], RATE, 0, now)  # written after the restart
        elif what[0] == "w":
            k, q = (int(v) for v in what[1:].split(":"))
            path.far(far[k * P : (k + 1) * P], RATE, q, now)
        else:
            c = int(what[1:])
            out[c * P : (c + 1) * P] = path.near(mic[c * P : (c + 1) * P], RATE, P + BACKLOG, now)
    return mic, out, float(late)


def _db(x: np.ndarray) -> float:
    return 10 * np.log10(float(np.mean(x.astype(np.float64) ** 2)) + 1e-12)


def test_an_underrun_keeps_the_reference_of_what_played() -> None:
    mic, out, late = _run()
    # Steady state before the underrun, and the echo around it: of the audio that played up
    # to the drain (still unread in the capture buffer, or within the canceller's lead) and
    # of the restart. Dropping it (today's code) cost about 12 dB here, this much longer.
    steady = slice(int(late) - int(0.8 * RATE), int(late) - int(0.3 * RATE))
    around = slice(int(late) - int(0.025 * RATE), int(late) + int(0.15 * RATE))
    erle_steady = _db(mic[steady]) - _db(out[steady])
    erle_around = _db(mic[around]) - _db(out[around])
    assert erle_steady > 15, erle_steady
    # Echo of audio that did play is cancelled as well as before (no 70 ms burst of echo).
    assert erle_around > erle_steady - 8, (erle_steady, erle_around)


def test_near_uses_the_time_the_capture_level_was_measured() -> None:
    """A read that returns 50 ms after the level was taken: the far audio handed to the
    canceller is that of the level's time, not of the read's."""
    path = EchoPath(AudioSettings(echo_cancel="webrtc", period_frames=960, buffer_periods=4))
    c = path._stream.canceller
    t = time.monotonic()
    path.far(np.full(4800, 0.1, np.float32), RATE, 0, t)  # plays from t for 100 ms
    path.near(np.zeros(P, np.float32), RATE, P, measured=t - 0.02)
    # Released up to the mic's time (t - 20 ms) plus the 30 ms lead: 10 ms of far audio.
    assert abs(c._far_in - 480) <= 2, c._far_in
