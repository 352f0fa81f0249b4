"""CabinAudio through real alsa-lib and pyalsaaudio on virtual devices (personaplex_edge.sim.devices).

The devices are alsa-lib's `file` plugin over `null` (no sound card), so they have no clock:
CabinAudio runs with `clockless=True`, which paces reads and writes to the wall clock.
Each test moves a few seconds of audio in real time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np
import pytest
import soxr

from personaplex_edge.runtime.audio.alsa_pcm import AlsaPcm, Xrun, alsa_errno
from personaplex_edge.runtime.audio.cabin import CabinAudio
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.sim.devices import VirtualCabin, to_s16
from personaplex_edge.sim.shipped import speech

pytest.importorskip("alsaaudio")

FRAME_S = FRAME_SAMPLES / 24000


@pytest.fixture
def make_cabin(tmp_path, monkeypatch, request) -> Callable[..., VirtualCabin]:
    def make(clock: bool = False, **options) -> VirtualCabin:
        if clock:
            options["clock_lib"] = request.getfixturevalue("clock_lib")
        cabin = VirtualCabin.create(tmp_path / "cabin", **options)
        monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
        return cabin

    return make


def _settings(**kw) -> AudioSettings:
    base = dict(capture_device="ppx_mic", playback_device="ppx_spk", capture_rate=48000,
                playback_rate=48000, channels=2, period_frames=960, buffer_periods=4,
                preroll_ms=100.0, clockless=True, retry_min_s=0.1, retry_max_s=0.4, echo_cancel="off")
    base.update(kw)
    return AudioSettings(**base)


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - got) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err)


def _collect(audio: CabinAudio, n: int, timeout: float = 10.0) -> list[np.ndarray]:
    frames, end = [], time.monotonic() + timeout
    while len(frames) < n and time.monotonic() < end:
        f = audio.read_frame(timeout=0.5)
        if f is not None:
            frames.append(f)
    return frames


def _feed(audio: CabinAudio, frames: np.ndarray, t0: float, start_index: int = 0,
          lead: int = 2) -> None:
    """Hand frames over at the model's pace: frame k due at t0 + (k - lead) * 80 ms."""
    for k, f in enumerate(frames, start_index):
        delay = t0 + (k - lead) * FRAME_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        audio.write_frame(f)


# -- capture ------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,channels,period,clock", [(48000, 2, 1001, False),
                                                        (24000, 1, 480, False),
                                                        (48000, 2, 960, True)])
def test_capture_gives_exact_frames_matching_the_speech(make_cabin, rate, channels, period, clock):
    """clock=True: the same through a clocked device, as a sound card drives CabinAudio."""
    x = speech(rate, 2.2)
    mix = np.stack([x * 0.8, x * 0.4], 1) if channels == 2 else x[:, None]
    make_cabin(mic_audio=mix, mic_rate=rate, mic_channels=channels, clock=clock)
    audio = CabinAudio(_settings(capture_rate=rate, channels=channels, period_frames=period,
                                 clockless=not clock))
    audio.start()
    try:
        frames = _collect(audio, 25)
    finally:
        assert audio.stop()
    assert len(frames) == 25
    assert all(f.shape == (FRAME_SAMPLES,) and f.dtype == np.float32 for f in frames)
    got = np.concatenate(frames)
    # What the mic really held (int16), downmixed, resampled in one go.
    mono = to_s16(mix).astype(np.float32).mean(axis=1) / 32768.0
    ref = mono if rate == 24000 else soxr.resample(mono, rate, 24000, "HQ")
    snr = _snr_db(ref[: len(got)], got)
    print(f"\ncapture {rate} Hz x {channels}, period {period}, clock {clock}: SNR {snr:.1f} dB "
          "vs one-shot resample")
    assert snr > 80.0  # the streamed frames are the one-shot resample, sample for sample
    # ...and still the shipped speech (scaled by the downmix), through int16 and two resamples.
    gain = 0.6 if channels == 2 else 1.0
    assert _snr_db(speech(24000, 2.2)[: len(got)] * gain, got) > 40.0
    st = audio.stats()
    assert st["frames_captured"] >= 25 and st["overruns"] == 0 and st["dropped_frames"] == 0
    assert not st["degraded"] and st["reopen_count"] == 0


