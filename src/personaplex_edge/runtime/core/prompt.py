"""The system-prompt prefix PersonaPlex steps through before it hears the user.

In order (upstream `step_system_prompts`), every stream forced:
  1. the voice prompt: each frame of the voice audio, Mimi-encoded, on the agent
     audio streams (text = padding, user = the sine frame's tokens); a released
     preset instead carries the per-step input embeddings and the token ring;
  2. 0.5 s of silence (agent = silence tokens);
  3. the text prompt "<system> {prompt} <system>", one SentencePiece token per frame;
  4. 0.5 s of silence again.
Because every token is known in advance, the whole prefix runs as one batched
prefill; `prefix_rows` turns it into the temporal transformer's input rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from personaplex_edge.runtime.constants import FRAME_RATE, TEXT_PADDING_ID
from personaplex_edge.runtime.core.lm_state import LMState

SILENCE_FRAMES = int(0.5 * FRAME_RATE)  # 6
# A prompt leaving less than this share of the context is accepted with a warning. What is
# left is all the conversation the model can attend to before the ring would overwrite the
# prompt (or re-anchoring must replay it): under 10% (24 s of the 7B's 240 s) the model keeps
# barely a turn or two, and a re-anchor is due every few seconds.
MIN_ROOM_SHARE = 0.10


@dataclass(frozen=True)
class ForcedFrame:
    text: int
    agent: tuple[int, ...]
    user: tuple[int, ...]


@dataclass(frozen=True)
class VoicePreset:
    """A released voice preset: per-step input embeddings [N-1, dim] and the token ring after it."""

    embeddings: np.ndarray
    ring: np.ndarray


def wrap_system(prompt: str) -> str:
    cleaned = prompt.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


def prompt_frames(voice_codes: np.ndarray | None, text_tokens: Sequence[int], silence: Sequence[int],
                  sine: Sequence[int]) -> list[ForcedFrame]:
    """Frames after the voice phase is (optionally) given as codes [N, 8]."""
    frames: list[ForcedFrame] = []
    silence_t, sine_t = tuple(int(t) for t in silence), tuple(int(t) for t in sine)
    if voice_codes is not None:
        frames += [ForcedFrame(TEXT_PADDING_ID, tuple(int(t) for t in row), sine_t) for row in voice_codes]
    frames += [ForcedFrame(TEXT_PADDING_ID, silence_t, sine_t)] * SILENCE_FRAMES
    frames += [ForcedFrame(int(tok), silence_t, sine_t) for tok in text_tokens]
    frames += [ForcedFrame(TEXT_PADDING_ID, silence_t, sine_t)] * SILENCE_FRAMES
    return frames


def prefix_rows(state: LMState, frames: Sequence[ForcedFrame]) -> list[np.ndarray]:
    """Step `state` through fully forced frames; returns the temporal input row of each model step.

    Nothing is sampled: every target is provided, so commit() keeps the forced tokens.
    """
    rows: list[np.ndarray] = []
    for frame in frames:
        step = state.next_input(user=frame.user, agent=frame.agent, text=frame.text)
        if step is None:
            continue
        rows.append(step.tokens)
        state.commit(step.text_target, step.audio_targets)
    return rows


def context_warning(prompt_steps: int, context: int) -> str | None:
    """Why a prefix of `prompt_steps` leaves too little of `context`, or None if it does not."""
    room = context - prompt_steps
    if room >= MIN_ROOM_SHARE * context:
        return None
    return (f"the system prompt takes {prompt_steps} of the model's {context} context steps, "
            f"leaving {room} ({room / FRAME_RATE:.1f} s) for the conversation, under "
            f"{MIN_ROOM_SHARE:.0%} of the context: shorten the prompt or the voice prompt")
