"""The block-free FIR resampler of the audio path (runtime/audio/resample.py) against scipy.signal:
its design, its response, its streaming, its alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from personaplex_edge.runtime.audio.resample import (
    ATTENUATION_DB,
    FirResampler,
    kaiser_lowpass,
    kaiser_order,
    open_stream,
)

PAIRS = [(48000, 24000), (24000, 48000), (44100, 24000), (24000, 44100), (16000, 24000),
         (24000, 16000)]


def _prototype(r: FirResampler) -> np.ndarray:
    """The filter as designed (at the rate between up and down), back out of its phases."""
    padded = r._phases[:, ::-1].T.reshape(-1).astype(np.float64)
    return padded[: 2 * r.delay * r.down + 1]


def test_the_design_is_scipys_kaiser_window_fir() -> None:
    for attenuation, width in ((82.0, 0.0833), (60.0, 0.02), (40.0, 0.1)):
        assert kaiser_order(attenuation, width) == pytest.approx(
            signal.kaiserord(attenuation, width), rel=1e-12)
    for numtaps, cutoff, beta in ((125, 0.479, 8.08), (8821, 0.00326, 8.08), (31, 0.25, 3.0)):
        np.testing.assert_allclose(
            kaiser_lowpass(numtaps, cutoff, beta),
            signal.firwin(numtaps, cutoff, window=("kaiser", beta)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rate_in,rate_out", PAIRS)
def test_flat_passband_deep_stopband_and_a_delay_of_about_a_millisecond(rate_in, rate_out):
    r = FirResampler(rate_in, rate_out)
    h = _prototype(r) / r.up
    freqs, response = signal.freqz(h, worN=1 << 16, fs=rate_in * r.up)
    nyquist_low = min(rate_in, rate_out) / 2
    gain_db = 20 * np.log10(np.abs(response) + 1e-300)
    passband = gain_db[freqs <= 0.875 * nyquist_low]  # 10.5 kHz next to 24 kHz
    stopband = gain_db[freqs >= 25 / 24 * nyquist_low]  # 12.5 kHz next to 24 kHz
    assert np.ptp(passband) < 0.01 and abs(passband.mean()) < 0.01
    assert stopband.max() <= -80.0 and ATTENUATION_DB >= 80.0
    # Linear phase, and half of it a whole number of output samples.
    np.testing.assert_allclose(h, h[::-1], atol=1e-15)
    assert (len(h) - 1) / 2 == r.delay * r.down
    limit_ms = 1.4 if nyquist_low >= 12000 else 2.0  # narrower bands need longer filters
    assert 0.5 <= 1000 * r.delay_s <= limit_ms


@pytest.mark.parametrize("rate_in,rate_out", PAIRS)
def test_streams_are_bit_identical_however_cut_and_match_upfirdn(rate_in, rate_out):
    rng = np.random.default_rng(rate_in + rate_out)
    x = (0.3 * rng.standard_normal(rate_in // 2)).astype(np.float32)
    whole = FirResampler(rate_in, rate_out).resample_chunk(x)
    for sizes in ((1,), (7, 1, 480, 13), (441, 960, 1)):
        stream, parts, i, k = FirResampler(rate_in, rate_out), [], 0, 0
        while i < len(x):
            n = sizes[k % len(sizes)]
            parts.append(stream.resample_chunk(x[i : i + n]))
            i, k = i + n, k + 1
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    # One-shot reference: zeros in, filter, every down-th sample, the delay taken off.
    r = FirResampler(rate_in, rate_out)
    ref = signal.upfirdn(_prototype(r), x.astype(np.float64), r.up, r.down)
    np.testing.assert_allclose(whole, ref[r.delay : r.delay + len(whole)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate_in,rate_out", [(48000, 24000), (24000, 48000), (44100, 24000)])
def test_every_chunk_gives_its_output_at_once(rate_in, rate_out):
    """No blocks: after each chunk, all but the filter's delay has come out (soxr HQ holds
    tens of milliseconds at times)."""
    r = FirResampler(rate_in, rate_out)
    period = rate_in // 100
    out = 0
    for _ in range(50):
        out += len(r.resample_chunk(np.zeros(period, np.float32)))
        assert r.held <= r.delay + 1
        assert out + r.held == -(-r._taken * rate_out // rate_in)


@pytest.mark.parametrize("rate_in,rate_out", [(48000, 24000), (24000, 48000), (44100, 24000)])
def test_output_is_aligned_with_the_input(rate_in, rate_out):
    """A tone comes out at the input's time and level: output k is the input at
    k * rate_in / rate_out, so the latency accounting counts the delay as held samples."""
    t_in = np.arange(rate_in // 4) / rate_in
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t_in)).astype(np.float32)
    y = FirResampler(rate_in, rate_out).resample_chunk(tone)
    t_out = np.arange(len(y)) / rate_out
    settled = t_out > 0.01
    np.testing.assert_allclose(y[settled], 0.5 * np.sin(2 * np.pi * 1000.0 * t_out[settled]),
                               atol=2e-4)


def test_open_stream_chooses_and_refuses() -> None:
    assert open_stream(24000, 24000, "FIR") is None
    assert isinstance(open_stream(48000, 24000), FirResampler)
    assert type(open_stream(48000, 24000, "HQ")).__name__ == "ResampleStream"
    with pytest.raises(ValueError, match="FIR, HQ, VHQ"):
        open_stream(48000, 24000, "LQ")
