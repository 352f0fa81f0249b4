"""A conversation that lasts the whole drive: the persona's prefix never leaves the context.

PersonaPlex's temporal transformer attends over a ring of `context` steps (3000 = 240 s). Left
alone, step 3000 overwrites the first step of the persona's prompt and the co-pilot forgets who
it is, four minutes after ignition. `Lifecycle` runs after every frame and keeps the prefix
pinned:

- **re-anchoring**: before the ring fills, the temporal state is rebuilt as the anchor snapshot
  (the persona's prefix, with any live context) followed by the last `keep` steps of this
  conversation's own input rows, replayed through the batched prefill graph
  (`Session.reanchor`). It happens in a pause once the context is within `soft_margin` of
  full, and regardless at `hard_limit`, one step before the ring would wrap. The token ring and
  the Mimi codec states are untouched, so the audio has no seam.
- **idle reset**: after `idle_reset` frames with neither side speaking, the temporal state goes
  back to the anchor alone (a re-anchor with nothing replayed): milliseconds, and inaudible,
  since nobody is speaking.
- **live context**: a new anchor (the persona's prompt with the head unit's facts) is compiled
  and re-anchored onto in the next pause.

The replay runs on the frame loop's thread between two frames: the capture side queues the
frames that arrive meanwhile and the loop catches up (README: "Conversations that last the
whole drive" has the costs). A re-anchor that fails falls back to an idle reset and is counted;
the conversation carries on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from personaplex_edge.runtime.constants import FRAME_RATE
from personaplex_edge.runtime.core.persona import Persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.core.snapshot import Snapshot
from personaplex_edge.runtime.errors import ConfigError, PpxError

log = logging.getLogger("personaplex.lifecycle")

PAUSE_S = 0.5  # this much quiet from both sides is a pause
SOFT_MARGIN_S = 60.0  # re-anchor in a pause once the context is this close to full
MIN_ROOM_S = 20.0  # conversation a re-anchored context must still have room for
ANCHOR_CACHE = 4  # compiled live-context prefixes kept in memory


@dataclass(frozen=True)
class LifecyclePolicy:
    """When to reset and re-anchor, in frames (80 ms steps)."""

    context: int
    idle_reset: int  # quiet frames before an idle reset; 0: never
    keep: int  # conversation steps replayed after the prefix on a re-anchor
    pause: int
    soft_limit: int  # context fill at which a pause re-anchors
    hard_limit: int  # context fill at which a re-anchor is forced

    @classmethod
    def from_seconds(cls, context: int, prefix_steps: int, idle_reset_s: float, keep_s: float,
                     where: str = "persona") -> LifecyclePolicy:
        """The policy for a prefix of `prefix_steps`; ConfigError if prefix + keep do not fit."""
        keep = int(round(keep_s * FRAME_RATE))
        hard = context - 2  # the step after this one would wrap onto slot 0 (the prefix)
        soft = max(hard - int(SOFT_MARGIN_S * FRAME_RATE), 0)
        room = int(MIN_ROOM_S * FRAME_RATE)
        if prefix_steps + keep + room > soft:
            raise ConfigError(
                f"{where}: the prompt ({prefix_steps} steps) plus conversation.keep_s ({keep_s:g} s = "
                f"{keep} steps) leave less than {MIN_ROOM_S:g} s before a re-anchor is due at "
                f"{soft} of {context} steps: shorten the prompt or keep_s")
        return cls(context, int(round(idle_reset_s * FRAME_RATE)), keep,
                   int(round(PAUSE_S * FRAME_RATE)), soft, hard)


@dataclass
class LifecycleStats:
    """What the metrics, `ctl status` and play's report show."""

    reanchors: int = 0
    idle_resets: int = 0
    context_updates: int = 0
    failures: int = 0
    longest_fill: int = 0
    conversation_frames: int = 0  # frames since the conversation started (age)
    last_reanchor: float | None = None  # time.monotonic() of the last event of each kind
    last_idle_reset: float | None = None
    last_context_update: float | None = None
    reanchor_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class Lifecycle:
    """Resets and re-anchors one `Session`'s conversation; call `after_frame` once per frame."""

    def __init__(self, session: Session, policy: LifecyclePolicy,
                 on_event: Callable[[str, float], None] | None = None):
        self.session = session
        self.policy = policy
        self.stats = LifecycleStats()
        self.on_event = on_event  # (kind, milliseconds): the daemon's metrics
        self._quiet = 0
        self._spoke = False  # someone spoke since the context was last rebuilt
        self._pending: Persona | None = None  # live context waiting for a pause
        self._anchors: OrderedDict[str, Snapshot] = OrderedDict()  # by persona content hash
        session.lm.keep_history(policy.keep)

    def conversation_started(self) -> None:
        """A new conversation (persona start or switch): ages and counters of the run restart."""
        self._quiet = 0
        self._spoke = False
        self.stats.conversation_frames = 0
        self.session.lm.keep_history(self.policy.keep)

    # -- per frame ---------------------------------------------------------------------
    def after_frame(self, speaking: bool) -> str | None:
        """Account one stepped frame; returns the action taken ("reanchor", "idle_reset",
        "context") or None. `speaking`: the driver or the agent is speaking in this frame."""
        self.stats.conversation_frames += 1
        self._quiet = 0 if speaking else self._quiet + 1
        self._spoke = self._spoke or speaking
        fill = self.session.context_fill
        self.stats.longest_fill = max(self.stats.longest_fill, fill)
        p = self.policy
        in_pause = self._quiet >= p.pause
        if self._pending is not None and in_pause:
            return self._apply_context()
        if fill >= p.hard_limit or (fill >= p.soft_limit and in_pause):
            return self._reanchor()
        if p.idle_reset and self._quiet >= p.idle_reset and self._spoke:
            return self._idle_reset()
        return None

    # -- live context ------------------------------------------------------------------
    def update_context(self, persona: Persona) -> None:
        """Stand on `persona`'s prefix (its prompt with the head unit's facts) from the next
        pause on. Compiled then, unless a recent prefix with the same content is cached."""
        self._pending = persona

    def remember_anchor(self, persona: Persona, snap: Snapshot) -> None:
        """Cache an already compiled prefix (the persona's own, from its snapshot)."""
        self._anchors[persona.content_hash()] = snap

    @property
    def context_pending(self) -> bool:
        return self._pending is not None

    def _apply_context(self) -> str:
        t0 = time.perf_counter()
        persona, self._pending = self._pending, None
        assert persona is not None
        key = persona.content_hash()
        try:
            snap = self._anchors.get(key)
            if snap is None:
                snap = self.session.compile_anchor(persona)
                self._anchors[key] = snap
                while len(self._anchors) > ANCHOR_CACHE:  # bounded: prefixes are MBs on a 7B
                    self._anchors.popitem(last=False)
            self._anchors.move_to_end(key)
            self.session.set_anchor(snap)
            self.session.reanchor()
        except PpxError as exc:
            log.error("live context not applied (%s): the conversation keeps its prefix", exc)
            self._failed()
            self._fallback()
            return "context_failed"
        self._rebuilt()
        self.stats.context_updates += 1
        self.stats.last_context_update = time.monotonic()
        self._event("context", t0)
        return "context"

    # -- the two rebuilds --------------------------------------------------------------
    def _reanchor(self) -> str:
        t0 = time.perf_counter()
        try:
            self.session.reanchor()
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, never stop the drive
            log.error("re-anchor failed (%s: %s): falling back to an idle reset",
                      type(exc).__name__, exc)
            self._failed()
            self._fallback()
            return "reanchor_failed"
        ms = (time.perf_counter() - t0) * 1e3
        self._rebuilt()
        self.stats.reanchors += 1
        self.stats.reanchor_ms.append(ms)
        self.stats.last_reanchor = time.monotonic()
        self._event("reanchor", t0)
        log.info("re-anchored: persona prefix + %d steps replayed in %.0f ms (context %d of %d)",
                 len(self.session.lm.history), ms, self.session.context_fill, self.policy.context)
        return "reanchor"

    def _idle_reset(self) -> str:
        t0 = time.perf_counter()
        self.session.reanchor(rows=[])
        self._rebuilt(cleared=True)
        self.stats.idle_resets += 1
        self.stats.last_idle_reset = time.monotonic()
        self._event("idle_reset", t0)
        return "idle_reset"

    def _fallback(self) -> None:
        self.session.reanchor(rows=[])  # the anchor alone: what an idle reset restores
        self._rebuilt(cleared=True)
        self.stats.idle_resets += 1
        self.stats.last_idle_reset = time.monotonic()

    def _rebuilt(self, cleared: bool = False) -> None:
        """The context was rebuilt; `cleared`: down to the anchor alone (nothing said is left)."""
        if cleared:
            self._spoke = False
        self.stats.longest_fill = max(self.stats.longest_fill, self.session.context_fill)

    def _event(self, kind: str, t0: float) -> None:
        if self.on_event is not None:
            self.on_event(kind, (time.perf_counter() - t0) * 1e3)

    def _failed(self) -> None:
        self.stats.failures += 1
        if self.on_event is not None:
            self.on_event("failure", 0.0)

    def summary(self) -> str:
        s = self.stats
        return (f"conversation: {s.reanchors} re-anchors, {s.idle_resets} idle resets, "
                f"{s.context_updates} context updates, longest context {s.longest_fill} frames"
                f" of {self.policy.context}" + (f", {s.failures} failures" if s.failures else ""))
