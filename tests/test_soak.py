"""A three-minute soak of `serve` with every fault injected once (tests/soak.py; `make soak`
runs the hour)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from soak import Soak

pytest.importorskip("alsaaudio")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="the clocked ALSA test plugin needs a C compiler")
def test_three_minute_soak_with_faults(tiny_build: Path, tmp_path: Path) -> None:
    soak = Soak(tiny_build, tmp_path, minutes=3.0, sample_every=30.0, cycle_s=180.0,
                log=lambda line: None)
    result = soak.run()
    log = (tmp_path / "daemon.log").read_text()[-3000:]
    assert result.failures == [], (result.failures, log)
    assert result.exit_code == 0
    injected = {k for k, v in result.faults.items() if v}
    assert injected >= {"xrun_burst", "capture_loss", "playback_loss", "persona_switch", "reset",
                        "sigstop", "control_fuzz"} | ({"snapshot_readonly", "snapshot_full"}
                                                      - set(result.skipped))
    assert len(result.samples) >= 5 and result.steady_drift_s
