"""One simulated hour of driving on the tiny build: re-anchors, idle resets, flat time and memory.

The whole runtime path of the daemon, minus ALSA: every 80 ms frame goes through `Conversation.step`
(ONNX Runtime CPU, the driver's VAD and the agent's activity, re-anchors and idle resets), as
fast as the machine goes. The drive: shipped speech in turns with pauses of 2 s to 2 min,
under road noise at 10 dB SNR, seeded. It prints:

- frames, re-anchors, idle resets, and whether the persona prefix was ever overwritten (the
  context fill, checked every frame, against upstream: its ring overwrites the prompt from the
  first frame past the context on);
- frame p50 / p99 per 5-minute bucket (they should be flat);
- RSS at 5 and at 60 minutes (within 5%);
- re-anchor cost p50 and max, and the cost of 30, 60 and 120 s tails on this CPU, projected for
  the 7B on Jetson AGX Orin (INT8) and Orin NX (INT4 weight-only) from the prefill's compute.

Two activity rows: the real one (VAD + the agent's text stream) and "driver VAD only". With
random weights the tiny model's text stream never pads for long, so the agent never falls
silent and only forced re-anchors happen; the second row shows what a trained model, silent
while nobody talks to it, gets: idle resets in the long pauses.

Usage: python bench/bench_conversation.py [--minutes 60] [--build DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from personaplex_edge.export.config import ModelConfig
from personaplex_edge.export.roofline import lm_params
from personaplex_edge.export.targets import PRECISIONS, load_target
from personaplex_edge.runtime.audio.files import read_audio
from personaplex_edge.runtime.audio.vad import CabinActivity
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.constants import FRAME_RATE, FRAME_SAMPLES
from personaplex_edge.runtime.core.conversation import Conversation
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.sim.noise import mix_at_snr, road_noise
from personaplex_edge.sim.shipped import driver_wav, speech_wav

BUCKET_S = 300.0
IDLE_RESET_S, KEEP_S = 45.0, 30.0  # the in-car defaults
PREFILL_EFFICIENCY = 0.5  # of the tensor-core peak a 512-row prefill GEMM reaches (projection)
# Dense tensor-core peaks (GPU only, no DLA), TFLOP/s: AGX Orin's GPU is 170 sparse INT8 TOPS
# (85 dense, FP16 half of that); Orin NX 16 GB has half the SMs at 918 vs 1300 MHz.
PEAKS = {"agx-orin-64gb": {"int8": 85.0, "fp16": 42.5},
         "orin-nx-16gb": {"int8": 85.0 * 0.5 * 918 / 1300, "fp16": 42.5 * 0.5 * 918 / 1300}}


def drive(seconds: float, seed: int = 0) -> np.ndarray:
    """The driver's side of the hour: speech turns, pauses from 2 s to 2 min, road noise."""
    rng = np.random.default_rng(seed)
    turns = [read_audio(p) for p in (driver_wav(), speech_wav())]
    n = int(seconds * 24000)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(2, 6) * 24000)
    while pos < n:
        turn = turns[rng.integers(len(turns))]
        start = int(rng.integers(0, max(len(turn) - 24000 * 8, 1)))
        piece = turn[start:start + int(rng.uniform(3, 12) * 24000)]
        out[pos:pos + len(piece)] = piece[: n - pos]
        pause = rng.choice([rng.uniform(2, 8), rng.uniform(10, 30), rng.uniform(60, 120)],
                           p=[0.6, 0.3, 0.1])
        pos += len(piece) + int(pause * 24000)
    noise = road_noise(60.0, 24000, seed=seed)  # tiled: a minute of road, looped
    return out + mix_at_snr(out, noise, 10.0)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DriverOnly(CabinActivity):
    """The driver's VAD alone decides (the agent of a random-weight model never falls silent)."""

    def update(self, mic: np.ndarray, text_token: int, pcm: np.ndarray | None) -> bool:
        return super().update(mic, text_token, None)


def run(build: Path, audio: np.ndarray, agent_counts: bool, label: str) -> dict:
    with tempfile.TemporaryDirectory() as snaps:
        session = Session(load_manifest(build), OrtBackend(threads=2), Path(snaps))
        persona = load_persona("copilot")  # its conversation settings are the in-car defaults
        assert (persona.conversation.idle_reset_s, persona.conversation.keep_s) == (IDLE_RESET_S, KEEP_S)
        life = Conversation(session, activity=CabinActivity() if agent_counts else DriverOnly())
        life.switch_persona(persona, seed=1)
        prefix = session.context_fill
        policy = life.policy
        assert policy is not None
        frame_ms: list[float] = []
        rss = {}
        overwritten = 0
        n = len(audio) // FRAME_SAMPLES
        t_start = time.perf_counter()
        for k in range(n):
            pcm = audio[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES]
            t0 = time.perf_counter()
            life.step(pcm)
            frame_ms.append((time.perf_counter() - t0) * 1e3)
            overwritten += session.context_fill >= policy.context
            minute = (k + 1) / FRAME_RATE / 60
            if abs(minute - 5) < 0.5 / (FRAME_RATE * 60) or (k + 1) == n:
                rss[round(minute)] = rss_mb()
        wall = time.perf_counter() - t_start
    return {"label": label, "frames": n, "stats": life.stats, "frame_ms": np.asarray(frame_ms),
            "rss": rss, "overwritten": overwritten, "prefix": prefix, "policy": policy,
            "wall_s": wall}


