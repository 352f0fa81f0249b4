"""Persona edge cases from issue 11: temperature 0 (greedy per stream), where a missing voice is
named, a prompt that fills the context, and seeds out of range."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import SPEECH, new_session, play, step_speech

from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.core.lm import SamplingInputs
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona, parse_persona
from personaplex_edge.runtime.errors import ConfigError, PpxError

PERSONA = "name: cold\nvoice: NATF2\nprompt: You are a calm co-pilot.\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cold.yaml"
    path.write_text(text)
    return path


def test_temperature_zero_is_accepted_and_tiny_temperatures_are_not(tmp_path: Path) -> None:
    path = _write(tmp_path, PERSONA + "sampling: {text_temperature: 0, audio_temperature: 0.0}\n")
    sampling = parse_persona(path).sampling
    assert sampling.text_temperature == 0.0 and sampling.audio_temperature == 0.0
    path = _write(tmp_path, PERSONA + "sampling:\n  audio_temperature: 0.001\n")
    with pytest.raises(ConfigError, match=r"cold\.yaml:5: sampling\.audio_temperature: 0\.001 is outside "
                                          r"0\.01\.\.2\.0 \(0 means greedy\)"):
        parse_persona(path)


def test_temperature_zero_on_both_streams_plays_the_greedy_tokens(tiny_build: Path, tmp_path: Path) -> None:
    base = parse_persona(_write(tmp_path, PERSONA))
    greedy = replace(base, sampling=replace(base.sampling, greedy=True))
    cold = parse_persona(_write(tmp_path, PERSONA + "sampling: {text_temperature: 0, audio_temperature: 0}\n"))
    runs = []
    for persona, seed in ((greedy, 1), (cold, 2)):  # different seeds: no randomness may be left
        session = new_session(tiny_build, tmp_path / "s")
        session.start(persona, seed=seed)
        runs.append(step_speech(session, 30))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_temperature_zero_makes_only_its_own_stream_greedy(tiny_build: Path) -> None:
    shape = _shape(tiny_build)
    base = load_persona("copilot").sampling
    text_only = SamplingInputs(replace(base, text_temperature=0.0), shape, seed=3)
    assert int(text_only.text["text_top_k"][0]) == 1 and float(text_only.text["text_temperature"][0]) > 0
    assert (text_only.text_noise() == 1).all()
    assert int(text_only.audio["top_k"][0]) == base.audio_top_k
    assert not (text_only.audio_noise() == 1).all()  # the audio stream still samples

    audio_only = SamplingInputs(replace(base, audio_temperature=0.0), shape, seed=3)
    assert int(audio_only.audio["top_k"][0]) == 1 and float(audio_only.audio["temperature"][0]) > 0
    assert (audio_only.audio_noise() == 1).all()
    assert int(audio_only.text["text_top_k"][0]) == base.text_top_k
    assert not (audio_only.text_noise() == 1).all()


def _shape(build: Path):
    from personaplex_edge.runtime.core.lm import LMShape

    return LMShape.from_manifest(load_manifest(build))


def test_a_voice_the_build_lacks_is_named_with_its_line(tiny_build: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "name: cold\n\nvoice: NATM9\nprompt: Hello.\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: voice: 'NATM9' is not a voice of this build "
                                          r"\(build voices: NATF2\)$"):
        new_session(tiny_build, tmp_path / "s").start(parse_persona(path))


def test_a_prompt_that_fills_the_context_warns(tiny_build: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    session = new_session(tiny_build, tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="personaplex"):
        ready = session.start(load_persona("copilot"))
    assert not caplog.records  # the built-in prompts leave most of the context
    context = session.shape.context
    long = parse_persona(_write(tmp_path, PERSONA.replace("You are a calm co-pilot.", "drive " * 1360)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="personaplex"):
        ready = session.start(long)
    steps = ready.prompt_steps
    assert context * 0.9 < steps < context, steps
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"{tmp_path / 'cold.yaml'}:3: prompt: the system prompt takes {steps} of the model's {context} "
        f"context steps, leaving {context - steps} ")


def test_play_prints_the_context_warning_on_stderr(tiny_build: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, PERSONA.replace("You are a calm co-pilot.", "drive " * 1360))
    short = tmp_path / "short.wav"
    import soundfile as sf

    sf.write(short, read_audio(SPEECH)[:1920 * 5], 24000)
    rc = play(tiny_build, tmp_path / "o.wav", "--persona", str(path), input_path=short)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"ppx-runtime: warning: {path}:3: prompt: the system prompt takes "), err
    # The warning comes when the persona starts. Whether play then goes on is play's policy
    # (re-anchoring may need more room than such a prompt leaves: one error line, exit 78).
    assert (rc, len(err)) in ((0, 1), (78, 2)), (rc, err)


def test_a_seed_out_of_range_is_one_clear_error(tiny_build: Path, tmp_path: Path) -> None:
    session = new_session(tiny_build, tmp_path / "s")
    for seed in (-1, 2**63):
        with pytest.raises(PpxError, match=rf"^seed {seed}: expected 0\.\.{2**63 - 1}$"):
            session.start(load_persona("copilot"), seed=seed)
