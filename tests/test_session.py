"""Persona snapshots and the conversation session on the tiny build (ONNX Runtime, CPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import SPEECH, new_session, step_speech

from personaplex_edge.runtime.audio.files import frames, read_audio
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.snapshot import load_snapshot, snapshot_key


def _greedy(name: str = "copilot"):
    persona = load_persona(name)
    return replace(persona, sampling=replace(persona.sampling, greedy=True))


def test_restored_snapshot_equals_step_by_step_replay(tiny_build: Path, tmp_path: Path) -> None:
    persona = _greedy()
    batched = new_session(tiny_build, tmp_path / "a")
    ready = batched.start(persona)
    assert ready.compiled and ready.prompt_steps > 100

    stepped = new_session(tiny_build, tmp_path / "b")
    key = snapshot_key(stepped.build_id, persona.content_hash())
    reference = stepped.compile(persona, key, batched=False)
    snap, why = load_snapshot(next((tmp_path / "a").glob("*.npz")), key)
    assert snap is not None, why

    assert set(snap.arrays) == set(reference.arrays)
    for name, ref in reference.arrays.items():
        got = snap.arrays[name]
        assert got.shape == ref.shape, name
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(got, ref, err_msg=name)

    # The conversation that follows is the same, token for token.
    stepped.restore(reference)
    stepped.lm.set_sampling(persona.sampling, 0)
    np.testing.assert_array_equal(step_speech(batched, 40), step_speech(stepped, 40))


def test_snapshot_is_reused_then_rebuilt_when_corrupt_or_stale(tiny_build: Path, tmp_path: Path) -> None:
    persona = _greedy()
    first = new_session(tiny_build, tmp_path).start(persona)
    assert first.compiled and first.why_compiled == "no snapshot yet"
    second = new_session(tiny_build, tmp_path).start(persona)
    assert not second.compiled and second.restore_ms < 1000

    path = next(tmp_path.glob("*.npz"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    third = new_session(tiny_build, tmp_path).start(persona)
    assert third.compiled and third.why_compiled.startswith(("corrupt", "unreadable"))

    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert new_session(tiny_build, tmp_path).start(persona).compiled

    session = new_session(tiny_build, tmp_path)
    session.build_id = "another-build"
    stale = session.start(persona)
    assert stale.compiled and stale.why_compiled.startswith("stale")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no partial files left behind"


def test_builds_sharing_a_snapshot_dir_keep_their_own_snapshots(tiny_build: Path, tmp_path: Path) -> None:
    """Two builds, one directory: switching between them restores, it does not recompile."""
    import json
    import shutil

    from personaplex_edge.runtime.core.manifest import write_manifest

    other = tmp_path / "other"
    shutil.copytree(tiny_build, other)
    data = json.loads((other / "manifest.json").read_text())
    write_manifest(other, {**data, "created": "another day"})  # same graphs, another build
    assert load_manifest(other).digest != load_manifest(tiny_build).digest
    snaps, persona = tmp_path / "snaps", _greedy()
    assert new_session(tiny_build, snaps).start(persona).compiled
    assert new_session(other, snaps).start(persona).compiled
    for build in (tiny_build, other, tiny_build):
        ready = new_session(build, snaps).start(persona)
        assert not ready.compiled, (build, ready.why_compiled)
    assert len(list(snaps.glob("*.npz"))) == 2


def test_persona_change_invalidates_only_its_own_snapshot(tiny_build: Path, tmp_path: Path) -> None:
    persona = _greedy()
    new_session(tiny_build, tmp_path).start(persona)
    changed = replace(persona, prompt=persona.prompt + " Always mention the weather.")
    assert new_session(tiny_build, tmp_path).start(changed).compiled
    assert not new_session(tiny_build, tmp_path).start(persona).compiled
    # Speech settings do not change the model state: same snapshot.
    louder = replace(persona, speech=replace(persona.speech, output_gain_db=3.0))
    assert not new_session(tiny_build, tmp_path).start(louder).compiled


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_build: Path, tmp_path: Path) -> None:
    persona = load_persona("roadtrip")
    runs = []
    for seed in (5, 5, 6):
        session = new_session(tiny_build, tmp_path)
        session.start(persona, seed=seed)
        runs.append(step_speech(session, 30))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_voice_file_persona_and_unknown_voice(tiny_build: Path, tmp_path: Path) -> None:
    from personaplex_edge.runtime.core.persona import parse_persona
    from personaplex_edge.runtime.errors import ConfigError

    wav = tmp_path / "me.wav"
    wav.write_bytes(SPEECH.read_bytes())
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text("name: mine\nvoice: me.wav\nprompt: You are a calm co-pilot.\n")
    persona = parse_persona(yaml_path)
    ready = new_session(tiny_build, tmp_path / "s").start(persona)
    assert ready.compiled and ready.prompt_steps > len(frames(read_audio(SPEECH), 1920))

    yaml_path.write_text("name: mine\nvoice: NATM9\nprompt: Hello.\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml:2: voice: 'NATM9' is not a voice of this build"):
        new_session(tiny_build, tmp_path / "s").start(parse_persona(yaml_path))


def test_silenced_agent_emits_the_silence_tokens(tiny_build: Path, tmp_path: Path) -> None:
    """Pause / busy / turn limit: the agent's audio is forced to silence, and the model sees it."""
    session = new_session(tiny_build, tmp_path)
    session.start(load_persona("roadtrip"), seed=3)
    user = frames(read_audio(SPEECH), 1920)[:20]
    out = np.stack([session.step(f, silence_agent=True).frame for f in user])
    silence = list(session.silence_tokens)
    assert all(list(row[1:9]) == silence for row in out)
    # Once released, the model speaks for itself again (sampled tokens, not the forced ones).
    free = np.stack([session.step(f).frame for f in user])
    assert any(list(row[1:9]) != silence for row in free[2:])