def tail_costs(build: Path) -> dict[int, float]:
    """Re-anchor cost (ms, best of 3) for 30, 60 and 120 s of replayed conversation."""
    with tempfile.TemporaryDirectory() as snaps:
        session = Session(load_manifest(build), OrtBackend(threads=2), Path(snaps))
        anchor = session.start(load_persona("copilot"), seed=1).snapshot
        row = session.lm.state.tokens[:, 0].copy()
        out = {}
        for seconds in (30, 60, 120):
            rows = [row] * int(seconds * FRAME_RATE)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                session.rebuild(anchor, rows)
                times.append((time.perf_counter() - t0) * 1e3)
            out[seconds] = min(times)
    return out


def projected_ms(target: str, tokens: int, prefix: int = 229) -> float:
    """7B re-anchor time on a Jetson: per 512-row prefill chunk, the longer of its GEMM compute
    (2 x temporal parameters x rows, plus attention over the filled context) at
    PREFILL_EFFICIENCY of the tensor-core peak, and reading the temporal weights once."""
    t = load_target(target)
    lm = ModelConfig().lm
    params = lm_params(lm)
    precision = t.precision["temporal"]
    math = "int8" if precision.startswith("int8") else "fp16"  # INT4 weight-only computes FP16
    peak = PEAKS[target][math] * 1e12 * PREFILL_EFFICIENCY
    weight_bytes = params.temporal_read * PRECISIONS[precision].bytes_per_weight
    total, done = 0.0, 0
    while done < tokens:
        rows = min(512, tokens - done)
        ctx = prefix + done + rows / 2  # mean attended length of this chunk
        flops = 2 * params.temporal_read * rows + 4 * lm.num_layers * lm.dim * ctx * rows
        total += max(flops / peak, weight_bytes / (t.bandwidth_gbps * 1e9))
        done += rows
    return total * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description="one simulated hour of driving")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--build", type=Path, help="a build (default: a fresh tiny one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build = args.build
        if build is None:
            from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
            from personaplex_edge.export.synth import synthesize

            synthesize("tiny", 0, Path(tmp) / "ck", quiet=True)
            build = export_onnx(Path(tmp) / "ck", Path(tmp) / "build", ExportOptions(), quiet=True)
        audio = drive(args.minutes * 60)
        rows = [run(build, audio, True, "VAD + agent text stream"),
                run(build, audio, False, "driver VAD only")]
        tails = tail_costs(build)
    report(rows, tails, args.minutes)


def report(rows: list[dict], tails: dict[int, float], minutes: float) -> None:
    first = rows[0]
    policy = first["policy"]
    print(f"one simulated drive of {minutes:g} min on the tiny build (ONNX Runtime CPU, 2 threads); "
          f"context {policy.context}, persona prefix {first['prefix']} steps, idle_reset_s "
          f"{IDLE_RESET_S:g}, keep_s {KEEP_S:g}")
    print(f"\n{'activity':<26}{'frames':>8}{'re-anchors':>12}{'idle resets':>13}"
          f"{'longest ctx':>13}{'prefix overwritten':>20}{'wall s':>8}")
    for r in rows:
        s = r["stats"]
        print(f"{r['label']:<26}{r['frames']:>8}{s.reanchors:>12}{s.idle_resets:>13}"
              f"{s.longest_fill:>13}{r['overwritten']:>20}{r['wall_s']:>8.0f}")
    upstream_first = policy.context - first["prefix"] + 1
    n = first["frames"]
    print(f"{'upstream (no re-anchor)':<26}{n:>8}{0:>12}{0:>13}{policy.context:>13}"
          f"{max(n - upstream_first + 1, 0):>20}      "
          f"(persona prompt overwritten from frame {upstream_first}, "
          f"{upstream_first / FRAME_RATE / 60:.1f} min)")
    print(f"\nframe time per {BUCKET_S / 60:g}-minute bucket ({first['label']}), ms")
    per = int(BUCKET_S * FRAME_RATE)
    ms = first["frame_ms"]
    print(f"{'bucket':>8}{'p50':>8}{'p99':>8}{'max':>8}")
    for b in range(0, len(ms), per):
        chunk = ms[b:b + per]
        print(f"{b // per * BUCKET_S / 60:>6.0f}-{(b // per + 1) * BUCKET_S / 60:<3.0f}"
              f"{np.percentile(chunk, 50):>6.2f}{np.percentile(chunk, 99):>8.2f}{chunk.max():>8.1f}")
    rss = first["rss"]
    if len(rss) >= 2:
        keys = sorted(rss)
        print(f"\nRSS: {rss[keys[0]]:.0f} MB at {keys[0]} min, {rss[keys[-1]]:.0f} MB at {keys[-1]} min "
              f"({100 * (rss[keys[-1]] / rss[keys[0]] - 1):+.1f}%)")
    costs = np.asarray(list(first["stats"].reanchor_ms) or [np.nan])
    print(f"re-anchor cost (keep_s {KEEP_S:g}): p50 {np.nanpercentile(costs, 50):.0f} ms, "
          f"max {np.nanmax(costs):.0f} ms over {first['stats'].reanchors} re-anchors")
    print(f"\n{'tail replayed':<16}{'tiny, this CPU':>16}{'7B AGX Orin INT8':>19}{'7B Orin NX INT4':>18}"
          "   (projection: prefill compute at "
          f"{PREFILL_EFFICIENCY:.0%} of the tensor-core peak, or the weight read if longer)")
    for seconds, cost in tails.items():
        tokens = int(seconds * FRAME_RATE)
        print(f"{seconds:>4} s ({tokens:>4}){cost:>15.0f} ms{projected_ms('agx-orin-64gb', tokens):>16.0f} ms"
              f"{projected_ms('orin-nx-16gb', tokens):>15.0f} ms")


if __name__ == "__main__":
    main()
