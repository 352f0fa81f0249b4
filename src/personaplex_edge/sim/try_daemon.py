"""Try the daemon without hardware (`make try`): `ppx-runtime serve` on virtual cabin devices.

The microphone is a spoken file (the driver's questions, with pauses, repeated) played in real
time by the clocked virtual devices the tests use (sim.devices), the speaker a file. While it runs,
`ppx-runtime ctl --config DIR/runtime.yaml status` (and every other ctl command) works from
another terminal. Ctrl-C (or --seconds) stops the daemon and writes what it said to
DIR/speaker.wav.

    python -m personaplex_edge.sim.try_daemon --build out/tiny-build [--dir out/try]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from personaplex_edge.sim.daemon import free_port
from personaplex_edge.sim.devices import VirtualCabin, build_clock_plugin
from personaplex_edge.sim.shipped import driver_wav

RATE = 48000  # the devices run at the shipped default rate, mono
PAUSE_S = 8.0  # silence after each time the questions are asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personaplex_edge.sim.try_daemon",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, required=True, help="a build (make demo: out/tiny-build)")
    parser.add_argument("--dir", type=Path, default=Path("out/try"),
                        help="where the devices, config, socket and speaker.wav go")
    parser.add_argument("--speech", type=Path, default=None,
                        help="what the microphone hears, any WAV/FLAC/OGG (default: the driver's "
                             "questions shipped in tests/data)")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the microphone talks "
                        "(the speech repeats with pauses; silence after)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop by itself after this many seconds (default: at Ctrl-C)")
    args = parser.parse_args(argv)
    if not (args.build / "manifest.json").is_file():
        print(f"try: {args.build}: not a build (no manifest.json); `make demo` makes out/tiny-build",
              file=sys.stderr)
        return 2

    work = args.dir.resolve()
    if work.exists():
        shutil.rmtree(work)  # a previous try: its socket, snapshots and speaker file
    cabin = _cabin(work, args.speech, args.minutes)
    port = free_port()
    config = _config(work, args.build.resolve(), port, clocked=cabin.clock_lib is not None)
    env = {**os.environ, **cabin.env}
    env.pop("NOTIFY_SOCKET", None)
    print(f"try: serve on virtual devices in {work} (microphone: {args.speech or driver_wav()})",
          flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve",
                               "--config", str(config)], env=env)
    if not _wait_until_answering(work / "control.sock", daemon):
        return daemon.wait() or 1
    ctl = f"ppx-runtime ctl --config {config}"
    print(f"try: the daemon is listening. In another terminal (with the venv's bin on PATH):\n"
          f"    {ctl} status\n    {ctl} persona focus\n"
          f"    {ctl} context set \"ETA 14:05, range 180 km\"\n"
          f"    curl -s 127.0.0.1:{port}/metrics | grep ppx_frames\n"
          f"try: Ctrl-C stops it and writes {work / 'speaker.wav'}", flush=True)
    try:
        daemon.wait(timeout=args.seconds)
    except subprocess.TimeoutExpired:
        pass
    except KeyboardInterrupt:
        pass
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    wav = _speaker_wav(cabin)
    print(f"try: stopped (exit {daemon.returncode}); the agent's side: {wav}")
    return 0 if daemon.returncode in (0, -signal.SIGTERM) else daemon.returncode


def _cabin(work: Path, speech: Path | None, minutes: float) -> VirtualCabin:
    from personaplex_edge.runtime.audio.files import read_audio

    voice = read_audio(speech or driver_wav(), RATE)
    once = np.concatenate([voice, np.zeros(int(PAUSE_S * RATE), np.float32)])
    mic = np.tile(once, max(1, int(np.ceil(minutes * 60 * RATE / len(once)))))
    return VirtualCabin.create(work, mic_audio=mic, mic_pad_s=60.0, mic_rate=RATE, mic_channels=1,
                               spk_rate=RATE, spk_channels=1, clock_lib=build_clock_plugin())


def _config(work: Path, build: Path, port: int, clocked: bool) -> Path:
    """The shipped defaults, but on the virtual devices, with files under `work`."""
    config = work / "runtime.yaml"
    config.write_text(f"""# Written by personaplex_edge.sim.try_daemon: the shipped defaults on virtual devices.
build: {{path: {build}, backend: ort-cpu}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, channels: 1, clockless: {str(not clocked).lower()}}}
snapshots: {{dir: {work / 'snapshots'}}}
control: {{socket: {work / 'control.sock'}, group: null}}
metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}
logging: {{transcripts: true}}
""")
    return config


def _wait_until_answering(socket_path: Path, daemon: subprocess.Popen, timeout: float = 300) -> bool:
    from personaplex_edge.runtime.service.ctl import Unreachable, request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            if request(socket_path, {"cmd": "status"}, timeout=2.0).get("ok"):
                return True
        except Unreachable:
            pass
        time.sleep(0.5)
    return False


def _speaker_wav(cabin: VirtualCabin) -> Path:
    import soundfile as sf

    wav = cabin.dir / "speaker.wav"
    if cabin.speaker_raw.is_file():
        tmp = wav.with_name(".speaker.wav.partial")
        sf.write(str(tmp), cabin.read_speaker()[:, 0], RATE, subtype="PCM_16", format="WAV")
        os.replace(tmp, wav)
    return wav


if __name__ == "__main__":
    sys.exit(main())
