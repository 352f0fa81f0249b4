"""`ppx-runtime play` end to end, the agent-only depformer, personas and long sessions."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SPEECH, play

from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona, parse_persona
from personaplex_edge.runtime.core.session import Session


def _play_named(build: Path, tmp: Path, name: str, *extra: str, input_path: Path = SPEECH) -> int:
    """support.play with the reply, its tokens and its transcript as tmp/name.{wav,npz,txt}."""
    return play(build, tmp / f"{name}.wav", "--dump-tokens", str(tmp / f"{name}.npz"),
                "--transcript", str(tmp / f"{name}.txt"), *extra, input_path=input_path)


def test_play_is_deterministic_for_a_seed(tiny_build: Path, tmp_path: Path) -> None:
    assert _play_named(tiny_build, tmp_path, "a", "--seed", "11") == 0
    assert _play_named(tiny_build, tmp_path, "b", "--seed", "11") == 0  # second run restores the snapshot
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["out_tokens"], b["out_tokens"])
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()


def test_play_output_matches_the_input_and_the_upstream_layout(tiny_build: Path, tmp_path: Path) -> None:
    assert _play_named(tiny_build, tmp_path, "a", "--greedy") == 0
    reply, rate = sf.read(tmp_path / "a.wav")
    speech, _ = sf.read(SPEECH)
    assert rate == 24000 and len(reply) == len(speech)
    tokens = np.load(tmp_path / "a.npz")
    frames = -(-len(speech) // 1920)
    assert tokens["user_tokens"].shape == (frames, 8) and tokens["out_tokens"].shape == (frames, 17)
    # The first frame after the prompt is its last silence frame (upstream's behaviour):
    # text padding, the agent's silence tokens, the user's sine tokens.
    manifest = load_manifest(tiny_build)
    first = tokens["out_tokens"][0]
    assert first[0] == 3
    assert list(first[1:9]) == manifest.data["prompt_tokens"]["silence"]
    assert list(first[9:17]) == manifest.data["prompt_tokens"]["sine"]
    # From then on the user streams of each frame are the user's own codes, one frame late.
    np.testing.assert_array_equal(tokens["out_tokens"][2:, 9:], tokens["user_tokens"][1:-1])


def test_play_accepts_other_rates_and_channels(tiny_build: Path, tmp_path: Path) -> None:
    speech, _ = sf.read(SPEECH, dtype="float32")
    import soxr

    stereo = np.stack([soxr.resample(speech, 24000, 48000)] * 2, axis=1)
    sf.write(tmp_path / "in.flac", stereo, 48000)
    assert _play_named(tiny_build, tmp_path, "a", "--seed", "1", input_path=tmp_path / "in.flac") == 0
    assert abs(len(sf.read(tmp_path / "a.wav")[0]) - len(speech)) <= 24


def test_play_bad_input_is_one_line(tiny_build: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "play", str(tmp_path / "junk.wav"),
                           "--build", str(tiny_build), "--out", str(tmp_path / "o.wav")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"ppx-runtime: error: {tmp_path / 'junk.wav'}: unreadable audio")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.wav").exists()

    bad = tmp_path / "p.yaml"
    bad.write_text("name: p\nvoice: NATF2\nprompt: hi\nsampling:\n  audio_top_k: 9999\n")
    rc = _play_named(tiny_build, tmp_path, "x", "--persona", str(bad))
    assert rc == 78


def test_agent_only_depformer_matches_the_full_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The user's depth steps never change the agent's tokens (they come later in depth order)."""
    full = export_onnx(tiny_checkpoint, tmp_path / "full", ExportOptions(prefill_steps=64, depformer_steps="all"),
                       quiet=True)
    agent = export_onnx(tiny_checkpoint, tmp_path / "agent", ExportOptions(prefill_steps=64), quiet=True)
    assert load_manifest(full).graph("depformer").meta["steps"] == 16
    assert load_manifest(agent).graph("depformer").meta["steps"] == 8
    persona = load_persona("copilot")
    persona = replace(persona, sampling=replace(persona.sampling, greedy=True))
    outs = []
    for build in (full, agent):
        session = Session(load_manifest(build), OrtBackend(threads=1), tmp_path / build.name)
        session.start(persona)
        speech, _ = sf.read(SPEECH, dtype="float32")
        outs.append(np.stack([session.step(speech[i:i + 1920]).frame for i in range(0, 1920 * 40, 1920)]))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("body,pattern", [
    ("name: Bad Name\nvoice: NATF2\nprompt: hi\n", r":1: name: use lowercase"),
    ("name: a\nvoice: NATF2\n", r":1: prompt: required field is missing"),
    ("name: a\nvoice: NATF2\nprompt: hi\nsampling:\n  text_top_k: 0\n", r":5: sampling\.text_top_k: 0 is outside 1\.\.250"),
    ("name: a\nvoice: NATF2\nprompt: hi\nspeech:\n  when_busy: shout\n", r":5: speech\.when_busy: 'shout' is not one of"),
    ("name: a\nvoice: NATF2\nprompt: hi\ncolour: red\n", r":4: colour: unknown field"),
    ("name: a\nvoice: missing.wav\nprompt: hi\n", r":2: voice: audio file .*missing\.wav not found"),
    ("name: a\nvoice: NATF2\nprompt: <system> hi <system>\n", r":3: prompt: do not include <system>"),
    ("name: [a\n", r":\d+: invalid YAML"),
])
def test_persona_errors_name_file_line_and_field(tmp_path: Path, body: str, pattern: str) -> None:
    from personaplex_edge.runtime.errors import ConfigError

    path = tmp_path / "persona.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=rf"persona\.yaml{pattern}"):
        parse_persona(path)


