"""Full-duplex cabin audio over ALSA (pyalsaaudio): a capture thread and a playback thread.

    audio = CabinAudio(AudioSettings(...))
    audio.start()
    while running:
        frame = audio.read_frame(timeout=0.5)   # 1920 float32 samples at 24 kHz, or None
        if frame is not None:
            audio.write_frame(session.step(frame).pcm)
    audio.stop()

Capture: nonblocking reads of whole periods (poll() in between, so stop() never waits on a
device), downmix, streaming resample to 24 kHz, cut into exact 1920-sample frames, put on a
bounded queue (when the consumer stalls, the oldest frame is dropped and counted).

Playback: frames are resampled into a FIFO at the device rate. Each time the device has room
for a period, the thread writes the next period from the FIFO. The first frame is preceded by
`preroll_ms` of silence (the jitter budget; the daemon sizes it from measured compute time).
When the model is late and the FIFO runs dry, silence is written instead (counted in
`model_underruns`; the device keeps running) and playback resumes with a fade-in when frames
come back. Gain, ducking, pause/resume, start and stop fades and the soft limiter are in
`dsp.OutputStage`; the PCMs are `alsa_pcm.AlsaPcm`, configured by `settings.AudioSettings`.

Device errors: an xrun (EPIPE) is counted (`overruns` / `underruns`) and the stream resumes:
pyalsaaudio 0.11 re-prepares the PCM itself and returns -EPIPE from read()/write(), so we just
retry; 0.10 returns -EPIPE from read() but raises ALSAAudioError("Broken pipe") from write(),
so we drop() (the next call re-prepares) and retry. A capture overrun also restarts the
resampler (the samples on either side of the gap are not contiguous). Any other error (USB
unplugged: ENODEV, EBADFD, EIO; a PCM that cannot be opened; a device with no progress for
`stall_s`; 50 xruns in a row without audio moving; even a bug in this loop) closes the device
and reopens it after a backoff (`retry_min_s` doubling to `retry_max_s`, afresh once a device
ran 10 s). `degraded` is True, with `reason`, from the failure until the reopened device has
moved audio again. Threads never die on a device problem.

`clockless=True` is for ALSA devices that have no clock (the `null` and `file` plugins the
tests use): reads and writes are then paced to the monotonic clock, as a sound card would.
Real devices are their own clock; leave it off there.

alsaaudio is imported lazily, so this module imports on machines without pyalsaaudio.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections import deque

import numpy as np

from personaplex_edge.runtime.audio.alsa_pcm import AlsaPcm, DeviceError, Xrun
from personaplex_edge.runtime.audio.dsp import (
    CaptureConverter,
    Int16Packer,
    OutputStage,
    PlaybackConverter,
)
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE

log = logging.getLogger("personaplex.audio")

_POLL_S = 0.05  # longest a thread sleeps in poll(): bounds stop() latency
_STABLE_S = 10.0  # a device that ran this long starts the reopen backoff afresh
_XRUN_STORM = 50  # xruns in a row with no audio moved: the device is not usable


class _Pacer:
    """For clockless devices: keep transferred samples from running ahead of the wall clock."""

    def __init__(self, rate: int, lead: int) -> None:
        self.rate, self.lead = rate, lead
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.samples = 0

    def advance(self, n: int, stop: threading.Event) -> None:
        self.samples += n
        ahead = self.t0 + (self.samples - self.lead) / self.rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
        elif ahead < -0.5:  # we were descheduled for long: don't burst to catch up
            self.reset()


# -- the two threads ------------------------------------------------------------------------

COUNTERS = ("frames_captured", "frames_played", "overruns", "underruns", "model_underruns",
            "dropped_frames", "playback_dropped", "latency_trims", "reopen_count",
            "capture_reopens", "playback_reopens")  # reopen_count: both directions together


class CabinAudio:
    """Capture and playback threads around the inference loop (see the module docstring)."""

    def __init__(self, settings: AudioSettings) -> None:
        self.settings = settings
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.silence_inserted_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._captured: deque[np.ndarray] = deque()
        self._capture_ready = threading.Condition(self._lock)
        self._to_play: deque[np.ndarray] = deque()
        self._play_ready = threading.Condition(self._lock)
        self._problems: dict[str, str] = {}
        self._open = {"capture": False, "playback": False}
        self._threads: list[threading.Thread] = []
        self._paused = False
        # Commands for the output stage, applied by the playback thread (it owns the stage).
        self._gain_db = settings.output_gain_db
        self._duck_db = 0.0

    # -- public API ------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("CabinAudio already started")
        self._stop.clear()
        self._threads = [threading.Thread(target=self._capture_main, name="ppx-capture",
                                          daemon=True),
                         threading.Thread(target=self._playback_main, name="ppx-playback",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Fade out, close both devices, join the threads; False if a thread did not end."""
        self._stop.set()
        with self._lock:
            self._capture_ready.notify_all()
            self._play_ready.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = any(t.is_alive() for t in self._threads)
        self._threads = []
        return not alive

    def read_frame(self, timeout: float | None = None) -> np.ndarray | None:
        """The oldest captured 1920-sample 24 kHz frame, or None after timeout / once stopped."""
        with self._lock:
            if not self._captured and not self._stop.is_set():
                self._capture_ready.wait(timeout)
            return self._captured.popleft() if self._captured else None

    def write_frame(self, frame: np.ndarray) -> None:
        """Queue one 1920-sample 24 kHz frame for the speaker (copied; drop-oldest if full)."""
        pcm = np.array(frame, np.float32).reshape(-1)
        if pcm.shape != (FRAME_SAMPLES,):
            raise ValueError(f"write_frame: need {FRAME_SAMPLES} samples, got {pcm.shape[0]}")
        with self._lock:
            if len(self._to_play) >= self.settings.playback_queue_frames:
                self._to_play.popleft()
                self.counters["playback_dropped"] += 1
            self._to_play.append(pcm)
            self._play_ready.notify()

    def set_paused(self, paused: bool) -> None:
        """Pause: fade the speaker out (frames are still consumed); resume: fade back in."""
        self._paused = bool(paused)

    def duck(self, db: float) -> None:
        """Glide the speaker level down by db (<= 0; 0 restores it) over duck_ms."""
        self._duck_db = min(0.0, float(db))

    def set_gain_db(self, db: float) -> None:
        self._gain_db = float(db)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def degraded(self) -> bool:
        with self._lock:
            return bool(self._problems)

    @property
    def reason(self) -> str:
        with self._lock:
            return "; ".join(self._problems[k] for k in sorted(self._problems))

    def stats(self) -> dict:
        with self._lock:
            out: dict = dict(self.counters)
            out.update(degraded=bool(self._problems),
                       reason="; ".join(self._problems[k] for k in sorted(self._problems)),
                       capture_open=self._open["capture"], playback_open=self._open["playback"],
                       capture_queue=len(self._captured), playback_queue=len(self._to_play),
                       silence_inserted_s=round(self.silence_inserted_s, 4), paused=self._paused)
        return out

    # -- shared helpers ----------------------------------------------------------------------

    def _set_problem(self, direction: str, text: str | None) -> None:
        with self._lock:
            before = self._problems.get(direction)
            if text is None:
                self._problems.pop(direction, None)
            else:
                self._problems[direction] = text
        if text is None and before is not None:
            log.info("%s device recovered", direction)
        elif text is not None and before is None:
            log.warning("%s", text)
        elif text is not None:
            log.debug("%s", text)

    def _realtime(self) -> None:
        prio = self.settings.rt_priority
        if prio > 0:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
            except (OSError, AttributeError) as exc:
                log.warning("no real-time priority for %s: %s",
                            threading.current_thread().name, exc)

    def _supervise(self, direction: str, stream) -> None:
        """Open, run `stream(dev)` until stop, and on any DeviceError close, back off, reopen.

        The backoff doubles from retry_min_s to retry_max_s with every failed open or loss
        in a row and starts over once a device has run for _STABLE_S. The direction stays
        degraded until the reopened device has moved audio (see _healthy)."""
        s = self.settings
        device = s.capture_device if direction == "capture" else s.playback_device
        rate = s.capture_rate if direction == "capture" else s.playback_rate
        channels = s.channels if direction == "capture" else s.out_channels
        backoff, lost = s.retry_min_s, False
        while not self._stop.is_set():
            try:
                dev = AlsaPcm(direction, device, rate, channels, s.period_frames,
                              s.buffer_periods)
            except DeviceError as exc:
                self._set_problem(direction, f"{exc} (retrying in {backoff:.1f} s)")
                lost = True
                self._stop.wait(backoff)
                backoff = min(2 * backoff, s.retry_max_s)
                continue
            if dev.rate != rate or dev.channels != channels:
                log.info("%s device %r runs at %d Hz x %d (asked %d Hz x %d); resampling from that",
                         direction, device, dev.rate, dev.channels, rate, channels)
            if lost:
                self.counters["reopen_count"] += 1
                self.counters[f"{direction}_reopens"] += 1
            with self._lock:
                self._open[direction] = True
            opened = time.monotonic()
            try:
                stream(dev)
            except Exception as exc:  # noqa: BLE001 - a bug must not silence the cabin for good
                if not isinstance(exc, DeviceError):
                    log.exception("%s thread failed; reopening the device", direction)
                    exc = DeviceError(f"{direction}: internal error {type(exc).__name__}: {exc}")
                dev.close()
                with self._lock:
                    self._open[direction] = False
                if time.monotonic() - opened > _STABLE_S:
                    backoff = s.retry_min_s
                self._set_problem(direction, f"{exc}: device lost (reopening in {backoff:.1f} s)")
                lost = True
                self._lost_cleanup(direction)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, s.retry_max_s)
                continue
            dev.close()
        with self._lock:
            self._open[direction] = False
            self._capture_ready.notify_all()

    def _healthy(self, direction: str) -> None:
        """The device moved audio: no longer degraded (if it was)."""
        if direction in self._problems:
            self._set_problem(direction, None)

    def _lost_cleanup(self, direction: str) -> None:
        if direction == "playback":
            with self._lock:  # frames queued during the outage are stale
                self.counters["playback_dropped"] += len(self._to_play)
                self._to_play.clear()

    # -- capture -----------------------------------------------------------------------------

    def _capture_main(self) -> None:
        self._realtime()
        self._supervise("capture", self._capture_stream)

    def _capture_stream(self, dev: AlsaPcm) -> None:
        s = self.settings
        conv = CaptureConverter(dev.rate, dev.channels, s.resample_quality)
        pacer = _Pacer(dev.rate, 0) if s.clockless else None
        poll_s = min(_POLL_S, 2 * dev.period / dev.rate)
        started = time.monotonic()
        last_data: float | None = None
        xruns = 0
        while not self._stop.is_set():
            try:
                pcm = dev.read()
            except Xrun:
                # Samples were lost: restart the resampler so no stale filter state spans the gap.
                self.counters["overruns"] += 1
                xruns += 1
                if xruns > _XRUN_STORM:
                    raise DeviceError(f"capture device {dev.device!r}: {xruns} overruns in a row "
                                      "without data", errno.EPIPE) from None
                conv.reset()
                continue
            now = time.monotonic()
            if pcm is None:
                if now - (last_data or started) > s.stall_s:
                    raise DeviceError(f"capture device {dev.device!r}: no audio for "
                                      f"{s.stall_s:.1f} s", errno.EIO)
                dev.wait(poll_s)
                continue
            if last_data is None:
                self._healthy("capture")
            last_data, xruns = now, 0
            conv.push(pcm)
            while (frame := conv.pop_frame()) is not None:
                self._deliver(frame)
            if pacer is not None:
                pacer.advance(len(pcm) // dev.channels, self._stop)

    def _deliver(self, frame: np.ndarray) -> None:
        with self._lock:
            if len(self._captured) >= self.settings.capture_queue_frames:
                self._captured.popleft()
                self.counters["dropped_frames"] += 1
            self._captured.append(frame)
            self.counters["frames_captured"] += 1
            self._capture_ready.notify()

    # -- playback ----------------------------------------------------------------------------

    def _playback_main(self) -> None:
        self._realtime()
        self._supervise("playback", self._playback_stream)

    def _take_frames(self, conv: PlaybackConverter, wait_s: float) -> None:
        """Move queued frames into the FIFO, waiting up to wait_s for the first one."""
        with self._lock:
            if not self._to_play and wait_s > 0 and not self._stop.is_set():
                self._play_ready.wait(wait_s)
            frames = list(self._to_play)
            self._to_play.clear()
        for f in frames:
            conv.push_frame(f)
        self.counters["frames_played"] += len(frames)

    def _playback_stream(self, dev: AlsaPcm) -> None:
        s = self.settings
        rate, period = dev.rate, dev.period
        conv = PlaybackConverter(rate, s.resample_quality)
        stage = OutputStage(rate, self._gain_db, s.fade_ms, s.duck_ms, s.limit_db,
                            max_period=period)
        stage.duck(self._duck_db)
        packer = Int16Packer(dev.channels, period)
        buf = np.zeros(period, np.float32)
        pacer = _Pacer(rate, dev.buffer) if s.clockless else None
        preroll = math.ceil(s.effective_preroll_ms * rate / 1000.0 / period) * period
        frame_dev = math.ceil(FRAME_SAMPLES * rate / SAMPLE_RATE)
        trim_above = preroll + 2 * frame_dev + 2 * period
        # How long the device can still play from its buffer once it has room for a period.
        budget_s = max(0.0, (dev.buffer - 1.5 * period) / rate)
        state, silence_left = "priming", 0
        gain_db, duck_db, paused = self._gain_db, self._duck_db, False
        stopping = healthy = False
        while True:
            if self._stop.is_set() and not stopping:
                stopping = True
                stage.fade_out()
            if stopping and stage.silent:
                self._write_period(dev, packer.pack(np.zeros(period, np.float32)), pacer, True)
                self._play_out(dev, pacer)
                return
            # Output-stage commands from other threads.
            if (gain_db, duck_db) != (self._gain_db, self._duck_db):
                gain_db, duck_db = self._gain_db, self._duck_db
                stage.set_gain_db(gain_db)
                stage.duck(duck_db)
            if self._paused != paused and not stopping:
                paused = self._paused
                if state == "playing":
                    stage.fade_out() if paused else stage.fade_in()
            # Fill one period.
            self._take_frames(conv, 0.0)
            if state == "priming" and conv.available > 0:
                state, silence_left = "preroll", preroll
            if state == "playing" and conv.available < period and not stopping:
                self._take_frames(conv, budget_s)
                if conv.available < period:
                    self.counters["model_underruns"] += 1
                    state = "starved"
            if state == "starved" and conv.available >= period:
                state = "playing"
            if state == "playing" and conv.available > trim_above:
                conv.discard(conv.available - (preroll + frame_dev))
                self.counters["latency_trims"] += 1
            if state == "preroll":
                buf[:] = 0.0
                silence_left -= period
                if silence_left <= 0:
                    state = "playing"  # from the next period on
            elif state == "playing":
                if stage.fade_target == 0.0 and not (paused or stopping):
                    stage.fade_in()  # the first real samples after silence ramp up
                got = conv.pop_into(buf)
                buf[got:] = 0.0
            else:  # priming or starved
                buf[:] = 0.0
                if state == "starved":
                    stage.mute_now()
                    self.silence_inserted_s += period / rate
            stage.process(buf)
            self._write_period(dev, packer.pack(buf), pacer, stopping)
            if not healthy:
                self._healthy("playback")
                healthy = True

    def _write_period(self, dev: AlsaPcm, data: memoryview, pacer: _Pacer | None,
                      stopping: bool) -> None:
        """Write all of data, waiting for room; xruns are counted and the rest retried."""
        s = self.settings
        total = len(data) // dev.frame_bytes
        done = xruns = 0
        last_progress = time.monotonic()
        while done < total:
            try:
                n = dev.write(data[done * dev.frame_bytes:])
            except Xrun:
                self.counters["underruns"] += 1
                xruns += 1
                if xruns > _XRUN_STORM:
                    raise DeviceError(f"playback device {dev.device!r}: {xruns} underruns in a "
                                      "row without progress", errno.EPIPE) from None
                continue
            if n > 0:
                done, xruns = done + n, 0
                last_progress = time.monotonic()
                continue
            if time.monotonic() - last_progress > s.stall_s:
                raise DeviceError(f"playback device {dev.device!r}: not draining for "
                                  f"{s.stall_s:.1f} s", errno.EIO)
            if stopping and time.monotonic() - last_progress > 0.25:
                return  # don't let a wedged device hold stop() up
            dev.wait(_POLL_S)
        if pacer is not None:
            pacer.advance(total, self._stop if not stopping else threading.Event())

    def _play_out(self, dev: AlsaPcm, pacer: _Pacer | None) -> None:
        """Let the device play what it holds (the fade-out tail) before close() drops it."""
        if pacer is not None:
            return
        deadline = time.monotonic() + min(0.3, dev.buffer / dev.rate + 0.02)
        while time.monotonic() < deadline:
            avail = dev.avail()
            if avail is not None and (avail < 0 or avail >= dev.buffer):
                return
            time.sleep(0.005)
