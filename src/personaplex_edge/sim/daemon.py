"""Running `ppx-runtime serve` on the virtual cabin devices (sim.devices): its config, a stand-in
for systemd's notify socket, requests to its control socket and scrapes of its metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def serve_config(tmp_path: Path, build: Path, *, port: int | None = None,
                 persona: str = "default: copilot", control: str = "", backend: str = "ort-cpu",
                 extra: str = "") -> Path:
    """runtime.yaml for the tiny build on the cabin's ppx_mic/ppx_spk (48 kHz stereo, paced to
    the clock); metrics on `port` (None: off); `control` adds control fields."""
    metrics = f"{{enabled: true, host: 127.0.0.1, port: {port}}}" if port else "{enabled: false}"
    config = tmp_path / "runtime.yaml"
    config.write_text(f"""
build: {{path: {build}, backend: {backend}, threads: 1}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: 48000, playback_rate: 48000,
        channels: 2, period_frames: 960, buffer_periods: 4, clockless: true}}
persona: {{{persona}}}
snapshots: {{dir: {tmp_path / 'snapshots'}}}
control: {{socket: {tmp_path / 'control.sock'}, group: null{', ' + control if control else ''}}}
metrics: {metrics}
{extra}
""")
    return config


def reap(proc: subprocess.Popen, notify: NotifyListener) -> str:
    """After a test's run: kill the daemon if it still runs, close the listener; its output."""
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate()[0]
    notify.close()
    return output


def start_serve(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "personaplex_edge.runtime.cli", "serve",
                             "--config", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


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


def ctl_json(config: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl", "--config", str(config),
                           "--json", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def raw_request(path: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(65536)
    return json.loads(buf.splitlines()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    """The daemon's metrics endpoint on 127.0.0.1:`port`: Prometheus text (checked to be so)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        kind = response.headers["Content-Type"] or ""
        if not kind.startswith("text/plain"):
            raise ValueError(f"the metrics endpoint served {kind!r}, not text/plain")
        return response.read().decode()


def samples(text: str) -> dict[str, float]:
    """A scrape as {sample name with its labels, as written: value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
