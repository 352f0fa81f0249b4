"""Which build the daemon serves, and starting again on another: `ppx-runtime serve`.

The update slots (runtime/update/) name the build to run, or none (build.path). A slot on trial
that does not load, or fails its health gate while it serves (Daemon's HealthGate), falls back to
the last good build in the same process; a committed slot that no longer loads is marked failed
and the one before it runs. build.path is the last resort: a problem there is exit 78 as always.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from typing import Any

from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.service.config import DaemonConfig
from personaplex_edge.runtime.service.daemon import BuildLoadError, Daemon
from personaplex_edge.runtime.service.notify import Notifier
from personaplex_edge.runtime.update.slots import Slots

log = logging.getLogger("personaplex.daemon")


def serve(cfg: DaemonConfig) -> int:
    """Run the build the update slots name (or build.path), and start again on another one when
    a slot is activated, rolled back, or fails its health check: the process stays, so the
    switch costs one build load, not a process start."""
    slots = Slots(cfg.update.slots_dir)
    notifier = Notifier.from_env()
    terminated = threading.Event()  # SIGTERM ends the process, whichever build is loading
    current: list[Daemon] = []

    def handle(_signum: int, _frame: Any) -> None:
        # Only set flags: logging from a signal handler can deadlock on the log queue.
        terminated.set()
        for running in current:
            running.stop_event.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    daemon: Daemon | None = None
    while not terminated.is_set():
        # The old build's memory goes before the new one loads: a Jetson has room for one 7B.
        current.clear()
        daemon = None
        gc.collect()
        slot, trial = _choose_slot(slots, cfg)
        try:  # loading the build: what decides a trial, or makes a committed slot fall back
            daemon = Daemon(cfg, notifier, build=slots.path(slot) if slot else None, slot=slot,
                            trial=trial, slots=slots)
            current.append(daemon)
            if terminated.is_set():  # SIGTERM while the build loaded
                daemon.stop_event.set()
            warm = daemon.prepare()
            lost = _personas_lost(daemon, slots, cfg) if trial else []
            if lost:  # e.g. a voice the new build lacks: the car would lose a persona
                raise BuildLoadError(f"persona(s) the last good build serves, skipped: "
                                     f"{'; '.join(lost)}")
        except PpxError as exc:
            if slot is None:
                raise  # build.path: the last resort, exit 78 as always
            if trial:  # a trial that does not load or compile: back to the good build
                log.error("slot %s failed its health check: %s; falling back to the last good "
                          "build", slot, exc)
                slots.fail(slot, f"did not start: {exc}")
                continue
            if not isinstance(exc, BuildLoadError):
                raise  # a config problem (a bad default persona): another build would not help
            fallback = slots.broken(slot, f"did not load: {exc}")
            log.error("slot %s (committed) did not load: %s; marked failed, running %s", slot, exc,
                      fallback)
            continue
        if warm is None:  # SIGTERM during start-up: nothing was opened
            log.info("stopped during start-up")
            return 0
        code = daemon.run(warm)
        if (terminated.is_set() and daemon.gate is not None and daemon.gate.started_at is not None
                and slot is not None):
            slots.stopped_cleanly(slot)  # a trial that served, switched off before its verdict
        if terminated.is_set() or daemon.switch_reason is None:
            return code
    return 0


def _personas_lost(daemon: Daemon, slots: Slots, cfg: DaemonConfig) -> list[str]:
    """The personas a trial build skipped whose voice the last good build has: lost by the
    update. A persona file that is broken on any build is the config's problem, not the trial's."""
    if not daemon.prepare_skipped:
        return []
    try:
        good = slots.read().good
        voices = load_manifest(slots.path(good) if good else cfg.build.path).data.get("voices", {})
    except PpxError:
        return []  # the good build cannot say: do not blame the trial for it
    return [f"{persona.name}: {why}" for persona, why in daemon.prepare_skipped
            if not persona.voice_is_file and persona.voice in voices]


def _choose_slot(slots: Slots, cfg: DaemonConfig) -> tuple[str | None, bool]:
    """(slot to run, whether it is on trial); (None, False) runs build.path."""
    if not slots.state_path.exists():  # no update ever installed: build.path, as always
        return None, False
    try:
        slot, trial, dropped = slots.start(cfg.update.max_starts)
    except PpxError as exc:
        log.error("%s: running build.path", exc)
        return None, False
    if dropped:
        log.error("%s", dropped)
    return slot, trial
