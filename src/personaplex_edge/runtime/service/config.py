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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.audio.settings import AUDIO_SETTINGS, AudioSettings, conflict
from personaplex_edge.runtime.backends.registry import BACKENDS
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.network.access import is_loopback
from personaplex_edge.runtime.update.settings import UpdateSettings
from personaplex_edge.runtime.yaml_schema import (
    Fields,
    Setting,
    YamlDoc,
    load_yaml_with_lines,
    setting,
    settings_of,
)

DEFAULT_CONFIG_PATH = Path("/etc/personaplex/runtime.yaml")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class BuildConfig:
    path: Path = setting(
        "path", Path("/opt/personaplex/build"),
        "the build directory from `ppx-export onnx`, `quantize` or `engines` (manifest.json, "
        "graphs, engines)", section="build")
    backend: str = setting(
        "choice", "ort-cuda",
        "inference backend. ort-cuda needs NVIDIA's onnxruntime-gpu: without its provider the "
        "daemon refuses to start (exit 78) rather than run on the CPU, and `check` says so",
        choices=BACKENDS, section="build")
    threads: int | None = setting(
        "int", None, "CPU threads for ONNX Runtime", lo=1, hi=256, null="the backend decides",
        section="build")


@dataclass(frozen=True)
class PersonaConfig:
    default: str = setting(
        "text", "copilot", "the persona at start-up: a built-in one (copilot, focus, roadtrip), "
        "a name from persona_dirs (which may replace a built-in), or a persona YAML file",
        section="persona")
    persona_dirs: tuple[Path, ...] = setting(
        "paths", (), "directories of extra persona YAML files (*.yaml, *.yml), e.g. "
        "[/etc/personaplex/personas]; a file that does not load is skipped with one line",
        null="none", section="persona")


@dataclass(frozen=True)
class SnapshotConfig:
    dir: Path = setting(
        "path", Path("/var/lib/personaplex/snapshots"),
        "compiled persona prompts (rebuilt automatically when stale); must be writable",
        section="snapshots")


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = setting(
        "path", Path("/run/personaplex/control.sock"),
        "the head unit's Unix socket (`ppx-runtime ctl`); at most 107 bytes", section="control")
    group: str | None = setting(
        "text", "personaplex", "group that may connect besides the daemon's user",
        null="keep the daemon's own group", section="control")
    mode: int = setting(
        "mode", 0o660, "permissions of the socket: owner and group only", section="control")
    reply_timeout_s: float = setting(
        "float", 2.0, "longest a reply waits on the daemon before it answers with an error",
        lo=0.1, hi=60.0, section="control")
    max_clients: int = setting(
        "int", 16, "connections at once; one more gets an error reply", lo=1, hi=256,
        section="control")
    # Idle clients must not hold every slot and lock `ctl` out.
    idle_timeout_s: float = setting(
        "float", 30.0, "a connection with no request and no reply in flight this long is closed",
        lo=0.1, hi=86400.0, section="control")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = setting(
        "bool", True, "serve Prometheus text at http://HOST:PORT/metrics", section="metrics")
    host: str = setting(
        "text", "127.0.0.1", "a loopback address only (127.0.0.1 or ::1): the endpoint has no "
        "authentication", section="metrics")
    port: int = setting("int", 9464, "TCP port; 0: any free port (tests)", lo=0, hi=65535,
                        section="metrics")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = setting(
        "choice", "info", "log level; logs go to stdout with journald priority prefixes",
        choices=LOG_LEVELS, section="logging")
    transcripts: bool = setting(
        "bool", False, "write what the agent says to the journal (privacy: off unless asked for)",
        section="logging")


@dataclass(frozen=True)
class WatchdogConfig:
    degraded_misses: int = setting(
        "int", 10, "frame deadline misses within degraded_window_s that make the daemon degraded",
        lo=1, hi=100000, section="watchdog")
    degraded_window_s: float = setting(
        "float", 5.0, "...and it is healthy again once fewer misses fall within the window and "
        "the audio devices move again", lo=0.1, hi=3600.0, section="watchdog")
    # The device recovery fields of this section (retry_min_s, retry_max_s, stall_s) are
    # AudioSettings fields: cfg.audio.retry_min_s and so on.


