"""The cabin's echo path: the playback stream as far end, the capture stream through echo.py.

    path = EchoPath(settings)             # mode and options from AudioSettings
    # playback thread, every period written (silence included): mono, at the device rate,
    # before the copy to the speaker channels; queued = frames ahead of it in the device buffer
    path.far(period, dev.rate, queued)
    path.drop_far("underrun", unplayed)   # the device did not take the newest `unplayed`
    path.drop_far("device lost")          # or lost what it held: what was to play from now
    # capture thread, every chunk read: after the downmix, before the resampling to 24 kHz;
    # buffered = frames waiting in the capture buffer before this read (this chunk included)
    clean = path.near(mono, dev.rate, buffered, measured)  # measured: when buffered was read

The canceller runs at the capture device's rate on 10 ms blocks (EchoStream: whole blocks go
through at once, what a read brings beyond them, under 10 ms, waits for the next read; WebRTC's
processing itself delays the mic by 9 ms at 48 kHz), its reference at the playback device's
rate (echo.py resamples it). The rates are those the devices opened at: when one differs from the
canceller's, the capture thread builds a new one (the far samples in between are dropped).

Alignment: both streams on one clock. ALSA's buffer levels say when each sample meets the air:
a far period handed over with `queued` frames ahead of it starts playing queued / rate from
now; a mic chunk read with `buffered` frames waiting ended buffered - len frames ago. The far
periods wait here with their play times, and the capture thread hands them to the canceller as
the mic's capture time passes them (plus the canceller's jitter margin, its smallest
lead, which `set_delay_ms` is told once with the headroom on top). So the canceller pairs each
mic block with what the speaker played while it was captured, whatever the device threads'
scheduling: a playback thread that writes 40 ms late or a capture thread that reads in bursts
changes nothing (pairing by when the threads ran, as echo.py does on its own, slid off on a
loaded machine and cost 25 dB of cancellation). What ALSA cannot see (DAC, air, ADC, a
speaker DSP) is AEC3's to find with its own estimator; it only ever has to delay the reference.
Clock drift between a USB mic and a separate DAC shows as the far end running ahead or dry by
a few ms, and echo.py re-pairs (accurately: the far end it re-anchors on is on time). Without
the buffer levels (pyalsaaudio 0.10 has no avail()) far periods go to the canceller as they
are written, and echo.py's own pairing and AEC3's estimator do it all. `DelayTracker` keeps the
ALSA part of the echo delay (queued + buffered, medians) for the status.

Devices come and go. A playback xrun: the buffer drained, so all it held did play; only the
period whose write failed did not (yet): `drop_far(reason, unplayed)` drops those samples, and
the playback thread hands them over again, timed anew, once the restarted device took them. A
lost playback device: `drop_far(reason)` drops what was to play from now on (waiting here, or
handed to the canceller within its lead). Each drop is counted (`reference_drops`, the
daemon's ppx_echo_reference_drops_total) and logged; capture carries on, paired with silence
where the reference went. A reopened capture device resets the canceller (a new device: echo.py's
reset()), from the capture thread, the one that runs AEC3.

"external" and "off": `active` is False; near() returns the mic as it is, far() and the ALSA
measurements are skipped.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections import deque

import numpy as np

from personaplex_edge.runtime.audio.echo import (
    HISTORY_S,
    MISSING_LIBRARY,
    EchoStream,
    make_echo_canceller,
)
from personaplex_edge.runtime.audio.latency import echo_processing_delay
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.errors import ConfigError

log = logging.getLogger("personaplex.audio")

UPDATE_S = 1.0  # how often the status's delay figure is refreshed
WINDOW = 100  # delay samples kept per side: 2 s of 20 ms periods
DROP_LOG_S = 10.0  # at most one log line per this long about reference drops (xrun storms)
FAR_WAIT_S = HISTORY_S  # far audio waiting for its play time, at most (the canceller's history)


def jitter_ms(settings: AudioSettings) -> float:
    """The canceller's lead over the mic: a far sample exists from its write, at most buffer - 1
    periods before it plays (the playback thread waits for room); half a period less leaves
    slack for a late wake-up. 30 ms at most (AEC3's own estimator finds the rest), a period at
    least."""
    period_ms = 1000.0 * settings.period_frames / settings.playback_rate
    return min(30.0, max(period_ms, (settings.buffer_periods - 1.5) * period_ms))


def webrtc_library() -> str:
    """"pywebrtc-audio X.Y.Z" when the `aec` extra imports, else one ConfigError line."""
    try:
        import pywebrtc_audio  # noqa: F401
    except ImportError:
        raise ConfigError(f"audio.echo_cancel: {MISSING_LIBRARY} (or set audio.echo_cancel to "
                          "external or off)") from None
    try:
        return f"pywebrtc-audio {importlib.metadata.version('pywebrtc-audio')}"
    except importlib.metadata.PackageNotFoundError:
        return "pywebrtc-audio (version unknown)"


class DelayTracker:
    """The ALSA part of the echo delay, playback queue + capture wait (medians), for status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._playback: deque[float] = deque(maxlen=WINDOW)
        self._capture: deque[float] = deque(maxlen=WINDOW)
        self._next = 0.0
        self.estimate_ms: float | None = None

    def playback(self, queued_ms: float) -> None:
        with self._lock:
            self._playback.append(queued_ms)

    def capture(self, buffered_ms: float) -> None:
        with self._lock:
            self._capture.append(buffered_ms)

    def forget_playback(self) -> None:
        with self._lock:
            self._playback.clear()

    def forget_capture(self) -> None:
        with self._lock:
            self._capture.clear()

    def update(self, now: float) -> float | None:
        """A new estimate in ms once UPDATE_S has passed and both sides have samples, else None."""
        if now < self._next:
            return None
        with self._lock:
            if not self._playback or not self._capture:
                return None
            ms = float(np.median(self._playback) + np.median(self._capture))
        self._next = now + UPDATE_S
        self.estimate_ms = ms
        return ms


class _TimedFar:
    """Far periods with their play times (monotonic s), handed on as the mic's time passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._periods: deque[tuple[float, np.ndarray, int]] = deque()  # start, samples, rate

    def put(self, start: float, period: np.ndarray, rate: int) -> None:
        with self._lock:
            self._periods.append((start, np.array(period, np.float32), rate))
            # Nothing takes them (capture lost): keep no more than the canceller could use.
            while self._periods and self._periods[0][0] < start - FAR_WAIT_S:
                self._periods.popleft()

    def take(self, until: float) -> list[tuple[float, np.ndarray, int]]:
        """The samples that start playing before `until` (a period may be split), with their
        play times."""
        out = []
        with self._lock:
            while self._periods and self._periods[0][0] < until:
                start, x, rate = self._periods.popleft()
                k = min(len(x), int((until - start) * rate) + 1)
                out.append((start, x[:k], rate))
                if k < len(x):
                    self._periods.appendleft((start + k / rate, x[k:], rate))
                    break
        return out

    def drop_newest(self, n: int) -> int:
        """Forget the newest n samples (the device did not take them); returns how many of
        them were still here (the rest went to the canceller already)."""
        left = n
        with self._lock:
            while left > 0 and self._periods:
                start, x, rate = self._periods.pop()
                if len(x) > left:
                    self._periods.append((start, x[: len(x) - left], rate))
                    left = 0
                else:
                    left -= len(x)
        return n - left

    def drop_from(self, t: float) -> None:
        """Forget the samples that start playing at `t` or later."""
        with self._lock:
            while self._periods and self._periods[-1][0] >= t:
                self._periods.pop()
            if self._periods:
                start, x, rate = self._periods[-1]
                k = max(0, int(np.ceil((t - start) * rate)))
                if k < len(x):
                    self._periods[-1] = (start, x[:k], rate)

    def clear(self) -> None:
        with self._lock:
            self._periods.clear()


class EchoPath:
    """The canceller between the two device threads (see the module docstring)."""

    def __init__(self, settings: AudioSettings) -> None:
        self.mode = settings.echo_cancel
        self.active = self.mode == "webrtc"
        self._options = {"noise_suppression": settings.noise_suppression,
                         "agc": settings.auto_gain, "high_pass": settings.high_pass,
                         "jitter_ms": jitter_ms(settings)}
        self._far_rate = settings.playback_rate  # the playback device's, once it has opened
        self._far = _TimedFar()
        self._far_end: float | None = None  # when the last far period queued ends playing
        self._released_end: float | None = None  # when the newest far sample handed over plays
        self._untimed = False  # the last far period went to the canceller as written
        self.delay = DelayTracker()
        self.reference_drops = 0
        self._unlogged_drops = 0
        self._drop_logged = -DROP_LOG_S
        self._captures = 0  # capture streams started (the first is no reopen)
        self._cpu_s = 0.0  # time spent in the canceller, and the mic seconds it took
        self._mic_s = 0.0
        self._stream: EchoStream | None = None
        if self.active:  # built now: a missing library is a ConfigError here, not in a thread
            self._stream = self._build(settings.capture_rate, settings.playback_rate)

    def _build(self, rate: int, far_rate: int) -> EchoStream:
        c = make_echo_canceller("webrtc", rate, far_rate, **self._options)
        # Far samples arrive `jitter` ahead of the mic (see _release): pair at exactly that lead.
        c.set_delay_ms(1000.0 * (c.jitter + c.headroom) / c.rate)
        self._ahead_s = c.jitter / c.rate
        # AEC3's own delay of the mic, for the latency estimate (latency.py): a twin measures it.
        self._processing_s = echo_processing_delay(
            lambda: make_echo_canceller("webrtc", rate, far_rate, **self._options), rate) / rate
        return EchoStream(c)

    # -- playback thread ------------------------------------------------------------------

    def far(self, period: np.ndarray, rate: int, queued: int | None,
            now: float | None = None) -> None:
        """One period as written to the playback device (mono float32 at its rate); `now`:
        when `queued` was measured (default: now)."""
        if not self.active:
            return
        if rate != self._far_rate:
            self._far_rate = rate  # the capture thread builds a canceller for it
            return
        now = time.monotonic() if now is None else now
        self._untimed = False
        if queued is not None:
            start = now + queued / rate
            self.delay.playback(1000.0 * queued / rate)
        elif self._far_end is not None:  # one level missing (an xrun): right after the last
            start = max(now, self._far_end)
        else:  # no buffer levels at all: the write is the best clock there is
            stream = self._stream  # read once: the capture thread may swap it
            if stream.canceller.far_rate == rate:
                stream.far(period)
            self._untimed = True
            return
        self._far_end = start + len(period) / rate
        self._far.put(start, period, rate)

    def drop_far(self, reason: str, unplayed: int | None = None,
                 now: float | None = None) -> None:
        """Far audio given to far() that will not play when it said: the newest `unplayed`
        samples (an underrun: the device did not take them; all it had taken did play, as
        the buffer drained), or, with None (a lost device), all that was to play from `now`
        on. Only that is dropped: the echo of what did play still gets its reference."""
        if not self.active:
            return
        now = time.monotonic() if now is None else now
        canceller = self._stream.canceller
        if self._untimed:  # no play times: the newest samples are the canceller's
            canceller.drop_far(unplayed)
        elif unplayed is not None:
            # Those handed over already (to play within the lead) go from the canceller.
            canceller.drop_far(unplayed - self._far.drop_newest(unplayed))
            if self._far_end is not None:
                self._far_end -= unplayed / self._far_rate
        else:
            self._far.drop_from(now)
            self._far_end = None
            ahead = 0.0 if self._released_end is None else self._released_end - now
            canceller.drop_far(max(0, int(np.ceil(ahead * self._far_rate))))
        self.delay.forget_playback()
        self.reference_drops += 1
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_S:  # an xrun storm is one line per 10 s
            log.info("echo reference dropped (%s; %d drop%s since the last line, %d in all)",
                     reason, self._unlogged_drops, "" if self._unlogged_drops == 1 else "s",
                     self.reference_drops)
            self._drop_logged, self._unlogged_drops = now, 0

    # -- capture thread -------------------------------------------------------------------

    def capture_started(self) -> None:
        """A capture stream starts: after a reopen the canceller starts afresh."""
        if self.active and self._captures:
            self._stream.reset()
            self.delay.forget_capture()
        self._captures += 1

    def near(self, mono: np.ndarray, rate: int, buffered: int | None,
             measured: float | None = None) -> np.ndarray:
        """The mic (mono float32 at the capture device's rate) with the echo taken out;
        `measured`: when `buffered` was measured, before the read (default: now)."""
        if not self.active:
            return mono
        stream = self._stream
        if stream.canceller.rate != rate or stream.canceller.far_rate != self._far_rate:
            log.info("echo canceller: capture at %d Hz, reference at %d Hz", rate, self._far_rate)
            stream = self._stream = self._build(rate, self._far_rate)
        now = time.monotonic() if measured is None else measured
        if buffered is None:
            until = float("inf")  # no capture clock: hand over all that was written
        else:
            # The level's own time, not the read's: a read that took long changes nothing.
            until = now - (buffered - len(mono)) / rate + self._ahead_s
            self.delay.capture(1000.0 * buffered / rate)
        self._release(stream, until)
        self.delay.update(now)
        t0 = time.thread_time()  # CPU, not wall: waits for the GIL are not the canceller's
        out = stream.near(mono)
        self._cpu_s += time.thread_time() - t0
        self._mic_s += len(mono) / rate
        return out

    def whole_blocks(self, samples: int, rate: int) -> int:
        """Mic samples to read so that `samples` more come out of the canceller: it gives 10 ms
        blocks, and has `pending` samples of the next one already."""
        if not self.active:
            return samples
        block = rate // 100
        pending = self._stream.pending if self._stream.canceller.rate == rate else 0
        return max(0, -(-samples // block) * block - pending)

    def block(self, rate: int) -> int | None:
        """The canceller's block at `rate` (its output comes 10 ms at a time), None when off."""
        return rate // 100 if self.active else None

    def _release(self, stream: EchoStream, until: float) -> None:
        """Hand the canceller the far samples that play before `until`."""
        for start, x, rate in self._far.take(until):
            if rate == stream.canceller.far_rate:
                stream.far(x)
                self._released_end = start + len(x) / rate

    @property
    def delay_s(self) -> float:
        """How much later the mic comes out than it went in: the part of a 10 ms block that
        waits for the next read, plus AEC3's processing delay (0 when not active)."""
        if not self.active:
            return 0.0
        stream = self._stream
        return stream.pending / stream.canceller.rate + self._processing_s

    # -- status ---------------------------------------------------------------------------

    def stats(self) -> dict:
        ms = self.delay.estimate_ms
        per_frame = 80.0 * self._cpu_s / self._mic_s if self._mic_s else 0.0
        out = {"echo_cancel": self.mode,
               "echo_delay_ms": None if ms is None else round(ms, 1),
               "echo_reference_drops": self.reference_drops,
               "echo_cpu_ms_per_frame": round(per_frame, 3)}
        if self.active:  # the pairing's moves since the last reset (echo.py's EchoStats)
            st = self._stream.canceller.stats
            out.update(echo_silent_far_blocks=st.silent_far_blocks,
                       echo_realigned=st.realigned_ahead + st.realigned_behind)
        return out
