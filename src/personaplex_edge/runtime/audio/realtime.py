"""Real-time scheduling for the audio threads: enter SCHED_FIFO, read back what the kernel
applied, and say in one line why not where it refused (the limit, the capability, the unit).

`enter_realtime` runs on the thread that wants it (CabinAudio's capture and playback threads);
`probe_realtime` tries it on a short-lived thread, so `check` can answer without changing its own
scheduling.
"""

from __future__ import annotations

import os
import resource
import threading

_CAP_SYS_NICE = 23  # linux/capability.h: lifts RLIMIT_RTPRIO
_POLICIES = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO",
                                        "SCHED_RR") if hasattr(os, n)}


def enter_realtime(prio: int) -> str | None:
    """Move the calling thread (only it) to SCHED_FIFO at `prio`. None when the kernel, read
    back, says it now runs so; else why not, one line."""
    if prio <= 0:
        return "audio.rt_priority is 0 (normal scheduling)"
    if not hasattr(os, "sched_setscheduler"):
        return "this platform has no sched_setscheduler"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))  # 0: this thread
    except OSError as exc:
        return f"SCHED_FIFO {prio} refused ({exc.strerror}): {_rt_grant(prio)}"
    # Read back: what counts is what the kernel applied, not that the call returned.
    policy, got = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    if (policy, got) != (os.SCHED_FIFO, prio):
        return f"asked SCHED_FIFO {prio}, runs {policy_name(policy)} {got}"
    return None


def probe_realtime(prio: int) -> str | None:
    """enter_realtime(prio) tried in a short-lived thread: can this process's audio threads
    run real-time (None), or why not. The calling thread keeps its scheduling."""
    result: list[str | None] = []
    probe = threading.Thread(target=lambda: result.append(enter_realtime(prio)),
                             name="ppx-rt-probe", daemon=True)
    probe.start()
    probe.join()
    return result[0] if result else "the probe thread failed"


def policy_name(policy: int) -> str:
    return _POLICIES.get(policy, f"policy {policy}")


def _rt_grant(prio: int) -> str:
    """Why the kernel said no: the rtprio limit, or, where that allows it, the rest."""
    soft = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    if soft == resource.RLIM_INFINITY or soft >= prio:
        granted = f"RLIMIT_RTPRIO {limit}"
    elif _has_cap_sys_nice():
        granted = "CAP_SYS_NICE"
    else:
        return (f"RLIMIT_RTPRIO is {limit} and no CAP_SYS_NICE (LimitRTPRIO= in the unit, "
                "--ulimit rtprio= in Docker, or rtprio in limits.conf)")
    return (f"{granted} allows it, so something else refuses: the cgroup's real-time budget "
            "(cpu.rt_runtime_us), RestrictRealtime=, a seccomp filter or a user namespace")


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> _CAP_SYS_NICE & 1)