NETWORK_POLICIES = ("when-cabin-idle", "exclusive", "off")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class NetworkConfig:
    """PersonaPlex's client protocol on a websocket (runtime/network/; docs/network.md)."""

    enabled: bool = setting(
        "bool", False, "serve PersonaPlex's client protocol on a websocket (/api/chat), so "
        "NVIDIA's web client or any client of that protocol talks to the car's model; needs the "
        "network extra", section="network")
    host: str = setting(
        "text", "127.0.0.1", "listen address: 127.0.0.1 for this machine only; any other "
        "address (0.0.0.0: every interface) needs token", section="network")
    port: int = setting("int", 8998, "TCP port (upstream's); 0: any free port (tests)", lo=0,
                        hi=65535, section="network")
    token: str | None = setting(
        "text", None, f"what every client from the network presents (the web client's "
        f"worker_auth_id, or an Authorization: Bearer header); at least {MIN_TOKEN_CHARS} "
        "characters, e.g. `openssl rand -hex 16`", null="none: loopback clients only",
        section="network")
    tls_cert: Path | None = setting(
        "path", None, "PEM certificate chain for wss:// and https:// (a browser on another "
        "machine gets the microphone only over https); with tls_key", null="plain ws:// and http://",
        section="network")
    tls_key: Path | None = setting(
        "path", None, "PEM private key of tls_cert", null="plain ws:// and http://",
        section="network")
    static_dir: Path | None = setting(
        "path", None, "a web client's built files (DIR/index.html), served on the same port "
        "(`serve --static DIR` sets it for one run)", null="no static files", section="network")
    policy: str = setting(
        "choice", "when-cabin-idle", "who has the model: when-cabin-idle (a session starts after "
        "the cabin was quiet for cabin_idle_s; the driver takes the model back by speaking), "
        "exclusive (a session keeps it until it ends), off (sessions refused)",
        choices=NETWORK_POLICIES, section="network")
    cabin_idle_s: float = setting(
        "float", 10.0, "quiet in the cabin before a session may start (when-cabin-idle)",
        lo=0.0, hi=3600.0, section="network")
    takeback_ms: float = setting(
        "float", 240.0, "driver speech this long ends a network session (when-cabin-idle)",
        lo=80.0, hi=5000.0, section="network")
    idle_timeout_s: float = setting(
        "float", 10.0, "a session ends after this long without audio from its client",
        lo=1.0, hi=3600.0, section="network")
    max_session_s: float = setting("float", 3600.0, "...or after this long in all", lo=1.0,
                                   hi=86400.0, section="network")
    start_timeout_s: float = setting(
        "float", 60.0, "the longest a client waits for the model (a new prompt's first compile "
        "included)", lo=1.0, hi=600.0, section="network")
    max_message_bytes: int = setting(
        "int", 65536, "larger messages end the session (audio pages are a few hundred bytes)",
        lo=1024, hi=1 << 22, section="network")
    max_clients: int = setting(
        "int", 4, "connections at once; one session has the model, the others are refused",
        lo=1, hi=64, section="network")
    jitter_ms: float = setting(
        "float", 40.0, "incoming audio buffered beyond one frame before the model hears it "
        "(covers the network's jitter; each ms is a ms of latency; 0 on wired links)",
        lo=0.0, hi=1000.0, section="network")
    jitter_max_ms: float = setting(
        "float", 1000.0, "the most incoming audio the jitter buffer holds (older is dropped)",
        lo=200.0, hi=600000.0, section="network")
    jitter_trim_s: float = setting(
        "float", 2.0, "a standing excess above jitter_ms that lasts this long is dropped "
        "(0: never; a session may then run up to jitter_max_ms late)",
        lo=0.0, hi=600.0, section="network")
    reply_queue_ms: float = setting(
        "float", 2000.0, "replies a client has not taken: beyond this the session ends (a slow "
        "reader)", lo=400.0, hi=60000.0, section="network")
    ping_interval_s: float = setting(
        "float", 5.0, "websocket pings: the round trip in the metrics, and a dead peer found",
        lo=0.5, hi=600.0, section="network")

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)


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
    network: NetworkConfig = field(default_factory=NetworkConfig)
    source: Path | None = field(default=None, compare=False)


SECTIONS = ("build", "audio", "persona", "snapshots", "control", "metrics", "logging", "watchdog",
            "update", "network")
_SECTION_CLASSES = {"build": BuildConfig, "persona": PersonaConfig, "snapshots": SnapshotConfig,
                    "control": ControlConfig, "metrics": MetricsConfig, "logging": LoggingConfig,
                    "watchdog": WatchdogConfig, "update": UpdateSettings, "network": NetworkConfig}


def config_settings() -> dict[str, tuple[Setting, ...]]:
    """Every field a config file may set, by section, in file order: the one table the loader,
    the example file's test and the generated reference read."""
    out = {}
    for name in SECTIONS:
        own = settings_of(_SECTION_CLASSES[name]) if name in _SECTION_CLASSES else ()
        out[name] = own + tuple(s for s in AUDIO_SETTINGS if s.section == name)
    return out
log = logging.getLogger(__name__)


