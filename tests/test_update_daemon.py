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
from dataclasses import dataclass
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


@dataclass
class _Car:
    """A car: a trusted key, the daemon's config (metrics on `port`) and its update slots;
    `install` makes a bundle of `build` and installs and activates it, as an OTA would."""

    tmp: Path
    build: Path
    key: Path
    cfg: Path
    port: int
    slots: Slots

    def bundle(self, version: str) -> Path:
        return bundle(self.build, self.key, self.tmp / f"v{version}.ppxb", version)

    def install(self, version: str) -> None:
        assert update(self.cfg, "install", "--activate", str(self.bundle(version))).returncode == 0


def _car(tmp: Path, bundled: Path, health: str, factory: Path | None = None) -> _Car:
    """Bundles of `bundled`; the daemon's build.path is `factory` (default: `bundled`)."""
    key = keys(tmp)
    port = free_port()
    cfg = _daemon_config(tmp, factory or bundled, trusted_dir(tmp, key), port, health)
    return _Car(tmp, bundled, key, cfg, port, Slots(tmp / "slots"))


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
    # Every frame is "late" against a 0.001 ms deadline: the trial fails after 3 misses.
    car = _car(tmp_path, tiny_build, "health_deadline_ms: 0.001, health_max_misses: 2, health_frames: 1000")
    cfg, port, slots = car.cfg, car.port, car.slots
    car.install("1.0")
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
    car = _car(tmp_path, tiny_build, "health_frames: 12, health_s: 1.0, health_deadline_ms: 10000")
    cfg, port, slots = car.cfg, car.port, car.slots
    car.install("1.0")
    proc, notify = _start(tmp_path, cfg)
    slots = Slots(tmp_path / "slots")
    try:
        notify.wait_for("READY=1", 120)
        waited = update(cfg, "wait", "--timeout", "60")
        assert waited.returncode == 0 and "slot a passed its health check" in waited.stdout
        assert "ppx_build_trial 0.0" in scrape(port)

        # A new build arrives while the driver talks: install, activate, the daemon follows.
        v2 = car.bundle("2.0")
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
    car = _car(tmp_path, tiny_build, "max_starts: 2, health_frames: 100000, health_s: 3600")
    cfg, port, slots = car.cfg, car.port, car.slots
    car.install("1.0")
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
    car = _car(tmp_path, tiny_build, "max_starts: 2")
    cfg, port, slots = car.cfg, car.port, car.slots
    car.install("1.0")
    slots.start(max_starts=2)
    assert slots.commit("a")
    v2 = car.bundle("2.0")
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


def _corrupt(slot_dir: Path) -> None:
    """A byte flipped in the installed slot (bit rot, a bad disk): the build no longer loads."""
    data = next(p for p in sorted(slot_dir.rglob("*.onnx.data")))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def test_slots_that_do_not_load_fall_back_to_the_next_build(tiny_build: Path, tmp_path: Path
                                                             ) -> None:
    """A trial that does not load is failed; a committed slot that no longer loads is marked
    failed and the car serves the next build (here build.path) instead of exiting 78."""
    car = _car(tmp_path, tiny_build, "max_starts: 2")
    cfg, port, slots = car.cfg, car.port, car.slots
    for phase, version in (("trial", "1.0"), ("committed", "2.0")):
        car.install(version)
        slot = slots.read().trial
        if phase == "committed":
            slots.start(max_starts=2)
            assert slots.commit(slot)
        _corrupt(slots.path(slot))
        proc, notify = _start(tmp_path, cfg)
        try:
            notify.wait_for("READY=1", 120)
            assert 'ppx_build_info{slot="",version=""} 1.0' in scrape(port)  # build.path
            shown = update(cfg, "status").stdout
            why = "did not start" if phase == "trial" else "did not load"
            assert f"slot {slot}: version {version} (target any), failed: {why}" in shown, shown
            assert "sha256 differs" in shown
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            output = reap(proc, notify)
        (tmp_path / "notify.sock").unlink()
        expected = ("failed its health check" if phase == "trial"
                    else f"slot {slot} (committed) did not load")
        assert "<3>" in output and expected in output, output
        assert "Traceback" not in output


def test_a_busy_metrics_port_does_not_fail_a_trial(tiny_build: Path, tmp_path: Path) -> None:
    """Only loading the build decides a trial: a device, port or socket the daemon cannot have
    is the car's problem, not the new build's."""
    import socket

    car = _car(tmp_path, tiny_build, "max_starts: 2")
    cfg, port, slots = car.cfg, car.port, car.slots
    car.install("1.0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc, notify = _start(tmp_path, cfg)
        try:
            assert proc.wait(timeout=120) != 0
        finally:
            output = reap(proc, notify)
    state = slots.read()
    assert (state.trial, state.info("a")["health"]) == ("a", "trial"), output
    assert "failed its health check" not in output


def test_a_trial_that_loses_a_persona_fails(tiny_build: Path, tmp_path: Path) -> None:
    """The car's build serves persona `far` (voice NATF9); the new build lacks that voice: the
    daemon would skip the persona and serve on, but the trial fails and the old build runs."""
    import shutil

    from update_kit import reseal

    factory = tmp_path / "factory"
    shutil.copytree(tiny_build, factory)
    manifest = factory / "manifest.json"
    manifest.write_bytes(reseal(manifest.read_bytes(),
                                lambda d: d["voices"].update(NATF9=d["voices"]["NATF2"])))
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "far.yaml").write_text("name: far\nvoice: NATF9\nprompt: Be brief.\n")
    car = _car(tmp_path, tiny_build, "max_starts: 2", factory=factory)
    cfg, port, slots = car.cfg, car.port, car.slots
    cfg.write_text(cfg.read_text() + f"persona: {{default: copilot, persona_dirs: [{personas}]}}\n")
    slots = Slots(tmp_path / "slots")
    car.install("1.0")
    proc, notify = _start(tmp_path, cfg)
    try:
        notify.wait_for("READY=1", 120)
        assert 'ppx_build_info{slot="",version=""} 1.0' in scrape(port)  # the factory build
        info = slots.read().info("a")
        assert info["health"] == "failed", info
        assert "persona(s) the last good build serves, skipped: far:" in info["failure"]
        assert "NATF9" in info["failure"]
        assert ctl_json(cfg, "persona", "far")["persona"] == "far"  # served by the old build
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        output = reap(proc, notify)
    assert "Traceback" not in output


def test_a_trial_stopped_while_it_still_loads_keeps_its_start(tiny_build: Path, tmp_path: Path
                                                              ) -> None:
    """SIGTERM before the trial served (systemd's TimeoutStartSec on a slow load) proves nothing
    good: unlike a clean stop of a serving trial, that start still counts in max_starts."""
    car = _car(tmp_path, tiny_build, "max_starts: 2")
    cfg, slots = car.cfg, car.slots
    car.install("1.0")
    proc, notify = _start(tmp_path, cfg)
    try:
        _wait(lambda: any(line.startswith("STATUS=preparing persona")
                          for _, msg in notify.messages for line in msg.splitlines()),
              120, "the trial preparing its personas")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        output = reap(proc, notify)
    assert notify.count("READY=1") == 0, output  # stopped before it served
    state = slots.read()
    assert (state.trial, state.starts) == ("a", 1), output
