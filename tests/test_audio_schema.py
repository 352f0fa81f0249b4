"""One audio schema: the YAML loader and the device layer agree on every audio field's default,
range and settability, and the shipped example documents every field (issue 15, item 4)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.service.config import load_config

EXAMPLE = Path(__file__).parents[1] / "src" / "personaplex_edge" / "runtime" / "runtime.example.yaml"


def _load(tmp_path: Path, text: str):
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    return load_config(path)


def _yaml_accepts(tmp_path: Path, section: str, name: str, value: object) -> bool:
    try:
        _load(tmp_path, f"{section}:\n  {name}: {value}\n")
    except ConfigError:
        return False
    return True


def _device_accepts(name: str, value: object) -> bool:
    try:
        AudioSettings(**{name: value})
    except ConfigError:
        return False
    return True


def test_an_empty_config_gives_the_device_layers_defaults(tmp_path: Path) -> None:
    """Was: echo_cancel webrtc in the config, off in AudioSettings."""
    audio = _load(tmp_path, "").audio
    device = AudioSettings()
    assert device.echo_cancel == "webrtc"  # the product default: open cabin speakers
    for f in dataclasses.fields(AudioSettings):
        if hasattr(audio, f.name):
            assert getattr(audio, f.name) == getattr(device, f.name), f.name


@pytest.mark.parametrize("name, values", [
    ("channels", (0, 1, 8, 9, 32, 33)),  # was 1..8 in the YAML, 1..32 in the device layer
    ("playback_channels", (0, 1, 8, 9, 32, 33)),
    ("period_frames", (16, 31, 32, 16384, 16385, 65536)),  # was 32..16384 vs 16..65536
    ("buffer_periods", (1, 2, 32, 33, 64)),  # was 2..32 vs 2..64
    ("capture_rate", (24000, 44100, 48000, 96000)),  # was 48000/24000 vs 8000..384000
    ("playback_rate", (24000, 44100, 48000)),
    ("preroll_ms", (-1, 0, 2000, 2001)),
])
def test_yaml_and_device_layer_accept_the_same_audio_values(tmp_path: Path, name: str,
                                                            values: tuple) -> None:
    for value in values:
        assert _yaml_accepts(tmp_path, "audio", name, value) == _device_accepts(name, value), (
            name, value)


@pytest.mark.parametrize("name, values", [
    ("retry_min_s", (0.001, 0.01, 0.5, 60, 61)),
    ("retry_max_s", (0.5, 600, 601)),
    ("stall_s", (0.1, 0.2, 60, 61)),
])
def test_yaml_and_device_layer_accept_the_same_device_recovery_values(tmp_path: Path, name: str,
                                                                      values: tuple) -> None:
    """The reopen backoff and stall limit: watchdog.* in the YAML, AudioSettings in the device
    layer (was: 0.01..60 and so on in the YAML, anything positive in the device layer)."""
    for value in values:
        other = {"retry_min_s": ("retry_max_s", 600), "retry_max_s": ("retry_min_s", 0.5)}.get(name)
        extra = f"\n  {other[0]}: {other[1]}" if other else ""
        yaml_ok = _yaml_accepts(tmp_path, "watchdog", name, f"{value}{extra}")
        device_ok = _device_accepts(name, value) if not other else _device_settings_ok(
            {name: value, other[0]: other[1]})
        assert yaml_ok == device_ok, (name, value)


def _device_settings_ok(values: dict) -> bool:
    try:
        AudioSettings(**values)
    except ConfigError:
        return False
    return True


def test_queues_and_real_time_priority_are_settable(tmp_path: Path) -> None:
    """Was: the YAML could not set rt_priority or capture_queue_frames."""
    audio = _load(tmp_path, "audio:\n  rt_priority: 10\n  capture_queue_frames: 6\n"
                            "  playback_queue_frames: 12\n").audio
    assert (audio.rt_priority, audio.capture_queue_frames, audio.playback_queue_frames) == (10, 6, 12)
    path = tmp_path / "runtime.yaml"
    for text, line, field, why in (
            ("audio:\n  rt_priority: 100\n", 2, "audio.rt_priority", "outside 0..99"),
            ("\naudio:\n  capture_queue_frames: 0\n", 3, "audio.capture_queue_frames", "outside 1..64"),
            ("audio:\n  playback_queue_frames: many\n", 2, "audio.playback_queue_frames",
             "expected an integer")):
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, text)
        assert str(info.value).startswith(f"{path}:{line}: {field}: ") and why in str(info.value)
    with pytest.raises(ConfigError, match=r"^audio\.rt_priority: 100 is outside 0\.\.99$"):
        AudioSettings(rt_priority=100)


def test_every_device_field_is_in_the_schema_with_a_line_of_documentation() -> None:
    from personaplex_edge.runtime.audio.settings import AUDIO_SETTINGS

    assert [s.name for s in AUDIO_SETTINGS] == [f.name for f in dataclasses.fields(AudioSettings)]
    device = AudioSettings()
    for s in AUDIO_SETTINGS:
        assert s.doc and "\n" not in s.doc, s.name
        assert s.default == getattr(device, s.name), s.name
        assert s.problem(s.default) is None, s.name  # the default is in its own range
        # Settable from the YAML (audio.* or watchdog.*), or its source says where it comes from.
        assert (s.section in ("audio", "watchdog")) != bool(s.source), s.name


def test_retired_recover_s_is_ignored_with_a_warning(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """watchdog.recover_s never had an effect: files copied from the old example still load."""
    with caplog.at_level(logging.WARNING):
        cfg = _load(tmp_path, "watchdog:\n  recover_s: 10.0\n")
    assert not hasattr(cfg.watchdog, "recover_s")
    assert f"{tmp_path / 'runtime.yaml'}:2: watchdog.recover_s: " in caplog.text
    assert "recover_s" not in EXAMPLE.read_text()


def test_device_layer_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^audio\.channels: 33 is outside 1\.\.32$"):
        AudioSettings(channels=33)
    with pytest.raises(ConfigError, match=r"^watchdog\.retry_max_s: 1(\.0)? is below retry_min_s"):
        AudioSettings(retry_min_s=2.0, retry_max_s=1.0)
    with pytest.raises(ConfigError, match=r"^audio\.auto_gain: needs echo_cancel: webrtc"):
        AudioSettings(echo_cancel="off", auto_gain=True)
    assert not hasattr(AudioSettings, "from_dict")  # dead: nothing built settings from a dict
