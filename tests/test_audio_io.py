"""Audio file reading/writing and BS.1770 loudness, against libsndfile/soxr and pyloudnorm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from personaplex_edge.runtime.audio.files import frames, read_audio, write_wav
from personaplex_edge.runtime.audio.loudness import integrated_loudness, normalize_loudness
from personaplex_edge.runtime.errors import PpxError

SPEECH = Path(__file__).parent / "data" / "speech_24k.wav"


@pytest.mark.parametrize("fmt,subtype,rate", [("WAV", "PCM_16", 48000), ("FLAC", "PCM_24", 44100),
                                             ("OGG", "VORBIS", 16000)])
def test_any_rate_and_channels_become_24k_mono(tmp_path: Path, fmt: str, subtype: str, rate: int) -> None:
    speech = read_audio(SPEECH)
    import soxr

    resampled = soxr.resample(speech, 24000, rate, quality="HQ")
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)
    path = tmp_path / f"in.{fmt.lower()}"
    sf.write(path, stereo, rate, format=fmt, subtype=subtype)
    out = read_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - len(speech)) <= 24000 * 0.01
    n = min(len(out), len(speech)) - 2400
    # Downmix averages the channels: 0.75 x the original, up to codec/resampler error.
    err = out[1200:n] - 0.75 * speech[1200:n]
    snr = 10 * np.log10(np.sum((0.75 * speech[1200:n]) ** 2) / np.sum(err ** 2))
    assert snr > (15 if fmt == "OGG" else 40), snr


def test_unreadable_and_empty_audio(tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(PpxError, match=r"junk\.wav: unreadable audio"):
        read_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 24000)
    with pytest.raises(PpxError, match=r"empty\.wav: audio file is empty"):
        read_audio(tmp_path / "empty.wav")
    with pytest.raises(PpxError, match=r"missing\.wav: audio file not found"):
        read_audio(tmp_path / "missing.wav")


def test_write_wav_roundtrip_is_atomic(tmp_path: Path) -> None:
    audio = np.sin(np.linspace(0, 100, 4800)).astype(np.float32) * 0.5
    write_wav(tmp_path / "out.wav", audio)
    back, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and np.max(np.abs(back - audio)) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def test_frames_pad_the_last_partial_frame() -> None:
    f = frames(np.ones(1920 * 2 + 5, np.float32), 1920)
    assert f.shape == (3, 1920) and f[2, :5].sum() == 5 and f[2, 5:].sum() == 0


@pytest.mark.parametrize("rate", [24000, 48000])
def test_loudness_matches_pyloudnorm(rate: int) -> None:
    pyln = pytest.importorskip("pyloudnorm")
    speech = read_audio(SPEECH, rate)
    for gain in (1.0, 0.1):
        ours = integrated_loudness(speech * gain, rate)
        ref = pyln.Meter(rate).integrated_loudness(speech * gain)
        assert abs(ours - ref) < 0.01, (ours, ref)
    normalized = normalize_loudness(speech, rate)
    assert abs(pyln.Meter(rate).integrated_loudness(normalized) - (-24.0)) < 0.01


def test_loudness_of_silence_is_left_alone() -> None:
    silence = np.zeros(24000, np.float32)
    assert integrated_loudness(silence, 24000) == float("-inf")
    np.testing.assert_array_equal(normalize_loudness(silence, 24000), silence)
