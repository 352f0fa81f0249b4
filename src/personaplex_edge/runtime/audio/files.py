"""Audio files in and out: any rate and channel count in, 24 kHz mono float32 for the model.

Reading uses libsndfile (WAV, FLAC, OGG/Vorbis, ...), downmixes by averaging
channels and resamples with soxr at its high-quality setting. Writing is
atomic (temporary name, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.constants import SAMPLE_RATE
from personaplex_edge.runtime.errors import PpxError


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    if rate_in == rate_out:
        return audio.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(audio, rate_in, rate_out, quality="HQ").astype(np.float32)


def read_audio(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `rate`; a clear error for a missing, unreadable or empty file."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise PpxError(f"{path}: audio file not found")
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise PpxError(f"{path}: unreadable audio ({exc})") from None
    if data.shape[0] == 0:
        raise PpxError(f"{path}: audio file is empty")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(mono, int(file_rate), rate)


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV, written under a temporary name and renamed into place."""
    import soundfile as sf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        sf.write(str(tmp), np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except OSError as exc:
        raise PpxError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def frames(audio: np.ndarray, frame_samples: int) -> np.ndarray:
    """Cut into whole frames [N, frame_samples], zero-padding the last partial frame (as upstream)."""
    n = -(-len(audio) // frame_samples)
    padded = np.zeros(n * frame_samples, np.float32)
    padded[: len(audio)] = audio
    return padded.reshape(n, frame_samples)
