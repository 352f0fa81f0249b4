"""The daemon's configuration (`/etc/personaplex/runtime.yaml`): a validated, frozen tree.

Every field has a default that works on a stock Jetson with a USB audio device
(the ALSA `default` device at 48 kHz), so an empty file is a valid config. Bad
content fails with one line naming file, line and field (`ConfigError`, exit
78). Relative paths are relative to the config file's directory.
`runtime/runtime.example.yaml` is the commented default file. The `audio` section (and the
device recovery fields of `watchdog`) is `audio.settings.AudioSettings`, the one audio schema.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personaplex_edge.runtime.audio.settings import AUDIO_SETTINGS, AudioSettings, conflict
from personaplex_edge.runtime.backends.registry import BACKENDS
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.update.settings import UpdateSettings
from personaplex_edge.runtime.yaml_schema import Fields, YamlDoc, load_yaml_with_lines

DEFAULT_CONFIG_PATH = Path("/etc/personaplex/runtime.yaml")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class BuildConfig:
    path: Path = Path("/opt/personaplex/build")  # from `ppx-export onnx` (plus engines)
    # ort-cuda needs onnxruntime's CUDA provider: without it serve refuses to start (exit 78)
    # rather than run on the CPU; `check` reports it too.
    backend: str = "ort-cuda"
    threads: int | None = None  # CPU threads for ONNX Runtime; None: the backend decides


@dataclass(frozen=True)
class PersonaConfig:
    default: str = "copilot"  # a built-in name, a name from persona_dirs, or a YAML file
    persona_dirs: tuple[Path, ...] = ()  # extra persona YAMLs (*.yaml, *.yml)


@dataclass(frozen=True)
class SnapshotConfig:
    dir: Path = Path("/var/lib/personaplex/snapshots")


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = Path("/run/personaplex/control.sock")
    group: str | None = "personaplex"  # None: keep the daemon's own group
    mode: int = 0o660
    reply_timeout_s: float = 2.0  # longest a reply waits on the daemon
    max_clients: int = 16
    # A connection with no request and no reply in flight for this long is closed, so idle
    # clients cannot hold every slot and lock `ctl` out.
    idle_timeout_s: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback only: the endpoint has no authentication
    port: int = 9464  # 0: any free port (tests)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    transcripts: bool = False  # the agent's words in the journal: off unless asked for


@dataclass(frozen=True)
class WatchdogConfig:
    degraded_misses: int = 10  # deadline misses within degraded_window_s -> degraded
    degraded_window_s: float = 5.0
    # The device recovery fields of this section (retry_min_s, retry_max_s, stall_s) are
    # AudioSettings fields: cfg.audio.retry_min_s and so on.


# Fields that once had a meaning (or were meant to): still accepted, so that files copied from
# an older example load, and ignored with a warning.
RETIRED = {
    "watchdog.recover_s": "retired and ignored (it never had an effect: the degraded state ends "
                          "by itself once fewer than degraded_misses fall within degraded_window_s "
                          "and the audio devices move again); delete the line",
}


@dataclass(frozen=True)
class DaemonConfig:
    build: BuildConfig = field(default_factory=BuildConfig)
    audio: AudioSettings = field(default_factory=AudioSettings)
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    update: UpdateSettings = field(default_factory=UpdateSettings)
    source: Path | None = field(default=None, compare=False)


SECTIONS = ("build", "audio", "persona", "snapshots", "control", "metrics", "logging", "watchdog",
            "update")
log = logging.getLogger(__name__)


def load_config(path: Path, text: str | None = None) -> DaemonConfig:
    """Parse and validate a config file (ConfigError: `file:line: field: why`)."""
    doc = load_yaml_with_lines(Path(path), text)
    top = Fields(doc, "", doc.data, set(SECTIONS))
    base = Path(path).resolve().parent

    def section(name: str, known: set[str]) -> Fields:
        data = top.data.get(name)
        return Fields(doc, name, {} if data is None else data, known)

    b = section("build", {"path", "backend", "threads"})
    build = BuildConfig(
        path=_path(b, "path", BuildConfig.path, base),
        backend=b.choice("backend", BuildConfig.backend, BACKENDS),
        threads=b.integer("threads", None, 1, 256),
    )

    audio = _audio(doc, section)

    p = section("persona", {"default", "persona_dirs"})
    persona = PersonaConfig(
        default=_persona_ref(p, base),
        persona_dirs=_path_list(doc, p, "persona_dirs", base),
    )

    s = section("snapshots", {"dir"})
    snapshots = SnapshotConfig(dir=_path(s, "dir", SnapshotConfig.dir, base))

    c = section("control", set(ControlConfig.__dataclass_fields__))
    group = c.data.get("group", ControlConfig.group)
    control = ControlConfig(
        socket=_path(c, "socket", ControlConfig.socket, base),
        group=None if group is None else c.str("group", ControlConfig.group),
        mode=_mode(c, "mode"),
        reply_timeout_s=c.number("reply_timeout_s", ControlConfig.reply_timeout_s, 0.1, 60.0),
        max_clients=c.integer("max_clients", ControlConfig.max_clients, 1, 256),
        idle_timeout_s=c.number("idle_timeout_s", ControlConfig.idle_timeout_s, 0.1, 86400.0),
    )
    if len(str(control.socket).encode()) > 107:  # sun_path is 108 bytes with the NUL
        raise doc.fail("control.socket", "path longer than 107 bytes (a Unix socket limit)")

    m = section("metrics", {"enabled", "host", "port"})
    metrics = MetricsConfig(
        enabled=m.boolean("enabled", MetricsConfig.enabled),
        host=_loopback(m, "host"),
        port=m.integer("port", MetricsConfig.port, 0, 65535),
    )

    lg = section("logging", {"level", "transcripts"})
    logging = LoggingConfig(
        level=lg.choice("level", LoggingConfig.level, LOG_LEVELS),
        transcripts=lg.boolean("transcripts", LoggingConfig.transcripts),
    )

    w = section("watchdog", _known("watchdog", WatchdogConfig))
    watchdog = WatchdogConfig(
        degraded_misses=w.integer("degraded_misses", WatchdogConfig.degraded_misses, 1, 100000),
        degraded_window_s=w.number("degraded_window_s", WatchdogConfig.degraded_window_s, 0.1, 3600.0),
    )

    u = section("update", set(UpdateSettings.__dataclass_fields__))
    target = u.data.get("target")
    update = UpdateSettings(
        slots_dir=_path(u, "slots_dir", UpdateSettings.slots_dir, base),
        trusted_keys=_path(u, "trusted_keys", UpdateSettings.trusted_keys, base),
        target=None if target is None else u.str("target", None),
        max_starts=u.integer("max_starts", UpdateSettings.max_starts, 1, 100),
        health_frames=u.integer("health_frames", UpdateSettings.health_frames, 1, 1_000_000),
        health_s=u.number("health_s", UpdateSettings.health_s, 0.0, 86400.0),
        health_deadline_ms=u.number("health_deadline_ms", UpdateSettings.health_deadline_ms,
                                    0.001, 10000.0),
        health_max_misses=u.integer("health_max_misses", UpdateSettings.health_max_misses, 0,
                                    1_000_000),
    )
    if update.target is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", update.target):
        raise doc.fail("update.target", f"{update.target!r} is not a target profile name")

    return DaemonConfig(build, audio, persona, snapshots, control, metrics, logging, watchdog,
                        update, source=Path(path))


# -- audio --------------------------------------------------------------------------------

def _known(name: str, own: type | None = None) -> set[str]:
    """The fields a section may hold: its own dataclass's, the AudioSettings it sets, retired."""
    known = {s.name for s in AUDIO_SETTINGS if s.section == name}
    known |= set(own.__dataclass_fields__) if own else set()
    return known | {key.split(".", 1)[1] for key in RETIRED if key.startswith(f"{name}.")}


