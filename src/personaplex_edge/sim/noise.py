"""Car cabin background noise for tests and benchmarks: road, tyre and engine, seeded.

    noise = road_noise(seconds=10.0, rate=24000, seed=0)          # float32, unit RMS
    mic = speech + mix_at_snr(speech, noise, snr_db=5.0)    # noise scaled to 5 dB SNR

The spectrum follows what published cabin recordings show at motorway speed: most energy
between 20 and 200 Hz (tyre cavity and road roughness through the body), falling about
9 dB per octave above that, a broadband wind floor higher up, and the engine's firing order
(second order for a four-cylinder at 1800-2600 rpm) as slowly gliding harmonics. The level
breathes with the road surface (slow amplitude modulation). No recording is shipped: the
generator is the data, so any length at any rate is reproducible from a seed.
"""

from __future__ import annotations

import numpy as np


def _shaped_noise(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """White noise through the road/tyre/wind spectral envelope (one FFT filter)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    f = np.maximum(f, 1.0)
    road = 1.0 / (1.0 + (f / 160.0) ** 1.5)  # flat to ~160 Hz, then -9 dB per octave
    rumble = np.where(f < 20.0, (f / 20.0) ** 2, 1.0)  # nothing the microphone cannot hear
    wind = 0.03 / (1.0 + (f / 4000.0) ** 2)  # broadband floor, rolling off above 4 kHz
    return np.fft.irfft(spectrum * (road * rumble + wind), n)


def _engine(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Firing-order harmonics with a slowly wandering engine speed."""
    t = np.arange(n) / rate
    rpm = 2200.0 + 400.0 * np.sin(2 * np.pi * t / rng.uniform(8.0, 14.0) + rng.uniform(0, 6.3))
    firing_hz = 2.0 * rpm / 60.0  # second order: four cylinders
    phase = 2 * np.pi * np.cumsum(firing_hz) / rate
    tone = np.zeros(n)
    for harmonic, level in ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)):
        tone += level * np.sin(harmonic * phase + rng.uniform(0, 6.3))
    return tone


def road_noise(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """`seconds` of cabin noise at `rate`, float32 with unit RMS (scale it with `mix_at_snr`)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    if n <= 0:
        return np.zeros(0, np.float32)
    road = _shaped_noise(n, rate, rng)
    road /= np.sqrt(np.mean(road**2)) + 1e-12
    engine = _engine(n, rate, rng)
    engine /= np.sqrt(np.mean(engine**2)) + 1e-12
    t = np.arange(n) / rate
    surface = 1.0 + 0.25 * np.sin(2 * np.pi * t / rng.uniform(3.0, 7.0))  # road surface changes
    noise = surface * road + 0.35 * engine
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float, rate: int = 24000) -> np.ndarray:
    """`noise` (trimmed or tiled to the signal's length) scaled so that the signal's active
    level over the noise is `snr_db`. Active level: the RMS over the loudest half of 20 ms
    blocks, so pauses in speech do not make the noise look quieter than a listener hears it."""
    signal = np.asarray(signal, np.float32)
    reps = int(np.ceil(len(signal) / max(len(noise), 1)))
    noise = np.tile(np.asarray(noise, np.float32), reps)[: len(signal)]
    block = int(0.02 * rate)
    usable = len(signal) // block * block
    energies = np.sort(np.mean(signal[:usable].reshape(-1, block) ** 2, axis=1))
    active = np.sqrt(np.mean(energies[len(energies) // 2:])) if len(energies) else 0.0
    level = np.sqrt(np.mean(noise**2)) + 1e-12
    return (noise * (active / level) * 10 ** (-snr_db / 20)).astype(np.float32)
