"""The daemon's personas: the default, and every other one a head unit may switch to.

One bad file in `persona_dirs` must not cost the car its assistant: it is left
out with one error line (and the `ppx_personas_skipped` metric), and `ctl
persona` to it answers with that file's error. Only the default persona must
load - without it there is nothing to run, which is a configuration error.

Lookup (`resolve`, also what `persona NAME` on the control socket uses): persona_dirs
before built-ins, so a file there may replace a built-in; a file named after the
persona reports its own errors; a file that cannot be read or decoded is a
`ConfigError` naming it, never another exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from personaplex_edge.runtime.core.persona import Persona, builtin_personas, load_persona
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.service.config import PersonaConfig, persona_files


def read_persona_file(path: Path, k_max: int) -> Persona:
    """A persona YAML file; any problem with it is one ConfigError that names the file."""
    try:
        return load_persona(path, k_max=k_max)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def resolve(cfg: PersonaConfig, ref: str, k_max: int = 250) -> Persona:
    """A persona by name (persona_dirs first, then built-ins) or by YAML path."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        return read_persona_file(Path(ref), k_max)
    files = persona_files(cfg)
    for path in files:
        if path.stem == ref and (persona := read_persona_file(path, k_max)).name == ref:
            return persona
    names = set(builtin_personas())
    for path in files:
        try:
            persona = read_persona_file(path, k_max)
        except ConfigError:
            continue  # another persona's problem; reported at start-up
        if persona.name == ref:
            return persona
        names.add(persona.name)
    if ref in builtin_personas():
        return load_persona(ref, k_max=k_max)
    raise ConfigError(f"persona {ref!r}: not found (known: {', '.join(sorted(names))})")


@dataclass
class PersonaCatalog:
    default: Persona
    personas: list[Persona]  # the default first, one per name
    skipped: list[str] = field(default_factory=list)  # one error line per file left out


def load_catalog(cfg: PersonaConfig, k_max: int) -> PersonaCatalog:
    """Every persona the daemon offers; ConfigError only when the default does not load."""
    default = resolve(cfg, cfg.default, k_max)
    skipped: list[str] = []
    names = list(builtin_personas())
    for path in persona_files(cfg):
        try:
            name = read_persona_file(path, k_max).name
        except ConfigError as exc:
            skipped.append(str(exc))
            continue
        if name not in names:
            names.append(name)
    personas, seen = [default], {default.name}
    for name in names:
        if name in seen:
            continue
        try:  # by name, so a persona_dirs file that replaces a built-in wins as it does on switch
            persona = resolve(cfg, name, k_max)
        except ConfigError as exc:  # e.g. a broken focus.yaml hides the built-in focus
            if str(exc) not in skipped:
                skipped.append(str(exc))
            continue
        seen.add(persona.name)
        personas.append(persona)
    return PersonaCatalog(default, personas, skipped)
