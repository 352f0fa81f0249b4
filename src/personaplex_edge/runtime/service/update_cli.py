"""`ppx-runtime update install|status|activate|rollback|wait`: the device side of an update.

The running daemon follows the slots' state file by itself (service/daemon.py): after
`activate` or `rollback` it switches builds within a second; nobody restarts it.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import metadata
from pathlib import Path

from personaplex_edge.runtime.core.durable import write_atomic
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.service.config import DEFAULT_CONFIG_PATH, load_config
from personaplex_edge.runtime.update.install import install
from personaplex_edge.runtime.update.slots import SLOTS, Slots

FALLBACK_RUNTIME_VERSION = "0.1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    sub = parser.add_subparsers(dest="update_command", required=True, metavar="ACTION")
    inst = sub.add_parser("install", help="check a signed bundle and unpack it into the inactive slot")
    inst.add_argument("bundle", type=Path, help="bundle file from `ppx-export bundle`, or an unpacked one")
    inst.add_argument("--allow-downgrade", action="store_true",
                      help="install a version older than the active build's")
    inst.add_argument("--activate", action="store_true", help="activate it once installed")
    inst.add_argument("--record", type=Path, metavar="FILE",
                      help="with --activate: write which slot and build were activated to FILE, "
                           "for `wait --record` and `rollback --record` (an OTA client's steps)")
    status = sub.add_parser("status", help="both slots: version, health, which one runs")
    status.add_argument("--json", action="store_true", help="the state as JSON")
    activate = sub.add_parser("activate", help="put the installed slot on trial (the daemon switches)")
    activate.add_argument("slot", nargs="?", choices=SLOTS)
    rollback = sub.add_parser("rollback", help="back to the last good build")
    rollback.add_argument("--if-trial", action="store_true",
                          help="only drop a slot still on trial; otherwise change nothing")
    rollback.add_argument("--record", type=Path, metavar="FILE",
                          help="undo the activation FILE (from `install --record`) names: drop its "
                               "trial, or, if it was committed, restore the build that ran before")
    wait = sub.add_parser("wait", help="wait for the trial slot's health check: exit 0 committed, "
                                       "1 failed or timed out")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    wait.add_argument("--record", type=Path, metavar="FILE",
                      help="exit 0 only if the activation FILE (from `install --record`) names is "
                           "the committed build")


def _tensorrt_version() -> str | None:
    from personaplex_edge.runtime.backends.tensorrt.device import installed_tensorrt_version

    return installed_tensorrt_version()


def runtime_version() -> str:
    try:
        return metadata.version("personaplex-edge")
    except metadata.PackageNotFoundError:
        return FALLBACK_RUNTIME_VERSION


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    cfg = config.update
    slots = Slots(cfg.slots_dir)
    action = args.update_command
    if action == "install":
        if args.record is not None and not args.activate:
            raise PpxError("--record: only with --activate (it records the activation)")
        done = install(args.bundle, slots, cfg.trusted_keys, cfg.target, runtime_version(),
                       allow_downgrade=args.allow_downgrade, activate=args.activate,
                       stamp_dir=config.snapshots.dir, device_tensorrt=_tensorrt_version)
        print(f"installed version {done.header.version} into slot {done.slot} ({done.files} files, "
              f"{done.bytes / 1e9:.2f} GB)" + ("; activated: the daemon switches to it now"
                                               if done.activated else
                                               "; `ppx-runtime update activate` to run it"))
        if args.record is not None:
            write_atomic(args.record, json.dumps({
                "slot": done.slot, "version": done.header.version,
                "manifest_sha256": done.header.manifest_sha256}).encode())
    elif action == "status":
        state = slots.read()
        if args.json:
            data = json.loads(state.to_json())
            data["selected"] = slots.wanted(state)  # what the daemon is told to run
            print(json.dumps(data, indent=1))
            return 0
        print(_describe(slots))
    elif action == "activate":
        slot = slots.activate(args.slot)
        print(f"slot {slot} activated: the daemon switches to it and commits it after its health "
              "check (`ppx-runtime update wait`)")
    elif action == "rollback":
        if args.record is not None:
            record = _read_record(args.record)
            if record is None:  # the install never activated anything: nothing to undo
                print(f"{args.record}: no activation recorded: nothing rolled back")
            else:
                print(slots.undo(record["slot"], record["manifest_sha256"],
                                 "rolled back by the OTA client"))
        else:
            print(slots.rollback(only_trial=args.if_trial))
    elif action == "wait":
        if args.record is not None:
            record = _read_record(args.record)
            if record is None:
                raise PpxError(f"{args.record}: no activation recorded (did the install fail?)")
            return _wait_for(slots, record, args.timeout)
        return _wait(slots, args.timeout)
    return 0


def _describe(slots: Slots) -> str:
    """Each slot's part (lifecycle and verdict in words), and which build the daemon is told to
    run: it follows the state file within a second; `ppx-runtime ctl status` or the metrics
    (ppx_build_info) say what it runs this moment."""
    state = slots.read()
    selected = slots.wanted(state)
    lines = []
    for slot in SLOTS:
        info = state.info(slot)
        mark = "*" if slot == selected else " "
        if not info:
            lines.append(f"{mark} slot {slot}: empty")
            continue
        text = f"{mark} slot {slot}: version {info['version']} (target {info['target']}), "
        if slot == state.good:
            text += "committed: the good build"
        elif slot == state.trial:
            text += f"on trial (start {state.starts}): committed after its health check"
        elif info.get("health") == "good":
            text += "committed before: what `update rollback` makes good again"
        elif info.get("health") == "failed":
            text += f"failed: {info.get('failure') or 'no reason recorded'}"
        else:
            text += "installed, not activated: `update activate` tries it"
        lines.append(text)
    lines.append(f"selected: {'slot ' + selected if selected else 'build.path'} (the daemon "
                 "switches to it within a second)")
    return "\n".join(lines)


def _wait(slots: Slots, timeout: float) -> int:
    state = slots.read()
    slot = state.trial
    if slot is None:
        # The daemon may have decided before we looked: judge the last activation, not
        # whether some slot is good (a dropped trial leaves the old good slot good).
        activated = [s for s in SLOTS if (state.info(s) or {}).get("activation_ns")]
        last = max(activated, key=lambda s: state.info(s)["activation_ns"], default=None)
        if last is None:
            print(f"no slot on trial; good: {state.good or 'build.path'}")
            return 0 if state.good else 1
        info = state.info(last)
        if state.good == last:
            print(f"slot {last} passed its health check: committed")
            return 0
        raise PpxError(f"slot {last} (version {info.get('version')}), the last activated, is not "
                       f"the committed build: {info.get('failure') or 'rolled back'}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slots.read()
        if state.trial != slot:
            info = state.info(slot) or {}
            if state.good == slot:
                print(f"slot {slot} passed its health check: committed")
                return 0
            raise PpxError(f"slot {slot} failed its health check: "
                           f"{info.get('failure', 'dropped')}")
        time.sleep(0.5)
    raise PpxError(f"slot {slot} is still on trial after {timeout:g} s (is the daemon running?)")


def _read_record(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and all(isinstance(data.get(k), str)
                                              for k in ("slot", "version", "manifest_sha256"))
        assert data["slot"] in SLOTS
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AssertionError):
        raise PpxError(f"{path}: not an activation record (from `update install --record`)"
                       ) from None
    return data


def _wait_for(slots: Slots, record: dict[str, str], timeout: float) -> int:
    """Exit 0 only when the recorded activation is the committed, good build: a trial the
    daemon dropped, a rollback or a reinstall meanwhile all fail it."""
    slot, what = record["slot"], f"slot {record['slot']} (version {record['version']})"
    deadline = time.monotonic() + timeout
    while True:
        state = slots.read()
        info = state.info(slot) or {}
        if info.get("manifest_sha256") != record["manifest_sha256"]:
            raise PpxError(f"{what}: replaced by another install meanwhile")
        if state.trial != slot:
            if state.good == slot:
                print(f"slot {slot} passed its health check: committed")
                return 0
            raise PpxError(f"{what} is not the committed build: "
                           f"{info.get('failure') or 'rolled back'}")
        if time.monotonic() >= deadline:
            raise PpxError(f"slot {slot} is still on trial after {timeout:g} s (is the daemon "
                           "running?)")
        time.sleep(0.5)
