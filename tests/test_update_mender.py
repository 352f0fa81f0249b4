"""The Mender update module (ota/mender/personaplex-build) run the way the Mender client runs
it: `MODULE STATE FILES_DIR` with the artifact's payload in FILES_DIR/files/, through a good
update (the daemon's health check commits it), a trial that never passes (ArtifactCommit fails,
ArtifactRollback drops it), a trial the daemon failed before ArtifactCommit (the commit fails),
a committed trial that Mender rolls back (the previous build runs again) and a refused bundle
(ArtifactInstall fails, the car untouched)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from update_kit import bundle, config, keys, trusted_dir

from personaplex_edge.runtime.update.slots import Slots

pytest.importorskip("cryptography")
MODULE = Path(__file__).resolve().parents[1] / "ota" / "mender" / "personaplex-build"


def _artifact(tmp: Path, name: str, bundle_file: Path) -> Path:
    """The module's FILES_DIR for one artifact, as the Mender client lays it out."""
    files_dir = tmp / "mender" / name
    (files_dir / "files").mkdir(parents=True)
    (files_dir / "tmp").mkdir()
    (files_dir / "header").mkdir()
    os.link(bundle_file, files_dir / "files" / bundle_file.name)
    return files_dir


def _module(env: dict[str, str], state: str, files_dir: Path | None = None
            ) -> subprocess.CompletedProcess:
    args = [str(MODULE), state] + ([str(files_dir)] if files_dir else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_mender_module_installs_commits_and_rolls_back(tiny_build: Path, tmp_path: Path) -> None:
    key = keys(tmp_path)
    cfg = config(tmp_path, tiny_build, trusted_dir(tmp_path, key))
    runtime = tmp_path / "ppx-runtime"  # the venv's console script, as on the car
    runtime.write_text(f"#!/bin/sh\nexec {sys.executable} -m personaplex_edge.runtime.cli \"$@\"\n")
    runtime.chmod(0o755)
    env = {**os.environ, "PPX_RUNTIME": str(runtime), "PPX_CONFIG": str(cfg),
           "PPX_COMMIT_TIMEOUT": "20"}
    slots = Slots(tmp_path / "slots")

    assert _module(env, "NeedsArtifactReboot").stdout.strip() == "No"
    assert _module(env, "SupportsRollback").stdout.strip() == "Yes"

    # A good update: Download (nothing to do), ArtifactInstall, then the daemon's health check
    # commits the trial while ArtifactCommit waits for it.
    v1 = _artifact(tmp_path, "v1", bundle(tiny_build, key, tmp_path / "v1.ppxb", "1.0"))
    assert _module(env, "Download", v1).returncode == 0
    installed = _module(env, "ArtifactInstall", v1)
    assert installed.returncode == 0, installed.stderr
    assert slots.read().trial == "a"

    def daemon_passes_health_check() -> None:
        time.sleep(1.0)
        slot, trial, _ = slots.start(max_starts=2)
        assert (slot, trial) == ("a", True)
        slots.commit("a")

    thread = threading.Thread(target=daemon_passes_health_check)
    thread.start()
    committed = _module(env, "ArtifactCommit", v1)
    thread.join()
    assert committed.returncode == 0 and "slot a passed its health check" in committed.stdout
    for state in ("ArtifactFailure", "Cleanup"):
        assert _module(env, state, v1).returncode == 0

    # An update whose trial never passes: ArtifactCommit times out, ArtifactRollback drops it.
    env["PPX_COMMIT_TIMEOUT"] = "2"
    v2 = _artifact(tmp_path, "v2", bundle(tiny_build, key, tmp_path / "v2.ppxb", "2.0"))
    assert _module(env, "ArtifactInstall", v2).returncode == 0
    waited = _module(env, "ArtifactCommit", v2)
    assert waited.returncode != 0 and "still on trial" in waited.stderr
    rolled = _module(env, "ArtifactRollback", v2)
    assert rolled.returncode == 0 and "dropped the trial of slot b" in rolled.stdout
    state = slots.read()
    assert (state.good, state.trial, state.info("b")["health"]) == ("a", None, "failed")
    # ...and a second ArtifactRollback (Mender may repeat a state) changes nothing.
    again = _module(env, "ArtifactRollback", v2)
    assert again.returncode == 0 and slots.read().good == "a"

    # The daemon fails the trial before ArtifactCommit looks: no slot is on trial any more and
    # slot a is good, but this artifact's build is not what runs, so the commit fails.
    v21 = _artifact(tmp_path, "v2.1", bundle(tiny_build, key, tmp_path / "v21.ppxb", "2.1"))
    assert _module(env, "ArtifactInstall", v21).returncode == 0
    assert slots.start(max_starts=2)[:2] == ("b", True)
    slots.fail("b", "3 of its first 3 frames missed the 80 ms deadline")
    waited = _module(env, "ArtifactCommit", v21)
    assert waited.returncode != 0, waited.stdout
    assert "slot b (version 2.1) is not the committed build: 3 of its first 3" in waited.stderr
    rolled = _module(env, "ArtifactRollback", v21)
    assert rolled.returncode == 0 and "nothing rolled back; running slot a" in rolled.stdout
    assert slots.read().good == "a"

    # The daemon commits the trial, then Mender rolls the artifact back (another payload of it
    # failed): the build that ran before comes back, and the rolled back one is failed.
    v22 = _artifact(tmp_path, "v2.2", bundle(tiny_build, key, tmp_path / "v22.ppxb", "2.2"))
    assert _module(env, "ArtifactInstall", v22).returncode == 0
    assert slots.start(max_starts=2)[:2] == ("b", True) and slots.commit("b")
    rolled = _module(env, "ArtifactRollback", v22)
    assert rolled.returncode == 0 and "slot b rolled back; running slot a" in rolled.stdout
    state = slots.read()
    assert (state.good, state.trial, state.info("b")["health"]) == ("a", None, "failed")
    assert slots.wanted() == "a"
    again = _module(env, "ArtifactRollback", v22)  # repeated: changes nothing
    assert again.returncode == 0 and slots.read().good == "a"

    # A bundle the car refuses: ArtifactInstall fails in one line, rollback leaves a running.
    stranger = keys(tmp_path, "stranger")
    v3 = _artifact(tmp_path, "v3", bundle(tiny_build, stranger, tmp_path / "v3.ppxb", "3.0"))
    refused = _module(env, "ArtifactInstall", v3)
    assert refused.returncode != 0 and "unknown key" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _module(env, "ArtifactRollback", v3).returncode == 0
    assert slots.wanted() == "a" and slots.read().good == "a"
