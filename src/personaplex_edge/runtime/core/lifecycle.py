"""When a conversation that lasts the drive re-anchors and resets: the policy, and its counters.

PersonaPlex's temporal transformer attends over a ring of `context` steps (3000 = 240 s). Left
alone, step 3000 overwrites the first step of the persona's prompt and the co-pilot forgets who
it is, four minutes after ignition. `core.conversation.Conversation` applies this policy after
every frame: re-anchor in a pause once the context is within `SOFT_MARGIN_S` of full, and
regardless at the hard limit, one step before the ring would wrap; reset to the persona's prefix
after `idle_reset_s` of quiet. docs/conversations.md has the costs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from personaplex_edge.runtime.constants import FRAME_RATE
from personaplex_edge.runtime.errors import ConfigError

PAUSE_S = 0.5  # this much quiet from both sides is a pause
SOFT_MARGIN_S = 60.0  # re-anchor in a pause once the context is this close to full
MIN_ROOM_S = 20.0  # conversation a re-anchored context must still have room for


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
