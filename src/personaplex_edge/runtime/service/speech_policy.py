"""In-car speech policy: when the agent is heard, held quiet or ducked.

- mute: the model hears silence (the cabin microphone is off);
- pause (e.g. navigation speaking) and a busy driver with `when_busy: pause`: the agent is
  forced silent - the model knows it stayed quiet - and the speaker fades out;
  `when_busy: duck` lowers the speaker instead;
- `max_turn_seconds`: a monologue longer than this is faded and the agent forced silent for a
  moment.

The head unit sets the flags from control threads; the frame loop reads them once per frame.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from personaplex_edge.runtime.constants import FRAME_RATE
from personaplex_edge.runtime.core.persona import Persona

log = logging.getLogger("personaplex.daemon")

SPEAKING_RMS = 10 ** (-50 / 20)  # output above -50 dBFS counts as the agent speaking
TURN_COOLDOWN_FRAMES = int(1.5 * FRAME_RATE)
TURN_END_QUIET_FRAMES = int(1.0 * FRAME_RATE)


@dataclass(frozen=True)
class FrameRules:
    """What one frame does, decided at its start."""

    muted: bool  # the model hears silence
    hold: bool  # the agent is forced silent and the speaker fades out
    duck_db: float  # speaker attenuation (0: none)


class SpeechPolicy:
    """The head unit's flags and the turn limit, for one frame loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.muted = self.paused = self.busy = False
        self._speaking_frames = 0
        self._quiet_frames_left = 0
        self._quiet_run = 0

    def set(self, *, muted: bool | None = None, paused: bool | None = None,
            busy: bool | None = None) -> None:
        """Control threads: change a flag; it applies from the next frame."""
        with self._lock:
            self.muted = self.muted if muted is None else bool(muted)
            self.paused = self.paused if paused is None else bool(paused)
            self.busy = self.busy if busy is None else bool(busy)

    def rules(self, persona: Persona) -> FrameRules:
        with self._lock:
            muted, paused, busy = self.muted, self.paused, self.busy
        when_busy = persona.speech.when_busy
        hold = paused or (busy and when_busy == "pause") or self._quiet_frames_left > 0
        duck = persona.speech.duck_gain_db if busy and when_busy == "duck" else 0.0
        return FrameRules(muted, hold, duck)

    def new_conversation(self) -> None:
        self._speaking_frames = self._quiet_frames_left = 0

    def after_frame(self, persona: Persona, pcm: np.ndarray, held: bool) -> None:
        """Count the agent's turn; past `max_turn_seconds` the next frames hold it quiet."""
        limit = persona.speech.max_turn_seconds
        if self._quiet_frames_left > 0:
            self._quiet_frames_left -= 1
            return
        speaking = not held and float(np.sqrt(np.mean(pcm * pcm))) > SPEAKING_RMS
        # A turn ends after a second of quiet, not at the first pause between words.
        self._quiet_run = 0 if speaking else self._quiet_run + 1
        if speaking:
            self._speaking_frames += 1
        elif self._quiet_run >= TURN_END_QUIET_FRAMES:
            self._speaking_frames = 0
        if limit > 0 and self._speaking_frames > limit * FRAME_RATE:
            log.info("turn longer than %.0f s: fading the agent out", limit)
            self._speaking_frames = 0
            self._quiet_frames_left = TURN_COOLDOWN_FRAMES

    def flags(self) -> list[str]:
        return [name for name, on in (("muted", self.muted), ("paused", self.paused),
                                      ("busy", self.busy)) if on]
