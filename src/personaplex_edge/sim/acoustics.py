"""A virtual car cabin for echo-cancellation tests and benchmarks: speaker, driver, road, mic.

    scene = cabin_scene(rate=48000, seconds=10.0, driver_from_s=4.0, nonlinear=True, snr_db=10)
    out = canceller(scene.far, scene.mic)          # anything that takes reference + mic
    erle_db(scene.echo, out, scene.far_active)     # and the metrics below

What reaches the microphone (all at one `rate`):

    echo   = IR_speaker * loudspeaker(far delayed by the playback path)
    driver = IR_driver * driver's speech
    noise  = road noise (sim.noise) at `snr_db` below the driver's active level
    mic    = echo + driver + noise

The impulse responses are the shipped tests/data/cabin_ir_*_48k.wav (found by sim.shipped), made by
scripts/make_cabin_irs.py (pyroomacoustics, a 2.5 x 1.5 x 1.2 m cabin; that script is the only
user of pyroomacoustics). The far end (the agent's voice) is tests/data/speech_24k.wav, the
driver is tests/data/driver_questions_24k.wav, both looped to length.

Levels follow an open-speaker cabin: the agent plays near full scale, the speaker is closer to
the overhead microphone than the driver is loud, so the echo's active level at the mic
(-20 dBFS by default) is 6 dB above the driver's (-26 dBFS): the canceller has to take out
more than the driver puts in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personaplex_edge.sim.noise import mix_at_snr, road_noise
from personaplex_edge.sim.shipped import data_dir, driver_wav, speech_wav

IR_RATE = 48000
IRS = ("door", "dash", "driver")
BLOCK_S = 0.02  # level and metric block: 20 ms, as mix_at_snr measures


def _read(path: Path, rate: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != rate:
        x = soxr.resample(x, sr, rate, quality="VHQ").astype(np.float32)
    return x


def load_ir(name: str, rate: int = IR_RATE) -> np.ndarray:
    """A shipped cabin impulse response ("door", "dash" or "driver") at `rate`, float64."""
    if name not in IRS:
        raise ValueError(f"no cabin IR {name!r}: one of {', '.join(IRS)}")
    return _read(data_dir() / f"cabin_ir_{name}_48k.wav", rate).astype(np.float64)


def looped(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // max(len(x), 1))
    return np.tile(x, reps)[:n]


def agent_speech(rate: int, seconds: float) -> np.ndarray:
    """The far end: the agent's voice, peak -1 dBFS, looped to `seconds`."""
    x = _read(speech_wav(), rate)
    x = 0.89 * x / np.abs(x).max()
    return looped(x, int(round(seconds * rate))).astype(np.float32)


def driver_speech(rate: int, seconds: float) -> np.ndarray:
    """The near end: the driver's questions (unit peak), looped to `seconds`."""
    x = _read(driver_wav(), rate)
    return looped(x / np.abs(x).max(), int(round(seconds * rate))).astype(np.float32)


def loudspeaker(x: np.ndarray, drive: float = 1.5, even: float = 0.15) -> np.ndarray:
    """A small car speaker driven hard: memoryless soft clipping with a mild even-order term.

    y = tanh(drive * (x + even * x^2)) / drive. Near full scale this compresses peaks by
    2-3 dB and adds about 5 % distortion (2nd and 3rd harmonics); at -20 dBFS it is nearly
    linear. A linear echo canceller cannot model it: it shows as residual echo."""
    x = np.asarray(x, np.float64)
    return (np.tanh(drive * (x + even * x * x)) / drive).astype(np.float32)


