"""Virtual cabin audio devices for tests: real alsa-lib and pyalsaaudio, no sound card.

    cabin = VirtualCabin.create(tmp_path, mic_audio=speech(48000), mic_rate=48000, mic_channels=2)
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)      # in-process tests
    subprocess.run([...], env={**os.environ, **cabin.env})        # a daemon under test
    ... open "ppx_mic" / "ppx_spk" / "ppx_duplex" ...
    cabin.read_speaker()                                           # [n, channels] float32

The config file (cabin.conf) defines, from alsa-lib's own userspace plugins:

    pcm.ppx_mic_raw  type file, slave null, file "/dev/null", infile <mic.raw>, format raw
                     (the file plugin's `infile` feeds capture: a virtual microphone)
    pcm.ppx_spk_raw  type file, slave null, file <speaker.raw>, format raw (a virtual speaker)
    pcm.ppx_mic      type plug over ppx_mic_raw, slave pinned to mic_rate/mic_channels/S16_LE
    pcm.ppx_spk      type plug over ppx_spk_raw, slave pinned to spk_rate/spk_channels/S16_LE
    pcm.ppx_duplex   type asym: capture ppx_mic, playback ppx_spk

The `plug` slaves are pinned because file and null accept any format: pinning makes the raw
files' layout fixed, and a client that opens another rate or channel count gets alsa-lib's
own conversion (rate, route, linear plugins).

How alsa-lib finds it: ALSA_CONFIG_PATH is a colon-separated list of top-level files that
*replaces* the default (<datadir>/alsa.conf), re-read by every snd_pcm_open(). We list the
system alsa.conf first (pcm.null, defaults, the usual hooks) and our file second. alsa-lib
notices a changed file by (device, inode, mtime in whole seconds), so `rewrite()` writes a new
file and renames it into place: a new inode, seen at once by the next open.

Quirks worth knowing (alsa-lib 1.2.8, pyalsaaudio 0.11):
- null has no clock: reads and writes complete at once. Either pace the client (CabinAudio's
  `clockless=True`) or read/write at your own pace.
- past the infile's end the null slave leaves the capture buffer untouched, and pyalsaaudio
  does not clear it: the data is undefined. `mic_pad_s` appends silence to cover a run.
- the file plugin buffers one ALSA buffer of speaker output and flushes it on drain/drop,
  which pyalsaaudio's close() does: read the speaker file after the client closed the PCM.
- null never enters the XRUN state, so no xrun can be provoked through these plugins.
- `speaker_file` / `mic_sink` may be a pipe ("|cmd"): when the command exits, the next flush
  fails and the PCM returns EIO, a real mid-stream device failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
SPEECH_WAV = DATA / "speech_24k.wav"


def speech(rate: int = 24000, seconds: float | None = None) -> np.ndarray:
    """The shipped test speech as float32 mono at `rate` (optionally the first `seconds`)."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(SPEECH_WAV), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    if seconds is not None:
        x = x[: int(seconds * sr)]
    if rate != sr:
        x = soxr.resample(x, sr, rate, quality="VHQ").astype(np.float32)
    return x


