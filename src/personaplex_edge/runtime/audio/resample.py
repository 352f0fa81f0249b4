"""Streaming resamplers for the audio path: a block-free polyphase FIR, or soxr.

soxr (HQ, VHQ) works in internal blocks: at 48 <-> 24 kHz it hands its output over up to
~35 ms behind the input, and a frame's last samples wait for the block that holds them. The
driver hears every such millisecond, so the default ("FIR") is a linear-phase Kaiser-window
low-pass run as a polyphase filter: every input chunk gives all the output it can at once, a
constant ~1.3 ms behind (half the filter), and cutting the stream anywhere gives the same
samples bit for bit (each output is one dot product over the same input samples).

The filter keeps 10.5 kHz flat (for a 24 kHz side; 7/8 of the lower Nyquist in general) and
takes 80 dB off everything from 12.5 kHz (25/24 of the lower Nyquist) that would fold into
the band. Its design is a closed form (windowed sinc, Kaiser's formulas), so the runtime
needs numpy only; tests/test_resample.py checks it against scipy.signal.firwin.

Output is aligned to the input like soxr's: output sample k is the signal at input time
k * rate_in / rate_out; the filter's delay shows as samples not yet given out (`held`).
"""

from __future__ import annotations

import math

import numpy as np

QUALITIES = ("FIR", "HQ", "VHQ")  # FIR: block-free (default); HQ, VHQ: soxr's presets
PASS_FRACTION = 0.875  # of the lower Nyquist: flat to 10.5 kHz next to 24 kHz
STOP_FRACTION = 25 / 24  # of the lower Nyquist: 12.5 kHz next to 24 kHz (folds to 11.5 kHz)
ATTENUATION_DB = 82.0  # the design's target; >= 80 dB measured (tests/test_resample.py)
SOXR_BURST_MS = 40.0  # soxr HQ hands its output over up to ~38 ms late at 48 kHz


def kaiser_lowpass(numtaps: int, cutoff: float, beta: float) -> np.ndarray:
    """A linear-phase low-pass (cutoff as a fraction of Nyquist) with unit gain at DC: the
    windowed sinc of scipy.signal.firwin(numtaps, cutoff, window=("kaiser", beta))."""
    m = np.arange(numtaps, dtype=np.float64) - (numtaps - 1) / 2
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(numtaps, beta)
    return h / h.sum()


def kaiser_order(attenuation_db: float, width: float) -> tuple[int, float]:
    """Taps and beta for a Kaiser-window FIR (Kaiser's formulas, as scipy.signal.kaiserord):
    `width` is the transition band as a fraction of Nyquist."""
    a = attenuation_db
    beta = 0.1102 * (a - 8.7) if a > 50 else (0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21)
                                              if a > 21 else 0.0)
    return math.ceil((a - 7.95) / (2.285 * math.pi * width) + 1), beta


class FirResampler:
    """rate_in -> rate_out, float32 mono, block-free: `resample_chunk` returns every output
    sample its input determines. Up by `up`, filter, down by `down` (polyphase: only the
    taps that meet input samples are computed)."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        g = math.gcd(int(rate_in), int(rate_out))
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self.up, self.down = self.rate_out // g, self.rate_in // g
        fast = self.rate_in * self.up  # the rate the filter runs at (in between up and down)
        nyquist_low = min(self.rate_in, self.rate_out) / 2
        width = (STOP_FRACTION - PASS_FRACTION) * nyquist_low / (fast / 2)
        numtaps, beta = kaiser_order(ATTENUATION_DB, width)
        # Half the filter a whole number of output samples, so output k sits exactly at k.
        self.delay = math.ceil((numtaps - 1) / 2 / self.down)  # output samples
        center = self.delay * self.down
        cutoff = (PASS_FRACTION + STOP_FRACTION) / 2 * nyquist_low / (fast / 2)
        h = kaiser_lowpass(2 * center + 1, cutoff, beta) * self.up  # zeros inserted: x up
        self.taps = -(-len(h) // self.up)  # per phase
        h = np.concatenate([h, np.zeros(self.taps * self.up - len(h))])
        # phases[p, t] = h[p + t * up]; reversed, so a window of input (oldest first) meets it.
        self._phases = np.ascontiguousarray(h.reshape(self.taps, self.up).T[:, ::-1], np.float32)
        self._center = center
        self.reset()

    def reset(self) -> None:
        self._history = np.zeros(self.taps - 1, np.float32)  # the last inputs, zeros at first
        self._taken = 0  # input samples so far
        self._given = 0  # output samples so far

    @property
    def delay_s(self) -> float:
        return self.delay / self.rate_out

    @property
    def held(self) -> int:
        """Output samples the input so far determines in time but the filter cannot give yet."""
        return -(-self._taken * self.up // self.down) - self._given

    def inputs_for(self, count: int) -> int:
        """Input samples it takes to get `count` output samples out (count >= 1)."""
        return ((count - 1) * self.down + self._center) // self.up + 1

    def resample_chunk(self, chunk: np.ndarray) -> np.ndarray:
        x = np.asarray(chunk, np.float32).reshape(-1)
        buf = np.concatenate([self._history, x])
        first = self._taken - (self.taps - 1)  # input index of buf[0]
        self._taken += len(x)
        # Output k needs the input up to index (k * down + center) // up: all that is here.
        end = max(0, -(-(self._taken * self.up - self._center) // self.down))
        k = np.arange(self._given, end, dtype=np.int64)
        self._given = max(self._given, end)
        self._history = buf[len(buf) - (self.taps - 1):].copy()
        if len(k) == 0:
            return np.zeros(0, np.float32)
        fast = k * self.down + self._center  # newest tap's place at the filter's rate
        newest = fast // self.up - first  # its input sample in buf
        windows = np.lib.stride_tricks.sliding_window_view(buf, self.taps)[newest - (self.taps - 1)]
        return (windows * self._phases[fast % self.up]).sum(axis=1, dtype=np.float32)


def open_stream(rate_in: int, rate_out: int, quality: str = "FIR"):
    """A streaming resampler with `resample_chunk(x) -> y` (None when the rates are equal)."""
    if quality not in QUALITIES:
        raise ValueError(f"resample quality must be one of {', '.join(QUALITIES)}, not {quality!r}")
    if rate_in == rate_out:
        return None
    if quality == "FIR":
        return FirResampler(rate_in, rate_out)
    import soxr

    return soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=quality)


def burst_ms(quality: str) -> float:
    """How late a resampler of this quality may hand output over, before the device's rate is
    known (the playback thread then takes its own resampler's: `hold_ms`)."""
    return 2.0 if quality == "FIR" else SOXR_BURST_MS


def hold_ms(resampler) -> float:
    """How late this stream hands output over: the FIR's delay, soxr's blocks, 0 for none."""
    if resampler is None:
        return 0.0
    return 1000.0 * resampler.delay_s if isinstance(resampler, FirResampler) else SOXR_BURST_MS