def test_failed_persona_switch_keeps_the_running_conversation(tiny_build: Path, tmp_path: Path) -> None:
    """The conversation goes on from where it was, as if no switch had been asked for (it used
    to restart from copilot's snapshot: a refused switch reset the talk)."""
    from personaplex_edge.runtime.core.conversation import Conversation
    from personaplex_edge.runtime.errors import ConfigError

    user = frames(read_audio(SPEECH), 1920)[:30]
    reference = new_session(tiny_build, tmp_path / "a")
    reference.start(_greedy())
    expected = np.stack([reference.step(f).frame for f in user])

    conversation = Conversation(new_session(tiny_build, tmp_path / "b"))
    conversation.switch_persona(_greedy())
    got = [conversation.step(f).result.frame for f in user[:10]]
    broken = replace(_greedy("focus"), voice="NATM9")
    with pytest.raises(ConfigError, match="NATM9"):
        conversation.switch_persona(broken)
    assert conversation.persona.name == "copilot" and conversation.session.persona.name == "copilot"
    got += [conversation.step(f).result.frame for f in user[10:]]
    np.testing.assert_array_equal(np.stack(got), expected)


def test_a_failing_frame_leaves_a_session_that_restarts_cleanly(tiny_build: Path, tmp_path: Path) -> None:
    """A real ONNX Runtime error mid-frame (wrong input size), then the daemon's recovery:
    restart the conversation from the snapshot; frames then match a fresh session."""
    user = frames(read_audio(SPEECH), 1920)[:20]
    session = new_session(tiny_build, tmp_path)
    session.start(_greedy())
    for f in user[:5]:
        session.step(f)
    with pytest.raises(Exception):  # noqa: B017 - whatever ONNX Runtime raises for a bad shape
        session.step(np.zeros(1000, np.float32))
    session.start(_greedy())
    fresh = new_session(tiny_build, tmp_path)
    fresh.start(_greedy())
    np.testing.assert_array_equal(np.stack([session.step(f).frame for f in user]),
                                  np.stack([fresh.step(f).frame for f in user]))