def test_playback_through_alsa_rate_and_channel_conversion(make_cabin):
    """We play 24 kHz mono into a 48 kHz stereo speaker: alsa-lib's plug converts.

    (Not on the capture side: the file plugin reads `infile` for the whole area a converting
    plugin maps, not the part it commits, so a converted virtual mic skips audio. The mic's
    plug slave must match what the client opens.)"""
    cabin = make_cabin(mic_audio=np.zeros(24000), mic_rate=24000, mic_channels=1)
    n = 15
    x = speech(24000, n * FRAME_S) * 0.5
    frames = x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    s = _settings(capture_rate=24000, channels=1, playback_rate=24000, playback_channels=1,
                  period_frames=480)
    audio = CabinAudio(s)
    audio.start()
    try:
        _feed(audio, np.concatenate([frames, np.zeros((4, FRAME_SAMPLES), np.float32)]),
              time.monotonic() + 0.1)
        time.sleep(0.2)
    finally:
        assert audio.stop()
    out = cabin.read_speaker()  # 48 kHz stereo
    assert np.array_equal(out[:, 0], out[:, 1])
    ref = soxr.resample(x[: n * FRAME_SAMPLES], 24000, 48000, "HQ")
    start = _locate(out[:, 0], ref)  # alsa-lib's rate plugin adds its own small delay
    body = slice(2000, len(ref) - 2000)
    snr = _snr_db(ref[body], out[start + body.start : start + body.stop, 0])
    print(f"\nplug 24k mono -> 48k stereo speaker: starts at {start}, SNR {snr:.1f} dB")
    assert snr > 40.0


def test_a_stalled_consumer_loses_the_oldest_frames_counted(make_cabin):
    x = speech(24000, 3.5)
    make_cabin(mic_audio=x, mic_rate=24000, mic_channels=1)
    audio = CabinAudio(_settings(capture_rate=24000, channels=1, period_frames=480,
                                 capture_queue_frames=4))
    audio.start()
    try:
        time.sleep(1.2)  # the inference loop hangs: 15 frames arrive, 4 fit
        queued = []
        while (f := audio.read_frame(timeout=0)) is not None:
            queued.append(f)
        st = audio.stats()
    finally:
        assert audio.stop()
    ref = to_s16(x).astype(np.float32) / 32768.0
    idx = [int(np.argmin([np.abs(ref[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES] - f).max()
                          if (k + 1) * FRAME_SAMPLES <= len(ref) else 9 for k in range(40)]))
           for f in queued]
    assert 1 <= len(queued) <= 5
    assert idx == list(range(idx[0], idx[0] + len(idx)))  # consecutive: the newest survive
    assert idx[0] >= 8  # the oldest were dropped
    assert st["dropped_frames"] >= idx[0]
    assert st["dropped_frames"] + len(queued) <= st["frames_captured"]


# -- playback -----------------------------------------------------------------------------

def _expected_playback(frames: np.ndarray, rate: int) -> np.ndarray:
    return soxr.resample(frames.reshape(-1), 24000, rate, "HQ")


def _speech_start(mono: np.ndarray, period: int) -> int:
    first = int(np.flatnonzero(np.abs(mono) > 0)[0])
    return first - first % period


def _locate(signal: np.ndarray, ref: np.ndarray) -> int:
    """Where ref starts inside signal (FFT cross-correlation)."""
    n = 1 << (len(signal) + len(ref)).bit_length()
    c = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(ref, n)), n)
    return int(np.argmax(c[: len(signal)]))


