"""Measurement taps on the daemon's audio, off unless their environment variable is set.

- PPX_DEBUG_MODEL_INPUT=FILE: every frame the model hears (24 kHz mono: after echo
  cancellation and resampling, mute applied) is appended to FILE as raw float32, little-endian.
- PPX_DEBUG_AGENT_WAV=FILE: the speaker plays this audio file (looped, at 24 kHz) instead of
  the agent's voice; the model runs and decides as ever (turn limit, pause, ducking included).
- PPX_DEBUG_LATENCY_PROBE=1: the speaker plays silence, except that a frame whose input (what the
  model heard) has a peak at or above -12 dBFS gets a click (one sample at -6 dBFS) at the
  same place in its reply as the peak had in the frame. The model runs as ever on every frame.
  A click at the mic then comes out of the speaker one mic-to-speaker latency later, the delay
  a model that echoed its input would have (bench/bench_latency.py; in a car: a clap at the
  mic, both recorded by one recorder). The agent's own voice is left out because it would
  hide the click, and a frame swapped for a click amid speech would add edges that look like
  one.

With a known far end and the model's input on file, the echo canceller can be measured where it
runs: in the car, or in tests/test_echo_alsa.py's virtual cabin. Not for normal service: set
them for a measurement run only (e.g. `systemctl edit` with Environment=, then remove it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.errors import ConfigError, PpxError

MODEL_INPUT_ENV = "PPX_DEBUG_MODEL_INPUT"
AGENT_WAV_ENV = "PPX_DEBUG_AGENT_WAV"
LATENCY_PROBE_ENV = "PPX_DEBUG_LATENCY_PROBE"
PROBE_THRESHOLD = 10 ** (-12 / 20)  # a peak this high in a frame heard is the click
PROBE_CLICK = 0.5  # the click in the reply, -6 dBFS: under the output stage's limiter

log = logging.getLogger("personaplex.daemon")


class DebugAudio:
    def __init__(self, model_input: Path | None = None, agent_wav: Path | None = None,
                 latency_probe: bool = False) -> None:
        self._tap: BinaryIO | None = None
        self._agent: np.ndarray | None = None
        self._pos = 0
        self._probe = latency_probe
        try:
            if agent_wav is not None:
                self._agent = read_audio(agent_wav)
            if model_input is not None:
                self._tap = open(model_input, "ab")  # noqa: SIM115 - closed in close()
        except (PpxError, OSError) as exc:  # a measurement that cannot run: say so, exit 78
            raise ConfigError(f"debug audio: {exc}") from None
        for name, value in ((MODEL_INPUT_ENV, model_input), (AGENT_WAV_ENV, agent_wav),
                            (LATENCY_PROBE_ENV, "1" if latency_probe else None)):
            if value is not None:
                log.warning("debug: %s=%s is set (a measurement run, not normal service)",
                            name, value)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DebugAudio:
        env = os.environ if env is None else env
        paths = [Path(env[k]) if env.get(k) else None for k in (MODEL_INPUT_ENV, AGENT_WAV_ENV)]
        probe = env.get(LATENCY_PROBE_ENV, "")
        if probe not in ("", "0", "1"):
            raise ConfigError(f"debug audio: {LATENCY_PROBE_ENV}={probe!r}: 1 (on) or 0 (off)")
        return cls(*paths, latency_probe=probe == "1")

    def heard(self, frame: np.ndarray) -> None:
        """The frame the model is about to hear."""
        if self._tap is not None:
            self._tap.write(np.asarray(frame, "<f4").tobytes())

    def speaker(self, heard: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        """What the speaker gets for the reply `pcm` to the frame `heard`."""
        if not self._probe:
            return self.agent(pcm)
        out = np.zeros_like(pcm)
        peak = int(np.argmax(np.abs(heard)))
        if abs(float(heard[peak])) >= PROBE_THRESHOLD:
            out[peak] = PROBE_CLICK  # where it was in the frame: every sample is delayed alike
        return out

    def agent(self, pcm: np.ndarray) -> np.ndarray:
        """What the speaker gets for this frame: the agent's pcm, or the debug file's next part."""
        if self._agent is None:
            return pcm
        n, x = len(pcm), self._agent
        idx = (self._pos + np.arange(n)) % len(x)
        self._pos = (self._pos + n) % len(x)
        return x[idx]

    def close(self) -> None:
        if self._tap is not None:
            self._tap.close()
            self._tap = None
