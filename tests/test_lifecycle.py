"""Conversations that outlast the context: re-anchoring keeps the persona's prefix pinned.

`Conversation` is driven here as play and serve drive it; `Scripted` says who speaks in each
frame (a random-weight model never stops emitting words, so its own activity would never pause).

A tiny build with a 120-step context stands in for the 3000-step one, so four contexts run in
seconds; the policy is given in frames."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conversation_kit import (
    CONTEXT,
    POLICY,
    SPEECH,
    anchor_of,
    frame,
    persona_file,
    prefix_kv,
    scripted_conversation,
    session_on,
    talk,
)

from personaplex_edge.runtime.core.lifecycle import LifecyclePolicy
from personaplex_edge.runtime.errors import ConfigError


def test_prefix_stays_bit_identical_over_four_contexts(short_context_build: Path,
                                                       tmp_path: Path) -> None:
    life, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path))
    session = life.session
    prefix = int(anchor_of(life).arrays["temporal.__offset__"])  # steps in the prefix's KV
    anchor = {k[len("temporal."):]: v for k, v in anchor_of(life).arrays.items()
              if k.startswith("temporal.") and k != "temporal.__offset__"}
    actions = []
    for pcm, speaking in talk(4 * CONTEXT + 40):
        actions.append(frame(life, who, pcm, speaking).action)
        assert session.context_fill <= POLICY.hard_limit
        live = prefix_kv(session, prefix)
        assert live.keys() == anchor.keys()
        for name, value in anchor.items():
            assert np.array_equal(live[name], value), name
    assert life.stats.reanchors >= 4
    assert life.stats.longest_fill <= POLICY.hard_limit
    assert "reanchor" in actions and life.stats.failures == 0


def test_reanchored_state_equals_a_fresh_restore_plus_prefill(short_context_build: Path,
                                                              tmp_path: Path) -> None:
    persona = persona_file(tmp_path)
    conversation, who = scripted_conversation(short_context_build, tmp_path / "a", persona)
    a = conversation.session
    for pcm, _ in talk(60):
        frame(conversation, who, pcm, True)
    rows = [r.copy() for r in conversation.history]
    assert len(rows) == POLICY.keep
    ring_before = a.lm.state.tokens.copy()
    conversation.reanchor()
    assert np.array_equal(a.lm.state.tokens, ring_before)  # the token ring goes on untouched
    b = session_on(short_context_build, tmp_path / "b")
    b.start(persona)
    b.lm.prefill(rows, max_steps=b.prefill_steps)
    prefix = anchor_of(conversation).arrays["temporal.__offset__"]
    assert a.context_fill == b.context_fill == prefix + len(rows)
    sa, sb = a.temporal.snapshot(slots=a.context_fill), b.temporal.snapshot(slots=b.context_fill)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert np.array_equal(sa[name], sb[name]), name


def test_idle_reset_after_silence_never_while_speaking(short_context_build: Path,
                                                       tmp_path: Path) -> None:
    life, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path),
                              replace(POLICY, soft_limit=POLICY.hard_limit))
    session = life.session
    speech = talk(40)[:40]
    for pcm, speaking in speech:  # 40 frames of speech: no reset, however long it runs
        assert frame(life, who, pcm, speaking).action is None
    silence = np.zeros(1920, np.float32)
    actions = []
    for _ in range(POLICY.idle_reset):
        actions.append(frame(life, who, silence, False).action)
    assert actions[:-1] == [None] * (POLICY.idle_reset - 1) and actions[-1] == "idle_reset"
    assert session.context_fill == anchor_of(life).arrays["temporal.__offset__"]  # anchor alone
    for _ in range(3 * POLICY.idle_reset):  # more silence: nothing said, nothing to reset
        assert frame(life, who, silence, False).action is None
    assert life.stats.idle_resets == 1


def test_live_context_lands_in_the_next_pause_on_the_new_prefix(short_context_build: Path,
                                                                tmp_path: Path) -> None:
    persona = persona_file(tmp_path)
    life, who = scripted_conversation(short_context_build, tmp_path, persona)
    session = life.session
    for pcm, speaking in talk(30):
        frame(life, who, pcm, speaking)
    facts = "the destination is Lyon, ETA 14:05."
    informed = replace(persona, prompt=f"Hi. Information: {facts}")
    life.set_context(life.check_context(facts))
    actions = []
    silence = np.zeros(1920, np.float32)
    offset = session.lm.state.offset
    for _ in range(POLICY.pause):
        actions.append(frame(life, who, silence, False).action)
    assert actions[-1] == "context" and life.stats.context_updates == 1
    assert session.lm.state.offset == offset + POLICY.pause  # the token ring went on seamlessly
    assert anchor_of(life).key["persona"] == informed.content_hash()
    assert life.show_context()["prompt"].endswith(f"Information: {facts} <system>")
    steps = int(anchor_of(life).arrays["temporal.__offset__"])
    assert session.context_fill == steps + len(life.history)
    live = prefix_kv(session, steps)
    for name, value in live.items():
        assert np.array_equal(value, anchor_of(life).arrays["temporal." + name]), name
    # The same facts again come from the cache of compiled prefixes: no compile.
    life.set_context("")
    for _ in range(POLICY.pause):
        frame(life, who, silence, False)
    life.set_context(facts)
    compiles = []
    session.compile = lambda *a, **k: compiles.append(a)  # type: ignore[method-assign]
    for _ in range(POLICY.pause):
        frame(life, who, silence, False)
    assert compiles == [] and life.stats.context_updates == 3


def test_a_prompt_that_leaves_no_room_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"the prompt \(2700 steps\) plus conversation.keep_s "
                                          r"\(30 s = 375 steps\)"):
        LifecyclePolicy.from_seconds(3000, 2700, idle_reset_s=45, keep_s=30)
    policy = LifecyclePolicy.from_seconds(3000, 229, idle_reset_s=45, keep_s=30)
    assert policy.hard_limit == 2998 and policy.soft_limit == 2998 - 750 and policy.keep == 375


def test_ten_minute_play_re_anchors_and_keeps_its_length(tiny_build: Path, tmp_path: Path) -> None:
    """The real 3000-step context: ten minutes of driving run past it at least twice."""
    import subprocess
    import sys

    speech, _ = sf.read(SPEECH, dtype="float32")
    pattern = np.concatenate([speech, np.zeros(24000 * 5, np.float32)])
    audio = np.tile(pattern, int(np.ceil(600 * 24000 / len(pattern))))[: 600 * 24000]
    audio = audio + 0.003 * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    sf.write(tmp_path / "drive.wav", audio, 24000)
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "play",
                           str(tmp_path / "drive.wav"), "--build", str(tiny_build), "--seed", "1",
                           "--out", str(tmp_path / "reply.wav"), "--snapshot-dir",
                           str(tmp_path / "snapshots")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("conversation: "))
    reanchors = int(line.split()[1])
    longest = int(line.split("longest context ")[1].split()[0])
    assert reanchors >= 2, line
    assert longest <= 2998, line  # the ring never reached the prefix
    reply, rate = sf.read(tmp_path / "reply.wav")
    assert rate == 24000 and len(reply) == len(audio)


def test_idle_reset_with_the_real_vad_never_during_speech_in_road_noise(
        short_context_build: Path, tmp_path: Path) -> None:
    """The driver's VAD decides: 20 s of shipped speech under road noise at 5 dB never resets;
    the road noise alone afterwards resets once, `idle_reset` frames after the speech ended.
    (The agent's side is left out: a random-weight model never stops emitting words.)"""
    from personaplex_edge.runtime.audio.vad import ConversationActivity, UserVad
    from personaplex_edge.sim.noise import mix_at_snr, road_noise

    speech, _ = sf.read(SPEECH, dtype="float32")
    talk_s, quiet_s = 20.0, 6.0
    voice = np.tile(speech, 3)[: int(talk_s * 24000)]
    noise = road_noise(talk_s + quiet_s, 24000, seed=4)
    level = mix_at_snr(voice, noise[: len(voice)], 5.0)
    audio = np.concatenate([voice, np.zeros(int(quiet_s * 24000), np.float32)])
    audio = audio + noise * (np.sqrt(np.mean(level**2)) / np.sqrt(np.mean(noise**2)))
    policy = replace(POLICY, soft_limit=POLICY.hard_limit, idle_reset=int(3.0 * 12.5))
    life, who = scripted_conversation(short_context_build, tmp_path, persona_file(tmp_path), policy)
    vad, talk = UserVad(), ConversationActivity()
    resets = []
    speech_frames = int(talk_s * 12.5)
    last_user = 0
    for k in range(len(audio) // 1920):
        pcm = audio[k * 1920:(k + 1) * 1920]
        user = vad.step(pcm).speech
        last_user = k if user else last_user
        if frame(life, who, pcm, talk.update(user, False).speaking).action == "idle_reset":
            resets.append(k)
    assert len(resets) == 1, resets
    assert resets[0] >= speech_frames  # never while the driver talks
    assert resets[0] == last_user + policy.idle_reset  # the configured silence, to the frame


def test_until_the_first_rebuild_the_lifecycle_changes_no_token(short_context_build: Path,
                                                                tmp_path: Path) -> None:
    """The per-frame bookkeeping (history, activity) perturbs nothing: until a re-anchor or
    reset happens, tokens equal a plain session's (which the parity tests hold to upstream)."""
    persona = persona_file(tmp_path)
    plain = session_on(short_context_build, tmp_path / "plain")
    plain.start(persona, seed=3)
    life, who = scripted_conversation(short_context_build, tmp_path / "kept", persona, seed=3)
    for pcm, speaking in talk(POLICY.soft_limit - 40):
        a = plain.step(pcm)
        turn = frame(life, who, pcm, speaking)
        b = turn.result
        assert turn.action is None
        assert np.array_equal(a.frame, b.frame)
        assert np.array_equal(a.pcm, b.pcm)
