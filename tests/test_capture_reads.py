"""The xrun cascade at 10 ms periods (issue 16): its cause, and that it is gone.

A block-free FIR once brought the clicks down but sent `serve` at 10 ms periods into an xrun
cascade, although the filter costs ~0.1 ms per 10 ms. The cause was the capture loop: on a device
whose pointer moves between period interrupts (HDA, USB, the clocked test plugin) it read
whatever had arrived, a few samples at a time, ~10,000 reads a second, and each read paid the
resampler's (and the canceller's) per-call cost: at the FIR's ~50 us a call, more than a core,
and the audio threads missed their periods. soxr's 4 us a call hid it. The loop now reads a
period at a time, or the tail of a frame the moment it lands (cabin.py's _read_size)."""

from __future__ import annotations

import time

import pytest
from support import answering_cabin

PERIOD_MS = 10.0


@pytest.mark.parametrize("echo", ["off", "webrtc"])
def test_ten_ms_periods_read_about_a_period_at_a_time_and_never_xrun(tmp_path, monkeypatch,
                                                                        clock_lib, echo) -> None:
    pytest.importorskip("alsaaudio")
    if echo == "webrtc":
        pytest.importorskip("pywebrtc_audio")
    with answering_cabin(tmp_path, clock_lib, monkeypatch, period_frames=round(48 * PERIOD_MS),
                         buffer_periods=3, echo_cancel=echo, resample_quality="FIR") as (audio, _):
        time.sleep(1.0)
        first, t0 = audio.stats(), time.monotonic()
        time.sleep(6.0)
        last, seconds = audio.stats(), time.monotonic() - t0
    reads_per_s = (last["capture_reads"] - first["capture_reads"]) / seconds
    print(f"\n{echo}: {reads_per_s:.0f} capture reads a second; {last}")
    # A period a time (100 a second) plus a frame's tail (12.5 a second), with room to spare;
    # the spinning loop did ~10,000.
    assert reads_per_s <= 1.3 * (1000 / PERIOD_MS + 12.5)
    assert last["overruns"] == last["underruns"] == 0
    assert last["model_underruns"] == first["model_underruns"]
    assert last["frames_captured"] - first["frames_captured"] >= 0.9 * seconds / 0.08
