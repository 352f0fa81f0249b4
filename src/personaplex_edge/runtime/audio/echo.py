"""Acoustic echo cancellation for open cabin speakers: WebRTC's AEC3, the playback as reference.

    aec = make_echo_canceller("webrtc", rate=48000, far_rate=48000)
    aec.set_delay_ms(alsa_playback_delay_ms + alsa_capture_delay_ms)   # as the daemon measures
    aec.process_far(written)            # playback thread: exactly what went to the speaker
    clean = aec.process_near(mic_10ms)  # capture thread: one 10 ms mono block in, one out

    stream = EchoStream(aec)            # or any chunk length: re-blocked to 10 ms
    stream.far(chunk); clean = stream.near(chunk)

Modes (`make_echo_canceller`): "webrtc" runs AEC3 from the `pywebrtc-audio` wheel (the `aec`
extra); "external" (a speakerphone or the car's DSP cancels) and "off" (headphones, tests) are
pass-throughs with the same interface. The wheel is imported on first use: the runtime imports
without it, and configuring "webrtc" without it is one ConfigError line.

Why pywebrtc-audio: it is AEC3 itself (the canceller in Chrome), a 0.4 MB wheel that needs only
numpy, with aarch64 cp310 wheels, float32 in and out, the GIL released while it runs, no
threads of its own. livekit's AudioProcessingModule is the same AEC3 with equal figures but a
10.6 MB wheel, protobuf, a 28 MB FFI library with its own thread pool and int16 frames only
(docs/cabin-audio.md has the measured comparison).

Alignment. pywebrtc-audio takes a mic block and its reference block together, so the pairing
is ours. The far end goes onto a sample-indexed timeline (a 2 s ring), and the first mic block
is paired with the far samples `lead` behind the newest one, where
lead = max(jitter_ms, delay - headroom_ms) and `delay` is what `set_delay_ms` was told: the time
from `process_far` of a sample to `process_near` of its echo (playback buffer + DAC + acoustic
path + ADC + capture buffer, which the daemon gets from the ALSA delays). AEC3's own delay
estimator (0 to about 500 ms, measured) finds the remaining `headroom_ms` plus whatever the
estimate got wrong. The reference must never come later than its echo (a causal filter cannot
cancel what it has not seen yet), hence the headroom: an estimate too large by less than
headroom_ms still works; one too small only makes AEC3 search further. jitter_ms is both the
smallest lead and how far the far end may run ahead of it: the echo path must be longer than
jitter_ms (any ALSA set-up is: its playback buffer alone holds two periods or more).
From then on the read position advances exactly one block per mic block, so the burstiness of
the two device threads (a period or a few at a time) never reaches AEC3 as jitter. It moves
only when the far end runs more than `jitter_ms` ahead of the lead for a whole 0.5 s (the
capture side stalled: the far samples that played meanwhile are skipped), when a new delay
estimate differs by more than jitter_ms, and when the far end runs dry (next paragraph).

A silent far end. When nothing arrives from the playback side (no reply yet, the playback
device stalled or lost), the mic blocks are paired with zeros, never with stale samples: for
AEC3 the speaker went quiet, so it predicts no echo and lets the driver through untouched; its
filter is kept. When far samples come again, the gap counts as silence and they are anchored
`lead` ahead of the mic, as in steady state (`stats.realigned_behind` counts these). In the
tests, a stale reference during a 3 s stall cost the driver 7 dB; the silence costs nothing.
`drop_far()` replaces the samples queued but not yet paired with silence, `drop_far(n)` only
the newest n: call it for far samples that never played (a lost device, a write that failed),
or AEC3 would suppress the driver against echo that never played; never for samples that did
(an underrun plays all the buffer held), or their echo goes through uncancelled. `reset()` forgets everything (a new device, a new conversation).

Everything is mono: the daemon downmixes the mic first (as CaptureConverter does) and takes
the reference before the mono playback is copied to the speaker channels. A far end at another
rate (`far_rate`) goes through a resampler first (resample.py; its output is aligned, so the history's
sample positions stay exact). The canceller's block is 10 ms: rate // 100 samples.

Threads: `process_far` and `drop_far` may run on the playback thread while `process_near`
runs on the capture thread (a lock guards the history). AEC3 itself is touched only by
`process_near` and `reset`: call those two from the same thread (or reset with it stopped).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from personaplex_edge.runtime.audio.resample import open_stream
from personaplex_edge.runtime.errors import ConfigError

MODES = ("webrtc", "external", "off")
MISSING_LIBRARY = ("webrtc echo cancellation needs the `aec` extra: "
                   "pip install 'personaplex-edge[aec]'")
HISTORY_S = 2.0  # far-end samples kept: bounds set_delay_ms (the lead) at 2 s - jitter
DENORMAL_GUARD = 1e-7  # amplitude of the floor under AEC3's inputs (-140 dBFS)
WINDOW_S = 0.5  # the far end must run ahead of its target this long before the pairing skips


class EchoControl(Protocol):
    """What the capture and playback paths call, whichever mode is configured."""

    mode: str
    rate: int
    block: int

    def process_far(self, samples: np.ndarray) -> None: ...
    def process_near(self, block: np.ndarray) -> np.ndarray: ...
    def set_delay_ms(self, ms: float) -> None: ...
    def drop_far(self, newest: int | None = None) -> None: ...
    def reset(self) -> None: ...


@dataclass
class EchoStats:
    blocks: int = 0  # mic blocks processed
    silent_far_blocks: int = 0  # of them, paired with an all-zero reference
    realigned_behind: int = 0  # far end came back after running dry: re-anchored after silence
    realigned_ahead: int = 0  # far end ran ahead (capture stalled): old far samples skipped
    dropped_far: int = 0  # drop_far() calls


def _check_rate(name: str, rate: int) -> int:
    rate = int(rate)
    # AEC3 runs on 10 ms blocks: a rate without a whole number of samples in 10 ms would be
    # approximated by the library, which costs cancellation.
    if not 8000 <= rate <= 384000 or rate % 100:
        raise ConfigError(f"echo cancellation: {name} {rate} Hz must be a multiple of 100 Hz "
                          "in 8000..384000")
    return rate


class PassThrough:
    """Modes "external" and "off": the mic comes out as it went in; the far end is ignored."""

    def __init__(self, rate: int, mode: str = "off") -> None:
        self.mode = mode
        self.rate = _check_rate("rate", rate)
        self.block = self.rate // 100
        self.stats = EchoStats()

    def process_far(self, samples: np.ndarray) -> None:
        pass

    def process_near(self, block: np.ndarray) -> np.ndarray:
        self.stats.blocks += 1
        return np.asarray(block, np.float32)

    def set_delay_ms(self, ms: float) -> None:
        pass

    def drop_far(self, newest: int | None = None) -> None:
        pass

    def reset(self) -> None:
        self.stats = EchoStats()


class _FarHistory:
    """The far end on a sample-indexed timeline: `written` samples so far, a ring of the last
    `capacity`. Reads outside [written - capacity, written) are silence."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, np.float32)
        self.written = 0

    def push(self, x: np.ndarray) -> None:
        n, cap = len(x), len(self.buf)
        if n >= cap:
            x, self.written = x[-cap:], self.written + n - cap
            n = cap
        start = self.written % cap
        first = min(n, cap - start)
        self.buf[start : start + first] = x[:first]
        self.buf[: n - first] = x[first:]
        self.written += n

    def silence(self, n: int) -> None:
        """Advance the timeline by n samples of silence (zero the ring where they land)."""
        cap = len(self.buf)
        if n >= cap:
            self.buf[:] = 0.0
        elif n > 0:
            start = self.written % cap
            first = min(n, cap - start)
            self.buf[start : start + first] = 0.0
            self.buf[: n - first] = 0.0
        self.written += max(0, n)

    def blank(self, begin: int) -> None:
        """Zero the samples from absolute position `begin` to `written` (keeps the timeline)."""
        cap = len(self.buf)
        begin = max(begin, self.written - cap)
        n = self.written - begin
        if n > 0:
            start = begin % cap
            first = min(n, cap - start)
            self.buf[start : start + first] = 0.0
            self.buf[: n - first] = 0.0

    def read(self, pos: int, out: np.ndarray) -> int:
        """out[:] = samples [pos, pos + len(out)); returns how many came from the ring."""
        n, cap = len(out), len(self.buf)
        lo, hi = max(pos, self.written - cap, 0), min(pos + n, self.written)
        out[:] = 0.0
        if hi <= lo:
            return 0
        start = lo % cap
        k = hi - lo
        first = min(k, cap - start)
        out[lo - pos : lo - pos + first] = self.buf[start : start + first]
        out[lo - pos + first : hi - pos] = self.buf[: k - first]
        return k


