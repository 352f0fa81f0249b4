"""Who has the model: the cabin, or a network session (`network.policy`).

One model holds one conversation. The network endpoint (runtime/network/server.py) asks for the
model with `open`, run between frames on the frame loop's thread; the policy decides:

- `when-cabin-idle` (default): a session starts only after the cabin was quiet (no driver, no
  agent) for `cabin_idle_s`, and while it runs the driver's voice activity on the cabin
  microphone is watched: `takeback_ms` of speech ends the session (the client gets an error
  message and a clean close) and the cabin gets a fresh conversation in the same frame.
- `exclusive`: a session starts whenever the model is free and keeps it until it ends.
- `off`: sessions are refused; the endpoint still answers (with that error).

While a session runs, the model hears the session's jitter buffer instead of the cabin
microphone (silence on an underrun; nothing at all before the client's first audio, so a
session's first frame is its first audio frame, as in `play`), its reply goes to the client,
and the cabin speaker plays silence. The frame loop keeps reading the microphone on its clock:
no cabin frame is missed. The Conversation's lifecycle (re-anchoring, idle reset, live
context) runs on network sessions as on the cabin.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.constants import FRAME_RATE, FRAME_SAMPLES
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.persona import TEMPERATURE_MIN, Persona, Sampling
from personaplex_edge.runtime.core.session import NETWORK_SOURCE
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.network.jitter import JitterBuffer
from personaplex_edge.runtime.network.link import Link
from personaplex_edge.runtime.network.protocol import ChatRequest
from personaplex_edge.runtime.service.config import NetworkConfig, PersonaConfig
from personaplex_edge.runtime.service.metrics import Metrics
from personaplex_edge.runtime.service.persona_catalog import resolve

log = logging.getLogger("personaplex.network")

TOKENS_ENV = "PPX_DEBUG_NETWORK_TOKENS"  # a directory: each session's model tokens (tests)
# Snapshots of clients' prompts kept on disk (about 120 MB each on the 7B): the most recently
# used ones, so a client that reconnects restores in milliseconds and none can fill the disk.
NETWORK_SNAPSHOTS = 4


class Refused(PpxError):
    """A session the policy or the request does not allow: the client's error message."""