def load_config(path: Path, text: str | None = None) -> DaemonConfig:
    """Parse and validate a config file (ConfigError: `file:line: field: why`)."""
    doc = load_yaml_with_lines(Path(path), text)
    top = Fields(doc, "", doc.data, set(SECTIONS))
    base = Path(path).resolve().parent

    def section(name: str, known: set[str]) -> Fields:
        data = top.data.get(name)
        return Fields(doc, name, {} if data is None else data, known)

    b = section("build", _known("build", BuildConfig))
    build = BuildConfig(path=_path(b, BuildConfig, "path", base),
                        **_simple(b, BuildConfig, besides=("path",)))

    audio = _audio(doc, section)

    p = section("persona", _known("persona", PersonaConfig))
    persona = PersonaConfig(default=_persona_ref(p, base),
                            persona_dirs=_path_list(doc, p, "persona_dirs", base))

    s = section("snapshots", _known("snapshots", SnapshotConfig))
    snapshots = SnapshotConfig(dir=_path(s, SnapshotConfig, "dir", base))

    c = section("control", _known("control", ControlConfig))
    control = ControlConfig(socket=_path(c, ControlConfig, "socket", base), mode=_mode(c, "mode"),
                            **_simple(c, ControlConfig, besides=("socket", "mode")))
    if len(str(control.socket).encode()) > 107:  # sun_path is 108 bytes with the NUL
        raise doc.fail("control.socket", "path longer than 107 bytes (a Unix socket limit)")

    m = section("metrics", _known("metrics", MetricsConfig))
    metrics = MetricsConfig(host=_loopback(m, "host"), **_simple(m, MetricsConfig, besides=("host",)))

    lg = section("logging", _known("logging", LoggingConfig))
    logging = LoggingConfig(**_simple(lg, LoggingConfig))

    w = section("watchdog", _known("watchdog", WatchdogConfig))
    watchdog = WatchdogConfig(**_simple(w, WatchdogConfig))

    u = section("update", _known("update", UpdateSettings))
    update = UpdateSettings(slots_dir=_path(u, UpdateSettings, "slots_dir", base),
                            trusted_keys=_path(u, UpdateSettings, "trusted_keys", base),
                            **_simple(u, UpdateSettings, besides=("slots_dir", "trusted_keys")))
    if update.target is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", update.target):
        raise doc.fail("update.target", f"{update.target!r} is not a target profile name")

    network = _network(section("network", _known("network", NetworkConfig)), base)

    return DaemonConfig(build, audio, persona, snapshots, control, metrics, logging, watchdog,
                        update, network, source=Path(path))


# -- network ------------------------------------------------------------------------------

def _network(n: Fields, base: Path) -> NetworkConfig:
    """The network section: each field by its Setting, then the rules that join them."""
    file_fields = ("tls_cert", "tls_key", "static_dir")
    values = _simple(n, NetworkConfig, besides=file_fields)
    files = {name: _path(n, NetworkConfig, name, base) for name in file_fields}
    cfg = NetworkConfig(**values, **files)
    try:
        ipaddress.ip_address(cfg.host)
    except ValueError:
        raise n.doc.fail("network.host", f"{cfg.host!r} is not an IP address (127.0.0.1 for this "
                                         "machine only, 0.0.0.0 for every interface)") from None
    if cfg.token is not None and len(cfg.token.strip()) < MIN_TOKEN_CHARS:
        raise n.doc.fail("network.token", f"at least {MIN_TOKEN_CHARS} characters (e.g. "
                                          "`openssl rand -hex 16`)")
    if cfg.enabled and not cfg.loopback_only and cfg.token is None:
        raise n.doc.fail("network.host", f"{cfg.host} is not a loopback address: set network.token, "
                                         "which every client from the network must present")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise n.doc.fail("network.tls_cert" if cfg.tls_cert is None else "network.tls_key",
                         "set both tls_cert and tls_key, or neither")
    for name in ("tls_cert", "tls_key"):
        value = getattr(cfg, name)
        if cfg.enabled and value is not None and not value.is_file():
            raise n.doc.fail(f"network.{name}", f"{value}: file not found")
    if cfg.enabled and cfg.static_dir is not None and not (cfg.static_dir / "index.html").is_file():
        raise n.doc.fail("network.static_dir", f"{cfg.static_dir}: no index.html there")
    return cfg


def with_static_dir(cfg: DaemonConfig, static: Path) -> DaemonConfig:
    """`serve --static DIR`: the config with network.static_dir = DIR (ConfigError if unusable)."""
    if not cfg.network.enabled:
        raise ConfigError("serve --static: the network endpoint is off (set network.enabled: true)")
    if not (static / "index.html").is_file():
        raise ConfigError(f"serve --static: {static}: no index.html there (build the client first)")
    return replace(cfg, network=replace(cfg.network, static_dir=static.resolve()))


# -- audio --------------------------------------------------------------------------------

def _of(cls: type, name: str) -> Setting:
    return next(s for s in settings_of(cls) if s.name == name)


def _simple(f: Fields, cls: type, besides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every field of `cls` but `besides` (read by rules of their own), each validated by its
    Setting alone (type, range, choices, null): a field added to a section is read with it."""
    return {s.name: f.setting(s) for s in settings_of(cls) if s.name not in besides}


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

def _path(f: Fields, cls: type, key: str, base: Path) -> Path:
    """A path field: relative to the config file's directory, `~` expanded."""
    value = f.str(key, None)
    return _of(cls, key).default if value is None else (base / Path(value).expanduser())


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
