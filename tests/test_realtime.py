"""Real-time audio threads (issue 16): CabinAudio's capture and playback threads take SCHED_FIFO at
audio.rt_priority, read back what the kernel applied and say so in stats()["realtime"].

Nothing here mocks the OS. The refused case runs CabinAudio in a child process whose
RLIMIT_RTPRIO is 0 and which lacks CAP_SYS_NICE (dropped from the bounding set before exec, so
even root loses it), on alsa-lib's virtual devices (personaplex_edge.sim.devices). The granted
cases read each audio thread's policy back from the kernel by its thread id; they skip where
this machine cannot grant real time at all (no CAP_SYS_NICE, no rtprio limit to raise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.runtime.audio.cabin import CabinAudio
from personaplex_edge.runtime.audio.realtime import enter_realtime, probe_realtime
from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.sim.devices import VirtualCabin

UNIT = Path(__file__).parents[1] / "systemd" / "personaplex-edge.service"
DEFAULT_PRIO = AudioSettings().rt_priority
_PR_CAPBSET_DROP = 24  # linux/prctl.h
_CAP_SYS_NICE = 23
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # loaded before any fork


def unit_rtprio() -> int:
    """LimitRTPRIO= of the shipped unit: the grant the daemon gets on the device."""
    match = re.search(r"^LimitRTPRIO=(\d+)$", UNIT.read_text(), re.M)
    assert match, f"{UNIT}: no LimitRTPRIO="
    return int(match.group(1))


# Prepended to a child's code: it must not have CAP_SYS_NICE (which overrides the limit).
_NO_CAP_SYS_NICE = f"""
import sys as _sys
_caps = next(l for l in open("/proc/self/status") if l.startswith("CapEff:"))
if int(_caps.split()[1], 16) >> {_CAP_SYS_NICE} & 1:
    print("CAP_SYS_NICE kept")
    _sys.exit(0)
