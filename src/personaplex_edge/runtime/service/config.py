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


NETWORK_POLICIES = ("when-cabin-idle", "exclusive", "off")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class NetworkConfig:
    """PersonaPlex's client protocol on a websocket (runtime/network/; docs/network.md)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback: only this machine; any other address needs `token`
    port: int = 8998  # upstream's port; 0: any free port (tests)
    token: str | None = None  # every non-loopback client presents it (worker_auth_id / Bearer)
    tls_cert: Path | None = None  # PEM certificate chain and key: wss:// and https://
    tls_key: Path | None = None
    static_dir: Path | None = None  # a web client's built files, served on the same port
    # Who has the model: a network session starts only after the cabin was quiet for
    # cabin_idle_s and the driver takes it back by speaking (when-cabin-idle); the network
    # session keeps it until it ends (exclusive); never the network (off).
    policy: str = "when-cabin-idle"
    cabin_idle_s: float = 10.0
    takeback_ms: float = 240.0  # driver speech this long ends a network session
    idle_timeout_s: float = 10.0  # no audio from the client for this long: the session ends
    max_session_s: float = 3600.0
    start_timeout_s: float = 60.0  # the persona's first compile included
    max_message_bytes: int = 65536
    max_clients: int = 4  # connections at once (one holds the model; the others are refused)
    jitter_ms: float = 40.0  # incoming audio buffered beyond a frame before the model hears it
    jitter_max_ms: float = 1000.0  # above this the oldest incoming audio is dropped
    reply_queue_ms: float = 2000.0  # replies the client has not taken: more ends the session
    ping_interval_s: float = 5.0  # websocket pings: the round trip in metrics, dead peers found

    @property
    def loopback_only(self) -> bool:
        return _is_loopback(self.host)


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
    network: NetworkConfig = field(default_factory=NetworkConfig)
    source: Path | None = field(default=None, compare=False)


SECTIONS = ("build", "audio", "persona", "snapshots", "control", "metrics", "logging", "watchdog",
            "network")
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

    network = _network(section("network", set(NetworkConfig.__dataclass_fields__)), base)

    return DaemonConfig(build, audio, persona, snapshots, control, metrics, logging, watchdog,
                        network, source=Path(path))


# -- network ------------------------------------------------------------------------------

def _network(n: Fields, base: Path) -> NetworkConfig:
    d = NetworkConfig
    host = n.str("host", d.host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise n.doc.fail("network.host", f"{host!r} is not an IP address (127.0.0.1 for this "
                                         "machine only, 0.0.0.0 for every interface)") from None
    token = n.data.get("token")
    if token is not None:
        token = n.str("token", None)
        if len(token.strip()) < MIN_TOKEN_CHARS:
            raise n.doc.fail("network.token", f"at least {MIN_TOKEN_CHARS} characters (e.g. "
                                              "`openssl rand -hex 16`)")
    enabled = n.boolean("enabled", d.enabled)
    if enabled and not _is_loopback(host) and token is None:
        raise n.doc.fail("network.host", f"{host} is not a loopback address: set network.token, "
                                         "which every client from the network must present")
    cert = _path(n, "tls_cert", None, base) if n.data.get("tls_cert") is not None else None
    key = _path(n, "tls_key", None, base) if n.data.get("tls_key") is not None else None
    if (cert is None) != (key is None):
        raise n.doc.fail("network.tls_cert" if cert is None else "network.tls_key",
                         "set both tls_cert and tls_key, or neither")
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        if enabled and value is not None and not value.is_file():
            raise n.doc.fail(f"network.{name}", f"{value}: file not found")
    static = _path(n, "static_dir", None, base) if n.data.get("static_dir") is not None else None
    if enabled and static is not None and not (static / "index.html").is_file():
        raise n.doc.fail("network.static_dir", f"{static}: no index.html there")
    return NetworkConfig(
        enabled=enabled, host=host, port=n.integer("port", d.port, 0, 65535), token=token,
        tls_cert=cert, tls_key=key, static_dir=static,
        policy=n.choice("policy", d.policy, NETWORK_POLICIES),
        cabin_idle_s=n.number("cabin_idle_s", d.cabin_idle_s, 0.0, 3600.0),
        takeback_ms=n.number("takeback_ms", d.takeback_ms, 80.0, 5000.0),
        idle_timeout_s=n.number("idle_timeout_s", d.idle_timeout_s, 1.0, 3600.0),
        max_session_s=n.number("max_session_s", d.max_session_s, 1.0, 86400.0),
        start_timeout_s=n.number("start_timeout_s", d.start_timeout_s, 1.0, 600.0),
        max_message_bytes=n.integer("max_message_bytes", d.max_message_bytes, 1024, 1 << 22),
        max_clients=n.integer("max_clients", d.max_clients, 1, 64),
        jitter_ms=n.number("jitter_ms", d.jitter_ms, 0.0, 1000.0),
        jitter_max_ms=n.number("jitter_max_ms", d.jitter_max_ms, 200.0, 600000.0),
        reply_queue_ms=n.number("reply_queue_ms", d.reply_queue_ms, 400.0, 60000.0),
        ping_interval_s=n.number("ping_interval_s", d.ping_interval_s, 0.5, 600.0),
    )


def with_static_dir(cfg: DaemonConfig, static: Path) -> DaemonConfig:
    """`serve --static DIR`: the config with network.static_dir = DIR (ConfigError if unusable)."""
    from dataclasses import replace

    if not cfg.network.enabled:
        raise ConfigError("serve --static: the network endpoint is off (set network.enabled: true)")
    if not (static / "index.html").is_file():
        raise ConfigError(f"serve --static: {static}: no index.html there (build the client first)")
    return replace(cfg, network=replace(cfg.network, static_dir=static.resolve()))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
