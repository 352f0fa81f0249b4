"""The daemon's echo path (runtime/audio/echo_path.py): the delay estimate, rates, modes, a lost
speaker through real alsa-lib, and webrtc configured without its library (check and serve).

The end-to-end measurement in a virtual cabin is tests/test_echo_alsa.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import import_guard

from personaplex_edge.runtime.audio.echo import MISSING_LIBRARY
from personaplex_edge.runtime.audio.echo_path import UPDATE_S, DelayTracker, EchoPath
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.runtime.errors import ConfigError
from personaplex_edge.sim.devices import VirtualCabin
from personaplex_edge.sim.shipped import speech

needs_aec = pytest.mark.skipif(__import__("importlib").util.find_spec("pywebrtc_audio") is None,
                               reason="pywebrtc-audio (the aec extra) is not installed")


def test_delay_estimate_is_the_two_buffers_medians_once_a_second() -> None:
    d = DelayTracker()
    for ms in (60.0, 61.0, 59.0, 200.0, 60.0):  # one late wake-up does not move the median
        d.playback(ms)
    assert d.update(100.0) is None  # no capture side yet: nothing to say
    for ms in (20.0, 21.0, 19.0):
        d.capture(ms)
    assert d.update(100.0) == pytest.approx(80.0)
    d.playback(500.0)
    assert d.update(100.0 + UPDATE_S / 2) is None  # once a second
    d.forget_playback()  # the speaker dropped its buffer: its old level says nothing now
    assert d.update(100.0 + UPDATE_S) is None and d.estimate_ms == pytest.approx(80.0)
    d.playback(40.0)
    assert d.update(100.0 + 2 * UPDATE_S) == pytest.approx(60.0)


def test_off_and_external_pass_the_mic_untouched() -> None:
    for mode in ("off", "external"):
        path = EchoPath(AudioSettings(echo_cancel=mode))
        mic = np.linspace(-0.5, 0.5, 960, dtype=np.float32)
        assert not path.active and path.near(mic, 48000, 960) is mic
        path.far(mic, 48000, 960)
        path.drop_far("underrun")
        assert path.stats() == {"echo_cancel": mode, "echo_delay_ms": None,
                                "echo_reference_drops": 0, "echo_cpu_ms_per_frame": 0.0}


@needs_aec
def test_the_canceller_follows_the_rates_the_devices_opened_at() -> None:
    path = EchoPath(AudioSettings(echo_cancel="webrtc", capture_rate=48000, playback_rate=48000,
                                  period_frames=960, buffer_periods=4))  # a 30 ms lead
    path.far(np.zeros(480, np.float32), 24000, 480)  # the speaker opened at 24 kHz
    out = path.near(np.zeros(960, np.float32), 48000, 960)
    c = path._stream.canceller
    assert (c.rate, c.far_rate) == (48000, 24000) and len(out) == 960  # never mismatched
    path.far(np.zeros(480, np.float32), 24000, 0)  # playing now
    path.near(np.zeros(960, np.float32), 48000, 960)
    assert c._far_in == 480  # from now on the reference goes in
    path.far(np.zeros(480, np.float32), 24000, 480)  # starts in 20 ms: the first 10 ms are
    path.near(np.zeros(960, np.float32), 48000, 960)  # within the 30 ms lead, the rest waits
    assert 480 + 230 <= c._far_in <= 480 + 250
    # A reopened microphone: the canceller starts afresh (the first open is no reopen).
    path.capture_started()
    assert c.stats.blocks == 6
    path.capture_started()
    assert c.stats.blocks == 0


@needs_aec
def test_far_periods_reach_the_canceller_when_they_play() -> None:
    """Not when the playback thread wrote them: by the buffer levels, on the mic's clock."""
    path = EchoPath(AudioSettings(echo_cancel="webrtc", period_frames=960, buffer_periods=4))
    c = path._stream.canceller
    path.far(np.full(960, 0.1, np.float32), 48000, 48000 // 4)  # plays in 250 ms
    path.near(np.zeros(960, np.float32), 48000, 960)  # the mic's newest sample: just now
    assert c._far_in == 0  # 250 ms ahead of the mic: it waits (the lead is 30 ms)
    time.sleep(0.25)
    path.near(np.zeros(480, np.float32), 48000, 480)
    assert c._far_in == 960
    path.far(np.full(960, 0.1, np.float32), 48000, 48000)  # a second ahead...
    path.drop_far("underrun")  # ...and then the device dropped it
    time.sleep(0.05)
    path.near(np.zeros(480, np.float32), 48000, None)  # no capture clock: all that waits
    assert c._far_in == 960 and path.stats()["echo_reference_drops"] == 1


@needs_aec
def test_lost_speaker_drops_the_reference_counted_and_capture_carries_on(tmp_path: Path,
                                                                        monkeypatch) -> None:
    """The file plugin pipes the speaker to `head -c`, which exits after 0.3 s: the next flush
    fails and the playback PCM returns EIO, a speaker lost mid-stream."""
    pytest.importorskip("alsaaudio")
    from personaplex_edge.runtime.audio.cabin import CabinAudio

    first = tmp_path / "before_loss.raw"
    cabin = VirtualCabin.create(tmp_path / "cabin", mic_audio=speech(48000, 4.0),
                                mic_rate=48000, mic_channels=2,
                                speaker_file=f"|head -c 60000 >{first}")
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
    audio = CabinAudio(AudioSettings(
        capture_device="ppx_mic", playback_device="ppx_spk", channels=2, preroll_ms=40.0,
        clockless=True, retry_min_s=5.0, retry_max_s=5.0, echo_cancel="webrtc"))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(FRAME_SAMPLES) / 24000)).astype(np.float32)
    captured = []
    audio.start()
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            frame = audio.read_frame(timeout=0.5)
            if frame is not None:
                captured.append(frame)
                audio.write_frame(tone)  # the agent talks over the loss
        st = audio.stats()
        canceller = audio._echo._stream.canceller
    finally:
        assert audio.stop()
    assert first.stat().st_size == 60000
    assert "Input/output error" in st["reason"] and not st["playback_open"]
    assert st["echo_reference_drops"] >= 1 and canceller.stats.dropped_far >= 1
    # The microphone never stopped: frames for the whole 3 s, the driver's speech in them,
    # paired with a silent reference once the speaker was gone.
    assert len(captured) >= 30 and st["capture_reopens"] == 0 and st["overruns"] == 0
    assert canceller.stats.silent_far_blocks >= 50
    assert np.sqrt(np.mean(np.concatenate(captured[-10:]) ** 2)) > 0.01