"""


def run_limited(rtprio: int, code: str, *args: str, env: dict | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -c code args` with RLIMIT_RTPRIO `rtprio` and no CAP_SYS_NICE, as the daemon runs
    under the unit (User=personaplex, no capabilities). Skips where the limit cannot be set
    (raising it needs CAP_SYS_RESOURCE) or CAP_SYS_NICE cannot be dropped."""
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))
        # Root's capabilities after exec come from the bounding set; without CAP_SETPCAP (not
        # root) this fails, and such a process has no CAP_SYS_NICE to drop anyway.
        _LIBC.prctl(_PR_CAPBSET_DROP, _CAP_SYS_NICE, 0, 0, 0)

    try:
        proc = subprocess.run([sys.executable, "-c", _NO_CAP_SYS_NICE + code, *args],
                              capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        raise
    except subprocess.SubprocessError as exc:  # "Exception occurred in preexec_fn."
        pytest.skip(f"cannot set RLIMIT_RTPRIO {rtprio} for a child here: {exc}")
    if proc.stdout.startswith("CAP_SYS_NICE kept"):
        pytest.skip("cannot drop CAP_SYS_NICE for a child here")
    return proc


# The child: CabinAudio on the virtual devices until both threads run and audio flows; then the
# status, and each audio thread's policy as the kernel reports it by thread id.
CHILD = r"""
import json, os, sys, threading, time
from personaplex_edge.runtime.audio.cabin import CabinAudio
from personaplex_edge.runtime.audio.settings import AudioSettings

audio = CabinAudio(AudioSettings(
    capture_device="ppx_mic", playback_device="ppx_spk", channels=2, clockless=True,
    preroll_ms=100.0, echo_cancel="off", rt_priority=int(sys.argv[1])))
audio.start()
end = time.monotonic() + 10
while time.monotonic() < end:
    st = audio.stats()
    if st["frames_captured"] >= 3 and st["playback_open"]:
        break
    time.sleep(0.05)
threads = {t.name: t.native_id for t in threading.enumerate() if t.name.startswith("ppx-")}
policy = {name: [os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority]
          for name, tid in {**threads, "main": threading.get_native_id()}.items()}
assert audio.stop()
print(json.dumps({"stats": st, "policy": policy}))
"""


@pytest.fixture
def cabin(tmp_path: Path) -> VirtualCabin:
    pytest.importorskip("alsaaudio")  # here, not for the module: test_check imports run_limited
    return VirtualCabin.create(tmp_path / "cabin", mic_audio=np.zeros((48000 * 3, 2), np.float32))


def _run_cabin(cabin: VirtualCabin, rtprio: int, prio: int) -> dict:
    proc = run_limited(rtprio, CHILD, str(prio), env=cabin.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_without_rtprio_the_threads_run_on_and_say_why(cabin: VirtualCabin) -> None:
    """The unit without LimitRTPRIO (or a shell without an rtprio limit): normal scheduling,
    audio still flows, and the status names the missing limit for each thread."""
    out = _run_cabin(cabin, 0, DEFAULT_PRIO)
    st, rt = out["stats"], out["stats"]["realtime"]
    assert (rt["capture"], rt["playback"]) == (False, False)
    print(f"\nwhy_not: {rt['why_not']}")
    for direction in ("capture", "playback"):
        assert (f"{direction}: SCHED_OTHER: SCHED_FIFO {DEFAULT_PRIO} refused (Operation not "
                "permitted): RLIMIT_RTPRIO is 0 and no CAP_SYS_NICE (LimitRTPRIO= in the unit") \
            in rt["why_not"]
    assert "\n" not in rt["why_not"]
    assert st["frames_captured"] >= 3 and not st["degraded"]  # no RT is not a device problem
    assert out["policy"]["ppx-capture"] == [os.SCHED_OTHER, 0]
    assert out["policy"]["ppx-playback"] == [os.SCHED_OTHER, 0]


def test_under_the_units_rtprio_limit_the_threads_run_sched_fifo(cabin: VirtualCabin) -> None:
    """What the unit grants (LimitRTPRIO=, no capability) is enough for the default priority;
    only the two audio threads run real-time, not the rest of the process."""
    out = _run_cabin(cabin, unit_rtprio(), DEFAULT_PRIO)
    assert out["stats"]["realtime"] == {"capture": True, "playback": True, "why_not": ""}
    assert out["policy"]["ppx-capture"] == [os.SCHED_FIFO, DEFAULT_PRIO]
    assert out["policy"]["ppx-playback"] == [os.SCHED_FIFO, DEFAULT_PRIO]
    assert out["policy"]["main"] == [os.SCHED_OTHER, 0]


def test_threads_run_sched_fifo_where_this_process_may(cabin: VirtualCabin, monkeypatch) -> None:
    """In this process (root, CAP_SYS_NICE or an rtprio limit): the kernel's view of each thread,
    read by its thread id, matches what stats() says; the calling thread keeps its policy."""
    why = probe_realtime(DEFAULT_PRIO)
    if why is not None:
        pytest.skip(f"no real time for this process: {why}")
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
    audio = CabinAudio(AudioSettings(capture_device="ppx_mic", playback_device="ppx_spk",
                                     channels=2, clockless=True, preroll_ms=100.0,
                                     echo_cancel="off"))
    audio.start()
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not all(
                audio.stats()["realtime"][d] for d in ("capture", "playback")):
            time.sleep(0.02)
        tids = {t.name: t.native_id for t in threading.enumerate() if t.name.startswith("ppx-")}
        kernel = {name: (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
                  for name, tid in tids.items()}
        st = audio.stats()
    finally:
        assert audio.stop()
    assert st["realtime"] == {"capture": True, "playback": True, "why_not": ""}
    assert kernel["ppx-capture"] == kernel["ppx-playback"] == (os.SCHED_FIFO, DEFAULT_PRIO)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_priority_zero_keeps_normal_scheduling_and_says_so(cabin: VirtualCabin,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
    audio = CabinAudio(AudioSettings(capture_device="ppx_mic", playback_device="ppx_spk",
                                     channels=2, clockless=True, echo_cancel="off",
                                     rt_priority=0))
    assert audio.stats()["realtime"] == {"capture": False, "playback": False, "why_not": ""}
    audio.start()
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not all(
                f"{d}:" in audio.stats()["realtime"]["why_not"] for d in ("capture", "playback")):
            time.sleep(0.02)
        st = audio.stats()
    finally:
        assert audio.stop()
    assert st["realtime"] == {
        "capture": False, "playback": False,
        "why_not": "capture: SCHED_OTHER: audio.rt_priority is 0 (normal scheduling); "
                   "playback: SCHED_OTHER: audio.rt_priority is 0 (normal scheduling)"}


def test_probe_leaves_the_calling_thread_alone() -> None:
    """check's probe runs in its own thread: whatever the answer, this one keeps SCHED_OTHER."""
    probe_realtime(DEFAULT_PRIO)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert enter_realtime(0) == "audio.rt_priority is 0 (normal scheduling)"


def test_default_priority_is_between_normal_threads_and_irq_threads() -> None:
    """Above SCHED_OTHER, below the kernel's threaded IRQ handlers (50), and within the unit's
    LimitRTPRIO (else the unit would refuse the default)."""
    assert 0 < DEFAULT_PRIO < 50 and DEFAULT_PRIO <= unit_rtprio()
