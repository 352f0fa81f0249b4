"""Speech with pauses, its per-frame truth, and road noise at an SNR: for the VAD test and bench.

    clean, speech_only, raw = conversation(shipped_speech(), seed=1)  # 24 kHz, 80 ms frames
    truth = with_hangover(raw)                                # what "the driver speaks" means
    mic = noisy(clean, speech_only, snr_db=5.0, seed=0)

Labels, from the clean signal: each file's active level L is mix_at_snr's (RMS over the loudest
half of its 20 ms blocks). A 10 ms block is voiced if its RMS is at least L - 30 dB. An 80 ms
frame is speech if at least 2 of its 8 blocks are voiced (20 ms of speech); `with_hangover` then
holds the label for 3 more frames (240 ms), so the short gaps between words count as speech.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.audio.vad import Hangover
from personaplex_edge.runtime.constants import FRAME_SAMPLES, SAMPLE_RATE
from personaplex_edge.sim.noise import mix_at_snr, road_noise
from personaplex_edge.sim.shipped import driver_wav, speech_wav

EXPORT_DATA = Path(__file__).resolve().parents[1] / "export" / "data"  # package data, installed


def shipped_speech() -> list[Path]:
    """All the speech the repository ships (espeak-ng voices; see export/data/calib/README.md):
    tests/data's two files, then the export's calibration clips and its synthetic voice."""
    return [speech_wav(), driver_wav(), *sorted((EXPORT_DATA / "calib").glob("*.wav")),
            EXPORT_DATA / "synth_voice.wav"]


VOICED_BELOW_ACTIVE_DB = 30.0
MIN_VOICED_BLOCKS = 2  # of the 8 10-ms blocks of a frame
LABEL_HANGOVER = 3  # frames


def active_level(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """mix_at_snr's speech level: RMS over the loudest half of 20 ms blocks."""
    block = int(0.02 * rate)
    e = np.sort(np.mean(x[: len(x) // block * block].astype(np.float64).reshape(-1, block) ** 2,
                        axis=1))
    return float(np.sqrt(np.mean(e[len(e) // 2:])))


def frame_labels(x: np.ndarray, level: float) -> np.ndarray:
    """Raw per-frame speech labels (no hangover) of a clean, frame-aligned 24 kHz signal."""
    block = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(x.astype(np.float64).reshape(-1, block) ** 2, axis=1))
    voiced = rms >= level * 10 ** (-VOICED_BELOW_ACTIVE_DB / 20)
    return voiced.reshape(-1, FRAME_SAMPLES // block).sum(axis=1) >= MIN_VOICED_BLOCKS


def with_hangover(raw: np.ndarray, frames: int = LABEL_HANGOVER) -> np.ndarray:
    hold = Hangover(frames)
    return np.array([hold.step(bool(r)) for r in raw], bool)


def conversation(files: list[Path], seed: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The files end to end after 0.96 s of silence, each followed by a seeded 0.5-3 s pause.
    -> (clean signal, the speech alone, raw labels per frame); frame-aligned, 24 kHz float32."""
    rng = np.random.default_rng(seed)
    parts, speech_only, labels = [], [], []

    def add(x: np.ndarray, level: float | None) -> None:
        x = np.concatenate([x, np.zeros(-len(x) % FRAME_SAMPLES, np.float32)])
        parts.append(x)
        labels.append(frame_labels(x, level) if level else np.zeros(len(x) // FRAME_SAMPLES, bool))

    add(np.zeros(FRAME_SAMPLES * 12, np.float32), None)
    for path in files:
        x = read_audio(path)  # mono float32 at 24 kHz
        speech_only.append(x)
        add(x, active_level(x))
        add(np.zeros(int(rng.uniform(0.5, 3.0) * SAMPLE_RATE), np.float32), None)
    return np.concatenate(parts), np.concatenate(speech_only), np.concatenate(labels)


def noisy(clean: np.ndarray, speech_only: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """`clean` plus road noise at `snr_db` over the speech's active level (inf: `clean`). The
    level is measured on the speech alone, so the pauses do not make the noise quieter."""
    if np.isinf(snr_db):
        return clean
    noise = road_noise(len(clean) / SAMPLE_RATE, SAMPLE_RATE, seed=seed)
    scaled = mix_at_snr(speech_only, noise, snr_db)  # mix_at_snr's gain for the speech alone
    ref = np.resize(noise, len(speech_only))
    gain = np.sqrt(np.mean(scaled.astype(np.float64) ** 2)) / np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    return (clean + gain * noise).astype(np.float32)


def scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Frame-level (precision, recall, F1) of boolean decisions against boolean truth."""
    tp = float(np.sum(pred & truth))
    p = tp / max(float(pred.sum()), 1.0)
    r = tp / max(float(truth.sum()), 1.0)
    return p, r, 2 * p * r / max(p + r, 1e-9)
