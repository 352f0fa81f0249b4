"""`serve` with update slots, on virtual ALSA devices and the tiny build: a trial slot that loads
but fails its health check is dropped without a person (the car goes on with the last good
build, and the failure shows in `update status`, the journal and the metrics); a trial that
passes is committed; activating and rolling back during a running session switch builds in
process, and the time without an assistant is measured (RELOADING=1 to the next READY=1)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from update_kit import bundle, config, keys, trusted_dir, update

from personaplex_edge.runtime.update.install import KILL_ENV, STEPS
from personaplex_edge.runtime.update.slots import Slots
from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    reap,
    scrape,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin
from personaplex_edge.sim.shipped import speech

pytest.importorskip("alsaaudio")
pytest.importorskip("cryptography")


def _daemon_config(tmp: Path, build: Path, trusted: Path, port: int, health: str) -> Path:
    cfg = config(tmp, build, trusted, extra=", " + health)
    cfg.write_text(cfg.read_text().replace("backend: ort-cpu}", "backend: ort-cpu, threads: 1}") + f"""
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: 48000, playback_rate: 48000,
        channels: 2, period_frames: 960, buffer_periods: 4, clockless: true}}
control: {{socket: {tmp / 'control.sock'}, group: null}}
metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}
""")
    return cfg


def _start(tmp: Path, cfg: Path) -> tuple:
    cabin = VirtualCabin.create(tmp / "alsa", mic_audio=speech(48000), mic_pad_s=120.0,
                                mic_rate=48000, mic_channels=2, spk_rate=48000, spk_channels=2)
    notify = NotifyListener(tmp / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "5000000"}
    return start_serve(cfg, env), notify


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def _gaps(notify: NotifyListener) -> list[float]:
    """Seconds from each RELOADING=1 (the old build's last frame is behind it) to the next READY=1."""
    gaps, reloading = [], None
    for t, msg in notify.messages:
        fields = msg.splitlines()
        if "RELOADING=1" in fields:
            reloading = t
        elif "READY=1" in fields and reloading is not None:
            gaps.append(t - reloading)
            reloading = None
    return gaps


def test_trial_that_fails_its_health_check_falls_back_without_a_person(
        tiny_build: Path, tmp_path: Path) -> None:
    key = keys(tmp_path)
    trusted = trusted_dir(tmp_path, key)
    port = free_port()
    # Every frame is "late" against a 0.001 ms deadline: the trial fails after 3 misses.
    cfg = _daemon_config(tmp_path, tiny_build, trusted, port,
                         "health_deadline_ms: 0.001, health_max_misses: 2, health_frames: 1000")
    assert update(cfg, "install", "--activate", str(bundle(tiny_build, key, tmp_path / "v1.ppxb",
                                                           "1.0"))).returncode == 0
    proc, notify = _start(tmp_path, cfg)
    slots = Slots(tmp_path / "slots")
    try:
        _wait(lambda: (slots.read().info("a") or {}).get("health") == "failed", 120,
              "slot a marked failed")
        notify.wait_for("RELOADING=1", 30)
        _wait(lambda: len(_gaps(notify)) == 1, 120, "READY again on build.path")
        status = ctl_json(cfg, "status")
        frames = status["frames"]
        _wait(lambda: ctl_json(cfg, "status")["frames"] > frames + 10, 30, "frames flow on")
        text = scrape(port)
        assert "ppx_update_failed_slots 1.0" in text
        assert 'ppx_build_info{slot="",version=""} 1.0' in text
        assert "ppx_build_trial 0.0" in text
        shown = update(cfg, "status").stdout
        assert "slot a: version 1.0 (target any), failed: 3 of its first 3 frames missed" in shown
        assert "selected: build.path" in shown
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        output = reap(proc, notify)
    assert "<3>" in output and "slot a failed its health check" in output  # journal, error
    assert "Traceback" not in output


def test_update_and_rollback_during_a_session_switch_in_process(
        tiny_build: Path, tmp_path: Path) -> None:
    key = keys(tmp_path)
    trusted = trusted_dir(tmp_path, key)
    port = free_port()
    cfg = _daemon_config(tmp_path, tiny_build, trusted, port,
                         "health_frames: 12, health_s: 1.0, health_deadline_ms: 10000")
    assert update(cfg, "install", "--activate", str(bundle(tiny_build, key, tmp_path / "v1.ppxb",
                                                           "1.0"))).returncode == 0
    proc, notify = _start(tmp_path, cfg)
    slots = Slots(tmp_path / "slots")
    try:
        notify.wait_for("READY=1", 120)
        waited = update(cfg, "wait", "--timeout", "60")
        assert waited.returncode == 0 and "slot a passed its health check" in waited.stdout
        assert "ppx_build_trial 0.0" in scrape(port)

        # A new build arrives while the driver talks: install, activate, the daemon follows.
        v2 = bundle(tiny_build, key, tmp_path / "v2.ppxb", "2.0")
        assert update(cfg, "install", "--activate", str(v2)).returncode == 0
        waited = update(cfg, "wait", "--timeout", "120")
        assert waited.returncode == 0 and "slot b passed" in waited.stdout, waited.stderr
        assert 'ppx_build_info{slot="b",version="2.0"} 1.0' in scrape(port)

        # Rolled back by hand: a is good again and runs.
        assert "slot a is good again" in update(cfg, "rollback").stdout
        _wait(lambda: len(_gaps(notify)) == 2, 120, "READY after the rollback")
        _wait(lambda: 'slot="a"' in scrape(port), 30, "serving slot a")
        frames = ctl_json(cfg, "status")["frames"]
        _wait(lambda: ctl_json(cfg, "status")["frames"] > frames + 10, 30, "frames flow on")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        output = reap(proc, notify)
    assert slots.read().good == "a"
    gaps = _gaps(notify)
    print(f"\ntime without an assistant per switch (tiny build, ort-cpu): "
          f"{', '.join(f'{g:.2f} s' for g in gaps)}")
    assert len(gaps) == 2 and all(g < 60 for g in gaps), gaps
    assert notify.count("STOPPING=1") == 1  # only the final stop: a switch is no stop
    assert "Traceback" not in output


def test_trial_killed_during_its_health_check_falls_back_at_the_next_start(
        tiny_build: Path, tmp_path: Path) -> None:
    """Power lost (SIGKILL) while a new build is on trial, max_starts times: the start after
    serves the last good build, and says why. A clean stop (the car switched off) is no strike."""
    key = keys(tmp_path)
    trusted = trusted_dir(tmp_path, key)
    port = free_port()
    cfg = _daemon_config(tmp_path, tiny_build, trusted, port,
                         "max_starts: 2, health_frames: 100000, health_s: 3600")
    slots = Slots(tmp_path / "slots")
    assert update(cfg, "install", "--activate", str(bundle(tiny_build, key, tmp_path / "v1.ppxb",
                                                           "1.0"))).returncode == 0
    # Switched off cleanly (SIGTERM) during the trial: that start does not count.
    proc, notify = _start(tmp_path, cfg)
    try:
        notify.wait_for("READY=1", 120)
        assert slots.read().starts == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        reap(proc, notify)
    (tmp_path / "notify.sock").unlink()
    assert slots.read().starts == 0 and slots.read().trial == "a"
    for start in (1, 2):
        proc, notify = _start(tmp_path, cfg)
        try:
            notify.wait_for("READY=1", 120)
            assert slots.read().starts == start and slots.wanted() == "a"
            proc.kill()
            proc.wait(timeout=10)
        finally:
            reap(proc, notify)
        (tmp_path / "notify.sock").unlink()
    proc, notify = _start(tmp_path, cfg)
    try:
        notify.wait_for("READY=1", 120)
        assert 'ppx_build_info{slot="",version=""} 1.0' in scrape(port)  # build.path again
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        output = reap(proc, notify)
    assert "slot a did not prove healthy in 2 start(s)" in output
    assert (slots.read().info("a") or {}).get("health") == "failed"


def test_installs_killed_at_every_step_never_disturb_the_running_build(
        tiny_build: Path, tmp_path: Path) -> None:
    """While the car serves its good slot, an install is SIGKILLed at each step: the daemon goes
    on serving that slot without a gap, and a restart serves it again."""
    key = keys(tmp_path)
    trusted = trusted_dir(tmp_path, key)
    port = free_port()
    cfg = _daemon_config(tmp_path, tiny_build, trusted, port, "max_starts: 2")
    slots = Slots(tmp_path / "slots")
    assert update(cfg, "install", "--activate", str(bundle(tiny_build, key, tmp_path / "v1.ppxb",
                                                           "1.0"))).returncode == 0
    slots.start(max_starts=2)
    assert slots.commit("a")
    v2 = bundle(tiny_build, key, tmp_path / "v2.ppxb", "2.0")
    for run in ("killed installs", "restart"):
        proc, notify = _start(tmp_path, cfg)
        try:
            notify.wait_for("READY=1", 120)
            assert 'ppx_build_info{slot="a",version="1.0"} 1.0' in scrape(port)
            if run == "killed installs":
                for step in STEPS[:-1]:  # the last, `activated`, is a switch that happened
                    frames = ctl_json(cfg, "status")["frames"]
                    killed = update(cfg, "install", "--activate", str(v2),
                                    env={**os.environ, KILL_ENV: step})
                    assert killed.returncode == -9, (step, killed.stderr)
                    _wait(lambda f=frames: ctl_json(cfg, "status")["frames"] > f + 5, 30,
                          f"frames flow on after a kill at {step}")
                time.sleep(1.5)  # past the daemon's next look at the state file
                assert 'slot="a"' in scrape(port) and not _gaps(notify)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            output = reap(proc, notify)
        (tmp_path / "notify.sock").unlink()
        assert "RELOADING=1" not in "".join(m for _, m in notify.messages), output
