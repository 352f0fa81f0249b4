"""One conversation over a drive, and the only code that changes it.

`Conversation` owns what a conversation has put into the model: the token ring, the KV cache
and its offset (through `Session`), the rows it fed (the replay history) and the anchor it
stands on (the persona's prefix, with the head unit's live facts). Its ways in are
`switch_persona`, `set_context`, `reanchor`, `idle_reset`, `snapshot` / `restore`, and `step`,
which feeds one frame and then keeps the persona's prefix in the context for hours:

- **re-anchoring**: before the 3000-step ring fills, the temporal state is rebuilt as the anchor
  followed by the last `keep` input rows, replayed through the batched prefill graph; in a pause
  once the context is within `soft_margin` of full, and regardless at `hard_limit`, one step
  before the ring would wrap onto the prefix. Ring and codec states stay: no seam in the audio.
- **idle reset**: after `idle_reset` quiet frames the temporal state goes back to the anchor
  alone and the history is forgotten: nothing of the old conversation may come back.
- **live context**: new facts become a new anchor (compiled, or cached) applied in a pause.

Every change is all-or-nothing: a refused persona switch or a failed context update leaves the
conversation as it was (the context is rebuilt onto the old anchor with the same history), and
`show_context` always tells what the model has. `play` and `serve` both drive this class;
`rebuild_guard` lets the daemon keep every microphone frame that arrives during a rebuild, and
bridge the speaker with silence when the rebuild falls in a pause.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from personaplex_edge.runtime.audio.vad import CabinActivity
from personaplex_edge.runtime.constants import FRAME_RATE
from personaplex_edge.runtime.core.lifecycle import LifecyclePolicy, LifecycleStats
from personaplex_edge.runtime.core.live_context import check_context_text, with_context
from personaplex_edge.runtime.core.persona import SEED_MAX, Persona
from personaplex_edge.runtime.core.prompt import wrap_system
from personaplex_edge.runtime.core.session import ModelState, PersonaReady, Session, StepResult
from personaplex_edge.runtime.core.snapshot import Snapshot, snapshot_key
from personaplex_edge.runtime.errors import PpxError

log = logging.getLogger("personaplex.conversation")

ANCHOR_CACHE = 4  # compiled live-context prefixes kept in memory (MBs each on a 7B)


def _no_guard(quiet: bool) -> AbstractContextManager[Any]:
    return nullcontext()


class Activity(Protocol):
    """Who speaks, frame by frame (`audio.vad.CabinActivity`; tests script it)."""

    def update(self, mic: np.ndarray, text_token: int, pcm: np.ndarray | None) -> bool: ...

    def new_conversation(self) -> None: ...

    def microphone_reopened(self) -> None: ...


@dataclass(frozen=True)
class Turn:
    """One frame through the conversation: the model's step, and what the lifecycle did."""

    result: StepResult
    speaking: bool  # the driver or the agent speaks in this frame
    action: str | None  # "reanchor", "idle_reset", "context", "..._failed" or None
    rebuild_ms: float = 0.0  # how long that action took, within this frame's step()
    rebuild_in_pause: bool = False  # it ran in a pause: planned work, not a late model

    @property
    def pause_rebuild_ms(self) -> float:
        """The time of a rebuild in a pause (else 0): the daemon leaves it out of the frame's
        compute, its deadline and the health gate; mid-speech it counts like any late frame."""
        return self.rebuild_ms if self.rebuild_in_pause else 0.0


@dataclass(frozen=True)
class ConversationSnapshot:
    """A whole conversation, to set it aside and come back to it (host copies; GBs on a 7B)."""

    model: ModelState
    anchor: Snapshot
    history: tuple[np.ndarray, ...]
    persona: Persona
    policy: LifecyclePolicy
    facts: str
    pending_facts: str | None
    base_steps: int


