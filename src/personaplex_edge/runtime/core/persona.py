"""Personas: who the model is in the cabin (YAML), validated with file/field/line errors.

A persona names a voice (a preset of the build such as NATF2, or a WAV file
next to the persona), the role prompt, sampling settings and in-car speech
settings. Its `content_hash` keys compiled snapshots: any change that affects
the model's state (voice, prompt) invalidates them; speech settings do not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.yaml_schema import Fields, load_yaml_with_lines

BUILTIN_DIR = Path(__file__).parents[1] / "personas"  # runtime/personas: package data
DEFAULT_PERSONA = "copilot"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
BUSY_POLICIES = ("pause", "duck", "continue")
TEMPERATURE_MIN = 0.01  # below it only 0 (greedy) is accepted
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    # A temperature of 0 is greedy (argmax) for that stream only, as upstream treats it.
    text_temperature: float = 0.7
    text_top_k: int = 25
    audio_temperature: float = 0.8
    audio_top_k: int = 250
    seed: int | None = None  # None: a fresh seed per conversation
    greedy: bool = False  # argmax on both streams (top-k 1): for tests and debugging

    @property
    def text_greedy(self) -> bool:
        return self.greedy or self.text_temperature == 0.0

    @property
    def audio_greedy(self) -> bool:
        return self.greedy or self.audio_temperature == 0.0


@dataclass(frozen=True)
class Speech:
    """In-car speech behaviour applied by the runtime around the model."""

    output_gain_db: float = 0.0
    max_turn_seconds: float = 0.0  # 0: no limit; else the agent is faded to silence after this long
    when_busy: str = "pause"  # what to do while the head unit reports the driver busy
    duck_gain_db: float = -12.0  # used by when_busy: duck


@dataclass(frozen=True)
class Conversation:
    """How a conversation lasts the drive (core/lifecycle.py)."""

    idle_reset_s: float = 45.0  # quiet on both sides this long: a fresh conversation (0: never)
    keep_s: float = 30.0  # conversation replayed after the prefix when the context is renewed


@dataclass(frozen=True)
class Persona:
    name: str
    voice: str  # preset name, or an absolute path to an audio file
    prompt: str
    description: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    speech: Speech = field(default_factory=Speech)
    conversation: Conversation = field(default_factory=Conversation)
    source: str = ""
    # field -> line in `source`, for errors found after parsing; not part of equality
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, field_name: str) -> str:
        """`file:line` of a field, for errors found after parsing (a voice the build lacks)."""
        line = self.lines.get(field_name)
        return f"{self.source}:{line}" if line else self.source

    @property
    def voice_is_file(self) -> bool:
        return self.voice.lower().endswith(_AUDIO_SUFFIXES)

    def content_hash(self) -> str:
        """Hash of what determines the prompt state: voice (file bytes if a file) and prompt."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"voice": Path(self.voice).name if self.voice_is_file else self.voice,
                                  "prompt": self.prompt.strip()}, sort_keys=True).encode())
        if self.voice_is_file:
            digest.update(Path(self.voice).read_bytes())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)


def load_persona(ref: str | Path, k_max: int = 250) -> Persona:
    """A built-in name (`copilot`) or a path to a persona YAML file."""
    path = Path(ref)
    if not path.suffix and _NAME.match(str(ref)):
        path = BUILTIN_DIR / f"{ref}.yaml"
        if not path.exists():
            known = ", ".join(builtin_personas())
            raise ConfigError(f"persona {ref!r}: no such built-in persona (built-in: {known})")
    return parse_persona(path, k_max=k_max)


def builtin_personas() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def parse_persona(path: Path, text: str | None = None, k_max: int = 250) -> Persona:
    doc = load_yaml_with_lines(path, text)
    top = Fields(doc, "", doc.data, {"name", "description", "voice", "prompt", "sampling", "speech",
                                     "conversation"})
    name = top.str("name")
    if not _NAME.match(name):
        raise doc.fail("name", "use lowercase letters, digits, '-' or '_' (at most 64)")
    voice = top.str("voice")
    if voice.lower().endswith(_AUDIO_SUFFIXES):
        voice_path = (Path(path).parent / voice).resolve()
        if not voice_path.is_file():
            raise doc.fail("voice", f"audio file {voice_path} not found")
        voice = str(voice_path)
    elif not re.match(r"^[A-Za-z0-9_-]+$", voice):
        raise doc.fail("voice", "expected a preset name (e.g. NATF2) or a .wav/.flac/.ogg file")
    prompt = " ".join(top.str("prompt").split())
    if "<system>" in prompt:
        raise doc.fail("prompt", "do not include <system> tags; they are added around the prompt")

    s = Fields(doc, "sampling", top.mapping("sampling"),
               {"text_temperature", "text_top_k", "audio_temperature", "audio_top_k", "seed", "greedy"})
    sampling = Sampling(
        text_temperature=_temperature(s, "text_temperature", 0.7),
        text_top_k=s.integer("text_top_k", 25, 1, k_max),
        audio_temperature=_temperature(s, "audio_temperature", 0.8),
        audio_top_k=s.integer("audio_top_k", 250, 1, k_max),
        seed=s.integer("seed", None, 0, SEED_MAX),
        greedy=s.boolean("greedy", False),
    )
    sp = Fields(doc, "speech", top.mapping("speech"),
                {"output_gain_db", "max_turn_seconds", "when_busy", "duck_gain_db"})
    speech = Speech(
        output_gain_db=sp.number("output_gain_db", 0.0, -40.0, 12.0),
        max_turn_seconds=sp.number("max_turn_seconds", 0.0, 0.0, 600.0),
        when_busy=sp.choice("when_busy", "pause", BUSY_POLICIES),
        duck_gain_db=sp.number("duck_gain_db", -12.0, -60.0, 0.0),
    )
    c = Fields(doc, "conversation", top.mapping("conversation"), {"idle_reset_s", "keep_s"})
    idle = c.number("idle_reset_s", 45.0, 0.0, 3600.0)
    if 0.0 < idle < 10.0:  # shorter would reset between a question and its answer
        raise doc.fail("conversation.idle_reset_s", f"{idle:g} is outside 10..3600 (0 means never)")
    conversation = Conversation(idle_reset_s=idle, keep_s=c.number("keep_s", 30.0, 5.0, 120.0))
    return Persona(name=name, voice=voice, prompt=prompt, description=top.str("description", "", allow_empty=True),
                   sampling=sampling, speech=speech, conversation=conversation, source=str(path),
                   lines=dict(doc.lines))


def _temperature(s: Fields, key: str, default: float) -> float:
    """0 is greedy for that stream (as upstream); otherwise 0.01..2.0. Tiny positive values
    are refused: logits / 0.001 overflow fp16 graphs, and 0 says "greedy" plainly."""
    value = s.number(key, default, 0.0, 2.0)
    if 0.0 < value < TEMPERATURE_MIN:
        raise s.doc.fail(f"sampling.{key}",
                         f"{value} is outside {TEMPERATURE_MIN}..2.0 (0 means greedy)")
    return value