def _audio(doc: YamlDoc, section: Callable[[str, set[str]], Fields]) -> AudioSettings:
    """AudioSettings from the `audio` section and the device recovery fields of `watchdog`."""
    parts = {name: section(name, _known(name, None if name == "audio" else WatchdogConfig))
             for name in ("audio", "watchdog")}
    values = {s.name: parts[s.section].setting(s) for s in AUDIO_SETTINGS if s.section}
    found = conflict(values)
    if found:
        raise doc.fail(*found)
    for key, why in RETIRED.items():
        name, field_name = key.split(".", 1)
        if field_name in parts[name].data:
            log.warning("%s:%s: %s: %s", doc.path, doc.lines.get(key, 1), key, why)
    return AudioSettings(**values)


# -- personas ---------------------------------------------------------------------------

def persona_files(cfg: PersonaConfig) -> list[Path]:
    """Every persona YAML in persona_dirs, sorted by directory then name (missing dirs skipped:
    `ppx-runtime check` reports them)."""
    files: list[Path] = []
    for d in cfg.persona_dirs:
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return files


# -- field helpers ----------------------------------------------------------------------

def _path(f: Fields, key: str, default: Path, base: Path) -> Path:
    value = f.str(key, None)
    return default if value is None else (base / Path(value).expanduser())


def _path_list(doc: YamlDoc, f: Fields, key: str, base: Path) -> tuple[Path, ...]:
    value = f.data.get(key, [])
    if value is None:
        return ()
    if not isinstance(value, list):
        raise doc.fail(f"{f.prefix}.{key}", "expected a list of directories")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            line = doc.lines.get(f"{f.prefix}.{key}", 1)
            raise ConfigError(f"{doc.path}:{line}: {f.prefix}.{key}[{i}]: expected a directory path, "
                              f"got {item!r}")
        out.append(base / Path(item).expanduser())
    return tuple(out)


def _persona_ref(f: Fields, base: Path) -> str:
    ref = f.str("default", PersonaConfig.default)
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        return str(base / Path(ref).expanduser())
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", ref):
        raise f.doc.fail("persona.default", f"{ref!r} is neither a persona name nor a .yaml file")
    return ref


def _mode(f: Fields, key: str) -> int:
    value = f.data.get(key, ControlConfig.mode)
    field_name = f"control.{key}"
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.replace("o", ""), 8)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise f.doc.fail(field_name, f"expected an octal mode such as \"0660\", got {value!r}")
    if value & ~0o777:
        raise f.doc.fail(field_name, f"{oct(value)} is not a permission mode (write it quoted in "
                                     "octal, e.g. \"0660\")")
    if value & 0o007:
        raise f.doc.fail(field_name, f"{oct(value)} gives other users access; the control socket is "
                                     "for the owner and its group (e.g. \"0660\")")
    if value & 0o600 != 0o600:
        raise f.doc.fail(field_name, f"{oct(value)} must let the owner read and write (0600)")
    return value


def _loopback(f: Fields, key: str) -> str:
    value = f.str(key, MetricsConfig.host)
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise f.doc.fail(f"metrics.{key}", f"{value!r} is not an IP address (use 127.0.0.1 or ::1)"
                         ) from None
    if not address.is_loopback:
        raise f.doc.fail(f"metrics.{key}", f"{value} is not a loopback address; the metrics endpoint "
                                           "has no authentication (use 127.0.0.1 or ::1)")
    return value
