"""Streaming audio DSP for the live daemon: resampling FIFOs and the speaker output stage.

Capture: device periods (any rate, any size, 1..N int16 channels) -> downmix -> resampler
-> exact 1920-sample 24 kHz frames. Playback: 1920-sample frames -> resampler -> a FIFO
at the device rate that hands out periods of whatever size the device wants.

The resampler streams (resample.py: the block-free FIR by default, or soxr) keep their filter
state across calls, so a stream cut into periods gives the same samples as resampling the
whole signal at once (tests/test_dsp.py checks it bit for bit): no drift, nothing lost or
repeated. soxr works in internal blocks, so its output arrives in bursts (at HQ about 35 ms at
most behind the input); the FIFOs absorb that. The FIR gives its output at once, 1.3 ms behind.

Output stage (per device period, at the device rate, i.e. after resampling so that the limit
holds for the samples the DAC actually gets): static gain x ducking ramp x fade ramp, then a
soft limiter. The limiter is a memoryless tanh knee above a threshold (see `soft_limit`).

Everything here is numpy on small preallocated buffers; it runs 12.5+ times a second next to
inference, so no per-sample Python loops and no growing arrays.
"""

from __future__ import annotations

import math

import numpy as np

from personaplex_edge.runtime.audio.resample import FirResampler, hold_ms, open_stream
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE

_INT16_SCALE = 1.0 / 32768.0


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


class SampleFifo:
    """A ring of float32 mono samples. Preallocated; doubles only if a burst overflows it."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.zeros(max(16, int(capacity)), np.float32)
        self._head = 0  # next sample to read
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._head = 0
        self._size = 0

    def push(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n == 0:
            return
        if self._size + n > len(self._buf):
            self._grow(self._size + n)
        cap = len(self._buf)
        tail = (self._head + self._size) % cap
        first = min(n, cap - tail)
        self._buf[tail : tail + first] = samples[:first]
        if first < n:
            self._buf[: n - first] = samples[first:]
        self._size += n

    def pop_into(self, out: np.ndarray) -> int:
        """Move up to len(out) samples into out[:k]; returns k."""
        k = min(len(out), self._size)
        if k == 0:
            return 0
        cap = len(self._buf)
        first = min(k, cap - self._head)
        out[:first] = self._buf[self._head : self._head + first]
        if first < k:
            out[first:k] = self._buf[: k - first]
        self._head = (self._head + k) % cap
        self._size -= k
        return k

    def peak(self, n: int) -> float:
        """The largest magnitude among the next n samples (0.0 for none)."""
        k = min(max(0, n), self._size)
        if k == 0:
            return 0.0
        cap = len(self._buf)
        first = min(k, cap - self._head)
        top = float(np.max(np.abs(self._buf[self._head : self._head + first])))
        if first < k:
            top = max(top, float(np.max(np.abs(self._buf[: k - first]))))
        return top

    def discard(self, n: int) -> int:
        k = min(max(0, n), self._size)
        self._head = (self._head + k) % len(self._buf)
        self._size -= k
        return k

    def _grow(self, need: int) -> None:
        new = np.zeros(max(need, 2 * len(self._buf)), np.float32)
        k = self._size
        self.pop_into(new[:k])
        self._buf, self._head, self._size = new, 0, k


def to_mono_float(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Interleaved (or [n, ch]) int16 -> float32 mono in [-1, 1): the mean of the channels."""
    data = np.asarray(pcm).reshape(-1, channels)
    if channels == 1:
        return data[:, 0].astype(np.float32) * np.float32(_INT16_SCALE)
    mono = data.mean(axis=1, dtype=np.float32)
    mono *= np.float32(_INT16_SCALE)
    return mono


