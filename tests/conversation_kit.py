"""A conversation on a tiny build with a 120-step context, driven frame by frame with a
scripted voice activity: four contexts run in seconds (test_lifecycle, test_conversation)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.lifecycle import LifecyclePolicy
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import Persona, parse_persona
from personaplex_edge.runtime.core.session import Session

SPEECH = Path(__file__).parent / "data" / "speech_24k.wav"
CONTEXT = 120
POLICY = LifecyclePolicy(context=CONTEXT, idle_reset=25, keep=20, pause=6, soft_limit=90,
                         hard_limit=CONTEXT - 2)


@pytest.fixture(scope="module")
def short_context_build(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("lifecycle")
    ckpt = work / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["context"] = CONTEXT
    (ckpt / "config.json").write_text(json.dumps(config))
    return export_onnx(ckpt, work / "build", ExportOptions(prefill_steps=32), quiet=True)


def persona_file(tmp_path: Path, prompt: str = "Hi.") -> Persona:
    path = tmp_path / "short.yaml"
    path.write_text(f"name: short\nvoice: NATF2\nprompt: {prompt}\nsampling:\n  greedy: true\n")
    voice = tmp_path / "short.wav"
    sf.write(voice, np.zeros(1920 * 4, np.float32), 24000)
    return replace(parse_persona(path), voice=str(voice))


def session_on(build: Path, tmp_path: Path) -> Session:
    return Session(load_manifest(build), OrtBackend(threads=1), tmp_path / "snapshots")


class Scripted:
    """Who speaks, as the test says: `speaking` is read at every frame."""

    def __init__(self) -> None:
        self.speaking = False

    def update(self, mic: np.ndarray, text_token: int, pcm: np.ndarray | None) -> bool:
        return self.speaking

    def new_conversation(self) -> None:
        pass

    def microphone_reopened(self) -> None:
        pass


def scripted_conversation(build: Path, tmp_path: Path, persona: Persona,
                  policy: LifecyclePolicy = POLICY, seed: int | None = None
                  ) -> tuple[Conversation, Scripted]:
    """A conversation on `persona` whose policy is `policy` (given in frames)."""
    who = Scripted()
    conversation = Conversation(session_on(build, tmp_path), activity=who, policy=policy)
    conversation.switch_persona(persona, seed=seed)
    return conversation, who


def frame(conversation: Conversation, who: Scripted, pcm: np.ndarray, speaking: bool):
    who.speaking = speaking
    return conversation.step(pcm)


def anchor_of(conversation: Conversation):
    return conversation._anchor_or_fail()


def talk(n: int) -> list[tuple[np.ndarray, bool]]:
    """Frames of speech (6 s) and silence (4 s) in turn, with whether someone speaks."""
    speech, _ = sf.read(SPEECH, dtype="float32")
    out = []
    for i in range(n):
        t = i % 125
        if t < 75:
            start = (i * 1920) % (len(speech) - 1920)
            out.append((speech[start:start + 1920], True))
        else:
            out.append((np.zeros(1920, np.float32), False))
    return out


def prefix_kv(session: Session, steps: int) -> dict[str, np.ndarray]:
    live = session.temporal.snapshot(slots=steps)
    return {k: v for k, v in live.items() if k != "__offset__"}


