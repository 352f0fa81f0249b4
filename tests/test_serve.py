"""`ppx-runtime serve` end to end: real alsa-lib devices (file/null plugins), the tiny build,
sd_notify on a test socket, every control command, metrics, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    raw_request,
    reap,
    scrape,
    serve_config,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin
from personaplex_edge.sim.shipped import speech

pytest.importorskip("alsaaudio")


def test_serve_full_duplex_with_control_metrics_and_clean_stop(tiny_build: Path, tmp_path: Path) -> None:
    mic = speech(48000)
    cabin = VirtualCabin.create(tmp_path / "alsa", mic_audio=mic, mic_pad_s=30.0, mic_rate=48000,
                                mic_channels=2, spk_rate=48000, spk_channels=2)
    sock = tmp_path / "control.sock"
    port = free_port()
    config = serve_config(tmp_path, tiny_build, port=port,
                          extra="logging: {level: info, transcripts: false}")
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    proc = start_serve(config, env)
    try:
        ready_at = notify.wait_for("READY=1", timeout=120)
        time.sleep(3.0)

        status = ctl_json(config, "status")
        assert status["ok"] and status["persona"] == "copilot" and status["frames"] > 20
        assert status["state"] == "listening" and not status["muted"]
        for args, key, value in ((("mute",), "muted", True), (("unmute",), "muted", False),
                                 (("pause",), "paused", True), (("resume",), "paused", False),
                                 (("busy", "on"), "busy", True), (("busy", "off"), "busy", False)):
            reply = ctl_json(config, *args)
            assert reply["ok"] and reply[key] is value, reply
        assert ctl_json(config, "reset")["ok"]
        assert ctl_json(config, "persona", "focus")["ok"]
        time.sleep(0.5)
        assert ctl_json(config, "status")["persona"] == "focus"
        # What a person reads: the switch is answered once it is applied (was "(pending yes)").
        said = subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "ctl", "--config",
                               str(config), "persona", "roadtrip"], capture_output=True, text=True,
                              timeout=30)
        assert (said.returncode, said.stdout, said.stderr) == (0, "persona roadtrip\n", "")
        assert ctl_json(config, "status")["persona"] == "roadtrip"
        metrics = ctl_json(config, "metrics")
        assert "ppx_frames_total" in json.dumps(metrics)

        # Bad requests get an error reply, and the audio keeps flowing.
        frames_before = ctl_json(config, "status")["frames"]
        assert raw_request(sock, b"{not json\n")["ok"] is False
        assert raw_request(sock, b'{"cmd": "explode"}\n')["ok"] is False
        assert raw_request(sock, b'{"cmd": "persona", "name": "../../etc/passwd"}\n')["ok"] is False
        assert raw_request(sock, b"x" * 10000 + b"\n")["ok"] is False
        time.sleep(1.0)
        assert ctl_json(config, "status")["frames"] > frames_before + 5

        text = scrape(port)
        assert "ppx_stage_duration_seconds_bucket" in text and 'persona="roadtrip"' in text

        run_s = time.monotonic() - ready_at
        assert notify.count("WATCHDOG=1", after=ready_at) >= int(run_s / 1.0) - 1  # every ~1 s (half of 2 s)
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for _, m in notify.messages)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        stop_s = time.monotonic() - t0
    finally:
        output = reap(proc, notify)
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
