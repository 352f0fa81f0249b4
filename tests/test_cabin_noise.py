"""The cabin noise generator the VAD and echo-cancellation tests and benchmarks rely on."""

from __future__ import annotations

import numpy as np

from personaplex_edge.sim.noise import mix_at_snr, road_noise
from personaplex_edge.sim.shipped import speech


def test_road_noise_is_seeded_unit_rms_and_low_frequency() -> None:
    a, b, c = road_noise(4.0, 24000, seed=1), road_noise(4.0, 24000, seed=1), road_noise(4.0, 24000, 2)
    assert a.dtype == np.float32 and len(a) == 96000
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(np.sqrt(np.mean(a.astype(np.float64) ** 2)) - 1.0) < 1e-3
    power = np.abs(np.fft.rfft(a)) ** 2
    f = np.fft.rfftfreq(len(a), 1 / 24000)
    low = power[(f >= 20) & (f < 500)].sum()
    assert low / power.sum() > 0.8  # road noise lives under 500 Hz
    assert power[f < 15].sum() / power.sum() < 0.01  # and not below what a microphone hears


def test_mix_at_snr_sets_the_active_speech_level_over_the_noise() -> None:
    voice = speech(24000, 6.0)
    for snr in (0.0, 5.0, 10.0):
        noise = mix_at_snr(voice, road_noise(2.0, 24000, seed=3), snr)  # tiled to 6 s
        assert len(noise) == len(voice)
        blocks = voice[: len(voice) // 480 * 480].reshape(-1, 480).astype(np.float64)
        energies = np.sort(np.mean(blocks**2, axis=1))
        active = np.mean(energies[len(energies) // 2:])
        measured = 10 * np.log10(active / np.mean(noise.astype(np.float64) ** 2))
        assert abs(measured - snr) < 0.1
