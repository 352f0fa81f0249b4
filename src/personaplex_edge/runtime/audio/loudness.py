"""Integrated loudness (ITU-R BS.1770-4) and normalisation, as upstream does for voice prompts.

PersonaPlex normalises a WAV voice prompt to -24 LUFS with pyloudnorm (a pure
gain, no limiter) before Mimi-encoding it. This is the same measurement: the
K-weighting pre-filter (high shelf + high pass), 400 ms blocks with 75 %
overlap, an absolute gate at -70 LUFS and a relative gate 10 LU below.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_LUFS = -24.0


def _biquad_high_shelf(rate: int, gain_db: float = 4.0, q: float = 1 / math.sqrt(2), fc: float = 1500.0):
    a = 10 ** (gain_db / 40.0)
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos, sq = math.cos(w0), 2 * math.sqrt(a) * alpha
    b = [a * ((a + 1) + (a - 1) * cos + sq), -2 * a * ((a - 1) + (a + 1) * cos), a * ((a + 1) + (a - 1) * cos - sq)]
    den = [(a + 1) - (a - 1) * cos + sq, 2 * ((a - 1) - (a + 1) * cos), (a + 1) - (a - 1) * cos - sq]
    return np.array(b) / den[0], np.array(den) / den[0]


def _biquad_high_pass(rate: int, q: float = 0.5, fc: float = 38.0):
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
    den = [1 + alpha, -2 * cos, 1 - alpha]
    return np.array(b) / den[0], np.array(den) / den[0]


def _lfilter(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    try:  # scipy when present (fast); the loop below is the same direct form II transposed filter
        from scipy.signal import lfilter

        return lfilter(b, a, x)
    except ImportError:
        pass
    y = np.empty_like(x, dtype=np.float64)
    z1 = z2 = 0.0
    b0, b1, b2 = (float(v) for v in b)
    _, a1, a2 = (float(v) for v in a)
    for i, xi in enumerate(x.tolist()):
        yi = b0 * xi + z1
        z1 = b1 * xi - a1 * yi + z2
        z2 = b2 * xi - a2 * yi
        y[i] = yi
    return y


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """LUFS of a mono signal; -inf for silence or audio shorter than one 400 ms block."""
    x = np.asarray(audio, dtype=np.float64)
    for b, a in (_biquad_high_shelf(rate), _biquad_high_pass(rate)):
        x = _lfilter(b, a, x)
    block, step = round(0.4 * rate), round(0.1 * rate)
    if len(x) < block:
        return float("-inf")
    starts = range(0, len(x) - block + 1, step)
    z = np.array([np.mean(x[s:s + block] ** 2) for s in starts])
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(z)
    z_abs = z[block_lufs > -70.0]
    if len(z_abs) == 0:
        return float("-inf")
    relative_gate = -0.691 + 10 * np.log10(np.mean(z_abs)) - 10.0
    z_gated = z[(block_lufs > -70.0) & (block_lufs > relative_gate)]
    return float(-0.691 + 10 * np.log10(np.mean(z_gated)))


def normalize_loudness(audio: np.ndarray, rate: int, target: float = TARGET_LUFS) -> np.ndarray:
    """Apply the gain that brings `audio` to `target` LUFS (silence is returned unchanged)."""
    loudness = integrated_loudness(audio, rate)
    if not math.isfinite(loudness):
        return audio.astype(np.float32)
    return (audio * 10 ** ((target - loudness) / 20.0)).astype(np.float32)
