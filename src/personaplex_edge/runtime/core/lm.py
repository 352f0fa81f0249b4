"""The language model for one conversation: token state machine + temporal + depformer.

`LMEngine.step` is one 80 ms frame: the state machine says what to feed, the
temporal transformer runs one step (text sampled in its graph), the depformer
runs its depth steps (audio sampled in its graph, forced tokens honoured), and
the state machine stores the results and returns the undelayed frame.
Sampling noise (exponential race) comes from a seeded numpy generator, so a
seeded conversation is reproducible; greedy mode is top-k 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from personaplex_edge.runtime.core.lm_state import LMState, StepInput
from personaplex_edge.runtime.core.manifest import Manifest
from personaplex_edge.runtime.core.network import Network
from personaplex_edge.runtime.core.persona import Sampling


@dataclass(frozen=True)
class LMShape:
    """The LM facts the runtime needs, read from the build manifest."""

    dim: int
    text_card: int
    card: int
    dep_q: int
    delays: tuple[int, ...]
    context: int
    dep_steps: int  # depth steps the depformer graph runs (the rest are always provided)

    @staticmethod
    def from_manifest(manifest: Manifest) -> LMShape:
        lm = manifest.model["lm"]
        steps = int(manifest.graph("depformer").meta.get("steps", lm["dep_q"]))
        return LMShape(lm["dim"], lm["text_card"], lm["card"], lm["dep_q"], tuple(lm["delays"]), lm["context"],
                       steps)


class SamplingInputs:
    """Per-step sampling tensors: settings fixed per persona, noise drawn per step.

    Each stream is greedy on its own (`greedy`, or its temperature 0): it then gets top-k 1
    and temperature 1, so the graph never divides logits by zero, and no noise is drawn."""

    def __init__(self, sampling: Sampling, shape: LMShape, seed: int | None):
        self.text_greedy, self.audio_greedy = sampling.text_greedy, sampling.audio_greedy
        self.rng = np.random.default_rng(seed)
        self.text = {
            "text_temperature": np.array([1.0 if self.text_greedy else sampling.text_temperature],
                                         np.float32),
            "text_top_k": np.array([1 if self.text_greedy else sampling.text_top_k], np.int64),
        }
        self.audio = {
            "temperature": np.array([1.0 if self.audio_greedy else sampling.audio_temperature],
                                    np.float32),
            "top_k": np.array([1 if self.audio_greedy else sampling.audio_top_k], np.int64),
        }
        # Greedy (and fully forced) steps need no randomness: constant noise keeps argmax.
        self._text_ones = np.ones((1, shape.text_card), np.float32)
        self._audio_ones = np.ones((shape.dep_steps, shape.card), np.float32)

    def text_noise(self, needed: bool = True) -> np.ndarray:
        if self.text_greedy or not needed:
            return self._text_ones
        return self.rng.standard_exponential(self._text_ones.shape, dtype=np.float32)

    def audio_noise(self) -> np.ndarray:
        if self.audio_greedy:
            return self._audio_ones
        return self.rng.standard_exponential(self._audio_ones.shape, dtype=np.float32)


class LMEngine:
    def __init__(self, temporal: Network, depformer: Network, shape: LMShape):
        self.temporal = temporal
        self.depformer = depformer
        self.shape = shape
        self.state = LMState(shape.delays, shape.dep_q, shape.text_card, shape.card)
        self.sampling: SamplingInputs | None = None
        # The temporal input row of the last step, as really fed (None: no model step ran):
        # the conversation keeps them for re-anchoring.
        self.last_input: np.ndarray | None = None

    def set_sampling(self, sampling: Sampling, seed: int | None) -> None:
        self.sampling = SamplingInputs(sampling, self.shape, seed)

    def reset(self) -> None:
        self.state.reset()
        self.temporal.reset()
        self.last_input = None

    def step(self, user: Sequence[int] | Callable[[], Sequence[int]] | None = None,
             agent: Sequence[int] | None = None, text: int | None = None) -> np.ndarray | None:
        """One frame. Returns [text, audio_0..audio_{dep_q-1}] of the undelayed frame, or None.

        `user` may be a callable (e.g. a pending Mimi encode): with the agent-only
        depformer it is only resolved after the model ran, so the two overlap."""
        assert self.sampling is not None, "set_sampling() first"
        late_user = callable(user) and self.state.offset > 0 and self.agent_only
        if callable(user) and not late_user:
            user = user()
        step = self.state.next_input(user=None if late_user else user, agent=agent, text=text)
        self.last_input = None if step is None else step.tokens
        if step is None:
            return None
        text_token, audio_tokens = self._run_model(step)
        if late_user:
            self.state.provide_user(user())
        return self.state.commit(text_token, audio_tokens)

    @property
    def agent_only(self) -> bool:
        """The depformer predicts no user codebook (the user's tokens are never an input to it)."""
        return self.shape.dep_steps <= self.state.agent_codebooks

    def _run_model(self, step: StepInput) -> tuple[int, np.ndarray]:
        s = self.sampling
        out = self.temporal.run("temporal_step", {
            "tokens": step.tokens[None, :],
            "text_noise": s.text_noise(needed=not step.text_forced),
            **s.text,
        })
        text_token = step.text_token(int(out["text_token"][0]))
        n = self.shape.dep_steps
        if step.audio_force_mask[:n].all():
            return text_token, step.audio_targets  # nothing to sample: skip the depformer
        dep = self.depformer.run("depformer", {
            "hidden": out["hidden"],
            "text_token": np.array([text_token], np.int64),
            "noise": s.audio_noise(),
            "forced_tokens": step.audio_targets[:n],
            "force_mask": step.audio_force_mask[:n],
            **s.audio,
        })
        return text_token, dep["audio_tokens"]

    def prefill(self, rows: Sequence[np.ndarray], embeddings: np.ndarray | None = None,
                max_steps: int | None = None) -> None:
        """Run forced input rows (and optional extra embeddings) through the prefill graph in chunks."""
        if not rows:
            return
        tokens = np.stack(rows)[None].astype(np.int64)
        extra = np.zeros((1, len(rows), self.shape.dim), np.float32)
        if embeddings is not None:
            extra[0, : len(embeddings)] = embeddings
        chunk = max_steps or len(rows)
        for start in range(0, len(rows), chunk):
            self.temporal.run("temporal_prefill", {
                "tokens": tokens[:, start:start + chunk],
                "embeddings": extra[:, start:start + chunk],
            })
