"""CabinAudio's playback thread (cabin.py has the rest of the class and the module's story).

Each time the device has room for a period, the thread writes the next period from the FIFO of
model audio at the device rate: pre-roll silence first, silence (counted) while the model is
late (the FIFO's target then grows), and the FIFO trimmed to its target in silence
(fifo_target.py), fades, gain and the soft limiter from `dsp.OutputStage`. Every period written, silence
included, is also the echo canceller's far end (`echo_path.EchoPath.far`), mono, before the copy
to the speaker channels, with the frames queued ahead of it (when it will play). An underrun
drops only the part of the period the device did not take (`drop_far`: all it held played),
and hands that part over again once the restarted device has it; a lost device drops what
was still to play (cabin.py's _lost_cleanup). The period that starts a reply completes that frame's latency trace
(latency.py): where in the period it starts, and the frames queued ahead.

A mixin: CabinAudio owns the state used here (declared below for readers and type checkers).
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections import deque

import numpy as np

from personaplex_edge.runtime.audio.alsa_pcm import (
    POLL_S,
    XRUN_STORM,
    AlsaPcm,
    DeviceError,
    Pacer,
    Xrun,
)
from personaplex_edge.runtime.audio.dsp import Int16Packer, OutputStage, PlaybackConverter
from personaplex_edge.runtime.audio.echo_path import EchoPath
from personaplex_edge.runtime.audio.fifo_target import MARGIN_MS, MARGIN_NO_RT_MS, FifoTarget
from personaplex_edge.runtime.audio.latency import FrameTrace, LatencyEstimate
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE

LOW_WATER_S = 1.0  # the window of the FIFO's low-water mark (a trim at most this often)
TRIM_HYSTERESIS_MS = 2.0  # a low-water mark this close to the target is left alone
QUIET_PEAK = 10 ** (-50 / 20)  # a period below -50 dBFS is silence: a trim there is inaudible


class PlaybackSide:
    """The playback thread's methods, mixed into CabinAudio."""

    settings: AudioSettings
    counters: dict[str, int]
    silence_inserted_s: float
    rebuild_silence_s: float  # silence bridging a rebuild in a pause (cabin.hold_capture)
    _bridge: bool
    _stop: threading.Event
    _lock: threading.Lock
    _to_play: deque[tuple[np.ndarray, FrameTrace | None]]
    _handover: deque[FrameTrace]
    latency: LatencyEstimate
    _play_ready: threading.Condition
    _paused: bool
    _gain_db: float
    _duck_db: float
    _echo: EchoPath
    fifo_target: FifoTarget
    fifo_target_ms: float  # the playback thread's last target (period included), for stats
    wake_late_ms: float  # the warm-up's wake-up lateness (headroom.py), set by the daemon
    _rt: dict[str, bool]  # does each audio thread run real-time (cabin.py)
    # and the methods _realtime, _supervise and _healthy (cabin.py)

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
        for f, trace in frames:
            if trace is not None:
                trace.first = conv.next_start
                self._handover.append(trace)
            conv.push_frame(f)
        self.counters["frames_played"] += len(frames)

    def _playback_stream(self, dev: AlsaPcm) -> None:
        s = self.settings
        rate, period = dev.rate, dev.period
        conv = PlaybackConverter(rate, s.resample_quality)
        self.fifo_target.hold_ms = conv.hold_ms  # this device's rate: this resampler's delay
        # A thread at normal priority wakes later at times: more margin where it is one; and
        # at least what the warm-up's wake-up probe measured (GIL waits under load included).
        self.fifo_target.margin_ms = max(MARGIN_MS if self._rt["playback"] else MARGIN_NO_RT_MS,
                                         self.wake_late_ms)
        stage = OutputStage(rate, self._gain_db, s.fade_ms, s.duck_ms, s.limit_db,
                            max_period=period)
        stage.duck(self._duck_db)
        packer = Int16Packer(dev.channels, period)
        buf = np.zeros(period, np.float32)
        pacer = Pacer(rate, dev.buffer) if s.clockless else None
        frame_dev = math.ceil(FRAME_SAMPLES * rate / SAMPLE_RATE)
        period_ms = 1000.0 * period / rate
        hysteresis = math.ceil(TRIM_HYSTERESIS_MS * rate / 1000.0)

        def target() -> int:  # FIFO samples to keep at its low point (fifo_target.py)
            ms = self.fifo_target.ms(time.monotonic())
            self.fifo_target_ms = period_ms + ms
            return period + math.ceil(ms * rate / 1000.0)

        goal = target()
        preroll = math.ceil(goal / period) * period  # the silence before the first reply
        # How long the device can still play from its buffer once it has room for a period.
        budget_s = max(0.0, (dev.buffer - 1.5 * period) / rate)
        state, silence_left = "priming", 0
        # The FIFO's low-water mark over the last LOW_WATER_S: above the target (fifo_target.py)
        # by more than the hysteresis, the stream is later than it needs to be (a backlog after
        # a rebuild or a stall, a jitter that fell): trim it back in silence, so the lateness
        # does not stay for the rest of the drive.
        window = max(1, round(LOW_WATER_S * rate / period))
        low_water, seen, quiet = None, 0, True
        self._handover = deque()  # a new FIFO: positions count from 0 again
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
                if state in ("playing", "bridging"):
                    stage.fade_out() if paused else stage.fade_in()
            # Room first, then fill: a period filled before the device can take it would sit
            # in hand while the buffer is full, one period more between the model and the
            # speaker (the path is then buffer - 1 periods deep when the period goes in).
            if not stopping and not self._wait_for_room(dev, period):
                continue  # stop() came while waiting: fade out from the top
            self._take_frames(conv, 0.0)
            if state == "priming" and conv.available > 0:
                state, silence_left = "preroll", preroll
            if state == "bridging" and (conv.available >= period or not self._bridge):
                state = "playing"  # the loop is back: from here a dry FIFO is a late model
            if state == "playing" and conv.available < period and not stopping:
                self._take_frames(conv, budget_s)
                if conv.available < period and self._bridge:
                    # A rebuild in a pause: the agent's silence goes on, period by period,
                    # without waiting for frames that cannot come before it ends.
                    state = "bridging"
                elif conv.available < period:
                    self.counters["model_underruns"] += 1
                    self.fifo_target.underrun(period_ms, time.monotonic())
                    state = "starved"
            if state == "starved":
                # Back only with the (grown) target in hand: resuming with a period would leave
                # no margin at all, and the next late frame would underrun again.
                goal = target()
                if conv.available >= goal:
                    state = "playing"
            if state == "playing" and conv.available > goal + 2 * frame_dev + 2 * period:
                conv.discard(conv.available - (goal + frame_dev))  # a backlog: at once
                self.counters["latency_trims"] += 1
            if state == "playing":
                low_water = conv.available if low_water is None else min(low_water, conv.available)
                seen += 1
                if seen >= window:
                    goal = target()
                    surplus = low_water - goal
                    # Only audio that is silence goes: what was just played and what is cut.
                    if surplus > hysteresis and quiet and conv.peak(surplus) < QUIET_PEAK:
                        conv.discard(surplus)
                        self.counters["latency_trims"] += 1
                    low_water, seen = None, 0
            else:
                low_water, seen = None, 0
            start = got = 0  # FIFO samples in this period (a reply may start among them)
            if state == "preroll":
                buf[:] = 0.0
                silence_left -= period
                if silence_left <= 0:
                    state = "playing"  # from the next period on
            elif state in ("playing", "bridging"):
                if stage.fade_target == 0.0 and not (paused or stopping):
                    stage.fade_in()  # the first real samples after silence ramp up
                start = conv.taken
                got = conv.pop_into(buf)
                buf[got:] = 0.0
                if state == "bridging":
                    self.rebuild_silence_s += (period - got) / rate
            else:  # priming or starved
                buf[:] = 0.0
                if state == "starved":
                    stage.mute_now()
                    self.silence_inserted_s += period / rate
            stage.process(buf)
            quiet = float(np.max(np.abs(buf))) < QUIET_PEAK
            queued, now = dev.queued(), time.monotonic()
            self._echo_reference(dev, buf, queued, now)
            if got:
                self._handed_over(start, got, rate, queued, now)
            resumed = self._write_period(dev, packer.pack(buf), pacer, stopping)
            if resumed is not None and self._echo.active:
                # An underrun dropped the part of this period the device had not taken; the
                # restarted device holds it now: its reference again, timed by the new level.
                after, at = dev.queued(), time.monotonic()
                rest = period - resumed
                self._echo_reference(dev, buf[resumed:], None if after is None
                                     else max(0, after - rest), at)
            if not healthy:
                self._healthy("playback")
                healthy = True

    def _echo_reference(self, dev: AlsaPcm, period: np.ndarray, queued: int | None,
                        now: float) -> None:
        """The period about to be written is the canceller's far end; the frames queued ahead
        of it (measured at `now`, before the write) say when it will play."""
        if self._echo.active:
            self._echo.far(period, dev.rate, queued, now)

    def _handed_over(self, start: int, got: int, rate: int, queued: int | None,
                     now: float) -> None:
        """The period about to be written holds FIFO samples start .. start + got: the replies
        that begin in it have their latency complete (a reply trimmed away is skipped)."""
        while self._handover and self._handover[0].first < start + got:
            trace = self._handover.popleft()
            if trace.first >= start and queued is not None:
                self.latency.record(trace, now, (trace.first - start) / rate, queued / rate)

    def _wait_for_room(self, dev: AlsaPcm, period: int) -> bool:
        """Wait until the device can take a whole period (or is in an xrun, which the write
        reports); False if stop() came first. A device that never drains is lost after stall_s."""
        since = time.monotonic()
        while not self._stop.is_set():
            queued = dev.queued()  # None: unknown or in error, for the write to report
            if queued is None or dev.buffer - queued >= period:
                return True
            if time.monotonic() - since > self.settings.stall_s:
                raise DeviceError(f"playback device {dev.device!r}: not draining for "
                                  f"{self.settings.stall_s:.1f} s", errno.EIO)
            dev.wait(min(POLL_S, (period - (dev.buffer - queued)) / dev.rate))
        return False

    def _write_period(self, dev: AlsaPcm, data: memoryview, pacer: Pacer | None,
                      stopping: bool) -> int | None:
        """Write all of data, waiting for room; xruns are counted and the rest retried.
        Returns None, or after an underrun the frame from which data went to the restarted
        device (its echo reference was dropped: the caller hands it over again)."""
        s = self.settings
        total = len(data) // dev.frame_bytes
        done = xruns = 0
        resumed: int | None = None
        last_progress = time.monotonic()
        while done < total:
            try:
                n = dev.write(data[done * dev.frame_bytes:])
            except Xrun:
                self.counters["underruns"] += 1
                # The buffer drained: all it held played. Only what it did not take is dropped.
                self._echo.drop_far("playback underrun", unplayed=total - done)
                resumed = done
                xruns += 1
                if xruns > XRUN_STORM:
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
                return None  # don't let a wedged device hold stop() up
            dev.wait(POLL_S)
        if pacer is not None:
            pacer.advance(total, self._stop if not stopping else threading.Event())
        return resumed

    def _play_out(self, dev: AlsaPcm, pacer: Pacer | None) -> None:
        """Let the device play what it holds (the fade-out tail) before close() drops it."""
        if pacer is not None:
            return
        deadline = time.monotonic() + min(0.3, dev.buffer / dev.rate + 0.02)
        while time.monotonic() < deadline:
            avail = dev.avail()
            if avail is not None and (avail < 0 or avail >= dev.buffer):
                return
            time.sleep(0.005)
