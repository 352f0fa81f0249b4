"""Daemon config: defaults, the shipped example, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.service.config import (
    DaemonConfig,
    PersonaConfig,
    load_config,
)
from personaplex_edge.runtime.service.persona_catalog import resolve

EXAMPLE = Path(__file__).parents[1] / "src" / "personaplex_edge" / "runtime" / "runtime.example.yaml"


def _load(tmp_path: Path, text: str) -> DaemonConfig:
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    return load_config(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_empty_file_gives_jetson_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg == DaemonConfig()
    assert cfg.audio == AudioSettings("default", "default", 48000, 48000, 1, None, 480, 3, None)
    assert cfg.audio.echo_cancel == "webrtc"
    assert cfg.control.socket == Path("/run/personaplex/control.sock")
    assert cfg.control.group == "personaplex" and cfg.control.mode == 0o660
    assert cfg.control.idle_timeout_s == 30.0  # idle clients cannot hold the socket's slots
    assert cfg.snapshots.dir == Path("/var/lib/personaplex/snapshots")
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.enabled) == ("127.0.0.1", 9464, True)
    assert cfg.logging.transcripts is False
    assert cfg.persona.default == "copilot"


def test_example_file_is_valid_and_states_the_defaults() -> None:
    assert load_config(EXAMPLE) == DaemonConfig()
    text = EXAMPLE.read_text()
    for section in ("build", "audio", "persona", "snapshots", "control", "metrics", "logging",
                    "watchdog", "update", "network"):
        assert f"\n{section}:\n" in text


def test_full_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "personas").mkdir()
    cfg = _load(tmp_path, """
build:
  path: build
  backend: ort-cpu
  threads: 2
audio:
  capture_device: "plughw:CARD=Device,DEV=0"
  playback_device: "null"
  capture_rate: 24000
  playback_rate: 48000
  channels: 2
  period_frames: 480
  buffer_periods: 3
  preroll_ms: 120
  playback_channels: 2
persona:
  default: focus
  persona_dirs: [personas, /etc/personaplex/personas]
snapshots:
  dir: /data/snap
control:
  socket: /run/x/c.sock
  group: null
  mode: 0600
  reply_timeout_s: 0.5
metrics:
  enabled: false
  host: "::1"
  port: 0
logging:
  level: debug
  transcripts: true
watchdog:
  degraded_misses: 3
  retry_max_s: 30
