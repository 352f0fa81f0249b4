"""`ppx-runtime serve`: the in-car daemon's frame loop.

Capture thread -> 24 kHz frames -> `Conversation.step` -> playback thread, 12.5 times a
second, for hours. Around it: the control socket (head unit), Prometheus
metrics on loopback, sd_notify (READY after warm-up, WATCHDOG from the frame
loop, readable STATUS lines) and the watchdog. What the agent may say is the
speech policy's (service/speech_policy.py); the conversation's state, its
re-anchors, idle resets and live context are the Conversation's (core/conversation.py).

Control requests that change the conversation run between frames on this
thread (FrameCommands); flags are read at the start of each frame. Which build a
Daemon serves, and starting another after an update, is service/serving.py's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.audio.cabin import CabinAudio
from personaplex_edge.runtime.audio.echo_path import webrtc_library
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.backends.registry import make_backend
from personaplex_edge.runtime.constants import FRAME_RATE
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import Persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.network.link import Link
from personaplex_edge.runtime.network.protocol import ChatRequest
from personaplex_edge.runtime.network.server import EndpointSettings, NetworkServer
from personaplex_edge.runtime.service.config import DaemonConfig
from personaplex_edge.runtime.service.control.frame_commands import FrameCommands
from personaplex_edge.runtime.service.control.server import ControlServer
from personaplex_edge.runtime.service.debug_audio import DebugAudio
from personaplex_edge.runtime.service.metrics import Metrics
from personaplex_edge.runtime.service.network_seat import NetworkSeat
from personaplex_edge.runtime.service.notify import Notifier
from personaplex_edge.runtime.service.persona_catalog import load_catalog, resolve
from personaplex_edge.runtime.service.speech_policy import TURN_END_QUIET_FRAMES, SpeechPolicy
from personaplex_edge.runtime.service.transcript import TranscriptLines
from personaplex_edge.runtime.service.warmup import Warmup, measure
from personaplex_edge.runtime.update.health import HealthGate
from personaplex_edge.runtime.update.slots import Slots

log = logging.getLogger("personaplex.daemon")
transcript_log = logging.getLogger("personaplex.transcript")

FRAME_BUDGET_MS = 1000.0 / FRAME_RATE  # 80 ms
MAX_ERRORS_IN_A_ROW = int(2 * FRAME_RATE)  # two seconds of failing frames: give up, let systemd restart
STATUS_EVERY_S = 5.0
LIVE_JITTER_FRAMES = int(30 * FRAME_RATE)  # the playback FIFO follows the last 30 s of frames
MAX_JITTER_MS = 400.0  # the most compute jitter the playback FIFO covers (a stall is no jitter)
SLOTS_POLL_S = 1.0  # how often the loop looks for an activated or rolled-back slot
SWITCH_WATCHDOG_S = 600.0  # the watchdog timeout while the daemon loads another slot


class BuildLoadError(ConfigError):
    """The build itself does not load here (manifest, hashes, graphs or engines): what makes
    serve() fall back from an update slot, as opposed to a config or device problem."""


class Daemon:
    """The serve loop; also the control socket's Controller (thread-safe entry points)."""

    def __init__(self, cfg: DaemonConfig, notifier: Notifier | None = None, *,
                 build: Path | None = None, slot: str | None = None, trial: bool = False,
                 slots: Slots | None = None):
        self.cfg = cfg
        # The build: build.path, or an update slot (trial: activated, not yet committed).
        self.build_path = cfg.build.path if build is None else build
        self.slot = slot
        self.slots = slots or Slots(cfg.update.slots_dir)
        self.gate = HealthGate(cfg.update) if trial else None
        self.switch_reason: str | None = None  # set: serve() starts again on another build
        self._slots_seen = self.slots.fingerprint()
        self._slots_polled = 0.0
        self.notifier = notifier or Notifier.from_env()
        self.commands = FrameCommands()
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self.started = time.monotonic()
        self.speech = SpeechPolicy()
        self.frames = self.deadline_misses = 0
        self._misses: deque[float] = deque()
        self._frame_ms: deque[float] = deque(maxlen=int(60 * FRAME_RATE))
        self._seen_counters: dict[str, int] = {}
        self._seen_rebuild_silence_s = 0.0
        self._errors_in_a_row = 0
        self.frame_errors = 0
        self._last_idle_status = 0.0
        self._transcript = TranscriptLines(quiet_frames=TURN_END_QUIET_FRAMES)
        # webrtc without its library: one line, exit 78, never a cabin without cancellation.
        self.echo = webrtc_library() if cfg.audio.echo_cancel == "webrtc" else cfg.audio.echo_cancel
        self.debug = DebugAudio.from_env()  # measurement taps; nothing unless asked for
        try:
            self.manifest = load_manifest(self.build_path)
            self.manifest.verify_files(stamp_dir=cfg.snapshots.dir)  # corrupt weights: exit 78
            self.k_max = int(self.manifest.data["sampling"]["k_max"])
            self.catalog = load_catalog(cfg.persona, self.k_max)  # a bad default: ConfigError
            self.persona = self.catalog.default
        except ConfigError:
            raise
        except PpxError as exc:  # a missing or broken build: fix the config, don't restart-loop
            raise BuildLoadError(f"{self._build_name}: {exc}") from None
        try:
            self.session = Session(self.manifest, make_backend(cfg.build.backend, cfg.build.threads),
                                   cfg.snapshots.dir)
        except PpxError as exc:  # graphs or engines that do not load here: a config problem
            raise BuildLoadError(f"build: {exc}") from None
        self.conversation = Conversation(self.session, on_event=self.metrics.count_lifecycle)
        for problem in self.catalog.skipped:  # one bad file must not cost the car its assistant
            log.error("persona file skipped: %s", problem)
        self.metrics.set_personas_skipped(len(self.catalog.skipped))
        self.prepare_skipped: list[tuple[Persona, str]] = []  # what prepare() could not compile
        self.audio: CabinAudio | None = None
        self.control: ControlServer | None = None
        # The network's claim on the model (network.policy); the endpoint starts in run().
        self.network = NetworkSeat(cfg.network, cfg.persona, self.k_max, self.conversation,
                                   self.metrics, cabin_persona=lambda: self.persona,
                                   give_back=lambda reason: self._start_conversation(self.persona, reason),
                                   reply_tap=self.debug.speaker)
        self.endpoint: NetworkServer | None = None  # while network.enabled

    # -- start-up -------------------------------------------------------------------
    def prepare(self) -> Warmup | None:
        """Compile every persona's snapshot, warm the engines; returns what the warm-up measured
        (None when stopped meanwhile). A period, buffer depth or pre-roll that cannot hold it is
        refused: ConfigError, one line naming the field and the smallest value that works."""
        for persona in list(self.catalog.personas):
            if self.stop_event.is_set():
                return None
            self.notifier.extend_timeout(120)
            self.notifier.status(f"preparing persona {persona.name}")
            try:
                # Compiles (or restores) its snapshot; a prompt and keep_s that leave no room in
                # the context are refused here, once.
                ready = self.conversation.switch_persona(persona)
            except PpxError as exc:  # e.g. a voice the build lacks: only the default is vital
                if persona is self.catalog.default:
                    raise
                log.error("persona file skipped: %s", exc)
                self.catalog.personas.remove(persona)
                self.catalog.skipped.append(str(exc))
                self.prepare_skipped.append((persona, str(exc)))
                self.metrics.set_personas_skipped(len(self.catalog.skipped))
                continue
            log.info("persona %s: %s in %.0f ms (%d prompt steps)", persona.name,
                     "compiled" if ready.compiled else "restored",
                     ready.compile_ms if ready.compiled else ready.restore_ms, ready.prompt_steps)
        self.conversation.switch_persona(self.persona)
        warm = measure(self.conversation, self.cfg.audio, self.stop_event)
        if warm is None:
            return None
        # The prefill graph meets a full keep_s now, not in the first pause of the drive.
        ms = self.conversation.rehearse_reanchor()
        log.info("warm-up: re-anchoring %.0f s of conversation takes %.0f ms",
                 self.persona.conversation.keep_s, ms)
        self._start_conversation(self.persona, "startup")
        problems = warm.problems(self.cfg.audio)
        if problems:  # a config this device cannot run unbroken: fix it, don't restart-loop
            raise ConfigError(problems[0])
        return warm

    def _start_conversation(self, persona: Persona, reason: str) -> None:
        """A new conversation with `persona`; refused (PpxError) with the running one untouched."""
        self.conversation.switch_persona(persona)
        self._say(self._transcript.flush())  # the old conversation's last words
        self.persona = persona
        self.speech.new_conversation()
        self.metrics.count_conversation_start(reason)
        self.metrics.set_persona(persona.name)
        if self.audio is not None:
            self.audio.set_gain_db(persona.speech.output_gain_db)

    def audio_settings(self, preroll_ms: float) -> AudioSettings:
        """The config's AudioSettings with the jitter the FIFO covers and the persona's gain."""
        return self.cfg.audio.replace(preroll_ms=preroll_ms,
                                      output_gain_db=self.persona.speech.output_gain_db)

    # -- the loop ---------------------------------------------------------------------
    def run(self, warm: Warmup | None = None) -> int:
        """Serve until stopped. `warm`: prepare()'s result, when the caller ran it (serve()
        does, so that only loading the build decides a trial, not the devices or ports)."""
        if warm is None:
            warm = self.prepare()
        if warm is None or self.stop_event.is_set():  # SIGTERM during start-up: nothing opened yet
            log.info("stopped during start-up")
            return 0
        # The playback FIFO covers the compute *jitter* (a steady compute time only shifts the
        # stream); fifo_target.py adds the resampler's hold and a margin, and the live jitter
        # replaces the warm-up's once the drive has some frames (_sync_audio_counters). A fixed
        # audio.preroll_ms is at least the warm-up's jitter: prepare() refused it otherwise.
        jitter_ms = min(MAX_JITTER_MS, warm.jitter_ms)
        fixed = self.cfg.audio.preroll_ms
        covered = jitter_ms if fixed is None else max(fixed, jitter_ms)
        last_status = time.monotonic()
        try:  # a device, port or socket that cannot be had still releases what was opened
            self.audio = CabinAudio(self.audio_settings(covered))
            self.audio.wake_late_ms = warm.wakeups.late_ms  # the FIFO's margin covers it
            # Frames the microphone delivers while the context is rebuilt wait for the loop.
            self.conversation.rebuild_guard = self.audio.hold_capture
            self.control = ControlServer.from_config(self.cfg.control, self,
                                                     on_reply=self.metrics.count_control_request)
            if self.cfg.metrics.enabled:
                self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            if self.cfg.network.enabled:
                self.endpoint = network_endpoint(self.cfg, self)
                self.endpoint.start()  # ConfigError (exit 78) when its address cannot be had
            self.audio.start()
            self.control.start()
            self.metrics.set_state(up=True, degraded=False)
            self._publish_build()
            if self.gate is not None:
                self.gate.ready()
                log.warning("slot %s (version %s) is on trial: committed after its health check",
                            self.slot, self.version)
            if self.notifier.watchdog_s is not None:  # back from a switch's longer timeout
                self.notifier.notify(WATCHDOG_USEC=str(int(self.notifier.watchdog_s * 1e6)))
            self.notifier.ready(f"listening; persona {self.persona.name}; frame p99 {warm.p99_ms:.1f} ms")
            log.info("ready: persona %s, frame p50 %.1f ms p99 %.1f ms, playback FIFO covers %.1f ms of "
                     "jitter, audio threads woke up to %.1f ms late, echo cancellation %s",
                     self.persona.name, warm.p50_ms, warm.p99_ms,
                     self.audio.fifo_target.jitter_ms, warm.wakeups.late_ms, self.echo)
            while not self.stop_event.is_set():
                self._follow_update()
                self.commands.run_pending()
                frame = self.audio.read_frame(timeout=0.25)
                if frame is None:
                    self._idle()
                    continue
                try:
                    self._frame(frame)
                    self._errors_in_a_row = 0
                except Exception as exc:  # noqa: BLE001 - a glitch must not kill the car's assistant
                    if not self._recover(frame, exc):
                        if self._fail_trial(f"{self._errors_in_a_row} frames in a row failed"):
                            # serve() loads the good build in this process: no STOPPING=1
                            self.switch_reason = f"slot {self.slot} failed its health check"
                        return 1
                    continue
                self.notifier.kick()
                if time.monotonic() - last_status > STATUS_EVERY_S:
                    last_status = time.monotonic()
                    self.notifier.status(self._status_line())
        finally:
            self._shutdown()
        return 0

    def _frame(self, pcm: np.ndarray) -> None:
        if self.network.active:
            t0 = time.perf_counter()
            if self.network.frame(pcm):  # the model is the network's: the cabin hears silence
                ms = (time.perf_counter() - t0) * 1e3 - self.network.pause_rebuild_ms
                self.audio.set_paused(False)
                self.audio.duck(0.0)
                self.audio.write_frame(np.zeros_like(pcm))
                self._account(ms)
                self.metrics.set_conversation(self.session.context_fill,
                                              self.conversation.stats.conversation_frames / FRAME_RATE)
                return
        persona = self.persona
        rules = self.speech.rules(persona)
        t0 = time.perf_counter()
        heard = np.zeros_like(pcm) if rules.muted else pcm
        self.debug.heard(heard)
        turn = self.conversation.step(heard, silence_agent=rules.hold)  # may rebuild the context
        # A rebuild in a pause is timed on its own (ppx_reanchor_duration_seconds): planned
        # work while nobody speaks, not the compute jitter the FIFO covers, nor a missed deadline.
        ms = (time.perf_counter() - t0) * 1e3 - turn.pause_rebuild_ms
        self.audio.set_paused(rules.hold)
        self.audio.duck(rules.duck_db)
        self.audio.write_frame(self.debug.speaker(heard, turn.result.pcm))
        self.speech.after_frame(persona, turn.result.pcm, rules.hold)
        self._account(ms)
        if self.gate is not None:
            self.gate.frame(ms)
        self.metrics.set_conversation(self.session.context_fill,
                                      self.conversation.stats.conversation_frames / FRAME_RATE)
        if self.cfg.logging.transcripts:
            self._say(self._transcript.add(self.session.piece(turn.result.text_token)))

    def _say(self, line: str | None) -> None:
        if line is not None and self.cfg.logging.transcripts:
            transcript_log.info("%s", line)

    def _recover(self, frame: np.ndarray, exc: Exception) -> bool:
        """A frame failed: keep the speaker fed, restart the conversation from its snapshot.

        Returns False when frames keep failing: then exiting lets systemd restart us."""
        self._errors_in_a_row += 1
        self.frame_errors += 1
        if self.gate is not None:
            self.gate.frame_error(exc)
        self.metrics.count_frame_error()
        self.audio.write_frame(np.zeros_like(frame))  # the stream stays continuous
        if self._errors_in_a_row == 1:
            log.error("frame failed (%s: %s): restarting the conversation", type(exc).__name__, exc)
        if self._errors_in_a_row > MAX_ERRORS_IN_A_ROW:
            log.critical("%d frames in a row failed: exiting for a restart", self._errors_in_a_row)
            return False
        self.metrics.set_state(degraded=True)
        try:
            if self.network.active:  # the model's state is suspect: the session cannot go on
                self.network.close("a frame failed: the session ended; reconnect", give_back=False)
            self._start_conversation(self.persona, "recovery")
        except Exception as again:  # noqa: BLE001 - reported; the next frame tries again
            log.error("conversation restart failed: %s", again)
        return True

    def _account(self, ms: float) -> None:
        now = time.monotonic()
        missed = ms > FRAME_BUDGET_MS
        self.frames += 1
        self._frame_ms.append(ms)
        stages = {name: values[-1] for name, values in self.session.timer.samples.items() if values}
        self.metrics.observe_stages(stages)
        self.metrics.count_frame(ms, missed=missed)
        if missed:
            self.deadline_misses += 1
            self._misses.append(now)
        window = self.cfg.watchdog.degraded_window_s
        while self._misses and now - self._misses[0] > window:
            self._misses.popleft()
        for values in self.session.timer.samples.values():  # keep the timer's memory bounded
            if len(values) > 4096:
                del values[:-1024]
        if self.frames % int(FRAME_RATE) == 0:
            self._sync_audio_counters()
        self.metrics.set_state(degraded=self.degraded)

    def _sync_audio_counters(self) -> None:
        """Carry the audio threads' xrun counters into the metrics (about once a second)."""
        stats = self.audio.stats()
        stats["snapshot_save_errors"] = self.session.snapshot_save_errors
        self.metrics.set_latency(stats.get("latency_ms"))
        if self.cfg.audio.preroll_ms is None and len(self._frame_ms) >= LIVE_JITTER_FRAMES:
            recent = np.asarray(self._frame_ms)[-LIVE_JITTER_FRAMES:]
            jitter = float(np.percentile(recent, 99) - np.percentile(recent, 50))
            self.audio.set_jitter_ms(min(MAX_JITTER_MS, jitter))
        bridged = float(stats.get("rebuild_silence_s", 0.0))
        self.metrics.add_rebuild_silence(bridged - self._seen_rebuild_silence_s)
        self._seen_rebuild_silence_s = bridged
        for key, report in (("overruns", lambda: self.metrics.count_xrun("capture")),
                            ("underruns", lambda: self.metrics.count_xrun("playback")),
                            ("model_underruns", self.metrics.count_model_underrun),
                            ("latency_trims", self.metrics.count_playback_trim),
                            ("capture_reopens", self._capture_reopened),
                            ("playback_reopens", lambda: self.metrics.count_reopen("playback")),
                            ("echo_reference_drops", self.metrics.count_echo_reference_drop),
                            ("snapshot_save_errors", self.metrics.count_snapshot_save_error)):
            for _ in range(int(stats.get(key, 0)) - self._seen_counters.get(key, 0)):
                report()
            self._seen_counters[key] = int(stats.get(key, 0))

    def _capture_reopened(self) -> None:
        self.metrics.count_reopen("capture")
        self.conversation.activity.microphone_reopened()

    def _idle(self) -> None:
        """No frame within the timeout: the device is lost (degraded, reopening) or stalled."""
        if self.audio is not None and self.audio.degraded and not self.audio.stats()["capture_open"]:
            # The capture device is lost and being reopened with backoff: the loop is alive and
            # knows why nothing flows, and a restart would not bring a USB microphone back. A
            # stuck capture that still counts as open gets no ping, so systemd restarts us.
            self.notifier.kick()
            if time.monotonic() - self._last_idle_status > STATUS_EVERY_S:
                self._last_idle_status = time.monotonic()
                self.notifier.status(f"degraded: {self.audio.reason}")
        self.metrics.set_state(degraded=self.degraded)

    @property
    def degraded(self) -> bool:
        audio_bad = self.audio is not None and self.audio.degraded
        return audio_bad or len(self._misses) >= self.cfg.watchdog.degraded_misses

    def _status_line(self) -> str:
        recent = np.asarray(self._frame_ms) if self._frame_ms else np.zeros(1)
        state = "degraded" if self.degraded else "listening"
        flags = self.speech.flags()
        return (f"{state}; persona {self.persona.name}; frame p50 {np.percentile(recent, 50):.1f} ms "
                f"p95 {np.percentile(recent, 95):.1f} ms; {self.deadline_misses} deadline misses"
                + (f"; {', '.join(flags)}" if flags else ""))

    # -- updates ----------------------------------------------------------------------------
    @property
    def _build_name(self) -> str:
        return f"update slot {self.slot} ({self.build_path})" if self.slot else "build.path"

    @property
    def version(self) -> str:
        info = self.slots.read().info(self.slot) if self.slot else None
        return str(info.get("version", "?")) if info else "build.path"

    def _publish_build(self) -> None:
        try:
            state = self.slots.read()
        except PpxError as exc:
            log.error("%s", exc)
            return
        failed = sum(1 for info in (state.slots or {}).values() if info.get("health") == "failed")
        info = state.info(self.slot) if self.slot else None
        self.metrics.set_build(self.slot, str(info.get("version")) if info else "",
                               self.gate is not None and not self.gate.passed, failed)

    def _follow_update(self) -> None:
        """Between frames: settle the trial's health gate, and notice an activated or rolled
        back slot (the state file changed), which ends this run for serve() to start again."""
        try:
            self._settle_gate()
        except PpxError as exc:  # a state file it cannot write: keep serving, say so
            log.error("update slots: %s", exc)
        now = time.monotonic()
        if now - self._slots_polled < SLOTS_POLL_S:
            return
        self._slots_polled = now
        seen = self.slots.fingerprint()
        if seen == self._slots_seen:
            return
        self._slots_seen = seen
        try:
            wanted = self.slots.wanted()
        except PpxError as exc:
            log.error("%s: staying on %s", exc, self._build_name)
            return
        if wanted != self.slot:
            self.switch_reason = (f"switching from {self._build_name} to "
                                  f"{f'slot {wanted}' if wanted else 'build.path'}")
            self.stop_event.set()

    def _settle_gate(self) -> None:
        """Commit the trial that passed its health check, or drop the one that failed."""
        gate = self.gate
        if gate is not None and gate.decided and self.switch_reason is None:
            if gate.passed:
                self.gate = None
                if self.slots.commit(self.slot):
                    log.info("slot %s passed its health check (%d frames, %d over %g ms): "
                             "committed", self.slot, gate.frames, gate.misses,
                             self.cfg.update.health_deadline_ms)
                self._publish_build()
            else:  # leave this build even if the state file cannot say why
                self.switch_reason = f"slot {self.slot} failed its health check"
                self.stop_event.set()
                self._fail_trial(gate.failure or "health check failed")

    def _fail_trial(self, reason: str) -> bool:
        """Mark the trial this daemon runs failed; False if it runs no trial (any more)."""
        if self.gate is None or self.slot is None:
            return False
        self.gate = None
        log.error("slot %s failed its health check: %s; falling back to the last good build",
                  self.slot, reason)
        self.slots.fail(self.slot, reason)
        return True

    def _shutdown(self) -> None:
        if self.switch_reason is not None:
            log.warning("%s", self.switch_reason)
            # Not STOPPING=1: the process stays; loading the next build may take a while.
            self.notifier.reloading()
            self.notifier.status(self.switch_reason)
            if self.notifier.watchdog_s is not None:
                self.notifier.notify(WATCHDOG_USEC=str(int(SWITCH_WATCHDOG_S * 1e6)))
        else:
            if self.stop_event.is_set():
                log.info("stop requested: stopping")
            self.notifier.stopping("stopping")
        self.metrics.set_state(up=False)
        self._say(self._transcript.flush())
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.control is not None:
            self.control.stop()
        if self.audio is not None:
            self.audio.stop(timeout=1.0)
        self.metrics.stop()
        self.debug.close()
        log.info("stopped after %d frames (%d deadline misses)", self.frames, self.deadline_misses)

    def install_signal_handlers(self) -> None:
        def handle(_signum: int, _frame: Any) -> None:
            # Only set the flag: logging from a signal handler can deadlock on the log queue.
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # -- Controller (control socket threads) ------------------------------------------------
    def status(self) -> dict[str, Any]:
        audio = self.audio.stats() if self.audio is not None else {}
        recent = np.asarray(self._frame_ms) if self._frame_ms else np.zeros(1)
        speech = self.speech
        return {"persona": self.persona.name, "state": "degraded" if self.degraded else "listening",
                "uptime_s": round(time.monotonic() - self.started, 1),
                "muted": speech.muted, "paused": speech.paused, "busy": speech.busy, "frames": self.frames,
                "deadline_misses": self.deadline_misses, "frame_errors": self.frame_errors, "frame_ms_p50": round(float(np.percentile(recent, 50)), 2),
                "frame_ms_p95": round(float(np.percentile(recent, 95)), 2),
                "frame_ms_p99": round(float(np.percentile(recent, 99)), 2),
                # The audio path's estimate (audio.latency_ms has its parts; audio/latency.py).
                "mic_to_speaker_ms": (audio.get("latency_ms") or {}).get("total"), "audio": audio,
                "network": {"enabled": self.cfg.network.enabled, **self.network.status()},
                **self.conversation.status()}

    def switch_persona(self, name: str) -> dict[str, Any]:
        """Switch between frames and answer with the outcome: a refused switch is the reply's
        error, and the running conversation goes on untouched."""
        persona = resolve(self.cfg.persona, name, self.k_max)  # ConfigError -> error reply

        def run() -> dict[str, Any]:
            self._start_conversation(persona, "switch")  # refused: a network session goes on
            self.network.close("the head unit switched the persona: the cabin takes the model back",
                               give_back=False)
            return {"persona": persona.name}

        return self.commands.call(run, self.cfg.control.reply_timeout_s)

    def reset(self) -> dict[str, Any]:
        def run() -> dict[str, Any]:  # a late answer (StillApplying) carries this reply too
            self._start_conversation(self.persona, "reset")
            self.network.close("the head unit reset the conversation: the cabin takes the model back",
                               give_back=False)
            return {"persona": self.persona.name}

        return self.commands.call(run, self.cfg.control.reply_timeout_s)

    def set_muted(self, muted: bool) -> dict[str, Any]:
        self.speech.set(muted=muted)
        self.metrics.set_state(muted=muted)
        return {"muted": muted}

    def set_paused(self, paused: bool) -> dict[str, Any]:
        self.speech.set(paused=paused)
        self.metrics.set_state(paused=paused)
        return {"paused": paused}

    def set_busy(self, busy: bool) -> dict[str, Any]:
        self.speech.set(busy=busy)
        self.metrics.set_state(busy=busy)
        return {"busy": busy, "policy": self.persona.speech.when_busy}

    def metrics_text(self) -> str:
        return self.metrics.text()

    def context(self, action: str, text: str | None) -> dict[str, Any]:
        """The head unit's live facts: validated here, applied between frames, in effect from
        the next pause (`show` says what the model has now and what is pending)."""
        timeout = self.cfg.control.reply_timeout_s
        if action == "show":
            return self.commands.call(self.conversation.show_context, timeout)
        facts = self.conversation.check_context(text) if action == "set" else ""
        return self.commands.call(lambda: self.conversation.set_context(facts), timeout)

    # -- Host (the network endpoint's thread) ---------------------------------------------
    def network_open(self, request: ChatRequest, peer: str) -> Future[Link]:
        """A network session asks for the model: decided between frames (NetworkSeat.open)."""
        return self.commands.submit(lambda: self.network.open(request, peer))

    def network_refused(self) -> None:
        self.metrics.count_network_session("refused")

    def network_bytes(self, direction: str, count: int) -> None:
        self.metrics.count_network_bytes(direction, count)

    def network_decode_error(self) -> None:
        self.metrics.count_network_decode_error()

    def network_rtt(self, seconds: float | None) -> None:
        self.metrics.set_network_rtt(seconds)


def network_endpoint(cfg: DaemonConfig, host: Daemon) -> NetworkServer:
    n = cfg.network
    return NetworkServer(EndpointSettings(
        host=n.host, port=n.port, token=n.token, tls_cert=n.tls_cert, tls_key=n.tls_key,
        static_dir=n.static_dir, idle_timeout_s=n.idle_timeout_s, max_session_s=n.max_session_s,
        start_timeout_s=n.start_timeout_s, max_message_bytes=n.max_message_bytes,
        max_clients=n.max_clients, ping_interval_s=n.ping_interval_s), host)