def _guarded(code: str) -> subprocess.CompletedProcess:
    """Run `code` with pywebrtc_audio unimportable, as on an install without the aec extra."""
    script = import_guard(("pywebrtc_audio",)) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def _config(tmp_path: Path, build: Path, echo: str = "") -> Path:
    config = tmp_path / "runtime.yaml"
    config.write_text(f"""
build: {{path: {build}, backend: ort-cpu}}
audio:
  capture_device: "null"
  playback_device: "null"
{echo}
snapshots: {{dir: {tmp_path / 'snapshots'}}}
control: {{socket: {tmp_path / 'control.sock'}, group: null}}
metrics: {{enabled: false}}
""")
    return config


def test_webrtc_without_its_library_check_says_so_and_serve_refuses(tiny_build: Path,
                                                                    tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_build)  # the default: webrtc
    line = (f"audio.echo_cancel: {MISSING_LIBRARY} (or set audio.echo_cancel to external or "
            "off)")
    check = _guarded("from personaplex_edge.runtime.cli import main\n"
                     f"sys.exit(main(['check', '--config', {str(config)!r}]))\n")
    assert check.returncode == 1, check.stderr
    assert line in check.stdout.splitlines(), check.stdout
    serve = _guarded("from personaplex_edge.runtime.cli import main\n"
                     f"sys.exit(main(['serve', '--config', {str(config)!r}]))\n")
    assert serve.returncode == 78, (serve.stdout, serve.stderr)
    assert serve.stderr == f"ppx-runtime: error: {line}\n"  # one line, before any work
    # The same install with `echo_cancel: external` (or off) is fine, and says what it runs.
    external = _config(tmp_path, tiny_build, "  echo_cancel: external")
    ok = _guarded("from personaplex_edge.runtime.cli import main\n"
                  f"sys.exit(main(['check', '--config', {str(external)!r}]))\n")
    if "pyalsaaudio is not installed" not in ok.stdout:
        assert ok.returncode == 0, ok.stdout
        assert ("; echo cancellation external (the car's DSP or the speakerphone cancels)"
                in ok.stdout.splitlines()[0])


@needs_aec
def test_check_names_the_library_in_use(tiny_build: Path, tmp_path: Path) -> None:
    import importlib.metadata

    from personaplex_edge.runtime.service.check import run_checks

    report = run_checks(_config(tmp_path, tiny_build))
    version = importlib.metadata.version("pywebrtc-audio")
    assert f"echo cancellation webrtc (pywebrtc-audio {version})" in report.notes
    off = run_checks(_config(tmp_path, tiny_build, "  echo_cancel: off"))
    assert "echo cancellation off" in off.notes


def test_unknown_mode_in_settings_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^audio\.echo_cancel: 'speex' is not one of webrtc, "
                                          r"external, off$"):
        AudioSettings(echo_cancel="speex")


def test_the_canceller_lead_follows_the_buffer_depth() -> None:
    """A far sample exists from its write, at most buffer - 1 periods before it plays: the lead
    is half a period less (a period at least, 30 ms at most), so a shallow buffer never leaves
    the reference late."""
    from personaplex_edge.runtime.audio.echo_path import jitter_ms

    def lead(period_frames: int, buffer_periods: int, rate: int = 48000) -> float:
        return jitter_ms(AudioSettings(period_frames=period_frames, buffer_periods=buffer_periods,
                                       playback_rate=rate))

    assert lead(480, 3) == 15.0  # the defaults: 10 ms x 3
    assert lead(960, 4) == 30.0 and lead(480, 8) == 30.0
    assert lead(480, 2) == 10.0 and lead(240, 2) == 5.0
    assert lead(480, 3, rate=24000) == 30.0  # 20 ms periods at 24 kHz
