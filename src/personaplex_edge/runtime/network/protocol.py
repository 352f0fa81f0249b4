"""PersonaPlex's client protocol: message kinds, and the `/api/chat` query as a typed request.

Every websocket message is binary and its first byte is its kind (as NVIDIA/personaplex's
server and web client define them): 0 handshake (sent by the server once the persona is
ready), 1 audio (Ogg/Opus at 24 kHz, both directions), 2 text (UTF-8 pieces of the agent's
text), 3 control, 4 metadata (JSON), 5 error (UTF-8), 6 ping.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import parse_qs

from personaplex_edge.runtime.errors import PpxError

CHAT_PATH = "/api/chat"
MAX_PROMPT_CHARS = 4000  # a system prompt longer than this would not fit a 7B's context anyway
_VOICE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PERSONA = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_CLOSE_REASON = 123  # bytes of UTF-8 a websocket close frame carries (RFC 6455)


class Kind(IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6


class ProtocolError(PpxError):
    """A client's request or message the server refuses: sent back as an error message."""


def message(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes((int(kind),)) + payload


def handshake() -> bytes:
    # Version 0, model 0, as moshi's client protocol encodes a handshake (upstream's server
    # sends the kind byte alone).
    return message(Kind.HANDSHAKE, b"\x00\x00")


def error(text: str) -> bytes:
    return message(Kind.ERROR, text.encode("utf-8"))


def close_reason(text: str) -> str:
    """`text` cut to what a close frame carries, at a character boundary: a longer reason
    makes the close fail, and the client sees 1006 instead of the code it was meant to get."""
    return text.encode("utf-8")[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


def split(data: bytes | str) -> tuple[Kind, bytes]:
    """A client's message -> (kind, payload); ProtocolError for anything else."""
    if isinstance(data, str):
        raise ProtocolError("message: text frames are not part of the protocol (send binary)")
    if not data:
        raise ProtocolError("message: empty (the first byte is the kind)")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(f"message: unknown kind {data[0]}") from None
    return kind, bytes(data[1:])


@dataclass(frozen=True)
class ChatRequest:
    """What a client asks for in the `/api/chat` query (validated, not yet clamped)."""

    text_prompt: str = ""
    voice_prompt: str = ""  # a voice of the build (upstream's file name: `.pt` is dropped)
    persona: str = ""  # a configured persona by name
    text_temperature: float | None = None
    text_topk: int | None = None
    audio_temperature: float | None = None
    audio_topk: int | None = None
    seed: int | None = None
    token: str = ""  # worker_auth_id

    @classmethod
    def from_query(cls, query: str) -> ChatRequest:
        """Parse the query string; ProtocolError naming the first bad parameter."""
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=32)
        except ValueError as exc:
            raise ProtocolError(f"query: {exc}") from None

        def one(name: str) -> str:
            values = params.get(name, [""])
            return values[-1]

        text = " ".join(one("text_prompt").split())
        if len(text) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"text_prompt: {len(text)} characters, at most {MAX_PROMPT_CHARS}")
        if "<system>" in text:  # the tags go around the prompt, as for the in-car personas
            text = " ".join(text.replace("<system>", " ").split())
        voice = one("voice_prompt").strip()
        voice = voice[:-3] if voice.endswith(".pt") else voice
        if voice and not _VOICE.match(voice):
            raise ProtocolError(f"voice_prompt: {voice[:80]!r} is not a voice name")
        persona = one("persona").strip()
        if persona and not _PERSONA.match(persona):
            raise ProtocolError(f"persona: {persona[:80]!r} is not a persona name")
        seed = _number(one("seed"), "seed", int)
        return cls(text_prompt=text, voice_prompt=voice, persona=persona,
                   text_temperature=_number(one("text_temperature"), "text_temperature", float),
                   text_topk=_number(one("text_topk"), "text_topk", int),
                   audio_temperature=_number(one("audio_temperature"), "audio_temperature", float),
                   audio_topk=_number(one("audio_topk"), "audio_topk", int),
                   seed=None if seed is None or seed < 0 else seed,  # upstream: -1 is "none"
                   token=one("worker_auth_id"))


def _number(text: str, name: str, kind: type) -> float | int | None:
    if text.strip() == "":
        return None
    try:
        value = kind(float(text)) if kind is int and "." in text else kind(text)
    except (ValueError, OverflowError):
        raise ProtocolError(f"{name}: {text[:40]!r} is not a number") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{name}: {text[:40]!r} is not a finite number")
    return value
