"""Full-duplex cabin audio over ALSA (pyalsaaudio): a capture thread and a playback thread.

    audio = CabinAudio(AudioSettings(...))
    audio.start()
    while running:
        frame = audio.read_frame(timeout=0.5)   # 1920 float32 samples at 24 kHz, or None
        if frame is not None:
            audio.write_frame(session.step(frame).pcm)
    audio.stop()

Capture: nonblocking reads of a period, or of a frame's tail the moment it lands (poll() in
between, so stop() never waits on a device), downmix, streaming resample to 24 kHz, cut into
exact 1920-sample frames, put on a bounded queue (when the consumer stalls, the oldest frame is
dropped and counted).

Playback: frames are resampled into a FIFO at the device rate. Each time the device has room
for a period, the thread writes the next period from the FIFO. The first frame is preceded by
silence up to the FIFO's target (fifo_target.py: the compute jitter, measured live, and a
margin). When the model is late and the FIFO runs dry, silence is written instead (counted in
`model_underruns`; the device keeps running) and playback resumes with a fade-in once the FIFO
holds its target again. A context rebuild in a pause (`hold_capture(quiet=True)`) is not a late
model: the FIFO running dry then is bridged with silence (`rebuild_silence_s`). Gain, ducking, pause/resume, start and stop fades and the soft limiter are in
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

Echo cancellation (`echo_path.EchoPath`, mode `echo_cancel`): each captured chunk is downmixed,
goes through the canceller at the device rate, then to CaptureConverter's resampler; every
period the playback thread writes (silence included) is its far end. ALSA's buffer levels,
read by both threads, put the two streams on one clock (when a far sample plays, when a mic
sample was captured); a playback underrun or loss drops the reference, a capture reopen resets
the canceller.

Latency: each frame carries a `latency.FrameTrace` from the capture thread (buffer levels at
the read that completed it) through read_frame/write_frame (the frame loop's time) to the period
that starts its reply (the playback buffer's level); `latency` averages the parts.

Real time: each audio thread moves itself (only itself: not the model's threads) to SCHED_FIFO
at `rt_priority` (the systemd unit's LimitRTPRIO grants it) and reads back what the kernel
applied; `stats()["realtime"]` says per thread whether it runs so, and why not. Without it the
threads run on at normal priority.

`clockless=True` is for ALSA devices that have no clock (the `null` and `file` plugins the
tests use): reads and writes are then paced to the monotonic clock, as a sound card would.
Real devices are their own clock; leave it off there.

The playback thread's loop is in playback.py (a mixin of CabinAudio). alsaaudio is imported
lazily, so this module imports on machines without pyalsaaudio.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from personaplex_edge.runtime.audio.alsa_pcm import (
    POLL_S,
    XRUN_STORM,
    AlsaPcm,
    DeviceError,
    Pacer,
    Xrun,
)
from personaplex_edge.runtime.audio.dsp import CaptureConverter, to_mono_float
from personaplex_edge.runtime.audio.echo_path import EchoPath
from personaplex_edge.runtime.audio.fifo_target import FifoTarget
from personaplex_edge.runtime.audio.latency import FrameTrace, LatencyEstimate, capture_trace
from personaplex_edge.runtime.audio.playback import PlaybackSide
from personaplex_edge.runtime.audio.realtime import enter_realtime, policy_name
from personaplex_edge.runtime.audio.resample import burst_ms
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE

log = logging.getLogger("personaplex.audio")

HOLD_MAX_S = 5.0  # the longest rebuild whose microphone frames are all kept (25 kB per frame)
HOLD_MAX_FRAMES = int(HOLD_MAX_S * SAMPLE_RATE / FRAME_SAMPLES)
_STABLE_S = 10.0  # a device that ran this long starts the reopen backoff afresh


COUNTERS = ("frames_captured", "frames_played", "overruns", "underruns", "model_underruns",
            "dropped_frames", "playback_dropped", "latency_trims", "reopen_count",
            "capture_reopens", "playback_reopens",  # reopen_count: both directions together
            "capture_reads")  # about a period's worth each: thousands a second means a spin


class CabinAudio(PlaybackSide):
    """Capture and playback threads around the inference loop (see the module docstring)."""

    def __init__(self, settings: AudioSettings) -> None:
        import alsaaudio  # noqa: F401 - missing: one line here (cli), not a dead device thread

        self.settings = settings
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.silence_inserted_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._captured: deque[tuple[np.ndarray, FrameTrace]] = deque()
        self._holding = 0  # hold_capture() depth: the loop is rebuilding, keep every frame
        # A rebuild in a pause: bridge a dry FIFO with silence until the next reply is written.
        self._bridge = False
        self.rebuild_silence_s = 0.0
        self._capture_ready = threading.Condition(self._lock)
        self._to_play: deque[tuple[np.ndarray, FrameTrace | None]] = deque()
        self._reading: FrameTrace | None = None  # the frame read last, until its reply comes
        self._handover: deque[FrameTrace] = deque()  # replies in the playback FIFO (playback.py)
        self.latency = LatencyEstimate()
        self._play_ready = threading.Condition(self._lock)
        self._problems: dict[str, str] = {}
        self._open = {"capture": False, "playback": False}
        # Per audio thread: does it really run SCHED_FIFO; and why not, where it does not.
        self._rt = {"capture": False, "playback": False}
        self._rt_why: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._paused = False
        # Commands for the output stage, applied by the playback thread (it owns the stage).
        self._gain_db = settings.output_gain_db
        self._duck_db = 0.0
        self._echo = EchoPath(settings)  # webrtc without its library: ConfigError here
        # The playback FIFO's target: the jitter it covers (measured; the daemon keeps it live).
        self.fifo_target = FifoTarget(settings.effective_preroll_ms,
                                      burst_ms(settings.resample_quality))
        self.fifo_target_ms = 0.0
        self.wake_late_ms = 0.0  # how late a thread like the audio threads woke (the warm-up's)

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

    @contextmanager
    def hold_capture(self, quiet: bool = False) -> Iterator[None]:
        """While the frame loop is busy on purpose (a re-anchor's replay), captured frames are
        kept rather than dropped from the front of the queue, up to `HOLD_MAX_S`; the loop
        catches up afterwards and the playback FIFO trims the lateness away in silence.

        `quiet`: the rebuild runs in a pause (neither the driver nor the agent speaks), so if
        the FIFO runs dry before the next reply is written, the speaker is bridged with the
        silence the agent was keeping anyway: counted in `rebuild_silence_s`, not as a late
        model (no model underrun, no growth of the FIFO's target, no wait to refill it)."""
        with self._lock:
            self._holding += 1
            self._bridge = self._bridge or quiet
        try:
            yield
        finally:
            with self._lock:
                self._holding -= 1

    def read_frame(self, timeout: float | None = None) -> np.ndarray | None:
        """The oldest captured 1920-sample 24 kHz frame, or None after timeout / once stopped."""
        with self._lock:
            if not self._captured and not self._stop.is_set():
                self._capture_ready.wait(timeout)
            if not self._captured:
                return None
            frame, self._reading = self._captured.popleft()
            return frame

    def write_frame(self, frame: np.ndarray) -> None:
        """Queue one 1920-sample 24 kHz frame for the speaker (copied; drop-oldest if full),
        the reply to the frame read last."""
        pcm = np.array(frame, np.float32).reshape(-1)
        if pcm.shape != (FRAME_SAMPLES,):
            raise ValueError(f"write_frame: need {FRAME_SAMPLES} samples, got {pcm.shape[0]}")
        trace, self._reading = self._reading, None
        if trace is not None:
            trace.written = time.monotonic()
        with self._lock:
            if not self._holding:  # the loop is back: a dry FIFO from now on is a late model
                self._bridge = False
            if len(self._to_play) >= self.settings.playback_queue_frames:
                self._to_play.popleft()
                self.counters["playback_dropped"] += 1
            self._to_play.append((pcm, trace))
            self._play_ready.notify()

    def set_paused(self, paused: bool) -> None:
        """Pause: fade the speaker out (frames are still consumed); resume: fade back in."""
        self._paused = bool(paused)

    def duck(self, db: float) -> None:
        """Glide the speaker level down by db (<= 0; 0 restores it) over duck_ms."""
        self._duck_db = min(0.0, float(db))

    def set_jitter_ms(self, ms: float) -> None:
        """The frame loop's live compute jitter (p99 - p50): the playback FIFO's target follows."""
        self.fifo_target.set_jitter_ms(ms)

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
                       silence_inserted_s=round(self.silence_inserted_s, 4),
                       rebuild_silence_s=round(self.rebuild_silence_s, 4), paused=self._paused,
                       realtime={**self._rt, "why_not": "; ".join(
                           self._rt_why[k] for k in sorted(self._rt_why))})
        out.update(self._echo.stats())
        out["latency_ms"] = self.latency.parts_ms()
        out["fifo_target_ms"] = round(self.fifo_target_ms, 1)  # the playback FIFO's low point
        out["fifo_jitter_ms"] = round(self.fifo_target.jitter_ms, 1)
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
        """Called first by each audio thread: SCHED_FIFO at rt_priority, recorded for stats()."""
        # The thread's name says which (start() names them; playback.py calls this too).
        direction = threading.current_thread().name.removeprefix("ppx-")
        prio = self.settings.rt_priority
        why = enter_realtime(prio)
        if why is not None:
            runs = policy_name(os.sched_getscheduler(0)) if hasattr(os, "sched_getscheduler") else "?"
            why = f"{direction}: {runs}: {why}"
            if prio > 0:  # asked for and not granted: the daemon runs on, at normal priority
                log.warning("audio thread without real-time priority: %s", why)
        with self._lock:
            self._rt[direction] = why is None
            if why is None:
                self._rt_why.pop(direction, None)
            else:
                self._rt_why[direction] = why

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
            self._echo.drop_far("playback device lost")  # what it held never played

    # -- capture -----------------------------------------------------------------------------

    def _capture_main(self) -> None:
        self._realtime()
        self._supervise("capture", self._capture_stream)

    def _capture_stream(self, dev: AlsaPcm) -> None:
        s = self.settings
        conv = CaptureConverter(dev.rate, dev.channels, s.resample_quality)
        self._echo.capture_started()
        self._align(conv, dev)
        pacer = Pacer(dev.rate, 0) if s.clockless else None
        poll_s = min(POLL_S, 2 * dev.period / dev.rate)
        started = time.monotonic()
        last_data: float | None = None
        xruns, flowing = 0, False
        while not self._stop.is_set():
            # Frames waiting before this read: when the mic samples read were captured.
            buffered, measured = dev.queued(), time.monotonic()
            # A capture stream starts at its first read (and again after an overrun): read
            # until data flows, then wait for a read's worth.
            short = 0 if buffered is None or not flowing else self._read_size(conv, dev) - buffered
            try:
                pcm = dev.read() if short <= 0 else None
            except Xrun:
                # Samples were lost: restart the resampler so no stale filter state spans the gap.
                self.counters["overruns"] += 1
                xruns, flowing = xruns + 1, False
                if xruns > XRUN_STORM:
                    raise DeviceError(f"capture device {dev.device!r}: {xruns} overruns in a row "
                                      "without data", errno.EPIPE) from None
                conv.reset()
                self._align(conv, dev)
                continue
            now = time.monotonic()
            if pcm is None:
                if now - (last_data or started) > s.stall_s:
                    raise DeviceError(f"capture device {dev.device!r}: no audio for "
                                      f"{s.stall_s:.1f} s", errno.EIO)
                dev.wait(poll_s if short <= 0 else min(poll_s, short / dev.rate))
                continue
            if last_data is None:
                self._healthy("capture")
            last_data, xruns, flowing = now, 0, True
            self.counters["capture_reads"] += 1
            self._capture_period(conv, dev, pcm, buffered, measured)
            if pacer is not None:
                pacer.advance(len(pcm) // dev.channels, self._stop)

    def _align(self, conv: CaptureConverter, dev: AlsaPcm) -> None:
        """Frames end where the canceller's 10 ms blocks end (measured: 8.7 ms less wait at
        48 kHz, bench_latency's re-framing row)."""
        block = self._echo.block(dev.rate)
        if block is not None:
            conv.align_to(block)

    def _read_size(self, conv: CaptureConverter, dev: AlsaPcm) -> int:
        """Device frames worth a read: a period, or less when that much completes the next
        model frame. A device whose pointer moves between periods (HDA, USB, the test plugin)
        would otherwise be read a few samples at a time, thousands of reads a second, each
        paying the canceller's and the resampler's call costs; and a frame's last samples
        are still read the moment they land, not at the end of their period."""
        tail = self._echo.whole_blocks(conv.device_samples_to_frame(), dev.rate)
        return max(1, min(dev.period, tail))

    def _capture_period(self, conv: CaptureConverter, dev: AlsaPcm, pcm: np.ndarray,
                        buffered: int | None, measured: float) -> None:
        """Downmix, take the echo out (at the device rate, 10 ms blocks), resample, frame."""
        mono = self._echo.near(to_mono_float(pcm, dev.channels), dev.rate, buffered, measured)
        conv.push_mono(mono)
        while (frame := conv.pop_frame()) is not None:
            trace = capture_trace(time.monotonic(), measured, buffered, len(pcm) // dev.channels,
                                  dev.rate, conv.buffered / SAMPLE_RATE, conv.held_s,
                                  self._echo.delay_s)
            self._deliver(frame, trace)

    def _deliver(self, frame: np.ndarray, trace: FrameTrace) -> None:
        with self._lock:
            limit = HOLD_MAX_FRAMES if self._holding else self.settings.capture_queue_frames
            if len(self._captured) >= limit:
                self._captured.popleft()
                self.counters["dropped_frames"] += 1
            self._captured.append((frame, trace))
            self.counters["frames_captured"] += 1
            self._capture_ready.notify()
