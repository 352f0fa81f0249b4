"""The slots survive interruption: an install killed (SIGKILL) at every step leaves the good slot
as it was and the next start on it, and the next install starts clean; a trial slot that never
proves itself is dropped by the boot counter; rollback and activation rules."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from update_kit import bundle, config, keys, trusted_dir, update

from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.update.install import KILL_ENV, STEPS, Member
from personaplex_edge.runtime.update.slots import Slots

pytest.importorskip("cryptography")


@pytest.fixture
def car(tiny_build: Path, tmp_path: Path) -> dict:
    key = keys(tmp_path)
    cfg = config(tmp_path, tiny_build, trusted_dir(tmp_path, key))
    v1 = bundle(tiny_build, key, tmp_path / "v1.ppxb", "1.0")
    v2 = bundle(tiny_build, key, tmp_path / "v2.ppxb", "2.0")
    return {"cfg": cfg, "slots": Slots(tmp_path / "slots"), "v1": v1, "v2": v2}


def _commit_v1(car: dict) -> None:
    assert update(car["cfg"], "install", "--activate", str(car["v1"])).returncode == 0
    slot, trial, _ = car["slots"].start(max_starts=2)
    assert (slot, trial) == ("a", True)
    assert car["slots"].commit("a")


def test_install_killed_at_every_step_leaves_the_last_good_build(car: dict) -> None:
    _commit_v1(car)
    slots: Slots = car["slots"]
    for step in STEPS:
        killed = update(car["cfg"], "install", "--activate", str(car["v2"]),
                        env={**os.environ, KILL_ENV: step})
        assert killed.returncode == -9, (step, killed.stdout, killed.stderr)
        state = slots.read()
        assert state.good == "a" and state.info("a")["version"] == "1.0", step
        load_manifest(slots.path("a")).verify_files()  # every byte of the good build
        slot, trial, _ = slots.start(max_starts=2)  # what the daemon's next start runs
        if step == "activated":  # the switch itself had happened: b is on trial, and complete
            assert (slot, trial) == ("b", True)
            load_manifest(slots.path("b")).verify_files()
            assert "dropped the trial of slot b" in update(car["cfg"], "rollback").stdout
        else:
            assert (slot, trial) == ("a", False), step
        # The next install starts clean and succeeds.
        again = update(car["cfg"], "install", str(car["v2"]))
        assert again.returncode == 0, (step, again.stderr)
        assert not list(slots.dir.glob(".*.partial-*")), step
        load_manifest(slots.path("b")).verify_files()
        assert slots.read().good == "a"


def test_a_trial_that_never_proves_itself_is_dropped_by_the_boot_counter(car: dict) -> None:
    _commit_v1(car)
    slots: Slots = car["slots"]
    assert update(car["cfg"], "install", "--activate", str(car["v2"])).returncode == 0
    assert slots.start(max_starts=2)[:2] == ("b", True)  # crashed during its health check...
    assert slots.start(max_starts=2)[:2] == ("b", True)  # ...twice
    slot, trial, dropped = slots.start(max_starts=2)
    assert (slot, trial) == ("a", False)
    assert "slot b did not prove healthy in 2 start(s)" in dropped
    status = update(car["cfg"], "status").stdout
    assert "slot b: version 2.0 (target any), failed: slot b did not prove healthy" in status
    assert "* slot a" in status
    with pytest.raises(PpxError, match="failed its health check"):
        slots.activate("b")  # never again without a reinstall
    assert update(car["cfg"], "install", "--activate", str(car["v2"])).returncode == 0
    assert slots.read().trial == "b"


def test_wait_after_the_daemon_already_failed_the_trial(car: dict) -> None:
    """`update wait` started after the verdict judges the last activation: a dropped trial is
    no success because the old good slot is still good."""
    _commit_v1(car)
    slots: Slots = car["slots"]
    assert update(car["cfg"], "install", "--activate", str(car["v2"])).returncode == 0
    slots.start(max_starts=2)
    slots.fail("b", "a frame failed")
    waited = update(car["cfg"], "wait", "--timeout", "1")
    assert waited.returncode != 0, waited.stdout
    assert "slot b (version 2.0), the last activated, is not the committed build: a frame " \
           "failed" in waited.stderr
    assert update(car["cfg"], "install", "--activate", str(car["v2"])).returncode == 0
    slots.start(max_starts=2)
    assert slots.commit("b")
    waited = update(car["cfg"], "wait", "--timeout", "1")
    assert waited.returncode == 0 and "slot b passed its health check" in waited.stdout


def test_rollback_and_activate_rules(car: dict) -> None:
    slots: Slots = car["slots"]
    assert "nothing to roll back to" in update(car["cfg"], "rollback").stderr
    assert "no installed slot" in update(car["cfg"], "activate").stderr
    _commit_v1(car)
    assert update(car["cfg"], "install", "--activate", str(car["v2"])).returncode == 0
    assert "already on trial" in update(car["cfg"], "activate").stderr
    assert "is on trial" in update(car["cfg"], "install", str(car["v2"])).stderr
    slots.start(max_starts=2)
    assert slots.commit("b")
    # b is good now; rollback makes a (still good, still there) the good slot again
    proc = update(car["cfg"], "rollback")
    assert proc.returncode == 0 and "slot a is good again" in proc.stdout
    assert slots.wanted() == "a"
    assert not slots.commit("b")  # a late commit of a slot no longer on trial changes nothing
    # The newest build ever committed (2.0) stays the downgrade floor after the rollback to 1.0,
    proc = update(car["cfg"], "install", str(car["v1"]))
    assert proc.returncode == 2 and "older than 2.0, the newest build committed" in proc.stderr
    # and `activate` without a slot never picks the build committed before (b, 2.0, here).
    assert "no installed slot to activate" in update(car["cfg"], "activate").stderr
    assert slots.read().trial is None


def test_disk_full_during_install_leaves_nothing_half_written(
        car: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from personaplex_edge.runtime.update import install as install_module

    _commit_v1(car)
    real_copy = install_module._copy_hashed
    calls = []

    def full_after_two(member: Member, out: int, expected: str, where: str, size: int) -> int:
        calls.append(member.name)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(member, out, expected, where, size)

    monkeypatch.setattr(install_module, "_copy_hashed", full_after_two)
    slots: Slots = car["slots"]
    keys_dir = car["cfg"].parent / "trusted"
    with pytest.raises(PpxError, match="disk full while installing slot b; the active build is "
                                       "untouched"):
        install_module.install(car["v2"], slots, keys_dir, None, "0.1.0", activate=True)
    assert not list(slots.dir.glob(".*.partial-*")) and not slots.path("b").exists()
    state = slots.read()
    assert (state.good, state.trial, state.info("b")) == ("a", None, None)
    load_manifest(slots.path("a")).verify_files()


def test_check_verifies_the_slot_the_daemon_runs(car: dict, tiny_build: Path) -> None:
    from personaplex_edge.runtime.service.check import running_build
    from personaplex_edge.runtime.service.config import load_config

    cfg = load_config(car["cfg"])
    assert running_build(cfg) == (cfg.build, [])  # no update yet: build.path
    _commit_v1(car)
    build, problems = running_build(cfg)
    assert build.path == car["slots"].path("a") and build.backend == cfg.build.backend
    assert not problems


# -- root writes into folders the daemon's user owns: no link there is followed -------------

def _victim(tmp: Path) -> Path:
    victim = tmp / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    return victim


def _untouched(victim: Path) -> None:
    assert victim.read_text() == "root's secret\n"
    assert victim.stat().st_mode & 0o777 == 0o600


def test_planted_lock_links_are_refused(car: dict, tmp_path: Path) -> None:
    from personaplex_edge.runtime.update import install as install_module

    victim = _victim(tmp_path)
    slots: Slots = car["slots"]
    slots.dir.mkdir(parents=True)
    (slots.dir / ".install.lock").symlink_to(victim)
    with pytest.raises(PpxError, match="cannot use the slots directory"):
        install_module.install(car["v1"], slots, car["cfg"].parent / "trusted", None, "0.1.0")
    _untouched(victim)
    (slots.dir / ".install.lock").unlink()
    (slots.dir / ".lock").symlink_to(victim)
    with pytest.raises(PpxError, match="cannot use the slots directory"):
        slots.activate("a")
    _untouched(victim)
    # The slots directory itself swapped for a link to a folder of root's: nothing made there.
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    linked = Slots(tmp_path / "linked-slots")
    linked.dir.symlink_to(elsewhere)
    with pytest.raises(PpxError, match="cannot use the slots directory"):
        install_module.install(car["v1"], linked, car["cfg"].parent / "trusted", None, "0.1.0")
    with pytest.raises(PpxError, match="cannot use the slots directory"):
        linked.activate("a")
    assert list(elsewhere.iterdir()) == []


def test_planted_state_and_stamp_links_are_replaced_not_followed(car: dict, tmp_path: Path) -> None:
    from personaplex_edge.runtime.core.integrity import record_verified, stamp_path

    victim = _victim(tmp_path)
    slots: Slots = car["slots"]
    _commit_v1(car)
    # The old predictable temporary name, and the state file itself, as links to root's file.
    (slots.dir / f".state.json.tmp-{os.getpid()}").symlink_to(victim)
    state = slots.state_path
    state.rename(tmp_path / "state.json")
    state.symlink_to(tmp_path / "state.json")
    (tmp_path / "state.json").chmod(0o600)
    assert "slot a" in slots.rollback()  # writes the state
    assert not state.is_symlink() and state.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600  # the link's target: as it was
    _untouched(victim)
    manifest = load_manifest(slots.path("a"))
    stamp = stamp_path(manifest, tmp_path / "snapshots")
    stamp.parent.mkdir(exist_ok=True)
    stamp.unlink(missing_ok=True)  # the install's own stamp
    stamp.symlink_to(victim)
    record_verified(manifest, stamp.parent)
    assert not stamp.is_symlink() and stamp.stat().st_mode & 0o777 == 0o644
    _untouched(victim)


def test_partial_folder_swapped_for_a_link_during_the_install(car: dict, tmp_path: Path) -> None:
    """The daemon's user owns the slots directory: it may rename the folder being written and
    put a link to a folder of root's there. Root keeps writing into the folder it made, and
    the link never becomes the slot."""
    from personaplex_edge.runtime.update import install as install_module

    slots: Slots = car["slots"]
    _commit_v1(car)
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    # A leftover link in the partial name of an earlier install: removed, never followed.
    (slots.dir / f".b.partial-{os.getpid()}").symlink_to(secret)
    swapped = []

    def swap(_name: str) -> None:
        if not swapped:
            (partial,) = [p for p in slots.dir.glob(".b.partial-*") if not p.is_symlink()]
            partial.rename(tmp_path / "moved")
            partial.symlink_to(secret)
            swapped.append(partial)

    with pytest.raises(PpxError, match="replaced while it was written"):
        install_module.install(car["v2"], slots, car["cfg"].parent / "trusted", None, "0.1.0",
                               progress=swap)
    assert swapped and list(secret.iterdir()) == [] and secret.stat().st_mode & 0o777 == 0o700
    assert not slots.path("b").exists() and slots.read().good == "a"
    assert not [p for p in slots.dir.iterdir() if ".partial-" in p.name]


def test_the_whole_slot_is_fsynced_before_its_rename(car: dict, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    from personaplex_edge.runtime.update import install as install_module

    slots: Slots = car["slots"]
    _commit_v1(car)
    synced: list[str] = []
    at_rename: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:  # noqa: ANN001 - os.replace's own signature
        if str(src).startswith(".b.partial-"):
            at_rename.extend(synced)
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    install_module.install(car["v2"], slots, car["cfg"].parent / "trusted", None, "0.1.0")
    assert at_rename, "the slot was not renamed into place"
    root = slots.path("b")
    written = {Path(re.sub(r"/\.b\.partial-[0-9a-f]+", "/b", p)) for p in at_rename}
    for path in [root, *root.rglob("*")]:
        assert path in written, f"{path} was not fsynced before the rename"