@pytest.mark.parametrize("clock", [False, True])
def test_playback_lands_in_the_speaker_file_whole_and_continuous(make_cabin, clock):
    cabin = make_cabin(mic_audio=np.zeros(24000), mic_rate=24000, mic_channels=1, clock=clock)
    n = 24
    x = speech(24000, n * FRAME_S) * 0.5  # below the limiter's knee: the signal is untouched
    frames = x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    tail = np.zeros((5, FRAME_SAMPLES), np.float32)  # the model goes on (silently)
    s = _settings(capture_rate=24000, channels=1, playback_channels=2, clockless=not clock)
    audio = CabinAudio(s)
    audio.start()
    try:
        t0 = time.monotonic() + 0.1
        _feed(audio, np.concatenate([frames, tail]), t0)
        st = audio.stats()  # before the model "stops" and the FIFO runs dry
        time.sleep(0.15)
    finally:
        assert audio.stop()
    out = cabin.read_speaker()
    assert out.shape[1] == 2 and np.array_equal(out[:, 0], out[:, 1])
    mono = out[:, 0]
    period = s.period_frames
    expected = _expected_playback(np.concatenate([frames, tail]), 48000)[: n * 3840]
    start = _locate(mono, expected)
    preroll = 5 * period  # 100 ms at 48 kHz, whole periods
    assert start >= preroll and start % period == 0  # silence is written in whole periods
    got = mono[start : start + len(expected)]
    fade = round(48000 * s.fade_ms / 1000)
    snr = _snr_db(expected[fade:], got[fade:])
    print(f"\nplayback: {n} frames, speech starts at {start / 48:.1f} ms, SNR {snr:.1f} dB, "
          f"{st}")
    assert snr > 60.0  # every sample where it belongs: nothing dropped, repeated or shifted
    assert np.all(np.abs(got[:fade]) <= np.abs(expected[:fade]) + 1e-4)  # the fade-in
    assert len(mono) >= start + len(expected)
    assert audio.stats()["frames_played"] == n + 5
    assert st["model_underruns"] == 0 and st["underruns"] == 0 and st["playback_dropped"] == 0


def test_late_frames_become_counted_silence_and_the_audio_goes_on(make_cabin):
    cabin = make_cabin(mic_audio=np.zeros(24000), mic_rate=24000, mic_channels=1)
    n1, n2 = 10, 10
    t = np.arange((n1 + n2) * FRAME_SAMPLES) / 24000
    tone = (0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(t)) * t)).astype(np.float32)
    frames = tone.reshape(n1 + n2, FRAME_SAMPLES)
    s = _settings(capture_rate=24000, channels=1, playback_channels=1)
    audio = CabinAudio(s)
    audio.start()
    try:
        t0 = time.monotonic() + 0.1
        _feed(audio, frames[:n1], t0)
        stall = 0.5
        _feed(audio, frames[n1:], t0 + stall, start_index=n1)  # the model stalls for 500 ms
        _feed(audio, np.zeros((4, FRAME_SAMPLES), np.float32), t0 + stall, n1 + n2)
        st = audio.stats()  # before the FIFO runs dry at the end
        time.sleep(0.1)
    finally:
        assert audio.stop()
    period = s.period_frames
    mono = cabin.read_speaker()[:, 0]
    start = _speech_start(mono, period)
    body = mono[start:].reshape(-1, period)[: (n1 + n2) * 4 + 40]
    silent = np.all(body == 0, axis=1)
    # The inserted silence sits between the two runs of tone; the tone itself never stops.
    first_gap = int(np.argmax(silent))
    gap = int(np.argmax(~silent[first_gap:]))
    assert gap > 0
    assert not silent[:first_gap].any()
    print(f"\nlate frames: gap of {gap} periods ({gap * period / 48:.0f} ms), {st}")
    assert st["model_underruns"] == 1
    assert st["silence_inserted_s"] == pytest.approx(gap * period / 48000, abs=period / 48000)
    assert gap * period / 48000 <= stall + 0.05
    played = np.concatenate([body[:first_gap].ravel(), body[first_gap + gap:].ravel()])
    expected = _expected_playback(frames, 48000)
    m = min(len(played), len(expected)) - 4000
    resume = first_gap * period
    fade = round(48000 * s.fade_ms / 1000)
    mask = np.ones(m, bool)
    mask[resume : resume + fade] = False  # the fade-in after the gap
    mask[:fade] = False
    assert _snr_db(expected[:m][mask], played[:m][mask]) > 60.0  # nothing lost around the gap
    assert st["underruns"] == 0


