"""`serve` at the shipped audio defaults for a while, with a core kept busy by another process:
xruns, model underruns, FIFO trims, and the mic-to-speaker latency from the daemon's estimate.

The daemon runs the tiny build (ONNX Runtime, CPU) on clocked virtual ALSA devices at 48 kHz
(personaplex_edge.sim.devices' ppx_clock: time is real), the microphone looping the shipped
speech with pauses. Only the devices are configured: period, buffer depth, resampler, echo
cancellation and pre-roll are the defaults. A second process spins on one core the whole time
(the 2-core machine then has one left for the daemon's frame loop and its audio threads). Every
`--every` seconds `ctl status` is sampled; the table gives p50/p99 of the latency estimate and
the counters' totals.

Usage: python bench/bench_loaded.py [--minutes 10] [--every 2] [--no-load] [--log FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
from machine_info import describe

from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.sim.builds import tiny_build
from personaplex_edge.sim.daemon import NotifyListener, ctl_json, reap, start_serve
from personaplex_edge.sim.devices import VirtualCabin, build_clock_plugin
from personaplex_edge.sim.shipped import speech

RATE = 48000


def spin() -> None:
    """The other process: one core, busy, at normal priority."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--no-load", action="store_true", help="no busy process")
    parser.add_argument("--log", type=Path, help="write the daemon's log here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ppx-loaded-"))
    clock = build_clock_plugin(work / "plugin")
    if clock is None:
        raise SystemExit("bench_loaded: needs a C compiler and the ALSA headers")
    build = tiny_build(work / "tiny")
    seconds = args.minutes * 60 + 60
    talk = speech(RATE)
    pattern = np.concatenate([talk, np.zeros(4 * RATE, np.float32)])
    mic = np.tile(pattern, int(np.ceil(seconds * RATE / len(pattern))))[: int(seconds * RATE)]
    cabin = VirtualCabin.create(work / "alsa", mic_audio=mic, mic_rate=RATE, mic_channels=1,
                                spk_rate=RATE, spk_channels=2, clock_lib=clock,
                                mic_sink="|exec dd of=/dev/null status=none",
                                speaker_file="|exec cat >/dev/null")
    config = work / "runtime.yaml"
    config.write_text(f"""
build: {{path: {build}, backend: ort-cpu, threads: 1}}
audio: {{capture_device: ppx_mic, playback_device: ppx_spk, capture_rate: {RATE},
        playback_rate: {RATE}, channels: 1, playback_channels: 2, clockless: false}}
persona: {{default: copilot}}
snapshots: {{dir: {work / 'snapshots'}}}
control: {{socket: {work / 'control.sock'}, group: null}}
metrics: {{enabled: false}}
logging: {{level: info, transcripts: false}}
""")
    load = None if args.no_load else multiprocessing.Process(target=spin, daemon=True)
    if load is not None:
        load.start()
    notify = NotifyListener(work / "notify.sock")
    proc = start_serve(config, {**os.environ, **cabin.env, "NOTIFY_SOCKET": str(notify.path)})
    totals, latency, samples = {}, [], 0
    try:
        ready = notify.wait_for("READY=1", timeout=300)
        end = ready + args.minutes * 60
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(args.every)
            status = ctl_json(config, "status")
            audio = status["audio"]
            if audio.get("latency_ms"):
                latency.append(audio["latency_ms"]["total"])
            totals = {**audio, "frame_ms_p99": status.get("frame_ms_p99"),
                      "deadline_misses": status.get("deadline_misses")}
            samples += 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        log = reap(proc, notify)
        if load is not None:
            load.kill()
        if args.log is not None:
            args.log.write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"serve exited {proc.returncode}:\n{log[-3000:]}")
    defaults = AudioSettings()
    lat = np.asarray(latency)
    print(f"`serve` for {args.minutes:g} min at the shipped defaults ({defaults.period_frames} "
          f"frames x {defaults.buffer_periods} periods, echo_cancel {defaults.echo_cancel}, "
          f"resampler {defaults.resample_quality}), "
          f"{'no other load' if args.no_load else 'one core kept busy by another process'}; "
          f"{describe()}")
    rows = [("capture overruns", totals.get("overruns")),
            ("playback underruns", totals.get("underruns")),
            ("model underruns (silence periods)", totals.get("model_underruns")),
            ("FIFO trims", totals.get("latency_trims")),
            ("rebuild silence in pauses (s; not underruns)", totals.get("rebuild_silence_s")),
            ("dropped capture frames", totals.get("dropped_frames")),
            ("frame loop deadline misses", totals.get("deadline_misses")),
            ("frame loop p99 (ms, last minute)", totals.get("frame_ms_p99")),
            ("FIFO target at the end (ms)", totals.get("fifo_target_ms")),
            ("real-time audio threads", totals.get("realtime")),
            (f"latency estimate p50 / p99 (ms, {len(lat)} samples)",
             f"{np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f}" if len(lat) else "-")]
    for label, value in rows:
        print(f"  {label:<44}{value}")


if __name__ == "__main__":
    main()
