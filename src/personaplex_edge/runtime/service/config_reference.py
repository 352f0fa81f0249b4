"""The configuration reference, generated from the schema (`config.config_settings`): one
Markdown table per section of `runtime.yaml`. The docs site's build inserts it
(docs/hooks/config_reference.py), so the reference cannot drift from what the loader accepts.

    python -m personaplex_edge.runtime.service.config_reference   # prints it
"""

from __future__ import annotations

from typing import Any

from personaplex_edge.runtime.service.config import RETIRED, config_settings
from personaplex_edge.runtime.yaml_schema import Setting


def reference_markdown() -> str:
    parts = []
    for section, settings in config_settings().items():
        parts.append(f"### `{section}`\n")
        parts.append("| field | default | allowed | what it does |")
        parts.append("|---|---|---|---|")
        for s in settings:
            parts.append(f"| `{section}.{s.name}` | {_default(s)} | {_allowed(s)} | "
                         f"{_cell(s.doc)} |")
        retired = [(key, why) for key, why in RETIRED.items() if key.startswith(f"{section}.")]
        if retired:
            parts.append("")
            parts += [f"Retired, still accepted with a warning: `{key}` ({why})."
                      for key, why in retired]
        parts.append("")
    return "\n".join(parts)


def _default(s: Setting) -> str:
    value: Any = s.default
    if value is None:
        return f"`{s.null_word or 'null'}` ({_cell(s.null or '')})"
    if s.kind == "mode":
        return f'`"{value:04o}"`'
    if s.kind == "paths":
        return f"`[{', '.join(str(v) for v in value)}]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _allowed(s: Setting) -> str:
    if s.choices:
        allowed = " \\| ".join(f"`{c}`" for c in s.choices)
    elif s.lo is not None and s.hi is not None:
        allowed = f"{s.lo:g} to {s.hi:g}"
    else:
        allowed = {"bool": "`true` \\| `false`", "text": "text", "path": "a path (relative to "
                   "the config file)", "paths": "a list of paths", "mode": 'quoted octal, e.g. '
                   '`"0660"`'}.get(s.kind, s.kind)
    if s.null is not None:
        allowed += f", or `{s.null_word or 'null'}`"
    return allowed


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    print(reference_markdown())
