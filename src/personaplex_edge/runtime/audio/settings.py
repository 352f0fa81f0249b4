"""The cabin audio devices' settings: names, rates, periods and output levels, validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from personaplex_edge.runtime.audio.dsp import QUALITIES
from personaplex_edge.runtime.audio.echo import MODES as ECHO_MODES
from personaplex_edge.runtime.errors import ConfigError

DEFAULT_PREROLL_MS = 100.0  # when the daemon has not measured compute time yet


@dataclass(frozen=True)
class AudioSettings:
    """ALSA devices, buffering and echo cancellation. The fields named in config.AudioConfig
    mirror it (`AudioSettings(**cfg.audio.as_dict())`)."""

    capture_device: str = "default"
    playback_device: str = "default"
    capture_rate: int = 48000
    playback_rate: int = 48000
    channels: int = 1  # capture channels (downmixed to mono) and, by default, playback's
    period_frames: int = 960  # device frames per ALSA period (20 ms at 48 kHz)
    buffer_periods: int = 4
    preroll_ms: float | None = None  # None: DEFAULT_PREROLL_MS
    playback_channels: int | None = None  # None: same as channels (mono is copied to each)
    output_gain_db: float = 0.0
    fade_ms: float = 15.0
    duck_ms: float = 150.0
    limit_db: float = -3.0  # soft-limiter knee, dBFS
    resample_quality: str = "HQ"
    capture_queue_frames: int = 4  # 320 ms of captured frames before the oldest is dropped
    playback_queue_frames: int = 8
    retry_min_s: float = 0.5  # reopen backoff after a lost device...
    retry_max_s: float = 5.0  # ...doubling up to this
    stall_s: float = 2.0  # no device progress for this long: treat it as lost
    rt_priority: int = 0  # >0: SCHED_FIFO priority for the two audio threads (best effort)
    clockless: bool = False  # pace I/O to the wall clock (null/file test devices only)
    # Echo cancellation in the capture path, the playback stream as reference (echo_path.py).
    # webrtc | external | off. "off" here (CabinAudio alone, tests); the daemon's config
    # default is webrtc (config.AudioConfig), passed through as_dict().
    echo_cancel: str = "off"
    noise_suppression: bool = False  # webrtc only: WebRTC's noise suppressor after AEC3
    high_pass: bool = True  # webrtc only: high-pass the mic (DC, rumble) before AEC3
    auto_gain: bool = False  # webrtc only: WebRTC's AGC on the mic

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"audio.{name}: {why}")

        for name in ("capture_device", "playback_device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "must be a non-empty ALSA PCM name")
        for name in ("capture_rate", "playback_rate"):
            if not 8000 <= int(getattr(self, name)) <= 384000:
                raise bad(name, f"{getattr(self, name)} Hz is outside 8000..384000")
        if not 1 <= self.channels <= 32:
            raise bad("channels", f"{self.channels} is outside 1..32")
        if self.playback_channels is not None and not 1 <= self.playback_channels <= 32:
            raise bad("playback_channels", f"{self.playback_channels} is outside 1..32")
        if not 16 <= self.period_frames <= 65536:
            raise bad("period_frames", f"{self.period_frames} is outside 16..65536")
        if not 2 <= self.buffer_periods <= 64:
            raise bad("buffer_periods", f"{self.buffer_periods} is outside 2..64")
        if self.preroll_ms is not None and not 0.0 <= self.preroll_ms <= 2000.0:
            raise bad("preroll_ms", f"{self.preroll_ms} is outside 0..2000")
        if self.resample_quality not in QUALITIES:
            raise bad("resample_quality", f"must be one of {', '.join(QUALITIES)}")
        if not 0.0 < self.retry_min_s <= self.retry_max_s:
            raise bad("retry_max_s", "need 0 < retry_min_s <= retry_max_s")
        if self.capture_queue_frames < 1 or self.playback_queue_frames < 1:
            raise bad("capture_queue_frames", "queues hold at least one frame")
        if self.echo_cancel not in ECHO_MODES:
            raise bad("echo_cancel", f"{self.echo_cancel!r} is not one of {', '.join(ECHO_MODES)}")

    @property
    def out_channels(self) -> int:
        return self.playback_channels or self.channels

    @property
    def effective_preroll_ms(self) -> float:
        return DEFAULT_PREROLL_MS if self.preroll_ms is None else float(self.preroll_ms)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AudioSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
