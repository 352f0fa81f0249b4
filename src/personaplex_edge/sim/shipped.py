"""Where the virtual cabin finds the audio the repository ships (tests/data): speech and IRs.

The files live in the source checkout's tests/data, not in the installed package: the tests and
the benchmarks use them too. `data_dir()` looks, in order, at $PPX_SIM_DATA, then upward from this
file (an editable install or a checkout on PYTHONPATH), then upward from the working directory,
for a folder tests/data holding speech_24k.wav, and says in one line what to do if none has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATA_ENV = "PPX_SIM_DATA"
_MARKER = "speech_24k.wav"


def data_dir() -> Path:
    """The folder of the shipped test audio (see the module docstring for where it looks)."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env)
        if not (path / _MARKER).is_file():
            raise FileNotFoundError(f"{DATA_ENV}={env}: no {_MARKER} there")
        return path
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            candidate = folder / "tests" / "data"
            if (candidate / _MARKER).is_file():
                return candidate
    raise FileNotFoundError(f"the shipped test audio (tests/data/{_MARKER}) is not found: run "
                            f"from a source checkout or set {DATA_ENV} to its tests/data")


def speech_wav() -> Path:
    """The agent's voice: tests/data/speech_24k.wav."""
    return data_dir() / "speech_24k.wav"


def driver_wav() -> Path:
    """The driver's questions: tests/data/driver_questions_24k.wav."""
    return data_dir() / "driver_questions_24k.wav"


def speech(rate: int = 24000, seconds: float | None = None) -> np.ndarray:
    """The shipped test speech as float32 mono at `rate` (optionally the first `seconds`)."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(speech_wav()), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    if seconds is not None:
        x = x[: int(seconds * sr)]
    if rate != sr:
        x = soxr.resample(x, sr, rate, quality="VHQ").astype(np.float32)
    return x