def test_builtin_personas_are_valid_and_cabin_tuned() -> None:
    from personaplex_edge.runtime.core.persona import builtin_personas

    assert builtin_personas() == ["copilot", "focus", "roadtrip"]
    copilot, focus = load_persona("copilot"), load_persona("focus")
    assert focus.speech.max_turn_seconds < copilot.speech.max_turn_seconds
    assert all(load_persona(n).voice == "NATF2" for n in builtin_personas())


def test_long_session_slides_with_flat_memory_and_time(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Past the context the cache slides as upstream (no error, no growth)."""
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["context"] = 48
    (ckpt / "config.json").write_text(json.dumps(config))
    build = export_onnx(ckpt, tmp_path / "build", ExportOptions(prefill_steps=32), quiet=True)
    persona_file = tmp_path / "short.yaml"
    persona_file.write_text("name: short\nvoice: NATF2\nprompt: Hi.\nsampling:\n  greedy: true\n")
    voice = tmp_path / "short.wav"
    sf.write(voice, np.zeros(1920 * 4, np.float32), 24000)
    persona = replace(parse_persona(persona_file), voice=str(voice))
    session = Session(load_manifest(build), OrtBackend(threads=1), tmp_path / "s")
    session.start(persona)
    speech, _ = sf.read(SPEECH, dtype="float32")
    sizes = {k: v.nbytes for k, v in session.temporal.state.items()}
    times, rss = [], []
    for i in range(48 * 10):  # ten times the window
        chunk = speech[(i * 1920) % (len(speech) - 1920):][:1920]
        t0 = time.perf_counter()
        session.step(chunk)
        times.append(time.perf_counter() - t0)
        if i % 48 == 0:
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert session.temporal.offset > 48 * 10
    assert {k: v.nbytes for k, v in session.temporal.state.items()} == sizes
    assert rss[-1] - rss[1] < 20_000, rss  # KiB: no growth beyond allocator noise
    early, late = np.median(times[48:96]), np.median(times[-48:])
    assert late < 3 * early, (early, late)


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: a\nvoice: NATF2\nprompt: hi\nsampling:\nspeech:\n")
    persona = parse_persona(path)
    assert persona.sampling.text_top_k == 25 and persona.speech.when_busy == "pause"
