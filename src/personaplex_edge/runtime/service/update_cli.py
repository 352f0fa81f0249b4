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
    status = sub.add_parser("status", help="both slots: version, health, which one runs")
    status.add_argument("--json", action="store_true", help="the state as JSON")
    activate = sub.add_parser("activate", help="put the installed slot on trial (the daemon switches)")
    activate.add_argument("slot", nargs="?", choices=SLOTS)
    rollback = sub.add_parser("rollback", help="back to the last good build")
    rollback.add_argument("--if-trial", action="store_true",
                          help="only drop a slot still on trial; otherwise change nothing "
                               "(what an OTA client's rollback step wants)")
    wait = sub.add_parser("wait", help="wait for the trial slot's health check: exit 0 committed, "
                                       "1 failed or timed out")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")


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
        done = install(args.bundle, slots, cfg.trusted_keys, cfg.target, runtime_version(),
                       allow_downgrade=args.allow_downgrade, activate=args.activate,
                       stamp_dir=config.snapshots.dir, device_tensorrt=_tensorrt_version)
        print(f"installed version {done.header.version} into slot {done.slot} ({done.files} files, "
              f"{done.bytes / 1e9:.2f} GB)" + ("; activated: the daemon switches to it now"
                                               if done.activated else
                                               "; `ppx-runtime update activate` to run it"))
    elif action == "status":
        state = slots.read()
        if args.json:
            data = json.loads(state.to_json())
            data["running"] = slots.wanted(state)
            print(json.dumps(data, indent=1))
            return 0
        print(_describe(slots))
    elif action == "activate":
        slot = slots.activate(args.slot)
        print(f"slot {slot} activated: the daemon switches to it and commits it after its health "
              "check (`ppx-runtime update wait`)")
    elif action == "rollback":
        print(slots.rollback(only_trial=args.if_trial))
    elif action == "wait":
        return _wait(slots, args.timeout)
    return 0


def _describe(slots: Slots) -> str:
    state = slots.read()
    running = slots.wanted(state)
    lines = []
    for slot in SLOTS:
        info = state.info(slot)
        mark = "*" if slot == running else " "
        if not info:
            lines.append(f"{mark} slot {slot}: empty")
            continue
        role = "good" if slot == state.good else "trial" if slot == state.trial else info["health"]
        text = f"{mark} slot {slot}: version {info['version']} (target {info['target']}), {role}"
        if info.get("failure"):
            text += f": {info['failure']}"
        lines.append(text)
    lines.append(f"running: {'slot ' + running if running else 'build.path'}"
                 + (f" (on trial, start {state.starts})" if state.trial else ""))
    return "\n".join(lines)


def _wait(slots: Slots, timeout: float) -> int:
    state = slots.read()
    slot = state.trial
    if slot is None:
        good = state.good
        print(f"no slot on trial; good: {good or 'build.path'}")
        return 0 if good else 1
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