class CaptureConverter:
    """Device capture periods -> exact FRAME_SAMPLES-long 24 kHz mono float32 frames."""

    def __init__(self, device_rate: int, channels: int, quality: str = "FIR",
                 frame_samples: int = FRAME_SAMPLES) -> None:
        self.device_rate = int(device_rate)
        self.channels = int(channels)
        self.quality = quality
        self.frame_samples = int(frame_samples)
        self._fifo = SampleFifo(4 * self.frame_samples)
        self._resampler = open_stream(self.device_rate, SAMPLE_RATE, quality)
        self._taken = self._given = 0  # resampler input and output so far (latency.py)

        self._skip = 0  # 24 kHz samples still to drop at the start (align_to)

    def reset(self) -> None:
        """Forget buffered audio and filter state (after an overrun or a reopen)."""
        self._fifo.clear()
        self._resampler = open_stream(self.device_rate, SAMPLE_RATE, self.quality)
        self._taken = self._given = self._skip = 0

    def align_to(self, block: int) -> int:
        """Start the frame grid so that each frame is whole at the end of a `block` of device
        samples (the echo canceller gives its output 10 ms at a time, so this converter gets
        whole blocks): a frame that needs a few samples of the next block would wait for all
        of it. Drops less than a block of audio at the start, once; returns the 24 kHz
        samples dropped (0 where the resampler has blocks of its own)."""
        resampler = self._resampler
        if resampler is not None and not isinstance(resampler, FirResampler):
            return 0

        def need(skip: int) -> int:  # device samples until the first frame is whole
            count = skip + self.frame_samples
            return count if resampler is None else resampler.inputs_for(count)

        target = -(-need(0) // block) * block
        skip = 0
        while need(skip + 1) <= target:  # fewer steps than a block has samples
            skip += 1
        self._skip = skip
        return skip

    @property
    def held_s(self) -> float:
        """Input the resampler has taken and not given out yet (its look-ahead and blocks)."""
        return self._taken / self.device_rate - self._given / SAMPLE_RATE

    @property
    def buffered(self) -> int:
        """24 kHz samples waiting for the next frame."""
        return len(self._fifo)

    def device_samples_to_frame(self) -> int:
        """Device-rate samples still to come before the next frame is whole (exact through the
        FIR; through soxr a lower bound: its blocks may need more, and the read then waits)."""
        missing = max(0, self.frame_samples + self._skip - len(self._fifo))
        if missing == 0:
            return 0
        if isinstance(self._resampler, FirResampler):  # exact: it has no blocks
            return self._resampler.inputs_for(self._given + missing) - self._taken
        return math.ceil(missing * self.device_rate / SAMPLE_RATE)

    def push(self, pcm: np.ndarray) -> int:
        """Add one period (int16, interleaved or [n, ch]); returns how many whole frames wait."""
        return self.push_mono(to_mono_float(pcm, self.channels))

    def push_mono(self, mono: np.ndarray) -> int:
        """Add float32 mono samples at the device rate (downmixed, e.g. then echo-cancelled)."""
        if self._resampler is not None:
            self._taken += len(mono)
            mono = self._resampler.resample_chunk(mono)
            self._given += len(mono)
        if self._skip:
            dropped = min(self._skip, len(mono))
            mono, self._skip = mono[dropped:], self._skip - dropped
        self._fifo.push(mono)
        return len(self._fifo) // self.frame_samples

    def pop_frame(self) -> np.ndarray | None:
        """The next whole frame (a new array the caller may keep), or None."""
        if len(self._fifo) < self.frame_samples:
            return None
        frame = np.empty(self.frame_samples, np.float32)
        self._fifo.pop_into(frame)
        return frame

    def frames(self, pcm: np.ndarray) -> list[np.ndarray]:
        """push() then every whole frame now available."""
        self.push(pcm)
        out = []
        while (frame := self.pop_frame()) is not None:
            out.append(frame)
        return out


class PlaybackConverter:
    """24 kHz mono frames -> a FIFO of mono float32 samples at the device rate."""

    def __init__(self, device_rate: int, quality: str = "FIR", capacity_s: float = 1.0) -> None:
        self.device_rate = int(device_rate)
        self.quality = quality
        self._fifo = SampleFifo(int(capacity_s * self.device_rate))
        self._resampler = open_stream(SAMPLE_RATE, self.device_rate, quality)
        self._pushed = 0  # 24 kHz samples pushed so far
        self.taken = 0  # device-rate samples popped or discarded so far

    def reset(self) -> None:
        self._fifo.clear()
        self._resampler = open_stream(SAMPLE_RATE, self.device_rate, self.quality)
        self._pushed = self.taken = 0

    @property
    def hold_ms(self) -> float:
        """How late its resampler may hand a frame's samples over."""
        return hold_ms(self._resampler)

    @property
    def available(self) -> int:
        """Device-rate samples ready to play."""
        return len(self._fifo)

    @property
    def next_start(self) -> int:
        """Where the next frame's first sample will be in the output stream (counted like
        `taken`): the resampler's output is aligned to its input, whatever it holds back for now."""
        return round(self._pushed * self.device_rate / SAMPLE_RATE)

    def push_frame(self, frame: np.ndarray) -> None:
        x = np.asarray(frame, np.float32).reshape(-1)
        self._pushed += len(x)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        self._fifo.push(x)

    def pop_into(self, out: np.ndarray) -> int:
        got = self._fifo.pop_into(out)
        self.taken += got
        return got

    def peak(self, n: int) -> float:
        """The largest magnitude among the next n samples to play."""
        return self._fifo.peak(n)

    def discard(self, n: int) -> int:
        k = self._fifo.discard(n)
        self.taken += k
        return k


class Ramp:
    """A gain that glides between values along a raised cosine, (1 - cos(pi t)) / 2.

    Raised cosine rather than linear: zero slope at both ends, so the ramp itself adds no
    click. The largest per-sample change is |b - a| * pi / (2 * length)."""

    def __init__(self, rate: int, ms: float, value: float = 1.0) -> None:
        self.length = max(1, round(rate * ms / 1000.0))
        k = np.arange(self.length + 1, dtype=np.float64)
        self._shape = ((1.0 - np.cos(np.pi * k / self.length)) / 2.0).astype(np.float32)
        self._from = self._to = float(value)
        self._pos = self.length  # at rest

    @property
    def value(self) -> float:
        return self._from + (self._to - self._from) * float(self._shape[self._pos])

    @property
    def target(self) -> float:
        return self._to

    @property
    def moving(self) -> bool:
        return self._pos < self.length

    def set(self, target: float) -> None:
        """Glide from wherever the gain is now to target."""
        if target == self._to and not self.moving:
            return
        self._from, self._to, self._pos = self.value, float(target), 0

    def jump(self, value: float) -> None:
        self._from = self._to = float(value)
        self._pos = self.length

    def apply(self, buf: np.ndarray) -> None:
        """Multiply buf (in place) by the next len(buf) gain values."""
        n = len(buf)
        k = 0
        if self.moving:
            k = min(n, self.length - self._pos)
            env = self._shape[self._pos + 1 : self._pos + 1 + k]
            buf[:k] *= self._from + (self._to - self._from) * env
            self._pos += k
        if k < n and self._to != 1.0:
            if self._to == 0.0:
                buf[k:] = 0.0
            else:
                buf[k:] *= np.float32(self._to)


def soft_limit(buf: np.ndarray, threshold: float, scratch: np.ndarray | None = None) -> None:
    """In place: identity up to `threshold`, a tanh knee above it; |y| < 1 for any finite x.

    y = sign(x) * (T + (1 - T) * tanh((|x| - T) / (1 - T)))  for |x| > T.

    Why this and not a look-ahead peak limiter: the model's speech is already loudness-
    normalised, so the limiter is a safety net that rarely engages. The knee is memoryless
    (nothing to reset on pause, reopen or underrun), adds no latency, is a few vectorised numpy
    operations per period, is bit-exact below the threshold, joins the line with matching slope
    (no hard corner, only mild odd harmonics on overs), and is bounded by 1.0 by construction,
    so the DAC never clips. A peak limiter would be more transparent on sustained overs but
    needs per-sample recursion (a Python loop here) and a look-ahead delay.
    """
    n = len(buf)
    if scratch is None or len(scratch) < n:
        scratch = np.empty(n, np.float32)
    mag = scratch[:n]
    np.abs(buf, out=mag)
    if not np.isfinite(mag.sum(dtype=np.float64)):
        # A broken engine must not reach the speaker as NaN/inf (undefined int16 cast).
        np.nan_to_num(buf, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.abs(buf, out=mag)
    if mag.max(initial=0.0) <= threshold:
        return
    over = mag > threshold
    knee = np.float32(1.0 - threshold)
    shaped = np.float32(threshold) + knee * np.tanh((mag[over] - np.float32(threshold)) / knee)
    buf[over] = np.copysign(shaped, buf[over])


class OutputStage:
    """Gain, ducking and fades, then the soft limiter; one device period at a time.

    Fades: `fade_in()` / `fade_out()` glide the fade gain over `fade_ms` (start, resume after
    pause, after a rebuffer; pause and stop). `duck(db)` glides the level to the static gain
    plus `db` over `duck_ms` (duck(0) restores it). The stage starts faded out.
    """

    def __init__(self, rate: int, gain_db: float = 0.0, fade_ms: float = 15.0,
                 duck_ms: float = 150.0, limit_db: float = -3.0, max_period: int = 8192) -> None:
        if not -40.0 <= limit_db < 0.0:
            raise ValueError(f"limiter threshold must be in [-40, 0) dBFS, not {limit_db}")
        self.rate = int(rate)
        self.threshold = db_to_gain(limit_db)
        self._gain_db = float(gain_db)
        self._duck_db = 0.0
        self._level = Ramp(rate, duck_ms, db_to_gain(gain_db))
        self._fade = Ramp(rate, fade_ms, 0.0)
        self._scratch = np.empty(max_period, np.float32)

    @property
    def gain_db(self) -> float:
        return self._gain_db

    @property
    def fade_target(self) -> float:
        return self._fade.target

    @property
    def silent(self) -> bool:
        """Faded all the way out: everything processed now comes out as zeros."""
        return self._fade.target == 0.0 and not self._fade.moving

    def set_gain_db(self, db: float) -> None:
        self._gain_db = float(db)
        self._level.set(db_to_gain(self._gain_db + self._duck_db))

    def duck(self, db: float) -> None:
        self._duck_db = min(0.0, float(db))
        self._level.set(db_to_gain(self._gain_db + self._duck_db))

    def fade_in(self) -> None:
        self._fade.set(1.0)

    def fade_out(self) -> None:
        self._fade.set(0.0)

    def mute_now(self) -> None:
        """Faded out with no ramp (device reopened, rebuffering)."""
        self._fade.jump(0.0)

    def process(self, buf: np.ndarray) -> np.ndarray:
        """In place on float32 mono samples; returns buf."""
        if self.silent:
            buf[:] = 0.0
            return buf
        self._level.apply(buf)
        self._fade.apply(buf)
        if len(self._scratch) < len(buf):
            self._scratch = np.empty(len(buf), np.float32)
        soft_limit(buf, self.threshold, self._scratch)
        return buf


class Int16Packer:
    """Float mono samples -> interleaved int16 for `channels` channels, in a reused buffer."""

    def __init__(self, channels: int, max_period: int) -> None:
        self.channels = int(channels)
        self._tmp = np.empty(max_period, np.float32)
        self._out = np.empty((max_period, self.channels), np.int16)

    def pack(self, mono: np.ndarray) -> memoryview:
        """A view valid until the next call (pyalsaaudio's write() takes any buffer)."""
        n = len(mono)
        if n > len(self._tmp):
            self._tmp = np.empty(n, np.float32)
            self._out = np.empty((n, self.channels), np.int16)
        tmp = self._tmp[:n]
        np.multiply(mono, np.float32(32767.0), out=tmp)
        np.clip(tmp, -32768.0, 32767.0, out=tmp)
        np.rint(tmp, out=tmp)
        out = self._out[:n]
        np.copyto(out, tmp[:, None], casting="unsafe")
        return memoryview(out).cast("B")
