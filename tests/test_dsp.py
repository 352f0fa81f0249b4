"""Streaming DSP of the live daemon: re-framing resamplers, output stage, limiter, fades."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soxr

from personaplex_edge.runtime.audio.dsp import (
    CaptureConverter,
    Int16Packer,
    OutputStage,
    PlaybackConverter,
    Ramp,
    SampleFifo,
    db_to_gain,
    soft_limit,
)
from personaplex_edge.runtime.audio.resample import FirResampler
from personaplex_edge.runtime.constants import FRAME_SAMPLES


def _noise_speechlike(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    return (0.2 * x * np.sin(np.linspace(0, 40, n)) ** 2).astype(np.float32)


def _whole(x: np.ndarray, rate_in: int, rate_out: int, quality: str) -> np.ndarray:
    """The signal resampled in one call: the reference a stream cut anywhere must match."""
    if rate_in == rate_out:
        return x
    if quality == "FIR":
        return FirResampler(rate_in, rate_out).resample_chunk(x)
    return soxr.resample(x, rate_in, rate_out, quality)


def test_sample_fifo_matches_a_plain_list_through_wraps_and_growth() -> None:
    rng = np.random.default_rng(1)
    fifo, ref, counter = SampleFifo(64), [], 0
    for _ in range(2000):
        if rng.random() < 0.55:
            n = int(rng.integers(0, 150))  # sometimes more than the capacity: it must grow
            fifo.push(np.arange(counter, counter + n, dtype=np.float32))
            ref.extend(range(counter, counter + n))
            counter += n
        else:
            out = np.empty(int(rng.integers(0, 120)), np.float32)
            k = fifo.pop_into(out)
            assert k == min(len(out), len(ref))
            assert out[:k].tolist() == ref[:k]
            del ref[:k]
        assert len(fifo) == len(ref)


@pytest.mark.parametrize("quality", ["FIR", "HQ"])
@pytest.mark.parametrize("rate,channels", [(48000, 2), (48000, 1), (24000, 1), (24000, 2),
                                           (44100, 2)])
def test_capture_converter_frames_are_exact_and_lossless(rate: int, channels: int,
                                                         quality: str) -> None:
    """Periods of odd, varying sizes -> 1920-sample frames equal to resampling all at once."""
    n = rate * 3
    mono = _noise_speechlike(n)
    chans = np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1)
    pcm = np.rint(chans * 32767).astype(np.int16)
    conv = CaptureConverter(rate, channels, quality)
    rng = np.random.default_rng(2)
    frames, i = [], 0
    while i < n:
        step = int(rng.integers(1, 1500)) | 1  # odd sizes
        frames += conv.frames(pcm[i : i + step].reshape(-1))  # interleaved, as ALSA gives it
        i += step
    assert all(f.shape == (FRAME_SAMPLES,) and f.dtype == np.float32 for f in frames)
    got = np.concatenate(frames)
    expected_mono = pcm.astype(np.float32).mean(axis=1, dtype=np.float32) / 32768.0
    whole = _whole(expected_mono, rate, 24000, quality)
    # Nothing lost or repeated: frames + what waits == the whole signal, sample for sample
    # (the stream holds back at most its filter's look-ahead: the FIR half its length).
    assert len(got) + conv.buffered <= len(whole)
    assert len(whole) - (len(got) + conv.buffered) < (1024 if quality != "FIR" else 1)
    if quality == "FIR":  # one dot product per sample, however the stream is cut
        np.testing.assert_array_equal(got, whole[: len(got)])
    np.testing.assert_allclose(got, whole[: len(got)], rtol=0, atol=2e-6)


def test_capture_converter_reset_restarts_cleanly() -> None:
    conv = CaptureConverter(48000, 1)
    pcm = np.rint(_noise_speechlike(48000) * 32767).astype(np.int16)
    conv.push(pcm)
    conv.reset()
    assert conv.buffered == 0 and conv.pop_frame() is None
    frames = conv.frames(pcm)
    whole = _whole(pcm.astype(np.float32) / 32768.0, 48000, 24000, "FIR")
    np.testing.assert_allclose(np.concatenate(frames), whole[: len(frames) * FRAME_SAMPLES],
                               atol=2e-6)


@pytest.mark.parametrize("quality", ["FIR", "HQ"])
@pytest.mark.parametrize("rate,period", [(48000, 960), (48000, 1001), (24000, 333),
                                         (44100, 441)])
def test_playback_converter_periods_are_exact(rate: int, period: int, quality: str) -> None:
    x = _noise_speechlike(FRAME_SAMPLES * 25, seed=3)
    conv = PlaybackConverter(rate, quality)
    out, buf = [], np.empty(period, np.float32)
    for k in range(25):
        conv.push_frame(x[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES])
        while conv.available >= period:
            assert conv.pop_into(buf) == period
            out.append(buf.copy())
    got = np.concatenate(out)
    whole = _whole(x, 24000, rate, quality)
    assert len(whole) - len(got) < period + (2048 if quality != "FIR" else 64)
    np.testing.assert_allclose(got, whole[: len(got)], rtol=0, atol=2e-6)


def test_soft_limiter_never_exceeds_full_scale_and_is_identity_below_threshold() -> None:
    rng = np.random.default_rng(4)
    t = db_to_gain(-3.0)
    x = (rng.standard_normal(200_000) * 3).astype(np.float32)
    x[:5] = [np.inf, -np.inf, np.nan, 1e30, -1e30]
    y = x.copy()
    soft_limit(y, t)
    assert np.all(np.isfinite(y))
    assert np.abs(y).max() <= 1.0
    below = np.abs(x) <= t
    np.testing.assert_array_equal(y[below], x[below])  # bit-exact where it does not engage
    # Monotonic and continuous through the knee, sign kept.
    ramp = np.linspace(-20, 20, 400_001, dtype=np.float32)
    r = ramp.copy()
    soft_limit(r, t)
    assert np.all(np.diff(r) >= 0)
    assert np.all(np.diff(r) <= np.diff(ramp) * 1.0001 + 1e-7)  # slope <= 1: no jumps
    assert np.all(np.sign(r) == np.sign(ramp))


def test_output_stage_int16_has_no_wraparound_on_hot_input() -> None:
    stage = OutputStage(48000, gain_db=+12.0, fade_ms=1.0)
    stage.fade_in()
    packer = Int16Packer(2, 960)
    x = np.sin(np.linspace(0, 200 * np.pi, 960 * 20)).astype(np.float32)  # +12 dB: way over
    for k in range(20):
        buf = x[k * 960 : (k + 1) * 960].copy()
        stage.process(buf)
        assert np.abs(buf).max() <= 1.0
        ints = np.frombuffer(packer.pack(buf), np.int16).reshape(-1, 2)
        assert np.array_equal(ints[:, 0], ints[:, 1])
        assert np.all(np.sign(ints[:, 0]) == np.sign(np.rint(buf * 32767)))


def test_int16_packer_rounds_and_saturates() -> None:
    p = Int16Packer(1, 8)
    ints = np.frombuffer(p.pack(np.array([0, 1, -1, 0.5, 2.0, -2.0], np.float32)), np.int16)
    assert ints.tolist() == [0, 32767, -32767, 16384, 32767, -32768]


def _max_step(ms: float, rate: int) -> float:
    return math.pi / (2 * round(rate * ms / 1000)) * 1.0001


@pytest.mark.parametrize("ms", [10.0, 15.0, 20.0])
def test_fades_are_raised_cosine_smooth_and_complete(ms: float) -> None:
    rate = 48000
    stage = OutputStage(rate, fade_ms=ms)
    length = round(rate * ms / 1000)
    dc = np.ones(3 * length, np.float32)  # worst case for a click: full-scale DC
    out = []
    stage.fade_in()
    for k in range(0, len(dc), 333):
        out.append(stage.process(dc[k : k + 333].copy()))
    y = np.concatenate(out)
    assert y[0] < 1e-4 and np.all(y[length:] == y[-1]) and y[-1] > 0.9  # (limited) full level
    steps = np.abs(np.diff(np.concatenate([[0.0], y])))
    assert steps.max() <= _max_step(ms, rate)
    stage.fade_out()
    z = np.concatenate([stage.process(np.ones(500, np.float32)) for _ in range(6)])
    steps = np.abs(np.diff(np.concatenate([[y[-1]], z])))
    assert steps.max() <= _max_step(ms, rate)
    assert np.all(z[length:] == 0.0) and stage.silent


def test_fade_reversal_midway_is_continuous() -> None:
    ramp = Ramp(48000, 20.0, 0.0)
    ramp.set(1.0)
    a = np.ones(400, np.float32)
    ramp.apply(a)  # part way up
    ramp.set(0.0)  # pause pressed mid fade-in: glide down from where it is
    b = np.ones(2000, np.float32)
    ramp.apply(b)
    y = np.concatenate([a, b])
    assert np.abs(np.diff(y)).max() <= _max_step(20.0, 48000)
    assert b[-1] == 0.0


def test_gain_and_ducking_reach_their_targets_smoothly() -> None:
    rate = 24000
    stage = OutputStage(rate, gain_db=-6.0, fade_ms=10.0, duck_ms=100.0)
    stage.fade_in()
    x = np.full(rate, 0.25, np.float32)  # below the limiter knee at any gain used here
    y = stage.process(x.copy())
    assert y[-1] == pytest.approx(0.25 * db_to_gain(-6.0), rel=1e-5)
    stage.duck(-12.0)
    y2 = stage.process(x.copy())
    assert y2[-1] == pytest.approx(0.25 * db_to_gain(-18.0), rel=1e-5)
    duck_len = round(rate * 0.1)
    assert np.all(y2[duck_len:] == y2[-1])  # done after duck_ms
    assert np.abs(np.diff(np.concatenate([[y[-1]], y2]))).max() <= \
        0.25 * abs(db_to_gain(-6.0) - db_to_gain(-18.0)) * _max_step(100.0, rate) * 1.01
    stage.duck(0.0)
    assert stage.process(x.copy())[-1] == pytest.approx(0.25 * db_to_gain(-6.0), rel=1e-5)
    stage.set_gain_db(0.0)
    assert stage.process(x.copy())[-1] == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("rate", [48000, 44100, 16000])
def test_aligned_frames_are_whole_at_the_end_of_a_canceller_block(rate: int) -> None:
    """align_to drops less than a block at the start so that each frame is whole exactly when
    a 10 ms block of device samples is (the echo canceller's output comes in those blocks);
    the frames are the unaligned stream's, moved by what was dropped."""
    block = rate // 100
    pcm = np.rint(_noise_speechlike(rate) * 32767).astype(np.int16)
    aligned, plain = CaptureConverter(rate, 1), CaptureConverter(rate, 1)
    skip = aligned.align_to(block)
    assert 0 < skip < block * 24000 // rate
    ready_at, frames = [], []
    for i in range(len(pcm)):  # a sample at a time: when exactly does each frame get whole?
        if aligned.push(pcm[i : i + 1]):
            ready_at.append(i + 1)
            frames.append(aligned.pop_frame())
    assert len(ready_at) >= 10
    # Whole at the block's end, or a sample before it (a 24 kHz sample spans ~2 at 48 kHz).
    assert all(-n % block < math.ceil(rate / 24000) for n in ready_at), ready_at
    # Unaligned, each frame needs a few samples of the next block: it would wait for all of it.
    plain_at = [i + 1 for i in range(len(pcm))
                if plain.push(pcm[i : i + 1]) and plain.pop_frame() is not None]
    assert all(-n % block > block // 2 for n in plain_at), plain_at
    whole = _whole(pcm.astype(np.float32) / 32768.0, rate, 24000, "FIR")
    np.testing.assert_array_equal(np.concatenate(frames),
                                  whole[skip : skip + len(frames) * FRAME_SAMPLES])


@pytest.mark.parametrize("rate", [48000, 44100, 24000])
def test_the_samples_a_frame_still_needs_are_exact(rate: int) -> None:
    """The capture thread reads a frame's tail the moment it lands: it asks how many device
    samples the next frame still needs, and exactly that many make it whole."""
    conv = CaptureConverter(rate, 1)
    conv.align_to(rate // 100)
    pcm = np.zeros(rate, np.int16)
    at = 0
    for _ in range(8):
        need = conv.device_samples_to_frame()
        if need > 1:
            assert conv.push(pcm[at : at + need - 1]) == 0  # one short: not yet
        assert conv.push(pcm[at + max(0, need - 1) : at + need]) == 1
        at += need
        assert conv.pop_frame() is not None