class NetworkSeat:
    """The network's claim on the model (frame loop thread only, except `status`)."""

    def __init__(self, cfg: NetworkConfig, personas: PersonaConfig, k_max: int,
                 conversation: Conversation, metrics: Metrics,
                 cabin_persona: Callable[[], Persona],
                 give_back: Callable[[str], None],
                 reply_tap: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
        self.cfg = cfg
        self.personas = personas
        self.k_max = k_max
        self.conversation = conversation
        self.session = conversation.session
        self.metrics = metrics
        self.cabin_persona = cabin_persona
        self.give_back = give_back  # (reason): a fresh cabin conversation
        # (heard, reply) -> what the client gets: the daemon's measurement taps (debug_audio.py)
        self.reply_tap = reply_tap or (lambda heard, pcm: pcm)
        self.link: Link | None = None
        self._vad = None  # the driver's voice on the cabin mic during a session (Silero)
        if cfg.enabled and cfg.policy == "when-cabin-idle":
            self._driver_vad()  # loaded at start-up, not in a session's first frame
        self._driver_frames = self._underruns = self._drops = 0
        self.pause_rebuild_ms = 0.0  # of the last frame: a rebuild in a pause (Turn)
        self._driver_quiet = self._carry = 0  # frames without the driver, in and after a session
        self._carry_for = -1  # the cabin conversation the carry belongs to (Conversation.starts)
        self.takeback_frames = max(1, round(cfg.takeback_ms / 1000 * FRAME_RATE))
        self._tokens: list[np.ndarray] = []
        self._tokens_dir = Path(os.environ[TOKENS_ENV]) if os.environ.get(TOKENS_ENV) else None
        self.sessions = 0
        self.last_end: str | None = None

    @property
    def active(self) -> bool:
        return self.link is not None

    # -- a session starts (frame loop thread, between frames) ------------------------------
    def open(self, request: ChatRequest, peer: str) -> Link:
        if self.cfg.policy == "off":
            raise Refused("network.policy is off: the cabin keeps the model")
        if self.link is not None and self.link.closed:
            # Ended on the network thread since the last frame (a quick reconnect): the model
            # goes back now, as the next frame would have done, and this client may have it.
            self.close()
        if self.link is not None:
            raise Refused("busy: the model is in another network session (one at a time)")
        quiet = self.cabin_quiet_frames  # before the switch below starts a new conversation
        if self.cfg.policy == "when-cabin-idle":
            quiet_s = quiet / FRAME_RATE
            if quiet_s < self.cfg.cabin_idle_s:
                raise Refused(f"the cabin is in a conversation: it has been quiet for {quiet_s:.1f} s"
                              f" of the {self.cfg.cabin_idle_s:g} s network.cabin_idle_s asks")
        persona = self.persona_for(request)
        link = Link(peer, persona.name, JitterBuffer(self.cfg.jitter_ms, self.cfg.jitter_max_ms,
                                                self.cfg.jitter_trim_s),
                    max_replies=max(1, int(self.cfg.reply_queue_ms / 1000 * FRAME_RATE)))
        if self.cfg.policy == "when-cabin-idle":
            self._driver_vad().reset()
        # A new prompt compiles here, on the frame loop's thread: the daemon's guard keeps the
        # cabin microphone's frames meanwhile (up to 5 s), as for a re-anchor.
        with self.conversation.rebuild_guard(self.conversation.in_pause):
            ready = self.conversation.switch_persona(persona, seed=request.seed)  # PpxError: refused
        log.info("network session from %s: persona %s %s in %.0f ms", peer, persona.name,
                 "compiled" if ready.compiled else "restored",
                 ready.compile_ms if ready.compiled else ready.restore_ms)
        if persona.source == NETWORK_SOURCE:
            self._prune_snapshots(self.session.snapshot_path(persona, ready.snapshot.key["persona"]))
        link.ready = {"compiled": ready.compiled, "ms": round(
            ready.compile_ms + ready.restore_ms if ready.compiled else ready.restore_ms, 1)}
        self._driver_frames = self._underruns = self._drops = 0
        self._driver_quiet = quiet
        self._tokens = []
        self.sessions += 1
        self.metrics.count_conversation_start("network")
        self.metrics.set_network_active(True)
        self.link = link  # last: a step above that raises leaves no half-opened session
        return link

    @property
    def cabin_quiet_frames(self) -> int:
        """Frames since the cabin last spoke. A session's quiet driver counts too: after a
        session gives the model back, the cabin's fresh conversation starts at 0, but if nobody
        has spoken since, the driver's silence during the session carries on (a client that
        reconnects does not wait cabin_idle_s again)."""
        quiet = self.conversation.quiet_frames
        # Only in the conversation the session gave back: a reset, a switch or a recovery since
        # is a cabin conversation of its own, which starts at 0.
        if (self.conversation.starts == self._carry_for
                and quiet == self.conversation.stats.conversation_frames):  # nobody spoke since
            quiet += self._carry
        return quiet

    def persona_for(self, request: ChatRequest) -> Persona:
        """The configured persona named (or the cabin's), with the client's prompt and voice,
        and its sampling clamped to what a persona file may set."""
        base = resolve(self.personas, request.persona, self.k_max) if request.persona \
            else self.cabin_persona()
        s = base.sampling

        def temperature(value: float | None, default: float) -> float:
            if value is None:
                return default
            value = min(2.0, max(0.0, value))
            return 0.0 if value < TEMPERATURE_MIN / 2 else max(TEMPERATURE_MIN, value)

        def top_k(value: int | None, default: int) -> int:
            return default if value is None else min(self.k_max, max(1, value))

        sampling = Sampling(text_temperature=temperature(request.text_temperature, s.text_temperature),
                            text_top_k=top_k(request.text_topk, s.text_top_k),
                            audio_temperature=temperature(request.audio_temperature, s.audio_temperature),
                            audio_top_k=top_k(request.audio_topk, s.audio_top_k),
                            seed=s.seed, greedy=s.greedy)
        custom = bool(request.text_prompt or request.voice_prompt)
        return replace(base, name=f"net-{base.name}" if custom else base.name,
                       prompt=request.text_prompt or base.prompt,
                       voice=request.voice_prompt or base.voice, sampling=sampling,
                       source=NETWORK_SOURCE if custom else base.source,
                       lines={} if custom else base.lines)

    @staticmethod
    def _prune_snapshots(used: Path) -> None:
        """Keep the NETWORK_SNAPSHOTS most recently used snapshots of clients' prompts."""
        try:
            if used.is_file():
                os.utime(used)  # used now: the last to go (restoring reads, it does not touch)
            kept = sorted(used.parent.glob("*.npz"), key=lambda f: f.stat().st_mtime, reverse=True)
            for old in kept[NETWORK_SNAPSHOTS:]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # the session runs on; the next start tries again
            log.warning("network snapshots in %s not pruned (%s)", used.parent,
                        exc.strerror or exc)

    # -- every frame while a session runs ------------------------------------------------
    def frame(self, cabin_pcm: np.ndarray) -> bool:
        """One frame of the session; False once it has ended (the cabin's frame runs instead)."""
        link = self.link
        assert link is not None
        if not link.closed and self.cfg.policy == "when-cabin-idle" and self._driver_speaks(cabin_pcm):
            link.end("the driver is speaking: the cabin takes the model back")
        if link.closed:
            self.close()
            return False
        pcm = link.jitter.pop()
        if pcm is None:
            if not link.jitter.ever_started:
                return True  # nothing from the client yet: the model waits for its first frame
            pcm = np.zeros(FRAME_SAMPLES, np.float32)
        jitter = link.jitter
        underruns, drops = jitter.underruns, jitter.overflows + jitter.drops
        turn = self.conversation.step(pcm)
        self.pause_rebuild_ms = turn.pause_rebuild_ms  # the daemon's accounting, as for the cabin
        result = turn.result
        if self._tokens_dir is not None:
            self._tokens.append(result.frame.copy())
        link.deliver(self.reply_tap(pcm, result.pcm), self.session.piece(result.text_token))
        self.metrics.set_network_jitter(jitter.depth_ms, jitter.wait_ms,
                                        underruns - self._underruns, drops - self._drops)
        self._underruns, self._drops = underruns, drops
        return True

    def _driver_vad(self):
        if self._vad is None:
            from personaplex_edge.runtime.audio.vad import UserVad

            self._vad = UserVad()
        return self._vad

    def _driver_speaks(self, cabin_pcm: np.ndarray) -> bool:
        speech = self._driver_vad().step(cabin_pcm).speech
        self._driver_frames = self._driver_frames + 1 if speech else 0
        self._driver_quiet = 0 if speech else self._driver_quiet + 1
        return self._driver_frames >= self.takeback_frames

    def close(self, reason: str | None = None, give_back: bool = True) -> None:
        """End the session (if any) and give the model back to the cabin; `give_back=False`:
        the caller starts the cabin's conversation itself (a reset, a switch, a recovery)."""
        link = self.link
        if link is None:
            return
        link.end(reason)
        self.link = None
        # exclusive does not watch the driver: nothing is known of the cabin during the session
        carry = self._driver_quiet if self.cfg.policy == "when-cabin-idle" else 0
        self._carry, self._carry_for = 0, -1
        self.last_end = link.reason or "client closed"
        self.metrics.set_network_active(False)
        self.metrics.count_network_session("clean" if link.reason is None else "error")
        log.info("network session from %s ended: %s (%d reply frames)", link.peer,
                 self.last_end, link.frames_out)
        self._save_tokens(link)
        if give_back:
            self.give_back("network_end")
            self._carry, self._carry_for = carry, self.conversation.starts

    def _save_tokens(self, link: Link) -> None:
        if self._tokens_dir is None or not self._tokens:
            return
        path = self._tokens_dir / f"session-{link.id}.npz"
        try:
            np.savez(path, out_tokens=np.stack(self._tokens).astype(np.int64))
        except OSError as exc:
            log.warning("%s: %s not written (%s)", TOKENS_ENV, path, exc.strerror)

    def status(self) -> dict[str, Any]:
        link = self.link
        return {"policy": self.cfg.policy, "sessions": self.sessions, "last_end": self.last_end,
                # how long the cabin has been quiet (when-cabin-idle asks for cabin_idle_s)
                "cabin_quiet_s": None if link is not None
                else round(self.cabin_quiet_frames / FRAME_RATE, 1),
                "session": None if link is None else link.stats()}
