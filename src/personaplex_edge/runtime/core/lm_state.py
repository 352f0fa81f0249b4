"""Token bookkeeping of the LM for one conversation (batch 1): PersonaPlex's `LMGen`.

Pure numpy, no inference: the backend runs the graphs, this class says what to
feed them and keeps the delayed token streams.

Streams: 0 = text, 1..A = agent audio codebooks, A+1..n_q = user audio
codebooks (A = 8 for PersonaPlex). Stream k is *delayed* by `delays[k]` steps:
the token given or generated for frame f sits in ring column f + delays[k].

One call = one 80 ms frame, in two halves:

1. ``next_input(user=..., agent=..., text=...)`` writes the tokens the caller
   provides for this frame (the user's Mimi codes; during prompts also the
   agent audio and the text) at their delayed columns, and returns what the
   graphs need: the model input row (column ``offset - 1``) and the forced
   targets of column ``offset`` (text, and per depth step the audio token with
   a mask). On the very first call nothing can be predicted yet: it returns
   None and the caller skips the model (PersonaPlex does the same).
2. ``commit(text_token, audio_tokens)`` stores the sampled tokens in column
   ``offset`` where nothing was provided, advances, and returns the undelayed
   frame ``[text, audio_0 .. audio_{dep_q-1}]`` once ``offset > max_delay``
   (None before, as upstream).

The temporal transformer position of the pending step is ``offset - 1`` until the context
is re-anchored (then the transformer's own offset counts). Columns at or before a stream's delay hold the initial
token (text_card for text, card for audio). -2 marks an unwritten slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personaplex_edge.runtime.constants import UNGENERATED_TOKEN


@dataclass(frozen=True)
class StepInput:
    """What one model step needs; arrays are int64 / bool numpy vectors."""

    tokens: np.ndarray  # [n_q + 1] temporal input row
    text_forced: bool
    text_target: int  # meaningful when text_forced
    audio_targets: np.ndarray  # [dep_q] forced depformer tokens (meaningful where masked)
    audio_force_mask: np.ndarray  # [dep_q]

    def text_token(self, sampled: int) -> int:
        """The text token the depformer must see: the forced one, else the sampled one."""
        return self.text_target if self.text_forced else int(sampled)


class LMState:
    def __init__(self, delays: Sequence[int], dep_q: int, text_card: int, card: int,
                 agent_codebooks: int | None = None):
        self.delays = np.asarray(delays, dtype=np.int64)
        self.num_streams = len(self.delays)
        self.dep_q = dep_q
        self.agent_codebooks = (self.num_streams - 1) // 2 if agent_codebooks is None else agent_codebooks
        self.max_delay = int(self.delays.max())
        # Live columns span offset - max_delay (output) .. offset + max_delay (provided ahead).
        self.capacity = 2 * self.max_delay + 2
        self.initial = np.full(self.num_streams, card, dtype=np.int64)
        self.initial[0] = text_card
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any) -> LMState:
        """From any object with LMConfig's fields (delays, dep_q, text_card, card)."""
        return cls(cfg.delays, cfg.dep_q, cfg.text_card, cfg.card)

    def reset(self) -> None:
        self.offset = 0
        self.tokens = np.full((self.num_streams, self.capacity), UNGENERATED_TOKEN, dtype=np.int64)
        self.provided = np.zeros((self.num_streams, self.capacity), dtype=bool)

    # -- first half: inputs -------------------------------------------------------
    def next_input(self, user: Sequence[int] | None = None, agent: Sequence[int] | None = None,
                   text: int | None = None) -> StepInput | None:
        """Provide this frame's known tokens; returns the model step's inputs (None on call 0)."""
        a = self.agent_codebooks
        if user is not None:
            self._provide(range(1 + a, self.num_streams), user)
        if agent is not None:
            self._provide(range(1, 1 + a), agent)
        if text is not None:
            self._provide([0], [text])
        early = self.offset <= self.delays
        col = self.offset % self.capacity
        self.tokens[early, col] = self.initial[early]
        self.provided[early, col] = True
        if self.offset == 0:
            self.offset = 1
            return None
        target = self.offset % self.capacity
        audio = slice(1, 1 + self.dep_q)
        return StepInput(
            tokens=self.tokens[:, (self.offset - 1) % self.capacity].copy(),
            text_forced=bool(self.provided[0, target]),
            text_target=int(self.tokens[0, target]),
            audio_targets=self.tokens[audio, target].copy(),
            audio_force_mask=self.provided[audio, target].copy(),
        )

    def provide_user(self, user: Sequence[int]) -> None:
        """Provide this frame's user tokens after `next_input` (before `commit`).

        The temporal input row never holds the current frame's user tokens (they
        enter the transformer one step later), so the user's audio can be encoded
        while the model runs. Only depth steps past the agent's codebooks would
        see the difference, and the agent-only depformer has none."""
        if self.offset == 0:
            raise RuntimeError("provide_user() needs a pending step (call next_input first)")
        self._provide(range(1 + self.agent_codebooks, self.num_streams), user)

    def _provide(self, streams: Sequence[int], values: Sequence[int]) -> None:
        streams = list(streams)
        if len(values) != len(streams):
            raise ValueError(f"expected {len(streams)} tokens, got {len(values)}")
        for k, value in zip(streams, values, strict=True):
            col = (self.offset + int(self.delays[k])) % self.capacity
            self.tokens[k, col] = int(value)
            self.provided[k, col] = True

    # -- second half: results -----------------------------------------------------
    def commit(self, text_token: int, audio_tokens: Sequence[int]) -> np.ndarray | None:
        """Store this step's sampled tokens (forced ones win) and advance.

        `audio_tokens` may cover only the first depth steps (a depformer built with
        fewer steps) if the remaining streams were provided.
        Returns int64 [dep_q + 1]: text then audio of frame offset - max_delay.
        """
        if self.offset == 0:
            raise RuntimeError("commit() before next_input()")
        self.provided[:, (self.offset - 1) % self.capacity] = False
        col = self.offset % self.capacity
        generated = [int(text_token)] + [int(t) for t in audio_tokens]
        for k in range(1 + self.dep_q):
            if self.provided[k, col]:
                continue
            if k >= len(generated):
                raise ValueError(f"stream {k} was neither generated nor provided")
            self.tokens[k, col] = generated[k]
        frame = None
        if self.offset > self.max_delay:
            cols = (self.offset - self.max_delay + self.delays[: 1 + self.dep_q]) % self.capacity
            frame = self.tokens[np.arange(1 + self.dep_q), cols].copy()
        self.offset += 1
        return frame

    # -- voice presets --------------------------------------------------------------
    def load_tokens(self, saved: np.ndarray) -> None:
        """Adopt a token ring saved by PersonaPlex after a voice prompt ([n_q + 1, R] or
        [1, n_q + 1, R], column c holding frame column c mod R) at the current offset.

        PersonaPlex replays a preset's P embedding rows as P model steps, each after
        ``next_input(user=initial, agent=initial, text=3)`` (the first frame calls it
        twice, as call 0 only primes the ring) and a commit; then it restores the
        ring saved with the preset: call this then."""
        saved = np.asarray(saved, dtype=np.int64).reshape(self.num_streams, -1)
        for c in range(self.offset - self.max_delay - 1, self.offset + self.max_delay + 1):
            if c >= 0:
                self.tokens[:, c % self.capacity] = saved[:, c % saved.shape[1]]
