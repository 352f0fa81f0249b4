"""A daemon with the network endpoint on a virtual cabin, for the network tests."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    reap,
    serve_config,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin

TOKEN = "test-token-0123456789abcdef"


@dataclass
class NetDaemon:
    proc: subprocess.Popen
    config: Path
    port: int
    metrics_port: int
    cabin: VirtualCabin
    notify: NotifyListener
    tokens: Path
    ready_at: float
    output: str = ""

    def url(self, query: str = "", host: str = "127.0.0.1", scheme: str = "ws") -> str:
        return f"{scheme}://{host}:{self.port}/api/chat" + (f"?{query}" if query else "")

    def status(self) -> dict:
        return ctl_json(self.config, "status")

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Until no network session holds the model (the frame loop has given it back)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["network"]["session"] is None:
                return status
            time.sleep(0.1)
        raise AssertionError(f"the network session did not end: {status['network']}")

    def stop(self) -> str:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.output = reap(self.proc, self.notify)
        return self.output


def start_net_daemon(tmp: Path, build: Path, mic: np.ndarray, network: str,
                     env: dict[str, str] | None = None,
                     persona: str = "default: copilot") -> NetDaemon:
    """`serve` on a 48 kHz virtual cabin whose microphone plays `mic` (24 kHz) then silence,
    with `network: {enabled: true, port: ..., <network>}` and `persona: {<persona>}`."""
    import soxr

    cabin = VirtualCabin.create(tmp / "alsa", mic_audio=soxr.resample(mic, 24000, 48000),
                                mic_pad_s=600.0, mic_rate=48000, mic_channels=2,
                                spk_rate=48000, spk_channels=2)
    port, metrics_port = free_port(), free_port()
    tokens = tmp / "tokens"
    tokens.mkdir()
    config = serve_config(tmp, build, port=metrics_port, persona=persona, extra=(
        "logging: {level: info, transcripts: false}\n"
        f"network: {{enabled: true, port: {port}, {network}}}"))
    notify = NotifyListener(tmp / "notify.sock")
    proc = start_serve(config, {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path),
                                "PPX_DEBUG_NETWORK_TOKENS": str(tokens), **(env or {})})
    try:
        ready_at = notify.wait_for("READY=1", timeout=180)
    except AssertionError:
        print(reap(proc, notify))
        raise
    return NetDaemon(proc, config, port, metrics_port, cabin, notify, tokens, ready_at)


def lan_address() -> str | None:
    """An address of this machine that is not loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address