def test_pause_fades_out_and_resume_fades_in(make_cabin):
    cabin = make_cabin(mic_audio=np.zeros(24000), mic_rate=24000, mic_channels=1)
    s = _settings(capture_rate=24000, channels=1, playback_channels=1, fade_ms=15.0)
    frames = np.full((30, FRAME_SAMPLES), 0.25, np.float32)  # DC: any click shows as a step
    audio = CabinAudio(s)
    audio.start()
    try:
        t0 = time.monotonic() + 0.1
        _feed(audio, frames[:10], t0)
        audio.set_paused(True)
        _feed(audio, frames[10:20], t0, 10)
        audio.set_paused(False)
        _feed(audio, frames[20:], t0, 20)
        time.sleep(0.05)  # stop while audio is still playing: the stop fade, not a dry FIFO
        st = audio.stats()
    finally:
        assert audio.stop()
    assert st["model_underruns"] == 0
    mono = cabin.read_speaker()[:, 0]
    steps = np.abs(np.diff(mono))
    bound = 0.25 * np.pi / (2 * round(48000 * 0.015)) + 2 / 32768
    # DC resampled has a settled value; the edges of the whole signal ring a little (soxr).
    assert steps.max() <= bound
    # Silence (pre-roll), DC, paused silence, DC, fade at stop: four edges, all ramps.
    edges = np.flatnonzero(np.diff((mono == 0).astype(int)))
    assert len(edges) == 4
    paused = edges[2] - edges[1]
    assert abs(paused / 48000 - 10 * FRAME_S) < 0.1  # paused for about the 10 frames sent


# -- xruns ----------------------------------------------------------------------------------

def test_pyalsaaudio_reports_real_xruns_and_the_stream_resumes(make_cabin):
    """A genuine overrun and underrun on the clocked device, at the AlsaPcm level.

    pyalsaaudio 0.11: read()/write() re-prepare the PCM and return -EPIPE (0.10 raised from
    write()); AlsaPcm turns both into Xrun, and the very next call works again."""
    make_cabin(mic_audio=np.zeros(48000 * 3), clock=True)
    mic = AlsaPcm("capture", "ppx_mic", 48000, 2, 960, 4)
    try:
        while mic.read() is None:
            mic.wait(0.05)  # the first read started the stream; wait for a period
        time.sleep(0.2)  # > the 80 ms buffer: the device overruns
        with pytest.raises(Xrun):
            mic.read()
        got = None
        for _ in range(20):
            if (got := mic.read()) is not None:
                break
            mic.wait(0.05)
        assert got is not None and len(got) > 0  # re-prepared and running again
    finally:
        mic.close()
    spk = AlsaPcm("playback", "ppx_spk", 48000, 2, 960, 4)
    try:
        period = memoryview(np.zeros(960 * 2, np.int16)).cast("B")
        assert spk.write(period) == 960
        time.sleep(0.1)  # the 20 ms written run out: underrun
        with pytest.raises(Xrun):
            spk.write(period)
        assert spk.write(period) == 960
    finally:
        spk.close()


