"""Mic-to-speaker latency of `ppx-runtime serve`, timed with clicks on clocked virtual devices.

    run = measure(work_dir, build, clock_lib, period_ms=20, echo="off", seconds=8.0)
    run.clicks_ms         # one latency per click, from the devices' own clock
    run.estimate          # the daemon's estimate and its parts (ctl status: audio.latency_ms)

The daemon runs with PPX_DEBUG_LATENCY_PROBE=1 (runtime/service/debug_audio.py): its speaker
plays silence, and a click wherever the frame the model heard had one, at the same place in
the frame. The microphone is a file of silence with a click (a 1 ms Hann pulse at -2 dBFS) every
CLICK_EVERY_S; that step is not a multiple of the 80 ms frame, so the clicks fall at different
places in their frames and the figure is shown to be the same for every sample.

The ground truth is the clocked device (sim.devices' ppx_clock with `clock_stamp`): it
records when each stream started on CLOCK_MONOTONIC, and from then on sample k of a stream
passes its virtual converter at start + k / rate, exactly as on a sound card. The mic file's
sample k is stream sample k (alsa-lib's file plugin reads the file as the stream is read), and
the speaker file's sample k is stream sample k (it writes what the stream was given, in order).
So a click at mic sample i that comes back at speaker sample j took

    (playback start + j / rate) - (capture start + i / rate)

with nothing of the daemon's own timing in it. An xrun restarts a stream and breaks that
mapping, so a run with one is reported as invalid (`valid`), not measured.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from personaplex_edge.sim.daemon import (
    NotifyListener,
    ctl_json,
    free_port,
    reap,
    samples,
    scrape,
    start_serve,
)
from personaplex_edge.sim.devices import VirtualCabin

RATE = 48000
FIRST_CLICK_S = 2.0  # mic time of the first click: the speaker has left its pre-roll by then
CLICK_EVERY_S = 1.013  # 13 ms past a multiple of the frame: each click at another frame offset
CLICK = 0.8 * np.hanning(50)[1:-1].astype(np.float32)  # 48 samples, 1 ms, peak at the middle
FOUND = 0.25  # a speaker sample this loud belongs to a click (the probe's is 0.5)


@dataclass
class Run:
    period_ms: float
    echo: str
    buffer_periods: int
    clicks_ms: list[float] = field(default_factory=list)
    missed: int = 0  # mic clicks with no speaker click within a second
    status: dict = field(default_factory=dict)
    exported_s: float | None = None  # ppx_mic_to_speaker_latency_seconds at the end
    starts: dict[str, list[int]] = field(default_factory=dict)
    log: str = ""
    trims_before_clicks: int = 0  # the playback FIFO's trims before the first click

    @property
    def trims_during_clicks(self) -> int:
        return self.status.get("audio", {}).get("latency_trims", 0) - self.trims_before_clicks

    @property
    def estimate(self) -> dict | None:
        return self.status.get("audio", {}).get("latency_ms")

    @property
    def problems(self) -> list[str]:
        """Why the clicks do not measure the path as it runs, if they do not."""
        audio = self.status.get("audio", {})
        why = [f"{k} {audio.get(k)}" for k in ("overruns", "underruns", "dropped_frames")
               if audio.get(k)]
        why += [f"{len(v)} {k} starts" for k, v in self.starts.items() if len(v) != 1]
        if not self.clicks_ms:
            why.append("no click came back")
        return why


def mic_signal(seconds: float) -> tuple[np.ndarray, list[int]]:
    """Silence with a click every CLICK_EVERY_S from FIRST_CLICK_S; the clicks' centres."""
    x = np.zeros(int(seconds * RATE), np.float32)
    centres = []
    t = FIRST_CLICK_S
    while t < seconds - 1.0:
        c = int(round(t * RATE / 2)) * 2  # even: the middle is a 24 kHz sample too
        x[c - len(CLICK) // 2 : c + len(CLICK) // 2] = CLICK
        centres.append(c)
        t += CLICK_EVERY_S
    return x, centres


def speaker_clicks(x: np.ndarray) -> list[int]:
    """Where the probe's clicks are in the speaker stream (the peak of each)."""
    loud = np.flatnonzero(np.abs(x) >= FOUND)
    if not len(loud):
        return []
    groups = np.split(loud, np.flatnonzero(np.diff(loud) > 100) + 1)
    return [int(g[np.argmax(np.abs(x[g]))]) for g in groups]


def _starts(path: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"capture": [], "playback": []}
    if path.exists():
        for line in path.read_text().splitlines():
            kind, ns = line.split()
            out[kind].append(int(ns))
    return out


def measure(work: Path, build: Path, clock_lib: Path, *, period_ms: float, echo: str,
            seconds: float, buffer_periods: int = 4, preroll_ms: float | None = None,
            backend: str = "ort-cpu") -> Run:
    """One daemon, `seconds` of mic time; the clicks' latencies and its own estimate."""
    work.mkdir(parents=True)
    mic, centres = mic_signal(seconds)
    stamps = work / "clock_starts"
    cabin = VirtualCabin.create(work / "alsa", mic_audio=mic, mic_pad_s=30.0, mic_rate=RATE,
                                mic_channels=1, spk_rate=RATE, spk_channels=2,
                                clock_lib=clock_lib, clock_stamp=stamps)
    port = free_port()
    preroll = "" if preroll_ms is None else f", preroll_ms: {preroll_ms}"
    config = work / "runtime.yaml"
    config.write_text(f"""
build: {{path: {build}, backend: {backend}, threads: 1}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: {RATE},
        playback_rate: {RATE}, channels: 1, playback_channels: 2,
        period_frames: {round(RATE * period_ms / 1000)}, buffer_periods: {buffer_periods},
        clockless: false, echo_cancel: {echo}{preroll}}}
persona: {{default: copilot}}
snapshots: {{dir: {work / 'snapshots'}}}
control: {{socket: {work / 'control.sock'}, group: null}}
metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}
""")
    run = Run(period_ms, echo, buffer_periods)
    notify = NotifyListener(work / "notify.sock")
    env = {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path),
           "PPX_DEBUG_LATENCY_PROBE": "1"}
    proc = start_serve(config, env)
    try:
        ready = notify.wait_for("READY=1", timeout=180)  # capture starts just before READY
        # The playback FIFO trims itself to its target in the first second (fifo_target.py):
        # what counts is that it stays put while the clicks come.
        time.sleep(max(0.0, ready + FIRST_CLICK_S - 0.5 - time.monotonic()))
        run.trims_before_clicks = ctl_json(config, "status").get("audio", {}).get("latency_trims", 0)
        time.sleep(max(0.0, ready + seconds - time.monotonic()))
        run.status = ctl_json(config, "status")
        run.exported_s = samples(scrape(port)).get("ppx_mic_to_speaker_latency_seconds")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        run.log = reap(proc, notify)
    if proc.returncode != 0 or "Traceback" in run.log:
        raise RuntimeError(f"serve failed ({proc.returncode}):\n{run.log}")
    run.starts = _starts(stamps)
    if not (run.starts["capture"] and run.starts["playback"]):
        return run
    cap0, play0 = run.starts["capture"][0] / 1e9, run.starts["playback"][0] / 1e9
    heard = [cap0 + i / RATE for i in centres]
    played = [play0 + j / RATE for j in speaker_clicks(cabin.read_speaker()[:, 0])]
    for t in heard:
        back = [p - t for p in played if 0.0 < p - t < 1.0]
        if back:
            run.clicks_ms.append(1000.0 * min(back))
        elif t < cap0 + seconds - 1.0:  # the last ones may still have been on their way
            run.missed += 1
    return run
