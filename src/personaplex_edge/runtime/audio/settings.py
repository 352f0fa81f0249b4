"""The one audio schema: every audio field's type, default, range, YAML section and documentation.

`AudioSettings` is both the device layer's settings (CabinAudio, EchoPath) and the daemon
config's `audio` section: the config loader reads each field with a YAML section from the file
(`runtime.example.yaml` documents them all), `check` probes the devices with the same object, and
`AUDIO_SETTINGS` is the machine-readable table (tests, generated docs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from personaplex_edge.runtime.audio.echo import MODES as ECHO_MODES
from personaplex_edge.runtime.audio.resample import QUALITIES
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.runtime.yaml_schema import Setting, check_settings, setting, settings_of

DEFAULT_PREROLL_MS = 100.0  # compute jitter the FIFO covers before the daemon has measured it
DEVICE_RATES = (48000, 24000)  # cabin devices run at one of these; the model at 24 kHz
WEBRTC_ONLY = ("noise_suppression", "auto_gain")  # parts of WebRTC's processing


@dataclass(frozen=True)
class AudioSettings:
    """ALSA devices, buffering, echo cancellation and device recovery, validated on creation."""

    capture_device: str = setting(
        "text", "default", 'ALSA PCM name of the microphone ("default", "plughw:CARD=Device", ...)',
        section="audio")
    playback_device: str = setting(
        "text", "default", "ALSA PCM name of the speakers", section="audio")
    capture_rate: int = setting(
        "int", 48000, "capture device rate in Hz (the model runs at 24 kHz)", choices=DEVICE_RATES,
        hint="the `plug` and `default` devices resample any card", section="audio")
    playback_rate: int = setting(
        "int", 48000, "playback device rate in Hz", choices=DEVICE_RATES,
        hint="the `plug` and `default` devices resample any card", section="audio")
    channels: int = setting(
        "int", 1, "capture channels (mixed down to mono) and, by default, playback's", lo=1, hi=32,
        section="audio")
    playback_channels: int | None = setting(
        "int", None, "playback channels (mono is copied to each)", lo=1, hi=32,
        null="same as channels", section="audio")
    period_frames: int = setting(
        "int", 480, "device frames per ALSA period (480 = 10 ms at 48 kHz)", lo=32, hi=16384,
        section="audio")
    buffer_periods: int = setting(
        "int", 3, "ALSA periods per device buffer", lo=2, hi=32, section="audio")
    preroll_ms: float | None = setting(
        "float", None, "compute jitter the playback FIFO covers, in milliseconds", lo=0.0,
        hi=2000.0, null="measured: the frame loop's p99 - p50, live (100 ms in the device layer "
        "alone)",
        null_word="auto", section="audio")
    capture_queue_frames: int = setting(
        "int", 4, "captured 80 ms frames held for the model before the oldest is dropped",
        lo=1, hi=64, section="audio")
    playback_queue_frames: int = setting(
        "int", 8, "80 ms frames of the model's speech held for the speaker", lo=1, hi=64,
        section="audio")
    rt_priority: int = setting(
        "int", 20, "SCHED_FIFO priority of the two audio threads (best effort; 0: normal "
        "scheduling); 20 beats every normal thread, not the kernel's IRQ threads (50)",
        lo=0, hi=99, section="audio")
    clockless: bool = setting(
        "bool", False, "pace I/O to the wall clock: only for clockless ALSA null/file test devices",
        section="audio")
    echo_cancel: str = setting(
        "choice", "webrtc", "echo cancellation: webrtc (WebRTC AEC3), external (the car's DSP), off",
        choices=ECHO_MODES, section="audio")
    noise_suppression: bool = setting(
        "bool", False, "webrtc only: WebRTC's noise suppressor after AEC3", section="audio")
    high_pass: bool = setting(
        "bool", True, "webrtc only: high-pass the mic (DC, rumble) before AEC3", section="audio")
    auto_gain: bool = setting(
        "bool", False, "webrtc only: WebRTC's automatic gain control on the mic", section="audio")
    retry_min_s: float = setting(
        "float", 0.5, "a lost audio device is reopened after this many seconds...", lo=0.01, hi=60.0,
        section="watchdog")
    retry_max_s: float = setting(
        "float", 5.0, "...doubling up to this many", lo=0.01, hi=600.0, section="watchdog")
    stall_s: float = setting(
        "float", 2.0, "a device that moves no audio for this many seconds counts as lost",
        lo=0.2, hi=60.0, section="watchdog")
    output_gain_db: float = setting(
        "float", 0.0, "speaker gain in dB", lo=-40.0, hi=12.0,
        source="the persona's speech.output_gain_db")
    fade_ms: float = setting(
        "float", 15.0, "raised-cosine fade on start, pause and stop", lo=0.0, hi=1000.0,
        source="built in")
    duck_ms: float = setting(
        "float", 150.0, "glide of the speaker level when ducked", lo=0.0, hi=5000.0,
        source="built in")
    limit_db: float = setting(
        "float", -3.0, "soft-limiter knee in dBFS", lo=-40.0, hi=-0.1, source="built in")
    resample_quality: str = setting(
        "choice", "FIR", "resampler of the audio path: FIR (block-free, 1.3 ms), or soxr's "
        "HQ or VHQ (blocks, up to ~35 ms late)", choices=QUALITIES,
        source="built in")

    def __post_init__(self) -> None:
        check_settings(self, "audio")
        found = conflict(asdict(self))
        if found:
            raise ConfigError(f"{found[0]}: {found[1]}")

    @property
    def out_channels(self) -> int:
        return self.playback_channels or self.channels

    @property
    def effective_preroll_ms(self) -> float:
        return DEFAULT_PREROLL_MS if self.preroll_ms is None else float(self.preroll_ms)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> AudioSettings:
        """A copy with `changes`, validated (the daemon adds the pre-roll and the persona's gain)."""
        return dataclasses.replace(self, **changes)


AUDIO_SETTINGS: tuple[Setting, ...] = settings_of(AudioSettings)


def conflict(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first pair of fields whose values are valid alone but not together, as (field, why)."""
    get = {s.name: s.default for s in AUDIO_SETTINGS} | dict(values)
    if get["retry_max_s"] < get["retry_min_s"]:
        return ("watchdog.retry_max_s",
                f"{get['retry_max_s']} is below retry_min_s ({get['retry_min_s']})")
    for key in WEBRTC_ONLY:
        if get[key] and get["echo_cancel"] != "webrtc":
            return (f"audio.{key}", "needs echo_cancel: webrtc (it is part of WebRTC's processing; "
                                    f"echo_cancel is {get['echo_cancel']})")
    return None
