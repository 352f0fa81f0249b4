"""The playback FIFO's target (runtime/audio/fifo_target.py): the live compute jitter, the
resampler's hold and a margin above the period being taken; trimmed to in silence, grown after
an underrun. The end-to-end tests run CabinAudio on clocked virtual ALSA devices (real alsa-lib)
with a model loop that answers each frame at once, as the daemon's loop does."""

from __future__ import annotations

import time

import pytest
from support import answering_cabin

from personaplex_edge.runtime.audio.fifo_target import (
    GROWTH_DECAY_S,
    GROWTH_MAX_MS,
    MARGIN_MS,
    FifoTarget,
)

PERIOD_MS = 20.0
LATENCY_WINDOW_S = 64 * 0.08  # latency.py's parts are means over the last 64 frames


def test_the_target_is_jitter_hold_and_margin() -> None:
    target = FifoTarget(jitter_ms=12.0, hold_ms=2.0)
    assert target.ms(0.0) == pytest.approx(12.0 + 2.0 + MARGIN_MS)
    target.set_jitter_ms(3.5)
    assert target.ms(0.0) == pytest.approx(3.5 + 2.0 + MARGIN_MS)
    target.set_jitter_ms(-1.0)  # p99 - p50 of a handful of frames can come out a hair negative
    assert target.jitter_ms == 0.0


def test_an_underrun_grows_the_target_by_a_period_which_fades_slowly() -> None:
    target = FifoTarget(jitter_ms=5.0, hold_ms=2.0)
    base = target.ms(100.0)
    target.underrun(PERIOD_MS, now=100.0)
    assert target.ms(100.0) == pytest.approx(base + PERIOD_MS)
    target.underrun(PERIOD_MS, now=100.0)  # a second one before it faded: two periods
    assert target.ms(100.0) == pytest.approx(base + 2 * PERIOD_MS)
    # A period fades per GROWTH_DECAY_S without another underrun; then it is gone.
    assert target.ms(100.0 + GROWTH_DECAY_S) == pytest.approx(base + PERIOD_MS)
    assert target.ms(100.0 + 3 * GROWTH_DECAY_S) == pytest.approx(base)
    for _ in range(20):
        target.underrun(PERIOD_MS, now=200.0)
    assert target.growth_ms(200.0) == GROWTH_MAX_MS


# -- through alsa-lib ------------------------------------------------------------------------

@pytest.fixture
def cabin_audio(tmp_path, monkeypatch, clock_lib):
    pytest.importorskip("alsaaudio")
    with answering_cabin(tmp_path, clock_lib, monkeypatch, period_frames=round(48 * PERIOD_MS),
                         buffer_periods=4, preroll_ms=100.0, echo_cancel="off") as running:
        yield running


def _settle(audio, seconds: float) -> dict:
    time.sleep(seconds)
    return audio.stats()


def test_the_fifo_trims_down_to_its_live_target_in_silence(cabin_audio) -> None:
    audio, _ = cabin_audio
    before = _settle(audio, 2.5)
    # 100 ms of warm-up jitter: the replies wait behind about that much in the FIFO.
    extra = audio.fifo_target.hold_ms + audio.fifo_target.margin_ms  # the FIR's 1.3 ms, a margin
    assert audio.fifo_target.hold_ms == pytest.approx(1.29, abs=0.01)
    assert before["fifo_target_ms"] == pytest.approx(PERIOD_MS + 100.0 + extra, abs=0.1)
    assert before["latency_ms"]["preroll"] >= 100.0
    audio.set_jitter_ms(4.0)  # what the frame loop measures live
    after = _settle(audio, 1.5 + LATENCY_WINDOW_S)  # a trim, then a window of replies after it
    target = PERIOD_MS + 4.0 + extra
    assert after["fifo_target_ms"] == pytest.approx(target, abs=0.1)
    assert after["latency_trims"] > before["latency_trims"]
    # The reply now waits behind the target and no more (2 ms hysteresis, a period's jitter
    # of where the reply lands), with nothing missing on the way down.
    assert after["latency_ms"]["preroll"] <= target + 2.0 + 1.0
    assert after["model_underruns"] == 0 and after["underruns"] == 0


def test_a_model_underrun_grows_the_target_and_the_fifo_keeps_more(cabin_audio) -> None:
    audio, stall = cabin_audio
    audio.set_jitter_ms(4.0)
    before = _settle(audio, 2.0 + LATENCY_WINDOW_S)
    stall.set()  # one reply 200 ms late: the FIFO runs dry
    after = _settle(audio, 1.0 + LATENCY_WINDOW_S)
    assert after["model_underruns"] > before["model_underruns"]
    # A period more, less what faded since (a period per GROWTH_DECAY_S).
    assert after["fifo_target_ms"] >= before["fifo_target_ms"] + 0.8 * PERIOD_MS
    assert after["latency_ms"]["preroll"] >= before["latency_ms"]["preroll"] + PERIOD_MS / 2
