"""Microphone-to-speaker latency of `ppx-runtime serve`: clicks timed by the devices' clock,
next to the daemon's own estimate and its parts.

The daemon runs on the tiny build (ONNX Runtime, CPU) on clocked virtual ALSA devices at 48 kHz
(personaplex_edge.sim.devices' ppx_clock: time is real), with PPX_DEBUG_LATENCY_PROBE=1: its speaker
plays a click wherever the frame the model heard had one, at the same place in the frame
(runtime/service/debug_audio.py). The microphone is silence with a click every 1.013 s, each at
another place in its frame. The clocked device records when each stream started, so a click at
mic sample i that comes back at speaker sample j took (playback start + j / 48000) - (capture
start + i / 48000): the latency of the audio path plus compute, on the devices' clock, with
nothing of the daemon's own timing in it (personaplex_edge.sim.latency_probe).

The parts are the daemon's estimate (`ctl status`: audio.latency_ms; the metric
ppx_mic_to_speaker_latency_seconds), traced frame by frame from ALSA's buffer levels, the
resamplers and the frame loop's times (runtime/audio/latency.py). Their sum is printed next to
the clicks. The goal is 80 ms (the frame) + compute p99 + 30 ms.

Runs 10 and 20 ms periods (4 per buffer), each with echo_cancel off and webrtc, then the shipped
defaults (10 ms x 3, webrtc), one after the other.

Usage: python bench/bench_latency.py [--build DIR] [--seconds 12] [--periods 10,20]
       [--echo off,webrtc] [--buffer-periods 4] [--no-defaults]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from machine_info import describe

from personaplex_edge.runtime.audio.settings import AudioSettings
from personaplex_edge.sim.builds import tiny_build
from personaplex_edge.sim.devices import build_clock_plugin
from personaplex_edge.sim.latency_probe import Run, measure

ROWS = (("frame", "frame (the first sample waits for the last)"),
        ("capture", "capture: ALSA read after the frame's end"),
        ("reframing", "re-framing: audio past the frame's end"),
        ("resampling", "resampling 48 -> 24 kHz: the resampler holds"),
        ("echo_cancel", "echo canceller (10 ms block, AEC3 delay)"),
        ("compute", "model compute, frame loop (mean)"),
        ("preroll", "pre-roll (playback FIFO)"),
        ("playback", "playback buffer (ALSA queued)"))
GOAL_MARGIN_MS = {"off": 30.0, "webrtc": 40.0}  # AEC3 delays the mic by 9 ms of its own


def goal_ms(run: Run) -> float:
    return 80.0 + float(run.status["frame_ms_p99"]) + GOAL_MARGIN_MS.get(run.echo, 30.0)


def fifo_target_ms(run: Run) -> str:
    """The playback FIFO's target at its low point, the period being written included."""
    target = run.status.get("audio", {}).get("fifo_target_ms")
    return "?" if target is None else f"{target:.0f}"


def table(runs: list[Run]) -> str:
    head = [f"{r.period_ms:g} ms x{r.buffer_periods}, AEC {r.echo}" for r in runs]
    width = max(18, *(len(h) + 2 for h in head))
    line = "{:<46}" + f"{{:>{width}}}" * len(runs)
    out = [line.format("ms", *head)]
    for key, label in ROWS:
        cells = []
        for r in runs:
            est = r.estimate or {}
            cell = f"{est.get(key, float('nan')):.1f}"
            if key == "compute":
                cell += f" (p99 {r.status['frame_ms_p99']:.1f})"
            elif key == "preroll":
                cell += f" (target {fifo_target_ms(r)})"
            cells.append(cell)
        out.append(line.format(label, *cells))
    out.append(line.format("daemon's estimate (sum of the parts)",
                           *(f"{(r.estimate or {}).get('total', float('nan')):.1f}" for r in runs)))
    out.append(line.format("measured with clicks: median",
                           *(f"{statistics.median(r.clicks_ms):.1f}" if r.clicks_ms else "-"
                             for r in runs)))
    out.append(line.format("  min - max (clicks)",
                           *(f"{min(r.clicks_ms):.1f}-{max(r.clicks_ms):.1f} ({len(r.clicks_ms)})"
                             if r.clicks_ms else "-" for r in runs)))
    out.append(line.format("goal: 80 + compute p99 + 30 (AEC: 40)",
                           *(f"{goal_ms(r):.1f}" for r in runs)))
    out.append(line.format("  measured - goal",
                           *(f"{statistics.median(r.clicks_ms) - goal_ms(r):+.1f}"
                             if r.clicks_ms else "-" for r in runs)))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, help="a build to serve (default: the tiny one, made "
                        "here)")
    parser.add_argument("--seconds", type=float, default=12.0, help="mic time per run")
    parser.add_argument("--periods", default="10,20", help="ALSA periods in ms")
    parser.add_argument("--echo", default="off,webrtc", help="echo_cancel modes")
    parser.add_argument("--buffer-periods", type=int, default=4)
    parser.add_argument("--no-defaults", action="store_true",
                        help="leave out the column of the shipped defaults")
    parser.add_argument("--preroll-ms", type=float, help="audio.preroll_ms (default: the daemon "
                        "sizes it from measured compute jitter)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppx-bench-latency-") as tmp_dir:
        tmp = Path(tmp_dir)
        clock = build_clock_plugin(tmp)
        if clock is None:
            sys.exit("bench_latency: needs a C compiler and the ALSA headers (ppx_clock plugin)")
        build = args.build or tiny_build(tmp)
        columns = [(float(p), echo, args.buffer_periods) for p in args.periods.split(",")
                   for echo in args.echo.split(",")]
        if not args.no_defaults:  # the shipped defaults: what a new install runs
            d = AudioSettings()
            columns.append((1000.0 * d.period_frames / 48000, d.echo_cancel, d.buffer_periods))
        runs = []
        for period, echo, depth in columns:
            for attempt in (1, 2):
                run = measure(tmp / f"{period:g}-{depth}-{echo}-{attempt}", build, clock,
                              period_ms=period, echo=echo, seconds=args.seconds,
                              buffer_periods=depth, preroll_ms=args.preroll_ms)
                if not run.problems:
                    break
                print(f"{period:g} ms x{depth}, {echo}, attempt {attempt}: "
                      f"{'; '.join(run.problems)}", file=sys.stderr)
            runs.append(run)
    print(f"mic-to-speaker latency of `serve`, tiny build on ONNX Runtime CPU, clocked virtual "
          f"ALSA devices at 48 kHz (the last column: the shipped defaults); {describe()}")
    print(table(runs))
    for r in runs:
        audio = r.status.get("audio", {})
        notes = r.problems + ([f"model underruns {audio['model_underruns']}"]
                              if audio.get("model_underruns") else [])
        if r.trims_during_clicks:
            notes.append(f"FIFO trims while the clicks came {r.trims_during_clicks}")
        if r.missed:
            notes.append(f"{r.missed} clicks did not come back")
        if notes:
            print(f"  {r.period_ms:g} ms x{r.buffer_periods}, AEC {r.echo}: {'; '.join(notes)}")


if __name__ == "__main__":
    main()
