"""The daemon's conversation over a drive: voice activity, the lifecycle and live vehicle context.

Every frame the driver's VAD and the agent's activity say whether anyone speaks; `Lifecycle`
then re-anchors, idle-resets or applies new context (core/lifecycle.py). The head unit's facts
(time, destination and ETA, next manoeuvre, outside temperature, range) become the persona
prompt's "Information:" part, the way PersonaPlex's customer-service prompts carry facts, and
reach the model in the next pause.

Live context is volatile: it lives in the daemon's memory only, and a restart clears it (the
head unit sends it again when it sees the daemon come back). It survives persona switches and
resets: it describes the vehicle, not the persona.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import replace
from typing import Any

import numpy as np

from personaplex_edge.runtime.audio.vad import AgentActivity, ConversationActivity, UserVad
from personaplex_edge.runtime.constants import FRAME_RATE, TEXT_PADDING_ID
from personaplex_edge.runtime.core.lifecycle import Lifecycle, LifecyclePolicy
from personaplex_edge.runtime.core.persona import Persona
from personaplex_edge.runtime.core.prompt import wrap_system
from personaplex_edge.runtime.core.session import Session, StepResult
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.service.metrics import Metrics

CONTEXT_MAX_CHARS = 400  # a few short facts; PersonaPlex follows short factual lists best


def with_context(persona: Persona, facts: str) -> Persona:
    """`persona` whose prompt carries `facts` as its "Information:" part."""
    prompt = persona.prompt.strip()
    if not facts:
        return persona
    if "Information:" in prompt:  # the persona has facts of its own: the vehicle's follow
        return replace(persona, prompt=f"{prompt} {facts}")
    sep = "" if prompt.endswith((".", "!", "?")) else "."
    return replace(persona, prompt=f"{prompt}{sep} Information: {facts}")


def check_context_text(text: Any) -> str:
    """The facts as given, or PpxError naming the limit they break."""
    if not isinstance(text, str):
        raise PpxError("context: text: expected a string")
    if len(text) > CONTEXT_MAX_CHARS:
        raise PpxError(f"context: text: {len(text)} characters, the limit is {CONTEXT_MAX_CHARS}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        raise PpxError(f"context: text: control or unassigned character U+{ord(bad):04X} at "
                       f"{text.index(bad)}: give plain text on one line")
    return " ".join(text.split())


class ConversationKeeper:
    """Per-frame activity and lifecycle for the daemon's one conversation (frame loop thread,
    except `check_context`, which control workers call)."""

    def __init__(self, session: Session, metrics: Metrics):
        self.session = session
        self.metrics = metrics
        self.vad = UserVad()
        self.agent = AgentActivity()
        self.talk = ConversationActivity()
        self.lifecycle: Lifecycle | None = None
        self.persona: Persona | None = None
        self.facts = ""  # the head unit's live context ('' = none)
        self._applied = ""  # the facts the model's prefix carries now
        self._base_steps = 0  # the persona's prefix without live context, in temporal steps
        self._started = time.monotonic()

    # -- conversation start -------------------------------------------------------------
    def policy_for(self, persona: Persona, prefix_steps: int) -> LifecyclePolicy:
        c = persona.conversation
        return LifecyclePolicy.from_seconds(self.session.shape.context, prefix_steps,
                                            c.idle_reset_s, c.keep_s, where=str(persona.source))

    def started(self, persona: Persona, reason: str) -> None:
        """`session.start(persona)` just ran (start-up, switch, reset, recovery)."""
        self.persona = persona
        self._base_steps = self.session.context_fill
        policy = self.policy_for(persona, self._base_steps)
        stats = self.lifecycle.stats if self.lifecycle is not None else None
        self.lifecycle = Lifecycle(self.session, policy, on_event=self._on_event)
        self.lifecycle.remember_anchor(persona, self.session.anchor)  # clearing context: no compile
        self._applied = ""
        if stats is not None:  # counters run for the daemon's life; ages restart
            stats.conversation_frames = 0
            self.lifecycle.stats = stats
        self.agent.reset()
        self.talk.reset()
        self._started = time.monotonic()
        self.metrics.count_conversation_start(reason)
        if self.facts:  # the vehicle's facts carry over to the new conversation
            self.lifecycle.update_context(with_context(persona, self.facts))

    # -- every frame --------------------------------------------------------------------
    def after_frame(self, mic: np.ndarray, result: StepResult, agent_silenced: bool) -> str | None:
        """`mic`: the 24 kHz frame the model heard; `agent_silenced`: the agent was forced quiet
        (pause, busy driver, turn limit), so its words are not speech in the cabin."""
        assert self.lifecycle is not None, "started() first"
        user = self.vad.step(mic).speech
        if agent_silenced:
            agent = self.agent.step(TEXT_PADDING_ID, None)
        else:
            agent = self.agent.step(result.text_token, result.pcm)
        now = self.talk.update(user, agent)
        action = self.lifecycle.after_frame(now.speaking)
        self.metrics.set_conversation(self.session.context_fill,
                                      self.lifecycle.stats.conversation_frames / FRAME_RATE)
        return action

    def _on_event(self, kind: str, ms: float) -> None:
        if kind == "context":
            self._applied = self.facts  # what was pending is what the prefix now carries
        self.metrics.count_lifecycle(kind, ms)

    def device_reopened(self) -> None:
        self.vad.reset()

    # -- live context ---------------------------------------------------------------------
    def check_context(self, text: Any, persona: Persona) -> str:
        """Validate new facts against the limits (text, and context steps left); returns them
        normalised. Safe on a control worker: reads only."""
        facts = check_context_text(text)
        tok = self.session.tokenizer
        base = len(tok.encode(wrap_system(persona.prompt)))
        new = len(tok.encode(wrap_system(with_context(persona, facts).prompt)))
        steps = self._base_steps - base + new
        try:
            self.policy_for(persona, steps)
        except PpxError as exc:
            raise PpxError(f"context: text: the prompt with these facts would take {steps} "
                           f"steps; {str(exc).split(': ', 1)[-1]}") from None
        return facts

    def set_context(self, facts: str) -> dict[str, Any]:
        """Frame loop: adopt new facts; they reach the model in the next pause."""
        assert self.lifecycle is not None and self.persona is not None
        self.facts = facts
        self.lifecycle.update_context(with_context(self.persona, facts))
        return self.show_context()

    def show_context(self) -> dict[str, Any]:
        """The facts, and the exact system prompt the model has now (and the one pending)."""
        assert self.persona is not None and self.lifecycle is not None
        pending = self.lifecycle.context_pending
        return {"context": self.facts, "pending": pending,
                "prompt": wrap_system(with_context(self.persona, self._applied).prompt),
                "pending_prompt": (wrap_system(with_context(self.persona, self.facts).prompt)
                                   if pending else None)}

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.lifecycle is not None
        s, now = self.lifecycle.stats, time.monotonic()

        def ago(t: float | None) -> float | None:
            return None if t is None else round(now - t, 1)

        return {"conversation_age_s": round(s.conversation_frames / FRAME_RATE, 1),
                "context_fill": f"{self.session.context_fill}/{self.lifecycle.policy.context}",
                "reanchors": s.reanchors, "idle_resets": s.idle_resets,
                "context_updates": s.context_updates, "last_reanchor_ago_s": ago(s.last_reanchor),
                "last_idle_reset_ago_s": ago(s.last_idle_reset),
                "last_context_update_ago_s": ago(s.last_context_update),
                "context_pending": self.lifecycle.context_pending}