def test_stalled_audio_threads_count_xruns_and_carry_on(make_cabin):
    """The audio threads are starved for 300 ms (as by a long GC pause or CPU contention):
    the clocked devices overrun and underrun for real; both are counted and recovered."""
    x = speech(48000, 4.0)
    make_cabin(mic_audio=x, clock=True)
    audio = CabinAudio(_settings(clockless=False))
    audio.start()
    try:
        assert len(_collect(audio, 3)) == 3
        for _ in range(4):
            audio.write_frame(np.zeros(FRAME_SAMPLES, np.float32))
        with audio._lock:  # both threads block on their next hand-over
            time.sleep(0.3)
        before = audio.stats()["frames_captured"]
        assert _wait_for(lambda: audio.stats()["frames_captured"] >= before + 4, 3.0)
        st = audio.stats()
    finally:
        assert audio.stop()
    print(f"\nafter a 300 ms stall: {st}")
    assert st["overruns"] >= 1 and st["underruns"] >= 1
    assert not st["degraded"] and st["reopen_count"] == 0


def test_one_full_duplex_device_name_serves_both_directions(make_cabin):
    """`ppx_duplex` is an asym PCM: capture from the mic, playback to the speaker."""
    x = speech(48000, 2.0)
    cabin = make_cabin(mic_audio=x)
    audio = CabinAudio(_settings(capture_device="ppx_duplex", playback_device="ppx_duplex",
                                 preroll_ms=200.0))
    audio.start()
    try:
        frames = []
        for _ in range(8):  # echo each frame as it comes, like the inference loop
            frames += _collect(audio, 1)
            audio.write_frame(frames[-1])
        time.sleep(0.2)
    finally:
        assert audio.stop()
    got = np.concatenate(frames)
    assert _snr_db(speech(24000, 2.0)[: len(got)], got) > 40.0
    out = cabin.read_speaker()[:, 0]
    ref = _expected_playback(got, 48000)[: len(got) * 2 - 4000]  # the tail meets the stop fade
    start = _locate(out, ref)
    body = slice(1000, len(ref) - 1000)
    assert _snr_db(ref[body], out[start + body.start : start + body.stop]) > 60.0


# -- device errors --------------------------------------------------------------------------

def test_alsa_errors_are_classified_by_errno():
    """pyalsaaudio's errors are `snd_strerror(err) [device]` strings, with no errno attached."""
    import errno
    import os

    import alsaaudio

    with pytest.raises(alsaaudio.ALSAAudioError) as info:
        alsaaudio.PCM(alsaaudio.PCM_CAPTURE, device="ppx_no_such_pcm_anywhere")
    assert alsa_errno(info.value) == errno.ENOENT
    for e in (errno.EPIPE, errno.ENODEV, errno.EBADFD, errno.EIO):
        assert alsa_errno(alsaaudio.ALSAAudioError(f"{os.strerror(e)} [hw:1,0]")) == e


def test_unknown_pcm_is_degraded_with_backoff_then_recovers(make_cabin):
    x = speech(48000, 2.5)
    cabin = make_cabin(mic_audio=x, mic_rate=48000, mic_channels=2)
    audio = CabinAudio(_settings(capture_device="ppx_late_mic"))
    audio.start()
    try:
        delays: list[str] = []
        end = time.monotonic() + 1.6
        while time.monotonic() < end:
            m = re.search(r"retrying in ([\d.]+) s", audio.reason)
            if m and (not delays or delays[-1] != m.group(1)):
                delays.append(m.group(1))
            time.sleep(0.01)
        assert audio.degraded and "ppx_late_mic" in audio.reason
        assert delays[:3] == ["0.1", "0.2", "0.4"] and set(delays) <= {"0.1", "0.2", "0.4"}
        assert audio.read_frame(timeout=0.05) is None
        # The USB mic shows up: the PCM now exists.
        cabin.rewrite(extra='pcm.ppx_late_mic { type plug slave.pcm "ppx_mic_raw" }')
        assert _wait_for(lambda: not audio.degraded, 3.0), audio.reason
        frames = _collect(audio, 5)
        st = audio.stats()
    finally:
        assert audio.stop()
    assert len(frames) == 5 and st["reopen_count"] == 1 and st["reason"] == ""
    got = np.concatenate(frames)
    assert _snr_db(speech(24000, 2.5)[: len(got)], got) > 40.0  # the mic, from its start


