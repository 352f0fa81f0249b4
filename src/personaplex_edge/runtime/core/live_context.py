"""The head unit's live facts as the persona prompt's "Information:" part.

The vehicle's facts (time, destination and ETA, next manoeuvre, outside temperature, range)
join the persona's prompt the way PersonaPlex's customer-service prompts carry facts.
"""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from typing import Any

from personaplex_edge.runtime.core.persona import Persona
from personaplex_edge.runtime.errors import PpxError

CONTEXT_MAX_CHARS = 400  # a few short facts; PersonaPlex follows short factual lists best


def with_context(persona: Persona, facts: str) -> Persona:
    """`persona` whose prompt carries `facts` as its "Information:" part."""
    prompt = persona.prompt.strip()
    if not facts:
        return persona
    if "Information:" in prompt:  # the persona has facts of its own: the vehicle's follow
        return replace(persona, prompt=f"{prompt} {facts}")
    sep = "" if prompt.endswith((".", "!", "?")) else "."
    return replace(persona, prompt=f"{prompt}{sep} Information: {facts}")


def check_context_text(text: Any) -> str:
    """The facts as given (whitespace normalised), or PpxError naming the limit they break."""
    if not isinstance(text, str):
        raise PpxError("context: text: expected a string")
    if len(text) > CONTEXT_MAX_CHARS:
        raise PpxError(f"context: text: {len(text)} characters, the limit is {CONTEXT_MAX_CHARS}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        raise PpxError(f"context: text: control or unassigned character U+{ord(bad):04X} at "
                       f"{text.index(bad)}: give plain text on one line")
    return " ".join(text.split())