class Conversation:
    """The one owner of a conversation's state on a `Session` (frame loop thread only, except
    `check_context`, which only reads)."""

    def __init__(self, session: Session, on_event: Callable[[str, float], None] | None = None,
                 activity: Activity | None = None, policy: LifecyclePolicy | None = None):
        self.session = session
        self._fixed_policy = policy  # in frames, for every persona (short test contexts)
        self.activity = activity or CabinActivity()  # who speaks: decides the pauses
        self.on_event = on_event  # (kind, milliseconds): the daemon's metrics
        self.stats = LifecycleStats()  # counters run for the owner's life; ages per conversation
        # Runs around every rebuild of the context, told whether it falls in a pause (the
        # daemon: keep captured frames meanwhile; in a pause, bridge the speaker with silence).
        self.rebuild_guard: Callable[[bool], AbstractContextManager[Any]] = _no_guard
        self.persona: Persona | None = None  # as configured, without the live facts
        self.policy: LifecyclePolicy | None = None
        self.history: deque[np.ndarray] = deque(maxlen=0)  # input rows a re-anchor replays
        self.facts = ""  # the facts the model's prefix carries now
        self.pending_facts: str | None = None  # facts waiting for the next pause
        self.last_context_error: str | None = None
        self._anchor: Snapshot | None = None
        self._anchors: OrderedDict[str, Snapshot] = OrderedDict()  # by persona content hash
        self._base_steps = 0  # the persona's prefix without live facts, in temporal steps
        self._quiet = 0
        self._spoke = False  # someone spoke since the context was last cleared
        self.starts = 0  # conversations begun (switch_persona, restore): tells one from the next

    # -- persona ------------------------------------------------------------------------
    def switch_persona(self, persona: Persona, seed: int | None = None) -> PersonaReady:
        """A new conversation with `persona` (start-up, switch, reset). Refused (PpxError) with
        the running conversation untouched: a seed out of range, a voice the build lacks, a
        prompt too long, a prompt plus `keep_s` with no room, live facts that do not fit."""
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise PpxError(f"seed {seed}: expected 0..{SEED_MAX}")
        self.session.check_voice(persona)  # the common refusal, before anything changes
        # A compile runs on the live model: then keep the whole KV cache to put back exactly.
        compiles = not self.session.snapshot_path(persona).is_file()
        saved = self.session.save_state(temporal=compiles) if self.persona is not None else None
        try:
            ready = self.session.start(persona, seed)
            policy = self._policy(persona, ready.prompt_steps)
            if self.facts or self.pending_facts:  # the vehicle's facts carry over: do they fit?
                self._check_fits(persona, ready.prompt_steps, self.pending_facts or self.facts)
        except BaseException:
            if saved is not None:
                self._roll_back(saved)
            raise
        facts = self.pending_facts if self.pending_facts is not None else self.facts
        self.persona, self.policy, self._base_steps = persona, policy, ready.prompt_steps
        self._anchor = ready.snapshot
        self._anchors.clear()
        self._remember(ready.snapshot.key["persona"], ready.snapshot)  # clearing facts: no compile
        self.history = deque(maxlen=policy.keep)
        self.facts, self.pending_facts = "", (facts or None)
        self.stats.conversation_frames = 0
        self._quiet, self._spoke = 0, False
        self.starts += 1
        self.activity.new_conversation()
        return ready

    def _policy(self, persona: Persona, prefix_steps: int) -> LifecyclePolicy:
        if self._fixed_policy is not None:
            return self._fixed_policy
        c = persona.conversation
        return LifecyclePolicy.from_seconds(self.session.shape.context, prefix_steps,
                                            c.idle_reset_s, c.keep_s, where=str(persona.source))

    # -- live context ---------------------------------------------------------------------
    def check_context(self, text: Any) -> str:
        """New facts, validated against the limits (text, and context steps left) and normalised.
        Reads only: safe on a control worker while the frame loop runs."""
        facts = check_context_text(text)
        if self.persona is None:
            raise PpxError("context: no conversation yet")
        self._check_fits(self.persona, self._base_steps, facts)
        return facts

    def _check_fits(self, persona: Persona, base_steps: int, facts: str) -> None:
        tok = self.session.tokenizer
        base = len(tok.encode(wrap_system(persona.prompt)))
        new = len(tok.encode(wrap_system(with_context(persona, facts).prompt)))
        steps = base_steps - base + new
        try:
            self._policy(persona, steps)
        except PpxError as exc:
            raise PpxError(f"context: text: the {persona.name} prompt with these facts would take "
                           f"{steps} steps; {str(exc).split(': ', 1)[-1]}") from None

    def set_context(self, facts: str) -> dict[str, Any]:
        """Adopt facts checked by `check_context` ('' clears them); they reach the model in the
        next pause. Returns `show_context()`."""
        self.pending_facts = facts if facts != self.facts else None
        return self.show_context()

    def show_context(self) -> dict[str, Any]:
        """The facts, and the exact system prompt the model has now (and the one pending)."""
        assert self.persona is not None, "switch_persona() first"
        pending = self.pending_facts
        return {"context": self.facts if pending is None else pending, "pending": pending is not None,
                "prompt": wrap_system(with_context(self.persona, self.facts).prompt),
                "pending_prompt": (None if pending is None
                                   else wrap_system(with_context(self.persona, pending).prompt)),
                "last_error": self.last_context_error}

    # -- every frame --------------------------------------------------------------------
    def step(self, mic: np.ndarray, silence_agent: bool = False) -> Turn:
        """One 80 ms frame: the model hears `mic` (24 kHz) and speaks; then voice activity and
        the lifecycle (which may rebuild the context in this frame). `silence_agent`: the agent
        is forced quiet (pause, busy driver, turn limit), so its words are not speech here."""
        assert self.policy is not None, "switch_persona() first"
        result = self.session.step(mic, silence_agent=silence_agent)
        if self.session.lm.last_input is not None:
            self.history.append(self.session.lm.last_input)
        speaking = self.activity.update(mic, result.text_token,
                                        None if silence_agent else result.pcm)
        t0 = time.perf_counter()
        action = self._after_frame(speaking)  # a rebuild leaves the quiet count as it was
        return Turn(result, speaking, action,
                    (time.perf_counter() - t0) * 1e3 if action is not None else 0.0,
                    action is not None and self.in_pause)

    @property
    def in_pause(self) -> bool:
        """Neither the driver nor the agent has spoken for the policy's `pause` frames."""
        return self.policy is not None and self._quiet >= self.policy.pause

    @property
    def quiet_frames(self) -> int:
        """Frames since the driver or the agent last spoke (0 at a conversation's start)."""
        return self._quiet

    def _after_frame(self, speaking: bool) -> str | None:
        assert self.policy is not None
        self.stats.conversation_frames += 1
        self._quiet = 0 if speaking else self._quiet + 1
        self._spoke = self._spoke or speaking
        fill = self.session.context_fill
        self.stats.longest_fill = max(self.stats.longest_fill, fill)
        p = self.policy
        in_pause = self.in_pause
        if self.pending_facts is not None and in_pause:
            return self._apply_context()
        if fill >= p.hard_limit or (fill >= p.soft_limit and in_pause):
            return self._timed("reanchor", self.reanchor)
        if p.idle_reset and self._quiet >= p.idle_reset and self._spoke:
            return self._timed("idle_reset", self.idle_reset)
        return None

    # -- the rebuilds ---------------------------------------------------------------------
    def reanchor(self) -> None:
        """The context becomes the anchor followed by the remembered history."""
        with self.rebuild_guard(self.in_pause):
            self.session.rebuild(self._anchor_or_fail(), list(self.history))
        self._rebuilt()

    def idle_reset(self) -> None:
        """The context becomes the anchor alone, and the history is forgotten with it."""
        with self.rebuild_guard(self.in_pause):
            self.session.rebuild(self._anchor_or_fail(), [])
        self.history.clear()
        self._spoke = False
        self._rebuilt()

    def rehearse_reanchor(self) -> float:
        """A re-anchor of a full `keep` of rows, timed in ms, then back to the anchor alone:
        the prefill graph meets that shape before the drive, not in its first pause."""
        assert self.policy is not None, "switch_persona() first"
        row = self.session.lm.state.tokens[:, 0].copy()
        t0 = time.perf_counter()
        self.session.rebuild(self._anchor_or_fail(), [row] * self.policy.keep)
        ms = (time.perf_counter() - t0) * 1e3
        self.session.rebuild(self._anchor_or_fail(), list(self.history))
        return ms

    def _apply_context(self) -> str:
        assert self.persona is not None and self.pending_facts is not None
        t0 = time.perf_counter()
        facts, self.pending_facts = self.pending_facts, None  # tried once: never a retry loop
        prompt = with_context(self.persona, facts)
        digest = prompt.content_hash()  # a voice file's audio is hashed: once per update
        saved = self.session.save_state()
        try:
            with self.rebuild_guard(self.in_pause):
                snap = self._anchors.get(digest) or self._compile_anchor(prompt, digest)
                self.session.rebuild(snap, list(self.history))
        except Exception as exc:  # noqa: BLE001 - any failure: the conversation goes on as it was
            self.last_context_error = f"{type(exc).__name__}: {exc}"
            log.error("live context not applied (%s): the conversation keeps its prefix",
                      self.last_context_error)
            self._failed()
            self._roll_back(saved)
            return "context_failed"
        self._anchor, self.facts, self.last_context_error = snap, facts, None
        self._remember(digest, snap)
        self._rebuilt()
        self.stats.context_updates += 1
        self.stats.last_context_update = time.monotonic()
        self._event("context", t0)
        return "context"

    def _compile_anchor(self, prompt: Persona, digest: str) -> Snapshot:
        """Compile a prefix while the conversation runs: the compile uses the live LM and
        encoder, which are put back after it (the temporal state is rebuilt next)."""
        saved = self.session.save_state()
        try:
            key = snapshot_key(self.session.build_id, digest)
            return self.session.compile(prompt, key)
        finally:
            self.session.load_state(saved)

    def _roll_back(self, saved: ModelState) -> None:
        """Back to the conversation as it was: the state as saved; without a saved KV cache the
        context is rebuilt onto the old anchor with the same history (a re-anchor; an idle
        reset if even that fails)."""
        self.session.load_state(saved)
        if self._anchor is None or saved.temporal is not None:  # put back exactly, or nothing to
            return
        try:
            self.session.rebuild(self._anchor, list(self.history))
        except Exception as exc:  # noqa: BLE001 - last resort: the anchor alone
            log.error("rebuild after a refused change failed (%s): idle reset", exc)
            self.session.rebuild(self._anchor, [])
            self.history.clear()

    def _timed(self, kind: str, rebuild: Callable[[], None]) -> str:
        t0 = time.perf_counter()
        try:
            rebuild()
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, never stop the drive
            log.error("%s failed (%s: %s): falling back to an idle reset", kind,
                      type(exc).__name__, exc)
            self._failed()
            self.idle_reset()  # the anchor alone; if even that fails, the frame loop recovers
            self.stats.idle_resets += 1
            self.stats.last_idle_reset = time.monotonic()
            return f"{kind}_failed"
        ms = (time.perf_counter() - t0) * 1e3
        if kind == "reanchor":
            self.stats.reanchors += 1
            self.stats.reanchor_ms.append(ms)
            self.stats.last_reanchor = time.monotonic()
            log.info("re-anchored: persona prefix + %d steps replayed in %.0f ms (context %d of %d)",
                     len(self.history), ms, self.session.context_fill, self.session.shape.context)
        else:
            self.stats.idle_resets += 1
            self.stats.last_idle_reset = time.monotonic()
        self._event(kind, t0)
        return kind

    def _anchor_or_fail(self) -> Snapshot:
        if self._anchor is None:
            raise PpxError("no conversation: switch_persona() first")
        return self._anchor

    def _remember(self, content_hash: str, snap: Snapshot) -> None:
        self._anchors[content_hash] = snap
        self._anchors.move_to_end(content_hash)
        while len(self._anchors) > ANCHOR_CACHE:  # bounded: prefixes are MBs on a 7B
            self._anchors.popitem(last=False)

    def _rebuilt(self) -> None:
        self.stats.longest_fill = max(self.stats.longest_fill, self.session.context_fill)

    def _event(self, kind: str, t0: float) -> None:
        if self.on_event is not None:
            self.on_event(kind, (time.perf_counter() - t0) * 1e3)

    def _failed(self) -> None:
        self.stats.failures += 1
        if self.on_event is not None:
            self.on_event("failure", 0.0)

    # -- set aside and come back ------------------------------------------------------------
    def snapshot(self) -> ConversationSnapshot:
        """The whole conversation (a full host copy of the KV cache: not for every frame)."""
        assert self.persona is not None and self.policy is not None, "switch_persona() first"
        model = self.session.save_state(temporal=True)
        return ConversationSnapshot(model, self._anchor_or_fail(), tuple(self.history),
                                    self.persona, self.policy, self.facts, self.pending_facts,
                                    self._base_steps)

    def restore(self, snap: ConversationSnapshot) -> None:
        """Go on with a conversation from `snapshot()` of this build, exactly where it was."""
        self.session.load_state(snap.model)
        self.persona, self.policy, self._base_steps = snap.persona, snap.policy, snap.base_steps
        self._anchor = snap.anchor
        self.history = deque(snap.history, maxlen=snap.policy.keep)
        self.facts, self.pending_facts = snap.facts, snap.pending_facts
        self._quiet, self._spoke = 0, bool(snap.history)
        self.starts += 1

    # -- status -----------------------------------------------------------------------------
    @property
    def context_pending(self) -> bool:
        return self.pending_facts is not None

    def summary(self) -> str:
        s, context = self.stats, self.session.shape.context
        return (f"conversation: {s.reanchors} re-anchors, {s.idle_resets} idle resets, "
                f"{s.context_updates} context updates, longest context {s.longest_fill} frames"
                f" of {context}" + (f", {s.failures} failures" if s.failures else ""))

    def status(self) -> dict[str, Any]:
        s, now = self.stats, time.monotonic()

        def ago(t: float | None) -> float | None:
            return None if t is None else round(now - t, 1)

        return {"conversation_age_s": round(s.conversation_frames / FRAME_RATE, 1),
                "context_fill": f"{self.session.context_fill}/{self.session.shape.context}",
                "reanchors": s.reanchors, "idle_resets": s.idle_resets,
                "context_updates": s.context_updates, "last_reanchor_ago_s": ago(s.last_reanchor),
                "last_idle_reset_ago_s": ago(s.last_idle_reset),
                "last_context_update_ago_s": ago(s.last_context_update),
                "context_pending": self.context_pending}
