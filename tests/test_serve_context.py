"""Live vehicle context on a running `serve`, over the real control socket: `ctl context
set/show/clear`, applied in the next pause, bad text refused with the conversation untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    raw_request,
    scrape,
    serve_config,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin
from personaplex_edge.sim.shipped import speech

pytest.importorskip("alsaaudio")

FACTS = "Destination Lyon, ETA 14:05. Next: exit 12 in 3 km. Outside 4 C. Range 180 km."


def _ctl_rc(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl", "--config",
                           str(config), *args], capture_output=True, text=True, timeout=30)


def _wait_applied(config: Path, timeout: float) -> tuple[float, dict]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        shown = ctl_json(config, "context", "show")
        if not shown["pending"]:
            return time.monotonic() - t0, shown
        time.sleep(0.05)
    raise AssertionError(f"context still pending after {timeout} s: {shown}")


def test_context_set_show_clear_on_a_running_daemon(tiny_build: Path, tmp_path: Path) -> None:
    cabin = VirtualCabin.create(tmp_path / "alsa", mic_audio=speech(48000, 3.0), mic_pad_s=60.0,
                                mic_rate=48000, mic_channels=2, spk_rate=48000, spk_channels=2)
    port = free_port()
    config = serve_config(tmp_path, tiny_build, port=port)
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path)}
    proc = start_serve(config, env)
    try:
        notify.wait_for("READY=1", timeout=120)
        base = ctl_json(config, "context", "show")
        assert base["context"] == "" and not base["pending"]
        assert base["prompt"].startswith("<system> You work for Northwind Drive")
        status = ctl_json(config, "status")
        assert status["context_fill"].endswith("/3000") and status["context_updates"] == 0

        # The agent talks (random weights never pause): no pause, so the facts wait.
        reply = ctl_json(config, "context", "set", FACTS)
        assert reply["pending"] and FACTS in reply["pending_prompt"]
        assert FACTS not in reply["prompt"]
        time.sleep(1.5)
        assert ctl_json(config, "context", "show")["pending"]
        # Navigation speaks: the agent is paused and the cabin microphone muted. A pause.
        ctl_json(config, "pause")
        ctl_json(config, "mute")
        elapsed, shown = _wait_applied(config, timeout=5.0)
        # The pause begins once both sides are quiet (hangovers 0.16 s driver, 0.48 s agent,
        # then 0.5 s); the context must land within 1 s of it.
        assert elapsed <= 0.48 + 0.5 + 1.0, elapsed
        assert shown["prompt"].endswith(f"{FACTS} <system>") and shown["context"] == FACTS
        status = ctl_json(config, "status")
        assert status["context_updates"] == 1 and status["last_context_update_ago_s"] < 5

        # Bad text: one error reply naming the limit; the conversation is untouched.
        frames = status["frames"]
        for text, why in (("x" * 401, "401 characters, the limit is 400"),
                          ("ETA 14:05\nrange 180 km", "control or unassigned character U+000A")):
            bad = _ctl_rc(config, "context", "set", text)
            assert bad.returncode == 1 and why in bad.stderr, bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
        raw = raw_request(tmp_path / "control.sock",
                           b'{"cmd": "context", "action": "set", "text": "\xff\xfe"}\n')
        assert raw == {"ok": False, "error": "request is not UTF-8"}
        after = ctl_json(config, "context", "show")
        assert after["context"] == FACTS and not after["pending"]
        assert ctl_json(config, "status")["frames"] > frames

        # Clear: back to the persona's own prompt in the (still running) pause.
        ctl_json(config, "context", "clear")
        _, shown = _wait_applied(config, timeout=5.0)
        assert shown["context"] == "" and shown["prompt"] == base["prompt"]
        text = scrape(port)
        assert 'ppx_lifecycle_events_total{kind="context"} 2.0' in text
        assert "ppx_context_fill_frames" in text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0, out