class EchoCanceller:
    """WebRTC AEC3 (pywebrtc-audio) on 10 ms mono float32 blocks; see the module docstring."""

    mode = "webrtc"

    def __init__(self, rate: int, far_rate: int | None = None, *, noise_suppression: bool = False,
                 ns_level: int = 1, agc: bool = False, high_pass: bool = True,
                 headroom_ms: float = 40.0,
                 jitter_ms: float = 30.0, resample_quality: str = "FIR") -> None:
        self.rate = _check_rate("rate", rate)
        self.far_rate = _check_rate("far_rate", far_rate if far_rate is not None else rate)
        if not 0 <= ns_level <= 3:
            raise ConfigError(f"echo cancellation: ns_level {ns_level} is outside 0..3")
        if not (0.0 <= headroom_ms <= 500.0 and 0.0 <= jitter_ms <= 500.0):
            raise ConfigError("echo cancellation: headroom_ms and jitter_ms must be in 0..500")
        self.block = self.rate // 100
        self.headroom = round(headroom_ms * self.rate / 1000)
        self.jitter = max(round(jitter_ms * self.rate / 1000), self.block)
        self._options = dict(noise_suppression=bool(noise_suppression), ns_level=int(ns_level),
                             agc=bool(agc), high_pass=bool(high_pass))
        self._quality = resample_quality
        self._processor = self._make_processor()  # fails here, once, if the wheel is missing
        self._lock = threading.Lock()
        self._history = _FarHistory(int(HISTORY_S * self.rate))
        self._delay: int | None = None  # samples, from set_delay_ms
        self._far = np.zeros(self.block, np.float32)
        # A noise floor at -140 dBFS (far below 16-bit audio's) under both streams: on digital
        # silence AEC3's filter states decay into denormal floats, which cost x86 CPUs ten times
        # the work (18 ms of CPU per 80 ms frame, measured on a Xeon); the floor keeps them out.
        self._floor = (DENORMAL_GUARD * np.random.default_rng(0).standard_normal(self.block)
                       ).astype(np.float32)
        self._near = np.empty(self.block, np.float32)
        self._window = max(1, round(WINDOW_S * self.rate / self.block))
        self.hold = self._measure_hold()  # samples the far resampler may hold back (0 if none)
        self._resampler = self._make_resampler()
        self._restart()
        self.stats = EchoStats()

    # -- construction ---------------------------------------------------------------------

    def _make_processor(self):
        try:
            import pywebrtc_audio
        except ImportError:
            raise ConfigError(MISSING_LIBRARY) from None
        o = self._options
        # AudioProcessor, not EchoCanceller: it takes any rate (24 kHz included) and resamples
        # to AEC3's 16/32/48 kHz bands inside. The high-pass (on by default) takes DC and
        # rumble off the mic before AEC3 models the echo.
        return pywebrtc_audio.AudioProcessor(
            sample_rate=self.rate, num_channels=1, echo_cancellation=True,
            noise_suppression=o["noise_suppression"], ns_level=o["ns_level"],
            high_pass_filter=o["high_pass"], auto_gain_control=o["agc"])

    def _make_resampler(self):
        return open_stream(self.far_rate, self.rate, self._quality)

    def _measure_hold(self) -> int:
        """The most output a far resampler holds back, fed 10 ms at a time for 0.5 s (it
        depends only on sample counts, so silence measures it)."""
        stream = self._make_resampler()
        if stream is None:
            return 0
        step, pushed, out, hold = self.far_rate // 100, 0, 0, 0
        for _ in range(50):
            pushed += step
            out += len(stream.resample_chunk(np.zeros(step, np.float32)))
            hold = max(hold, pushed * self.rate // self.far_rate - out)
        return hold

    # -- alignment ----------------------------------------------------------------------------

    @property
    def lead(self) -> int:
        """Far samples between the newest one pushed and the block paired with the next mic
        block: delay - headroom, at least the jitter plus what the resampler holds back."""
        floor = self.jitter + self.hold
        target = floor if self._delay is None else max(floor, self._delay - self.headroom)
        return min(target, len(self._history.buf) - 2 * self.block - floor)

    def set_delay_ms(self, ms: float) -> None:
        """The measured time from process_far(sample) to process_near(its echo), in ms.

        Takes effect at the next mic block: a change larger than jitter_ms re-pairs once."""
        if not 0.0 <= ms <= 1000 * HISTORY_S:
            raise ValueError(f"echo delay {ms} ms is outside 0..{1000 * HISTORY_S:.0f}")
        with self._lock:
            self._delay = round(ms * self.rate / 1000)

    @property
    def delay_ms(self) -> float | None:
        return None if self._delay is None else self._delay * 1000 / self.rate

    # -- the two streams ----------------------------------------------------------------------

    def process_far(self, samples: np.ndarray) -> None:
        """The playback reference, any length, float32 mono at far_rate: what the speaker got."""
        x = np.asarray(samples, np.float32).reshape(-1)
        if len(x) == 0:
            return
        pushed = len(x)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        with self._lock:
            if self._starved and self._read is not None:
                # The far end comes back after running dry: the gap was silence, and the new
                # samples are anchored `lead` ahead of the mic, as in steady state.
                self._starved = False
                self.stats.realigned_behind += 1
                self._silence(self._read + self._applied - self._newest())
                self._low = None
            self._history.push(x)
            self._far_in += pushed
            self._far_out += len(x)

    def drop_far(self, newest: int | None = None) -> None:
        """Far samples pushed but not played: silence them. All not yet paired (None), or
        the newest `newest` (at far_rate) that did not play, never those that did."""
        with self._lock:
            begin = self._read
            if newest is not None:
                last = self._history.written - int(np.ceil(newest * self.rate / self.far_rate))
                begin = last if begin is None else max(begin, last)
            if begin is not None:
                self._history.blank(begin)
            self.stats.dropped_far += 1

    def _restart(self) -> None:
        self._read: int | None = None  # next far position to pair; None until the first block
        self._applied = 0  # the lead the current pairing was made with
        self._starved = False  # the far end ran dry: re-anchor it when it comes back
        self._low: int | None = None  # lowest `ahead` in this window of blocks
        self._seen = 0  # blocks in this window
        self._far_in = 0  # far samples pushed, at far_rate
        self._far_out = 0  # of them, out of the resampler (at rate)

    def _newest(self) -> int:
        """The timeline position just past the newest far sample pushed, counting what the
        resampler still holds: pairing is anchored to pushes, not to a resampler's bursts."""
        held = self._far_in * self.rate // self.far_rate - self._far_out if self.hold else 0
        return self._history.written + max(0, held)

    def _silence(self, n: int) -> None:
        if n > 0:  # the timeline moves; the resampler's count of held samples does not
            self._history.silence(n)

    def _pair(self) -> np.ndarray:
        """The far block for the next mic block (under the lock)."""
        h, b, target = self._history, self.block, self.lead
        if self._read is None:
            self._read, self._applied = self._newest() - target - b, target
        elif abs(target - self._applied) > self.jitter:
            # A new delay estimate: move the pairing once (later far: silence in between;
            # earlier far: skip ahead).
            if target > self._applied:
                self._silence(target - self._applied)
            else:
                self._read += self._applied - target
            self._applied, self._low = target, None
        if h.written < self._read + b:
            # Nothing (or not enough) came from the playback side: no reply yet, or playback
            # stalled or lost. Pair with silence (read() gives zeros past the newest sample).
            self._starved = True
        else:
            ahead = self._newest() - (self._read + b)  # far samples newer than this block
            self._low = ahead if self._low is None else min(self._low, ahead)
            self._seen += 1
            if self._seen >= self._window:
                if self._low > self._applied + self.jitter:
                    # Ahead by more than the jitter for a whole window, even at its lowest (the
                    # capture side stalled): skip the far samples that played meanwhile.
                    self._read += self._low - self._applied
                    self.stats.realigned_ahead += 1
                self._low, self._seen = None, 0
        h.read(self._read, self._far)
        self._read += b
        if not self._far.any():
            self.stats.silent_far_blocks += 1
        return self._far

    def process_near(self, block: np.ndarray) -> np.ndarray:
        """One 10 ms mic block (rate // 100 float32 mono samples) -> the same with the echo out."""
        x = np.asarray(block, np.float32).reshape(-1)
        if len(x) != self.block:
            raise ValueError(f"echo canceller takes {self.block}-sample blocks, not {len(x)}")
        with self._lock:
            far = self._pair() + self._floor  # a copy: the history buffer stays as it was
        self.stats.blocks += 1
        np.add(x, self._floor, out=self._near)
        return self._processor.process(self._near, far)

    def reset(self) -> None:
        """Forget the filter, the far history and the pairing (a new conversation or device)."""
        with self._lock:
            self._processor.reset()
            self._history = _FarHistory(len(self._history.buf))
            self._resampler = self._make_resampler()
            self._restart()
            self.stats = EchoStats()


class EchoStream:
    """Arbitrary-length chunks to a canceller's 10 ms blocks and back.

    `near(chunk)` returns the processed samples available now: whole blocks go through at
    once, and the at most block - 1 samples of an incomplete block wait for the next chunk (so
    chunks that are whole blocks, such as 20 ms ALSA periods, add no latency at all)."""

    def __init__(self, canceller: EchoControl) -> None:
        self.canceller = canceller
        self._pending = np.zeros(0, np.float32)
        self._passthrough = canceller.mode != "webrtc"

    def far(self, chunk: np.ndarray) -> None:
        self.canceller.process_far(chunk)

    def near(self, chunk: np.ndarray) -> np.ndarray:
        x = np.asarray(chunk, np.float32).reshape(-1)
        if self._passthrough:
            return x
        if len(self._pending):
            x = np.concatenate([self._pending, x])
        b = self.canceller.block
        whole = len(x) // b * b
        self._pending = x[whole:].copy()
        if whole == 0:
            return np.zeros(0, np.float32)
        out = np.empty(whole, np.float32)
        for i in range(0, whole, b):
            out[i : i + b] = self.canceller.process_near(x[i : i + b])
        return out

    @property
    def pending(self) -> int:
        """Mic samples waiting for the rest of their block."""
        return len(self._pending)

    def reset(self) -> None:
        self._pending = np.zeros(0, np.float32)
        self.canceller.reset()


def make_echo_canceller(mode: str, rate: int, far_rate: int | None = None,
                        **options) -> EchoControl:
    """"webrtc": an EchoCanceller (options: noise_suppression, ns_level, agc, high_pass,
    headroom_ms, jitter_ms); "external" / "off": a PassThrough. Unknown mode or missing wheel:
    ConfigError."""
    if mode == "webrtc":
        return EchoCanceller(rate, far_rate, **options)
    if mode in ("external", "off"):
        return PassThrough(rate, mode)
    raise ConfigError(f"echo cancellation mode {mode!r}: one of {', '.join(MODES)}")
