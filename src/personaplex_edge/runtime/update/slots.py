"""Two build slots, `a` and `b`, under the slots directory, and one state file that says which
is good and which is on trial.

    <slots_dir>/a/, b/         installed builds (manifest.json and its files)
    <slots_dir>/state.json     {"good": "a", "trial": "b", "starts": 1, "slots": {...}}
    <slots_dir>/.lock          held (flock) by whoever changes the state

Every change of state is one atomic rename of a fsynced file, so a power cut leaves either the
old state or the new one. Activation writes `trial`; each start of the daemon on a trial slot
counts in `starts` before it runs (a boot counter, as RAUC and Mender use): a trial that crashed,
hung or lost power `max_starts` times is marked failed and the good slot runs again. The daemon
commits a trial (`good` := trial) only after its health gate passed. No state file, or no good
slot and no trial: the daemon runs `build.path`, as it did before slots existed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.core.durable import fsync_dir, open_lock, write_atomic
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.update.bundle_format import version_key

__all__ = ["fsync_dir", "open_lock", "write_atomic"]  # install.py takes them from here too

SLOTS = ("a", "b")
STATE_NAME = "state.json"
LOCK_NAME = ".lock"
STATE_FORMAT = "personaplex-edge/slots"
PARTIAL_MARK = ".partial-"


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass
class SlotState:
    good: str | None = None
    trial: str | None = None
    starts: int = 0  # daemon starts on the trial slot so far
    slots: dict[str, dict[str, Any]] | None = None  # slot -> what is in it and how it fared
    highest: str | None = None  # the newest version ever committed here (downgrade floor)

    def info(self, slot: str) -> dict[str, Any] | None:
        return (self.slots or {}).get(slot)

    def to_json(self) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "good": self.good, "trial": self.trial,
                           "starts": self.starts, "slots": self.slots or {},
                           "highest": self.highest}, indent=1).encode()


class Slots:
    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, slot: str) -> Path:
        return self.dir / slot

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_NAME

    # -- reading ------------------------------------------------------------------------------
    def read(self) -> SlotState:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return SlotState(slots={})
        except OSError as exc:
            raise PpxError(f"{self.state_path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            assert isinstance(data, dict) and data.get("format") == STATE_FORMAT
            state = SlotState(data.get("good"), data.get("trial"), int(data.get("starts", 0)),
                              dict(data.get("slots") or {}), data.get("highest"))
            assert state.good in (None, *SLOTS) and state.trial in (None, *SLOTS)
        except (ValueError, AssertionError, TypeError):
            raise PpxError(f"{self.state_path}: not a slot state file (corrupt?): run `ppx-runtime "
                           "update status`, then reinstall") from None
        return state

    def wanted(self, state: SlotState | None = None) -> str | None:
        """The slot the daemon should run now (None: build.path), without changing anything."""
        state = state or self.read()
        if state.trial and self._usable(state, state.trial):
            return state.trial
        return state.good if state.good and self._usable(state, state.good) else None

    def _usable(self, state: SlotState, slot: str) -> bool:
        info = state.info(slot)
        return bool(info) and info.get("health") != "failed" and self.path(slot).is_dir()

    def fingerprint(self) -> tuple[int, int] | None:
        """Changes whenever the state file is replaced (a cheap poll for the daemon)."""
        try:
            st = self.state_path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    # -- changing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[SlotState]:
        """The state under the lock; what the block leaves in it is written back atomically."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = open_lock(self.dir / LOCK_NAME)
        except OSError as exc:
            raise PpxError(f"{self.dir}: cannot use the slots directory: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.read()
            before = state.to_json()
            yield state
            if state.to_json() != before:
                write_atomic(self.state_path, state.to_json())
        finally:
            os.close(fd)

    def start(self, max_starts: int) -> tuple[str | None, bool, str | None]:
        """For the daemon's start: (slot to run or None for build.path, whether it is on trial,
        why a trial was dropped).

        A trial that already had `max_starts` starts without a commit is marked failed here:
        a crash, a hang or a power cut on it ends in the good slot without a person."""
        dropped = None
        with self.locked() as state:
            if state.trial and self._usable(state, state.trial):
                if state.starts >= max_starts:
                    dropped = (f"slot {state.trial} did not prove healthy in {state.starts} "
                               f"start(s): back to {state.good or 'build.path'}")
                    self._fail(state, state.trial, dropped)
                else:
                    state.starts += 1
                    return state.trial, True, None
            elif state.trial:
                state.trial, state.starts = None, 0
            slot = state.good if state.good and self._usable(state, state.good) else None
            return slot, False, dropped

    def stopped_cleanly(self, slot: str) -> None:
        """The daemon stopped on request (the car was switched off) while `slot` was on trial:
        that start proved nothing either way, so it does not count against max_starts. A
        crash, a watchdog abort or a power cut never gets here and counts."""
        with self.locked() as state:
            if state.trial == slot and state.starts > 0:
                state.starts -= 1

    def commit(self, slot: str) -> bool:
        """The trial `slot` proved healthy: it becomes the good slot. False if it is no longer
        the trial (rolled back meanwhile)."""
        with self.locked() as state:
            if state.trial != slot:
                return False
            state.good, state.trial, state.starts = slot, None, 0
            info = state.slots[slot]
            info.update(health="good", committed_at=now_utc(), failure=None)
            version = info.get("version")
            if isinstance(version, str) and (state.highest is None or
                                             version_key(version) > version_key(state.highest)):
                state.highest = version
            return True

    def fail(self, slot: str, reason: str) -> None:
        with self.locked() as state:
            if state.trial == slot:
                self._fail(state, slot, reason)

    def broken(self, slot: str, reason: str) -> str:
        """The committed `slot` did not load: mark it failed and make the other slot good if
        it was committed before and is still there, else build.path. Returns what runs now."""
        with self.locked() as state:
            if state.good == slot:
                state.slots[slot].update(health="failed", failure=reason, failed_at=now_utc())
                previous = other(slot)
                info = state.info(previous)
                ok = info and info.get("health") == "good" and self.path(previous).is_dir()
                state.good = previous if ok else None
            return _name(state.good)

    @staticmethod
    def _fail(state: SlotState, slot: str, reason: str) -> None:
        state.trial, state.starts = None, 0
        state.slots[slot].update(health="failed", failure=reason, failed_at=now_utc())

    def activate(self, slot: str | None = None) -> str:
        """Put the installed, untried slot on trial (one atomic rename of the state file)."""
        with self.locked() as state:
            if state.trial:
                raise PpxError(f"slot {state.trial} is already on trial: wait for its health check "
                               "(`update status`) or `update rollback`")
            # Without a name only a freshly installed slot: never the older one committed before.
            candidates = [s for s in SLOTS if s != state.good
                          and (state.info(s) or {}).get("health") == "installed"]
            slot = slot or (candidates[0] if candidates else None)
            info = state.info(slot) if slot else None
            if slot is None or info is None:
                raise PpxError("no installed slot to activate: `ppx-runtime update install` first")
            if slot == state.good:
                raise PpxError(f"slot {slot} is already the good slot")
            if info.get("health") == "failed":
                raise PpxError(f"slot {slot} failed its health check ({info.get('failure')}): "
                               "install the build again to retry it")
            state.trial, state.starts = slot, 0
            # What ran before: what an OTA client's rollback restores, even after a commit.
            before = state.info(state.good) if state.good else None
            previous = ({"slot": state.good, "manifest_sha256": before.get("manifest_sha256"),
                         "version": before.get("version")} if before else None)
            # activation_ns orders activations within one second (`update wait` judges the last)
            info.update(health="trial", activated_at=now_utc(), activation_ns=time.time_ns(),
                        previous=previous)
            return slot

    def undo(self, slot: str, manifest_sha256: str, reason: str) -> str:
        """Undo one activation (an OTA client's rollback): drop `slot` if it is still on trial,
        or, if it was committed meanwhile, make the build that ran before it good again. Only
        if `slot` still holds that build (`manifest_sha256`); repeated, it changes nothing."""
        with self.locked() as state:
            info = state.info(slot)
            if not info or info.get("manifest_sha256") != manifest_sha256:
                return (f"slot {slot} no longer holds that build: nothing rolled back; running "
                        f"{_name(state.good)}")
            if state.trial == slot:
                self._fail(state, slot, reason)
                return f"dropped the trial of slot {slot}; running {_name(state.good)}"
            if state.good != slot:
                return f"slot {slot} is not running: nothing rolled back; running {_name(state.good)}"
            previous = info.get("previous")
            if previous:
                back = state.info(previous["slot"])
                if (not back or back.get("manifest_sha256") != previous["manifest_sha256"]
                        or not self.path(previous["slot"]).is_dir()):
                    raise PpxError(f"cannot roll slot {slot} back: slot {previous['slot']} no "
                                   "longer holds the build that ran before it")
                back.update(health="good", failure=None)
            state.good = previous["slot"] if previous else None
            info.update(health="failed", failure=reason, failed_at=now_utc())
            return f"slot {slot} rolled back; running {_name(state.good)}"

    def rollback(self, only_trial: bool = False) -> str:
        """Back to the last good build: drop a trial, or make the other healthy slot good.
        `only_trial`: drop a trial, else change nothing (decided under the lock, so a commit
        that lands meanwhile is not undone)."""
        with self.locked() as state:
            if state.trial:
                dropped = state.trial
                self._fail(state, dropped, "rolled back by `update rollback`")
                return f"dropped the trial of slot {dropped}; running {state.good or 'build.path'}"
            if only_trial:
                return f"no slot on trial: nothing rolled back; running {state.good or 'build.path'}"
            if state.good is None:
                raise PpxError("nothing to roll back to: no slot has been committed")
            previous = other(state.good)
            info = state.info(previous)
            if info and info.get("health") == "good" and self.path(previous).is_dir():
                state.good = previous
                return f"slot {previous} is good again"
            current, state.good = state.good, None
            state.slots[current].update(health="failed", failure="rolled back by `update rollback`")
            return f"slot {current} rolled back; running build.path"

    def forget(self, state: SlotState, slot: str) -> None:
        """Before a slot's files are replaced: the state stops naming it (written at once, so a
        half-deleted slot is never the good or the trial one)."""
        if slot in (state.good, state.trial):
            raise PpxError(f"slot {slot} is in use")
        if state.slots.pop(slot, None) is not None:
            write_atomic(self.state_path, state.to_json())

    def clean_partials(self) -> None:
        """What an interrupted install left behind: the next install starts clean."""
        for path in self.dir.glob(f".*{PARTIAL_MARK}*"):
            remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove a folder (shutil.rmtree never follows links inside it); a link in its place is
    removed itself, not what it points to."""
    import shutil

    if path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def _name(slot: str | None) -> str:
    return f"slot {slot}" if slot else "build.path"


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