def to_s16(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 the way CabinAudio and most drivers round (x * 32767, rint)."""
    return np.rint(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def system_alsa_conf() -> Path:
    """The top-level config alsa-lib would load by default (honours ALSA_CONFIG_DIR)."""
    top = os.environ.get("ALSA_CONFIG_DIR", "/usr/share/alsa")
    return Path(top) / "alsa.conf"


def _quote(s: str) -> str:
    if '"' in s or "\n" in s:
        raise ValueError(f"cannot put {s!r} in an ALSA config string")
    return f'"{s}"'


@dataclass(frozen=True)
class VirtualCabin:
    dir: Path
    mic_rate: int = 48000
    mic_channels: int = 2
    spk_rate: int = 48000
    spk_channels: int = 2
    mic_infile: Path | None = None  # None: dir/mic.raw
    mic_sink: str = "/dev/null"  # where the file plugin copies captured audio (or "|cmd")
    speaker_file: str | None = None  # None: dir/speaker.raw (or "|cmd")
    extra: str = ""  # appended verbatim (more PCM definitions)
    names: dict = field(default_factory=lambda: {
        "mic": "ppx_mic", "spk": "ppx_spk", "duplex": "ppx_duplex"})

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, dir: Path, mic_audio: np.ndarray | None = None, mic_pad_s: float = 2.0,
               **options) -> VirtualCabin:
        """Write the config (and, given mic_audio [n] or [n, ch] float, the mic infile)."""
        cabin = cls(Path(dir), **options)
        cabin.dir.mkdir(parents=True, exist_ok=True)
        if mic_audio is not None:
            cabin.write_mic(mic_audio, pad_s=mic_pad_s)
        cabin._write_config()
        return cabin

    def rewrite(self, **changes) -> VirtualCabin:
        """The same cabin with some fields changed; the config is replaced atomically."""
        cabin = replace(self, **changes)
        cabin._write_config()
        return cabin

    # -- paths and environment ------------------------------------------------------------

    @property
    def config_path(self) -> str:
        """The ALSA_CONFIG_PATH value: system alsa.conf, then ours."""
        parts = [str(system_alsa_conf())] if system_alsa_conf().is_file() else []
        return ":".join(parts + [str(self.conf)])

    @property
    def env(self) -> dict[str, str]:
        return {"ALSA_CONFIG_PATH": self.config_path}

    @property
    def conf(self) -> Path:
        return self.dir / "cabin.conf"

    @property
    def mic_raw(self) -> Path:
        return self.mic_infile if self.mic_infile is not None else self.dir / "mic.raw"

    @property
    def speaker_raw(self) -> Path:
        return self.dir / "speaker.raw"

    # -- audio files ------------------------------------------------------------------------

    def write_mic(self, audio: np.ndarray, pad_s: float = 2.0) -> None:
        """The virtual mic's content: float [n] (copied to every channel) or [n, mic_channels]."""
        a = np.asarray(audio, np.float32)
        if a.ndim == 1:
            a = np.repeat(a[:, None], self.mic_channels, axis=1)
        if a.shape[1] != self.mic_channels:
            raise ValueError(f"mic audio has {a.shape[1]} channels, the mic {self.mic_channels}")
        pad = np.zeros((int(pad_s * self.mic_rate), self.mic_channels), np.float32)
        tmp = self.mic_raw.with_name(self.mic_raw.name + ".partial")
        to_s16(np.concatenate([a, pad])).tofile(tmp)
        os.replace(tmp, self.mic_raw)

    def read_speaker(self, path: Path | None = None) -> np.ndarray:
        """What reached the virtual speaker: float32 [n, spk_channels] (x / 32768)."""
        raw = np.fromfile(path or self.speaker_raw, "<i2")
        return (raw.reshape(-1, self.spk_channels).astype(np.float32) / 32768.0)

    # -- the config -------------------------------------------------------------------------

    def text(self) -> str:
        n = self.names
        spk = self.speaker_file if self.speaker_file is not None else str(self.speaker_raw)
        return f"""# Virtual cabin devices, written by tests/alsa_env.py
pcm.{n['mic']}_raw {{
    type file
    slave.pcm {{ type null }}
    file {_quote(self.mic_sink)}
    infile {_quote(str(self.mic_raw))}
    format "raw"
}}
pcm.{n['mic']} {{
    type plug
    slave {{ pcm "{n['mic']}_raw" format S16_LE rate {self.mic_rate} channels {self.mic_channels} }}
}}
pcm.{n['spk']}_raw {{
    type file
    slave.pcm {{ type null }}
    file {_quote(spk)}
    format "raw"
}}
pcm.{n['spk']} {{
    type plug
    slave {{ pcm "{n['spk']}_raw" format S16_LE rate {self.spk_rate} channels {self.spk_channels} }}
}}
pcm.{n['duplex']} {{
    type asym
    capture.pcm "{n['mic']}"
    playback.pcm "{n['spk']}"
}}
{self.extra}
"""

    def _write_config(self) -> None:
        tmp = self.conf.with_name(self.conf.name + ".partial")
        tmp.write_text(self.text())
        os.replace(tmp, self.conf)  # a new inode: the next snd_pcm_open() re-reads
