"""A re-anchor on a slow device costs the driver no word: through real alsa-lib, a frame loop
that stalls 700 ms inside `hold_capture` (where the Conversation runs every rebuild) loses no
microphone frame, and the mic-to-speaker latency is back at its level within 2 s. In a pause the
speaker is bridged with silence (no model underrun); mid-speech the gap counts as one.

700 ms is the replay docs/conversations.md projects for a 30 s tail on Orin NX (INT4); before the hold,
the 4-frame capture queue dropped about 5 frames of speech at every such re-anchor."""

from __future__ import annotations

import time

import numpy as np
import pytest

from personaplex_edge.runtime.audio.cabin import CabinAudio
from personaplex_edge.runtime.audio.latency import LatencyEstimate
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.sim.devices import VirtualCabin, to_s16
from personaplex_edge.sim.shipped import speech

pytest.importorskip("alsaaudio")

STALL_S = 0.7


def _latency_ms(audio: CabinAudio) -> float | None:
    parts = audio.latency.parts_ms()
    return None if parts is None else parts["total"]


@pytest.mark.parametrize("hold, quiet", [(True, True), (True, False), (False, False)])
def test_a_slow_rebuild_loses_no_microphone_frame(tmp_path, monkeypatch, hold: bool,
                                                  quiet: bool) -> None:
    x = speech(24000, 9.0)
    cabin = VirtualCabin.create(tmp_path / "cabin", mic_audio=x, mic_rate=24000, mic_channels=1)
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
    audio = CabinAudio(AudioSettings(capture_device="ppx_mic", playback_device="ppx_spk",
                                     capture_rate=24000, playback_rate=48000, channels=1,
                                     playback_channels=2, period_frames=480, buffer_periods=4,
                                     preroll_ms=60.0, clockless=True, echo_cancel="off",
                                     capture_queue_frames=4))
    audio.latency = LatencyEstimate(window=2)  # the latest replies, not a 5 s mean
    frames: list[np.ndarray] = []
    latency: list[tuple[float, float]] = []  # (time.monotonic(), ms)
    stall_end = None
    audio.start()
    try:
        end = time.monotonic() + 7.0
        while time.monotonic() < end:
            frame = audio.read_frame(timeout=0.5)
            if frame is None:
                continue
            frames.append(frame)
            if len(frames) == 25:  # the re-anchor: the loop is busy with the replay
                with audio.hold_capture(quiet) if hold else _no_hold():
                    time.sleep(STALL_S)
                stall_end = time.monotonic()
            # The reply, at once (compute ~0 here): the agent is silent, as in the pause a
            # re-anchor waits for, so the playback FIFO may trim the backlog away.
            audio.write_frame(np.zeros_like(frame))
            ms = _latency_ms(audio)
            if ms is not None:
                latency.append((time.monotonic(), ms))
        stats = audio.stats()
    finally:
        assert audio.stop()
    if not hold:  # the old behaviour, to show the test can fail: frames are dropped
        assert stats["dropped_frames"] >= 3
        return
    assert stats["dropped_frames"] == 0
    # What the FIFO held before the stall played on; then the speaker went silent.
    if quiet:  # a rebuild in a pause: bridged with silence, no late model
        assert stats["model_underruns"] == 0 and stats["silence_inserted_s"] == 0.0, str(stats)
        assert 0.1 <= stats["rebuild_silence_s"] <= STALL_S, stats
    else:  # mid-speech (the hard limit): the gap is a late model, counted as one
        assert stats["model_underruns"] >= 1 and stats["silence_inserted_s"] >= 0.1
        assert stats["rebuild_silence_s"] == 0.0
    ref = to_s16(x).astype(np.float32) / 32768.0
    index = [int(np.argmin([np.abs(ref[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES] - f).max()
                            for k in range(len(ref) // FRAME_SAMPLES)])) for f in frames]
    assert index == list(range(index[0], index[0] + len(index)))  # every frame, in order
    assert stall_end is not None
    stall_start = stall_end - STALL_S
    before = [ms for t, ms in latency if t < stall_start]
    after = [ms for t, ms in latency if 2.0 <= t - stall_end <= 3.0]
    assert before and after
    # Back to its level: the low-water trim leaves the FIFO at the pre-roll, within 3 periods
    # of where the stream had settled (the adaptive target is issue 16's).
    assert np.median(after) <= np.median(before) + 30.0, (np.median(before), after)


class _no_hold:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