def active_rms(x: np.ndarray, rate: int) -> float:
    """RMS over the loudest half of 20 ms blocks (mix_at_snr's speech level)."""
    block = int(BLOCK_S * rate)
    n = len(x) // block * block
    energies = np.sort(np.mean(np.asarray(x[:n], np.float64).reshape(-1, block) ** 2, axis=1))
    return float(np.sqrt(np.mean(energies[len(energies) // 2:]))) if len(energies) else 0.0


def convolve(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Linear convolution cut to len(x) (FFT; float64 inside)."""
    n = len(x) + len(ir) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    return y.astype(np.float32)


def _db_gain(x: np.ndarray, rate: int, dbfs: float) -> float:
    return 10 ** (dbfs / 20) / (active_rms(x, rate) + 1e-12)


@dataclass
class Scene:
    rate: int
    far: np.ndarray  # the reference the canceller gets (what was written to the speaker)
    echo: np.ndarray  # the far end as the mic hears it
    driver: np.ndarray  # the driver as the mic hears it (the clean target)
    noise: np.ndarray  # road noise at the mic
    mic: np.ndarray  # echo + driver + noise
    far_active: np.ndarray  # per 20 ms block: the echo is above -40 dB re its active level
    driver_active: np.ndarray  # per 20 ms block: the driver is above -30 dB re his active level

    @property
    def block(self) -> int:
        return int(BLOCK_S * self.rate)


def cabin_scene(rate: int = 48000, seconds: float = 10.0, *, speaker: str = "door",
                far: np.ndarray | None = None, driver_from_s: float | None = None,
                echo_dbfs: float = -20.0, driver_dbfs: float = -26.0,
                snr_db: float | None = None, nonlinear: bool = False, delay_ms: float = 40.0,
                seed: int = 0) -> Scene:
    """The mic signal of the virtual cabin, with its parts.

    speaker: which echo path ("door" or "dash"). far: the reference (default: the agent's
    voice for `seconds`). driver_from_s: the driver speaks from then on (None: single talk).
    snr_db: road noise this far below the driver's active level (None: no noise).
    nonlinear: the loudspeaker model in the echo path. delay_ms: the playback path between the
    reference and the speaker (ALSA buffer, DAC), on top of the acoustic delay in the IR."""
    n = int(round(seconds * rate))
    far = agent_speech(rate, seconds) if far is None else np.asarray(far, np.float32)[:n]
    played = loudspeaker(far) if nonlinear else far
    lag = int(round(delay_ms * rate / 1000))
    played = np.concatenate([np.zeros(lag, np.float32), played])[:n]
    echo = convolve(played, load_ir(speaker, rate))
    echo *= np.float32(_db_gain(echo, rate, echo_dbfs))

    talker = convolve(driver_speech(rate, seconds), load_ir("driver", rate))
    talker *= np.float32(_db_gain(talker, rate, driver_dbfs))
    driver = np.zeros(n, np.float32)
    if driver_from_s is not None:
        start = int(driver_from_s * rate)
        driver[start:] = talker[: n - start]
    noise = np.zeros(n, np.float32)
    if snr_db is not None:
        noise = mix_at_snr(talker, road_noise(seconds, rate, seed), snr_db, rate)
    mic = echo + driver + noise
    return Scene(rate, far, echo, driver, noise, mic, block_active(echo, rate, -40.0),
                 block_active(driver, rate, -30.0))


# -- metrics (per 20 ms block) ---------------------------------------------------------------

def block_energy(x: np.ndarray, rate: int) -> np.ndarray:
    block = int(BLOCK_S * rate)
    n = len(x) // block * block
    return np.mean(np.asarray(x[:n], np.float64).reshape(-1, block) ** 2, axis=1)


def block_active(x: np.ndarray, rate: int, below_db: float) -> np.ndarray:
    """Blocks whose energy is within `below_db` of the signal's active level."""
    e = block_energy(x, rate)
    ref = active_rms(x, rate) ** 2
    if ref == 0.0:
        return np.zeros(len(e), bool)
    return e > ref * 10 ** (below_db / 10)


def erle_db(mic: np.ndarray, out: np.ndarray, rate: int, mask: np.ndarray | None = None,
            from_s: float = 0.0, to_s: float | None = None) -> float:
    """Echo return loss enhancement: mic energy over output energy, over the masked blocks
    from `from_s` to `to_s` (single talk: what the canceller took out of the echo)."""
    e_in, e_out = block_energy(mic, rate), block_energy(out, rate)
    keep = np.ones(len(e_in), bool) if mask is None else mask[: len(e_in)].copy()
    keep[: int(round(from_s / BLOCK_S))] = False
    if to_s is not None:
        keep[int(round(to_s / BLOCK_S)):] = False
    return float(10 * np.log10(e_in[keep].sum() / (e_out[keep].sum() + 1e-20)))


def erle_track(mic: np.ndarray, out: np.ndarray, rate: int, mask: np.ndarray,
               window_s: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """ERLE over a sliding window of active blocks: (times in s, dB); NaN where no echo."""
    e_in, e_out = block_energy(mic, rate), block_energy(out, rate)
    m = mask[: len(e_in)].astype(np.float64)
    w = max(1, int(window_s / BLOCK_S))
    kernel = np.ones(w)
    num = np.convolve(e_in * m, kernel)[: len(e_in)]
    den = np.convolve(e_out * m, kernel)[: len(e_in)]
    cnt = np.convolve(m, kernel)[: len(e_in)]
    with np.errstate(divide="ignore", invalid="ignore"):
        db = np.where(cnt >= w / 2, 10 * np.log10(num / (den + 1e-20)), np.nan)
    return (np.arange(len(e_in)) + 1) * BLOCK_S, db


def convergence_s(mic: np.ndarray, out: np.ndarray, rate: int, mask: np.ndarray,
                  target_db: float, hold_s: float = 2.0, fraction: float = 0.9) -> float:
    """When the sliding 200 ms ERLE first reaches `target_db` and then stays there for at
    least `fraction` of the windows in the next `hold_s` (inf: never). A dip at a speech
    offset, where a window holds only the reverberant tail, does not reset it."""
    t, db = erle_track(mic, out, rate, mask)
    valid = ~np.isnan(db)
    hold = int(round(hold_s / BLOCK_S))
    for i in np.nonzero(valid & (db >= target_db))[0]:
        later = db[i + 1 : i + 1 + hold][valid[i + 1 : i + 1 + hold]]
        if len(later) and np.mean(later >= target_db) >= fraction:
            return float(t[i])
    return float("inf")


def seg_snr_db(clean: np.ndarray, out: np.ndarray, rate: int, mask: np.ndarray,
               floor_db: float = -10.0, ceil_db: float = 35.0) -> float:
    """Segmental SNR of `out` against `clean` over the masked 20 ms blocks, each clamped to
    [floor_db, ceil_db] (the usual speech-enhancement limits)."""
    s, err = block_energy(clean, rate), block_energy(np.asarray(out) - np.asarray(clean), rate)
    k = mask[: len(s)]
    with np.errstate(divide="ignore"):
        snr = 10 * np.log10(s[k] / (err[k] + 1e-20) + 1e-20)
    return float(np.mean(np.clip(snr, floor_db, ceil_db)))


def near_end_gain_db(clean: np.ndarray, out: np.ndarray, rate: int, mask: np.ndarray) -> float:
    """How loud the driver comes through: the energy of `out`'s projection onto `clean`,
    block by block, over the clean's energy (0 dB: untouched; a mute gives -inf)."""
    block = int(BLOCK_S * rate)
    n = len(clean) // block * block
    c = np.asarray(clean[:n], np.float64).reshape(-1, block)[mask[: n // block]]
    y = np.asarray(out[:n], np.float64).reshape(-1, block)[mask[: n // block]]
    alpha = np.sum(c * y, axis=1) / (np.sum(c * c, axis=1) + 1e-20)
    return float(10 * np.log10(np.sum(alpha**2 * np.sum(c * c, axis=1)) / np.sum(c * c) + 1e-20))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-20))


def dbfs(x: np.ndarray) -> float:
    """RMS level in dBFS (full-scale sine = -3 dBFS convention not used: RMS of 1.0 = 0 dBFS)."""
    return float(10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20))
