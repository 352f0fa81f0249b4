"""Tiny YAML schema validation with errors that name file, field and line.

`load_yaml_with_lines` parses a document and remembers the line of every
mapping key, so a validator can say `persona.yaml:7: sampling.top_k: ...`.
Used by personas, the daemon config and target profiles.

Hostile or sloppy files fail as one line too: bytes that are not UTF-8,
anchors and aliases (a 500-byte "billion laughs" would otherwise expand to
billions of nodes when walked: the schemas never need them), duplicate keys
(PyYAML keeps the last one silently), and tags no safe constructor knows.
Numbers follow YAML 1.2 where PyYAML's 1.1 rules fall short: `1e9` is a float.

`Setting` describes one field once (type, default, range, YAML section, one line of
documentation) as the metadata of a dataclass field (`setting(...)`); `settings_of` reads the
table back for the loader (`Fields.setting`), the dataclass's own validation (`check_settings`),
tests and generated docs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.utf8 import decode_utf8


@dataclass
class YamlDoc:
    path: Path
    data: dict[str, Any]
    lines: dict[str, int]  # dotted field path -> 1-based line

    def fail(self, field: str, why: str) -> ConfigError:
        line = self.lines.get(field) or self.lines.get(field.rsplit(".", 1)[0], 1)
        return ConfigError(f"{self.path}:{line}: {field}: {why}")


class _AliasRefused(yaml.MarkedYAMLError):
    """An anchor or alias in a file whose schema needs neither."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases while composing (before any expansion)
    and resolves YAML 1.2 exponent floats (`1e9`), which YAML 1.1 reads as strings."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasRefused(problem="YAML anchors and aliases are not allowed",
                                problem_mark=event.start_mark)
        return super().compose_node(parent, index)


# YAML 1.1 wants a dot and a signed exponent (`1.0e+9`); 1.2 also reads `1e9`, `1.5e3`, `.5e3`.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _to_python(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path,
               scalars: yaml.constructor.SafeConstructor) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            field = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in out:
                raise ConfigError(f"{path}:{line}: {field}: duplicate key (first at line {lines[field]})")
            lines[field] = line
            out[key] = _to_python(value_node, field, lines, path, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, f"{prefix}[{i}]", lines, path, scalars) for i, v in enumerate(node.value)]
    if node.tag == "tag:yaml.org,2002:null":  # `key:` with nothing after it
        return None
    try:
        return scalars.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # unknown tag, `!!int abc`, ...
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: invalid YAML: {why}") from None


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return decode_utf8(raw, path, ConfigError)


def load_yaml_with_lines(path: Path, text: str | None = None) -> YamlDoc:
    path = Path(path)
    source = _read_utf8(path) if text is None else text
    try:
        node = yaml.compose(source, Loader=_Loader)
    except _AliasRefused as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem} (this file needs "
                          "neither)") from None
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
    # One constructor per document: it caches what it built, so it must not outlive the load.
    return YamlDoc(path, _to_python(node, "", lines, path, yaml.constructor.SafeConstructor()), lines)


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

    def setting(self, s: Setting) -> Any:
        """The value of `s` (its default when absent), validated by `s.problem`."""
        value = self.data.get(s.name, s.default)
        if s.null_word is not None and value == s.null_word:
            value = None
        if s.kind == "choice" and isinstance(value, bool) and "off" in s.choices:
            if value is True:  # YAML 1.1 reads a bare `on` / `off` as a boolean
                raise self.doc.fail(self._path(s.name), f"true (or on) is not one of {s.choices_text}")
            value = "off"
        why = s.problem(value)
        if why:
            raise self.doc.fail(self._path(s.name), why)
        return float(value) if s.kind == "float" and value is not None else value


# -- one table of fields ------------------------------------------------------------------

# path: a file or directory (relative to the config file); paths: a list of them; mode: a
# permission mode, written quoted in octal ("0660"). Their finer rules live with their loaders.
Kind = Literal["text", "int", "float", "bool", "choice", "path", "paths", "mode"]


@dataclass(frozen=True)
class Setting:
    """One field: its type, default, range and one line of documentation."""

    kind: Kind
    default: Any
    doc: str
    lo: float | None = None  # inclusive range of an int or float
    hi: float | None = None
    choices: tuple[Any, ...] = ()  # the allowed values of a choice (or an int)
    null: str | None = None  # what null means, where null is allowed
    null_word: str | None = None  # a word the YAML may write for null ("auto")
    section: str | None = None  # the YAML section that sets it; None: not settable there
    source: str = ""  # where the value comes from when no YAML section sets it
    hint: str = ""  # appended to a refusal
    name: str = ""  # the dataclass field's name (settings_of fills it in)

    @property
    def choices_text(self) -> str:
        return ", ".join(str(c) for c in self.choices)

    @property
    def range_text(self) -> str:
        return f"{self.lo:g}..{self.hi:g}"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid here (one clause), or None."""
        why = self._problem(value)
        return f"{why} ({self.hint})" if why and self.hint else why

    def _problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null is not None else self._expected(value)
        if self.kind == "bool":
            return None if isinstance(value, bool) else self._expected(value)
        if self.kind == "paths":
            ok = isinstance(value, list | tuple) and all(isinstance(v, str | Path) and str(v).strip()
                                                        for v in value)
            return None if ok else self._expected(value)
        if self.kind == "mode":
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777
            return None if ok else self._expected(value)
        if self.kind == "path" and isinstance(value, Path):
            value = str(value)
        if self.kind in ("text", "path"):
            if not isinstance(value, str) or not value.strip():
                return self._expected(value)
            if any(c in value for c in "\n\r\0"):
                return "cannot contain control characters"
            return None
        if self.kind == "choice":
            return None if value in self.choices else f"{value!r} is not one of {self.choices_text}"
        number = int if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return self._expected(value)
        if self.choices and value not in self.choices:
            return f"{value} is not one of {self.choices_text}"
        if self.lo is not None and self.hi is not None and not self.lo <= value <= self.hi:
            return f"{value} is outside {self.range_text}"
        return None

    def _expected(self, value: Any) -> str:
        what = {"bool": "true or false", "text": "a non-empty string", "int": "an integer",
                "float": "a number", "path": "a path", "paths": "a list of paths",
                "mode": 'an octal permission mode such as "0660"'}.get(self.kind, "a value")
        if self.null_word is not None:
            what += f' or "{self.null_word}"'
        return f"expected {what}, got {value!r}"


def setting(kind: Kind, default: Any, doc: str, **options: Any) -> Any:
    """A dataclass field described by a `Setting` (`channels: int = setting("int", 1, ...)`)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, default, doc,
                                                                           **options)})


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The `Setting` of every field of dataclass `cls` declared with `setting`, in field order."""
    return tuple(dataclasses.replace(f.metadata["setting"], name=f.name)
                 for f in dataclasses.fields(cls) if "setting" in f.metadata)


def check_settings(obj: Any, section: str) -> None:
    """Validate every `Setting` field of `obj` (ConfigError: `section.field: why`, the field's
    own YAML section where it has one)."""
    for s in settings_of(type(obj)):
        why = s.problem(getattr(obj, s.name))
        if why:
            raise ConfigError(f"{s.section or section}.{s.name}: {why}")
