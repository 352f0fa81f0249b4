"""Tiny YAML schema validation with errors that name file, field and line.

`load_yaml_with_lines` parses a document and remembers the line of every
mapping key, so a validator can say `persona.yaml:7: sampling.top_k: ...`.
Used by personas and the daemon config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from personaplex_edge.runtime.errors import ConfigError


@dataclass
class YamlDoc:
    path: Path
    data: dict[str, Any]
    lines: dict[str, int]  # dotted field path -> 1-based line

    def fail(self, field: str, why: str) -> ConfigError:
        line = self.lines.get(field) or self.lines.get(field.rsplit(".", 1)[0], 1)
        return ConfigError(f"{self.path}:{line}: {field}: {why}")


def _to_python(node: yaml.Node, prefix: str, lines: dict[str, int]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            lines[path] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, path, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, f"{prefix}[{i}]", lines) for i, v in enumerate(node.value)]
    if node.tag == "tag:yaml.org,2002:null":  # `key:` with nothing after it
        return None
    return yaml.safe_load(yaml.serialize(node))


def load_yaml_with_lines(path: Path, text: str | None = None) -> YamlDoc:
    path = Path(path)
    try:
        source = path.read_text() if text is None else text
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        node = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if node is None:
        return YamlDoc(path, {}, {})
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: expected a mapping at the top level")
    lines: dict[str, int] = {}
    return YamlDoc(path, _to_python(node, "", lines), lines)


class Fields:
    """Typed access to one mapping of a YamlDoc, rejecting unknown keys."""

    def __init__(self, doc: YamlDoc, prefix: str, data: Any, known: set[str]):
        if not isinstance(data, dict):
            raise doc.fail(prefix, "expected a mapping")
        self.doc, self.prefix, self.data = doc, prefix, data
        for key in data:
            if key not in known:
                raise doc.fail(self._path(key), f"unknown field (known: {', '.join(sorted(known))})")

    def _path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def str(self, key: str, default: Any = ..., allow_empty: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.doc.fail(self._path(key), "expected a non-empty string")
        return value

    def number(self, key: str, default: Any, lo: float, hi: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.doc.fail(self._path(key), f"expected a number, got {value!r}")
        if not lo <= value <= hi:
            raise self.doc.fail(self._path(key), f"{value} is outside {lo}..{hi}")
        return float(value)

    def integer(self, key: str, default: Any, lo: int, hi: int) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.doc.fail(self._path(key), f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.doc.fail(self._path(key), f"{value} is outside {lo}..{hi}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.doc.fail(self._path(key), f"expected true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(key, default)
        if value not in choices:
            raise self.doc.fail(self._path(key), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def mapping(self, key: str) -> Any:
        value = self.data.get(key)
        return {} if value is None else value  # an empty section means all defaults

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is ...:
            raise self.doc.fail(self._path(key) if self.prefix else key, "required field is missing")
        return default
