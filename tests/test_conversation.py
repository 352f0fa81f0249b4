"""The conversation's one owner: every change is all-or-nothing, and a reset forgets.

Each test here reproduces a seam the house issue found in the old wiring (a reset that kept
the replay history, a context update that set its anchor before its replay succeeded, a
refused persona switch that restarted the talk) and holds the fix."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conversation_kit import (
    POLICY,
    anchor_of,
    frame,
    persona_file,
    prefix_kv,
    scripted_conversation,
    talk,
)

from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.errors import ConfigError, PpxError

SILENCE = np.zeros(1920, np.float32)


def _state(conversation: Conversation) -> dict[str, np.ndarray]:
    """Everything the conversation has put into the model, as host copies."""
    s = conversation.session
    out = {f"temporal.{k}": v for k, v in s.temporal.snapshot(slots=s.context_fill).items()}
    out.update({"ring": s.lm.state.tokens.copy(), "provided": s.lm.state.provided.copy(),
                "offset": np.array(s.lm.state.offset),
                "history": np.array(list(conversation.history))})
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_an_idle_reset_forgets_the_conversation_even_when_keep_outlasts_it(
        short_context_build: Path, tmp_path: Path) -> None:
    """keep (20 frames) longer than the idle reset (8): a context update after the reset must
    replay only what was said since, never the conversation the reset forgot."""
    policy = replace(POLICY, idle_reset=8, soft_limit=POLICY.hard_limit)
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path), policy)
    for pcm, _ in talk(30):
        frame(conversation, who, pcm, True)
    actions = [frame(conversation, who, SILENCE, False).action for _ in range(policy.idle_reset)]
    assert actions[-1] == "idle_reset"
    assert len(conversation.history) == 0
    said_after = 3
    for pcm, _ in talk(said_after):
        frame(conversation, who, pcm, True)
    conversation.set_context(conversation.check_context("the destination is Lyon."))
    actions = [frame(conversation, who, SILENCE, False).action for _ in range(policy.pause)]
    assert actions[-1] == "context"
    prefix = int(anchor_of(conversation).arrays["temporal.__offset__"])
    # The new prefix, then only the frames since the reset: 3 spoken + the pause's frames.
    assert conversation.session.context_fill == prefix + said_after + policy.pause


def test_a_failed_context_update_changes_nothing_tells_the_truth_and_is_not_retried(
        short_context_build: Path, tmp_path: Path) -> None:
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path))
    for pcm, speaking in talk(20):
        frame(conversation, who, pcm, speaking)
    conversation.set_context(conversation.check_context("fuel range 80 km."))
    for _ in range(POLICY.pause):
        frame(conversation, who, SILENCE, False)
    shown = conversation.show_context()
    assert shown["context"] == "fuel range 80 km." and not shown["pending"]
    anchor = anchor_of(conversation)

    def broken_backend(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    conversation.session.compile = broken_backend  # type: ignore[method-assign]
    conversation.set_context(conversation.check_context("fuel range 20 km, refuel soon."))
    for pcm, _ in talk(4):  # talking: the update waits for a pause
        frame(conversation, who, pcm, True)
    before = _state(conversation)
    actions = [frame(conversation, who, SILENCE, False).action for _ in range(POLICY.pause)]
    assert actions[-1] == "context_failed"
    assert anchor_of(conversation) is anchor  # still on the prefix the model really has
    shown = conversation.show_context()
    assert shown["context"] == "fuel range 80 km." and not shown["pending"]
    assert "fuel range 80 km." in shown["prompt"] and "RuntimeError" in shown["last_error"]
    # The conversation went on from where it was: the old prefix, then what was said since.
    prefix = int(anchor.arrays["temporal.__offset__"])
    assert conversation.session.context_fill == prefix + len(conversation.history)
    for name, value in prefix_kv(conversation.session, prefix).items():
        assert np.array_equal(value, anchor.arrays["temporal." + name]), name
    assert int(conversation.session.lm.state.offset) == int(before["offset"]) + POLICY.pause
    # Tried once: later pauses do not try again (a lasting error is no restart loop).
    for _ in range(3 * POLICY.pause):
        assert frame(conversation, who, SILENCE, False).action not in ("context", "context_failed")
    assert conversation.stats.failures == 1 and conversation.stats.context_updates == 1


def test_a_refused_persona_switch_leaves_the_conversation_untouched(
        short_context_build: Path, tmp_path: Path) -> None:
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path))
    for pcm, speaking in talk(30):
        frame(conversation, who, pcm, speaking)
    before = _state(conversation)
    persona = conversation.persona
    skipped = replace(load_persona("focus"), voice="NOT_A_VOICE")  # as `ctl persona` finds it
    with pytest.raises(ConfigError, match="is not a voice of this build"):
        conversation.switch_persona(skipped)
    _assert_same(_state(conversation), before)
    assert conversation.persona is persona
    with pytest.raises(PpxError, match="seed"):
        conversation.switch_persona(persona, seed=-1)
    _assert_same(_state(conversation), before)


def test_a_switch_refused_after_its_compile_restores_the_conversation(
        short_context_build: Path, tmp_path: Path) -> None:
    """A prompt too long for the context is found only once it is compiled, on the live
    model: the conversation is put back (its prefix and history replayed), the ring as it was."""
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path))
    for pcm, speaking in talk(30):
        frame(conversation, who, pcm, speaking)
    before = _state(conversation)
    wordy = persona_file(tmp_path, prompt="Hi there. " * 30)
    with pytest.raises(ConfigError):
        conversation.switch_persona(wordy)
    after = _state(conversation)
    for name in ("ring", "provided", "offset", "history"):
        assert np.array_equal(after[name], before[name]), name
    assert conversation.session.context_fill == int(before["temporal.__offset__"])
    prefix = int(anchor_of(conversation).arrays["temporal.__offset__"])
    for name, value in prefix_kv(conversation.session, prefix).items():
        assert np.array_equal(value, anchor_of(conversation).arrays["temporal." + name]), name
    # ... and it goes on: the next frame is the one the unrefused conversation would make.
    twin, twin_who = scripted_conversation(short_context_build, tmp_path / "twin", persona_file(tmp_path))
    for pcm, speaking in talk(30):
        frame(twin, twin_who, pcm, speaking)
    pcm = talk(31)[-1][0]
    assert np.array_equal(frame(conversation, who, pcm, True).result.frame,
                          frame(twin, twin_who, pcm, True).result.frame)


def test_every_rebuild_runs_inside_the_guard_that_keeps_microphone_frames(
        short_context_build: Path, tmp_path: Path) -> None:
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path))
    inside: list[bool] = []
    quiet: list[bool] = []
    guarded = False

    class Guard:
        def __init__(self, in_pause: bool) -> None:
            quiet.append(in_pause)

        def __enter__(self) -> None:
            nonlocal guarded
            guarded = True

        def __exit__(self, *exc: object) -> None:
            nonlocal guarded
            guarded = False

    rebuild = conversation.session.rebuild

    def watched(*args: object) -> None:
        inside.append(guarded)
        rebuild(*args)  # type: ignore[arg-type]

    conversation.session.rebuild = watched  # type: ignore[method-assign]
    conversation.rebuild_guard = Guard
    for pcm, speaking in talk(POLICY.soft_limit + 40):  # re-anchors and idle resets
        frame(conversation, who, pcm, speaking)
    conversation.set_context(conversation.check_context("it is raining."))
    for _ in range(POLICY.pause):
        frame(conversation, who, SILENCE, False)
    assert conversation.stats.reanchors >= 1 and conversation.stats.context_updates == 1
    assert inside and all(inside)
    # Each of these rebuilds waits for a pause: the daemon may bridge the speaker with silence.
    assert quiet and all(quiet)


def test_a_rebuild_forced_by_a_full_context_mid_speech_is_not_called_quiet(
        short_context_build: Path, tmp_path: Path) -> None:
    """The hard limit re-anchors while the driver talks: the speaker's gap is then a late
    model (counted), not a pause's silence (bridged)."""
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path),
                                              replace(POLICY, soft_limit=POLICY.hard_limit))
    quiet: list[bool] = []

    def guard(in_pause: bool):
        quiet.append(in_pause)
        return nullcontext()

    conversation.rebuild_guard = guard
    pcm = talk(1)[0][0]
    turns = [frame(conversation, who, pcm, True) for _ in range(POLICY.hard_limit)]
    reanchored = [t for t in turns if t.action == "reanchor"]
    assert len(reanchored) == 1 and quiet == [False]
    # Its time stays in the frame's compute: the driver hears this one.
    assert reanchored[0].rebuild_ms > 0.0 and reanchored[0].pause_rebuild_ms == 0.0


