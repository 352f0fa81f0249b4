"""`ppx-runtime serve` end to end: real alsa-lib devices (file/null plugins), the tiny build,
sd_notify on a test socket, every control command, metrics, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from alsa_env import VirtualCabin, speech

pytest.importorskip("alsaaudio")


class NotifyListener:
    """A stand-in for systemd's notify socket: collects every datagram with its arrival time."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, msg in self.messages:
                if field in msg.splitlines():
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {field} within {timeout} s; got {self.messages}")

    def count(self, field: str, after: float = 0.0) -> int:
        return sum(1 for t, msg in self.messages if t >= after and field in msg.splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _ctl(config: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl", "--config", str(config),
                           "--json", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def _raw_request(path: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(65536)
    return json.loads(buf.splitlines()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_full_duplex_with_control_metrics_and_clean_stop(tiny_build: Path, tmp_path: Path) -> None:
    mic = speech(48000)
    cabin = VirtualCabin.create(tmp_path / "alsa", mic_audio=mic, mic_pad_s=30.0, mic_rate=48000,
                                mic_channels=2, spk_rate=48000, spk_channels=2)
    sock = tmp_path / "control.sock"
    port = _free_port()
    config = tmp_path / "runtime.yaml"
    config.write_text(f"""
build: {{path: {tiny_build}, backend: ort-cpu, threads: 1}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: 48000, playback_rate: 48000,
        channels: 2, period_frames: 960, buffer_periods: 4, clockless: true}}
persona: {{default: copilot}}
snapshots: {{dir: {tmp_path / 'snapshots'}}}
control: {{socket: {sock}, group: null}}
metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}
logging: {{level: info, transcripts: false}}
""")
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready_at = notify.wait_for("READY=1", timeout=120)
        time.sleep(3.0)

        status = _ctl(config, "status")
        assert status["ok"] and status["persona"] == "copilot" and status["frames"] > 20
        assert status["state"] == "listening" and not status["muted"]
        for args, key, value in ((("mute",), "muted", True), (("unmute",), "muted", False),
                                 (("pause",), "paused", True), (("resume",), "paused", False),
                                 (("busy", "on"), "busy", True), (("busy", "off"), "busy", False)):
            reply = _ctl(config, *args)
            assert reply["ok"] and reply[key] is value, reply
        assert _ctl(config, "reset")["ok"]
        assert _ctl(config, "persona", "focus")["ok"]
        time.sleep(0.5)
        assert _ctl(config, "status")["persona"] == "focus"
        metrics = _ctl(config, "metrics")
        assert "ppx_frames_total" in json.dumps(metrics)

        # Bad requests get an error reply, and the audio keeps flowing.
        frames_before = _ctl(config, "status")["frames"]
        assert _raw_request(sock, b"{not json\n")["ok"] is False
        assert _raw_request(sock, b'{"cmd": "explode"}\n')["ok"] is False
        assert _raw_request(sock, b'{"cmd": "persona", "name": "../../etc/passwd"}\n')["ok"] is False
        assert _raw_request(sock, b"x" * 10000 + b"\n")["ok"] is False
        time.sleep(1.0)
        assert _ctl(config, "status")["frames"] > frames_before + 5

        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "ppx_stage_duration_seconds_bucket" in scrape and 'persona="focus"' in scrape

        run_s = time.monotonic() - ready_at
        assert notify.count("WATCHDOG=1", after=ready_at) >= int(run_s / 1.0) - 1  # every ~1 s (half of 2 s)
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for _, m in notify.messages)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
        notify.close()
    assert rc == 0, output
    assert stop_s < 2.0, stop_s
    assert notify.count("STOPPING=1") == 1
    assert "Traceback" not in output
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>", "<2>") for line in output.splitlines() if line), output

    # The speaker got a continuous stream for the whole run: its length follows the wall clock.
    heard = cabin.read_speaker()
    played_s = len(heard) / 48000
    assert played_s > run_s - 1.0, (played_s, run_s)
    assert np.abs(heard).max() <= 1.0


def test_serve_config_error_exits_78_without_restart_loop(tmp_path: Path) -> None:
    config = tmp_path / "runtime.yaml"
    config.write_text("build:\n  path: /nonexistent/build\naudio:\n  capture_rate: 44100\n")
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "runtime.yaml:4: audio.capture_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