def test_vanished_mic_file_degrades_then_recovers(make_cabin):
    x = speech(48000, 2.0)
    cabin = make_cabin(mic_audio=x, mic_rate=48000, mic_channels=2)
    cabin.mic_raw.unlink()
    audio = CabinAudio(_settings())
    audio.start()
    try:
        assert _wait_for(lambda: audio.degraded, 2.0)
        assert "No such file or directory" in audio.reason
        cabin.write_mic(x)
        assert _wait_for(lambda: not audio.degraded, 3.0), audio.reason
        assert len(_collect(audio, 3)) == 3
    finally:
        assert audio.stop()


def test_capture_io_error_midstream_reopens_with_backoff(make_cabin, tmp_path):
    """The file plugin copies captured audio to `mic_sink`; a pipe to `head -c` closes after
    ~0.2 s, the next flush fails and snd_pcm_readi() returns -EIO: a device lost mid-stream."""
    x = speech(48000, 3.0)
    cabin = make_cabin(mic_audio=x, mic_rate=48000, mic_channels=2,
                       mic_sink="|head -c 40000 >/dev/null")
    audio = CabinAudio(_settings())
    audio.start()
    try:
        assert _wait_for(lambda: audio.degraded, 3.0)
        assert "Input/output error" in audio.reason
        cabin.rewrite(mic_sink="/dev/null")  # the device is back for good
        assert _wait_for(lambda: not audio.degraded and audio.stats()["capture_open"], 3.0)
        before = audio.stats()["frames_captured"]
        assert _wait_for(lambda: audio.stats()["frames_captured"] >= before + 3, 3.0)
        st = audio.stats()
    finally:
        assert audio.stop()
    assert st["reopen_count"] >= 1 and st["overruns"] == 0
    assert st["capture_reopens"] == st["reopen_count"] and st["playback_reopens"] == 0


def test_playback_io_error_midstream_reopens_and_audio_resumes(make_cabin, tmp_path):
    first = tmp_path / "before_loss.raw"
    cabin = make_cabin(mic_audio=np.zeros(24000), mic_rate=24000, mic_channels=1,
                       speaker_file=f"|head -c 60000 >{first}")
    s = _settings(capture_rate=24000, channels=1, playback_channels=2)
    audio = CabinAudio(s)
    audio.start()
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(FRAME_SAMPLES) / 24000)).astype(np.float32)
    try:
        t0 = time.monotonic()
        k = 0
        while not audio.degraded and k < 40:
            _feed(audio, [tone], t0, k)
            k += 1
        assert audio.degraded and "Input/output error" in audio.reason
        cabin = cabin.rewrite(speaker_file=None)
        assert _wait_for(lambda: not audio.degraded and audio.stats()["playback_open"], 3.0)
        t1 = time.monotonic()
        _feed(audio, [tone] * 8, t1)
        st = audio.stats()
    finally:
        assert audio.stop()
    assert first.stat().st_size == 60000
    after = cabin.read_speaker()
    assert st["reopen_count"] == 1 and st["playback_reopens"] == 1 and st["capture_reopens"] == 0
    assert np.abs(after).max() > 0.1  # the tone plays on the reopened device


def test_stop_is_prompt_even_while_reopening(make_cabin):
    make_cabin(mic_audio=np.zeros(48000), mic_rate=48000, mic_channels=2)
    audio = CabinAudio(_settings(capture_device="ppx_missing", playback_device="ppx_missing2",
                                 retry_min_s=5.0, retry_max_s=5.0))
    audio.start()
    assert _wait_for(lambda: audio.degraded, 2.0)
    t = time.monotonic()
    assert audio.stop(timeout=2.0)
    print(f"\nstop while backing off: {1000 * (time.monotonic() - t):.0f} ms")