def test_snapshot_and_restore_go_on_exactly_where_the_conversation_was(
        short_context_build: Path, tmp_path: Path) -> None:
    conversation, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path), seed=2)
    frames = talk(70)
    for pcm, speaking in frames[:40]:
        frame(conversation, who, pcm, speaking)
    saved = conversation.snapshot()
    first = [frame(conversation, who, pcm, speaking).result.frame for pcm, speaking in frames[40:]]
    conversation.restore(saved)
    again = [frame(conversation, who, pcm, speaking).result.frame for pcm, speaking in frames[40:]]
    # Sampling noise goes on from where it is (not rewound), so compare greedy streams only.
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.fixture(scope="module")
def room_for_facts_build(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny build whose context (1200 steps) leaves a prompt about 130 steps, once the
    lifecycle's margins (60 s to re-anchor, 20 s of room, 5 s kept) are taken off."""
    import json
    import shutil

    from personaplex_edge.export.export_onnx import ExportOptions, export_onnx

    work = tmp_path_factory.mktemp("facts")
    shutil.copytree(tiny_checkpoint, work / "ckpt")
    config = json.loads((work / "ckpt" / "config.json").read_text())
    config["context"] = 1200
    (work / "ckpt" / "config.json").write_text(json.dumps(config))
    return export_onnx(work / "ckpt", work / "build", ExportOptions(prefill_steps=32), quiet=True)


def test_live_facts_are_checked_again_when_the_persona_changes(room_for_facts_build: Path,
                                                               tmp_path: Path) -> None:
    """Facts that fit one persona's prompt may not fit the next one's: the switch is refused,
    the conversation and its facts untouched; a persona they fit takes them over."""
    from conversation_kit import Scripted, session_on

    def persona(name: str, prompt: str):
        p = persona_file(tmp_path / name, prompt=prompt)
        return replace(p, name=name, conversation=replace(p.conversation, keep_s=5.0))

    for name in ("short", "wordy", "medium"):
        (tmp_path / name).mkdir()
    short = persona("short", "Hi.")
    wordy = persona("wordy", "You are a calm assistant in a car. " * 6)
    alone = Conversation(session_on(room_for_facts_build, tmp_path / "alone"), activity=Scripted())
    alone.switch_persona(wordy)  # without facts the wordy prompt fits
    conversation = Conversation(session_on(room_for_facts_build, tmp_path), activity=Scripted())
    conversation.switch_persona(short)
    facts = conversation.check_context("the destination is Lyon, fuel range 300 km.")
    conversation.set_context(facts)
    for _ in range(12):  # a pause: the facts reach the model
        conversation.step(SILENCE)
    assert conversation.facts == facts
    before = _state(conversation)
    with pytest.raises(PpxError, match="the wordy prompt with these facts would take"):
        conversation.switch_persona(wordy)  # ... with the facts it does not
    _assert_same(_state(conversation), before)
    assert conversation.persona is short and conversation.facts == facts
    medium = persona("medium", "You are a calm assistant.")
    conversation.switch_persona(medium)
    assert conversation.persona is medium and conversation.pending_facts == facts