""")
    assert cfg.build.path == tmp_path / "build"  # relative to the config file
    assert (cfg.build.backend, cfg.build.threads) == ("ort-cpu", 2)
    assert cfg.audio.capture_device == "plughw:CARD=Device,DEV=0"
    assert (cfg.audio.capture_rate, cfg.audio.playback_rate, cfg.audio.channels) == (24000, 48000, 2)
    assert cfg.audio.preroll_ms == 120.0 and cfg.audio.playback_channels == 2
    assert cfg.audio.as_dict()["period_frames"] == 480
    assert cfg.persona.persona_dirs == (tmp_path / "personas", Path("/etc/personaplex/personas"))
    assert cfg.control.group is None and cfg.control.mode == 0o600  # YAML 1.1 octal
    assert cfg.metrics.host == "::1" and cfg.metrics.port == 0 and not cfg.metrics.enabled
    assert cfg.logging.level == "debug" and cfg.logging.transcripts
    assert cfg.watchdog.degraded_misses == 3 and cfg.audio.retry_max_s == 30.0


def test_echo_cancellation_modes_and_options(tmp_path: Path) -> None:
    audio = _load(tmp_path, "").audio  # open cabin speakers: WebRTC AEC3, its high-pass only
    assert (audio.echo_cancel, audio.noise_suppression, audio.high_pass, audio.auto_gain) == (
        "webrtc", False, True, False)
    assert _load(tmp_path, "audio:\n  echo_cancel: off\n").audio.echo_cancel == "off"  # YAML false
    assert _load(tmp_path, "audio:\n  echo_cancel: external\n").audio.echo_cancel == "external"
    audio = _load(tmp_path, "audio:\n  noise_suppression: true\n  high_pass: false\n"
                            "  auto_gain: true\n").audio
    assert (audio.noise_suppression, audio.high_pass, audio.auto_gain) == (True, False, True)


def test_quoted_octal_mode_and_null_sections(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'control:\n  mode: "0640"\naudio: null\nwatchdog: ~\n')
    assert cfg.control.mode == 0o640
    assert cfg.audio == AudioSettings()


@pytest.mark.parametrize("text, line, field, why", [
    ("bogus: 1\n", 1, "bogus", "unknown field"),
    ("audio:\n  chanels: 2\n", 2, "audio.chanels", "unknown field"),
    ("audio:\n  capture_rate: 44100\n", 2, "audio.capture_rate", "not one of 48000, 24000"),
    ("audio:\n  playback_rate: '48000'\n", 2, "audio.playback_rate", "expected an integer"),
    ("audio:\n  channels: 0\n", 2, "audio.channels", "outside 1..32"),
    ("audio:\n  buffer_periods: 1\n", 2, "audio.buffer_periods", "outside 2..32"),
    ("audio:\n  playback_channels: 33\n", 2, "audio.playback_channels", "outside 1..32"),
    ("audio:\n  capture_device: \"a\\nb\"\n", 2, "audio.capture_device", "control characters"),
    ("audio:\n  preroll_ms: soon\n", 2, "audio.preroll_ms", '"auto"'),
    ("audio:\n  preroll_ms: -5\n", 2, "audio.preroll_ms", "outside"),
    ("audio:\n  capture_device: ''\n", 2, "audio.capture_device", "non-empty string"),
    ("audio:\n  echo_cancel: speex\n", 2, "audio.echo_cancel", "not one of webrtc, external, off"),
    ("audio:\n  echo_cancel: on\n", 2, "audio.echo_cancel", "true (or on) is not one of"),
    ("audio:\n  echo_cancel: off\n  noise_suppression: true\n", 3, "audio.noise_suppression",
     "needs echo_cancel: webrtc"),
    ("audio:\n  echo_cancel: external\n  auto_gain: true\n", 3, "audio.auto_gain",
     "needs echo_cancel: webrtc"),
    ("audio:\n  high_pass: 1\n", 2, "audio.high_pass", "true or false"),
    ("audio: [1, 2]\n", 1, "audio", "expected a mapping"),
    ("build:\n  backend: cuda\n", 2, "build.backend", "not one of"),
    ("build:\n  threads: 1.5\n", 2, "build.threads", "expected an integer"),
    ("\n\nmetrics:\n  host: 0.0.0.0\n", 4, "metrics.host", "not a loopback address"),
    ("metrics:\n  host: 192.168.1.10\n", 2, "metrics.host", "not a loopback address"),
    ("metrics:\n  host: localhost\n", 2, "metrics.host", "not an IP address"),
    ("metrics:\n  port: 70000\n", 2, "metrics.port", "outside"),
    ("metrics:\n  enabled: yes please\n", 2, "metrics.enabled", "true or false"),
    ("control:\n  mode: 660\n", 2, "control.mode", "octal"),
    ("control:\n  mode: '0666'\n", 2, "control.mode", "other users"),
    ("control:\n  mode: '0060'\n", 2, "control.mode", "owner"),
    ("control:\n  group: 5\n", 2, "control.group", "non-empty string"),
    ("control:\n  idle_timeout_s: 0\n", 2, "control.idle_timeout_s", "outside"),
    ("control:\n  idle_timeout_s: soon\n", 2, "control.idle_timeout_s", "expected a number"),
    ("control:\n  socket: /run/" + "x" * 120 + "\n", 2, "control.socket", "107 bytes"),
    ("logging:\n  level: verbose\n", 2, "logging.level", "not one of"),
    ("persona:\n  default: My Persona\n", 2, "persona.default", "neither"),
    ("persona:\n  persona_dirs: /etc\n", 2, "persona.persona_dirs", "list"),
    ("persona:\n  persona_dirs:\n    - a\n    - 7\n", 2, "persona.persona_dirs[1]", "directory path"),
    ("watchdog:\n  retry_min_s: 5\n  retry_max_s: 1\n", 3, "watchdog.retry_max_s", "below"),
    ("watchdog:\n  degraded_misses: 0\n", 2, "watchdog.degraded_misses", "outside"),
    ("watchdog:\n  stall_s: 0.1\n", 2, "watchdog.stall_s", "outside 0.2..60"),
    ("watchdog:\n  recover_after_s: 1\n", 2, "watchdog.recover_after_s", "unknown field"),
])
def test_bad_values_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str,
                                             why: str) -> None:
    message = _error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'runtime.yaml'}:{line}: {field}: "), message
    assert why in message


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "runtime.yaml:3: invalid YAML" in _error(tmp_path, "audio:\n  channels: [1\n")
    assert "expected a mapping at the top level" in _error(tmp_path, "- 1\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_resolve_prefers_persona_dirs_then_builtins(tmp_path: Path) -> None:
    d = tmp_path / "personas"
    d.mkdir()
    (d / "copilot.yaml").write_text("name: copilot\nvoice: NATF2\nprompt: A custom copilot.\n")
    (d / "other-file.yaml").write_text("name: night\nvoice: NATF2\nprompt: Quiet at night.\n")
    (d / "broken.yaml").write_text("name: broken\nvoice: NATF2\n")
    cfg = PersonaConfig(persona_dirs=(d, tmp_path / "missing"))
    assert resolve(cfg, "copilot").prompt == "A custom copilot."  # replaces the built-in
    assert resolve(cfg, "night").source == str(d / "other-file.yaml")  # by name, not file
    assert resolve(cfg, "focus").source.endswith("personas/focus.yaml")  # built-in
    with pytest.raises(ConfigError, match="broken.yaml:.*prompt: required field is missing"):
        resolve(cfg, "broken")  # the file named after it: its own error
    with pytest.raises(ConfigError, match=r"persona 'nobody': not found \(known: .*night"):
        resolve(cfg, "nobody")


def test_the_example_documents_every_field_with_its_default() -> None:
    """Every field the loader accepts (the schema's table, which the docs' reference is generated
    from) is in runtime.example.yaml at its default, under a comment. Was: audio.clockless (and
    rt_priority, the queues) missing from the example."""
    from personaplex_edge.runtime.service.config import config_settings
    from personaplex_edge.runtime.yaml_schema import load_yaml_with_lines

    doc = load_yaml_with_lines(EXAMPLE)
    text = EXAMPLE.read_text().splitlines()
    table = config_settings()
    assert {s.name for s in table["audio"]} >= {"clockless", "rt_priority", "capture_queue_frames"}
    for section, settings in table.items():
        assert set(doc.data[section]) == {s.name for s in settings}, section  # nothing extra
        for s in settings:
            value = doc.data[section][s.name]
            value = {"mode": lambda v: int(v, 8), "path": Path, "paths": tuple}.get(s.kind, lambda v: v)(
                value) if value is not None else None
            assert (None if value == s.null_word else value) == s.default, f"{section}.{s.name}"
            above = doc.lines[f"{section}.{s.name}"] - 2  # 0-based index of the line above
            while text[above].strip() and not text[above].lstrip().startswith("#") and \
                    text[above].startswith("  "):  # a group of keys under one comment
                above -= 1
            assert text[above].lstrip().startswith("#"), f"{section}.{s.name}: no comment above it"


def test_the_generated_reference_has_every_field_and_its_range() -> None:
    from personaplex_edge.runtime.service.config import config_settings
    from personaplex_edge.runtime.service.config_reference import reference_markdown

    text = reference_markdown()
    for section, settings in config_settings().items():
        for s in settings:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{s.name}` |"))
            if s.lo is not None:
                assert f"{s.lo:g} to {s.hi:g}" in row, row
            for choice in s.choices:
                assert f"`{choice}`" in row, row
    assert "| `control.mode` | `\"0660\"` |" in text
    assert "Retired, still accepted with a warning: `watchdog.recover_s`" in text


def test_update_section_is_read_and_checked(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
update:
  slots_dir: slots
  trusted_keys: /etc/personaplex/trusted-keys
  target: agx-orin-64gb
  max_starts: 3
  health_frames: 125
  health_s: 10
  health_deadline_ms: 70
  health_max_misses: 0
""").update
    assert cfg.slots_dir == tmp_path / "slots"  # relative to the config file
    assert (cfg.target, cfg.max_starts, cfg.health_frames) == ("agx-orin-64gb", 3, 125)
    assert (cfg.health_s, cfg.health_deadline_ms, cfg.health_max_misses) == (10.0, 70.0, 0)
    for text, message in (("update: {max_starts: 0}", r"runtime.yaml:1: update.max_starts: 0 is outside 1..100"),
                          ("update: {target: ../x}", r"update.target: '../x' is not a target profile name"),
                          ("update: {health_s: fast}", r"update.health_s: expected a number"),
                          ("update: {slot_dir: /x}", r"update.slot_dir")):
        with pytest.raises(ConfigError, match=message):
            _load(tmp_path, text)
