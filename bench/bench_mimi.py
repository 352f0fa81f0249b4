"""Streaming Mimi per 80 ms frame: our ONNX graphs on ONNX Runtime (CPU) vs upstream PyTorch.

Real-size Mimi (default MimiConfig) with random weights from upstream's initialiser
(codebooks filled with random centroids: upstream initialises them to zero). Each
frame is encode (1920 samples -> 8 codes) then decode (8 codes -> 1920 samples).

Configurations, measured in interleaved rounds so that host noise hits all alike:
  ort seq      encoder then decoder, one session each, intra-op threads 1 or 2
  ort enc||dec encoder of frame t and decoder of frame t-1 at once, one thread each
               (how a full-duplex runtime uses Mimi: the two directions are independent)
  torch        upstream `mimi.streaming(1)` encode then decode, torch threads 1 or 2

Usage: python bench/bench_mimi.py [--frames 40] [--rounds 3] [--warmup 8] [--profile DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from personaplex_edge.export.config import MimiConfig
from personaplex_edge.export.graphs import mimi as M
from personaplex_edge.export.graphs.builder import GraphBuilder, TensorSpec
from personaplex_edge.export.synth import mimi_config_json

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_24k.wav"
TARGET_MS = 25.0


# -- models ----------------------------------------------------------------------


def upstream_mimi(cfg: MimiConfig, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """Upstream Mimi, randomly initialised, with random codebooks; and its numpy weights."""
    from moshi.models.loaders import get_mimi

    torch.manual_seed(seed)
    model = get_mimi(None, mimi_config_json(cfg), num_codebooks=cfg.num_codebooks)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("embedding_sum"):
            state[key] = torch.randn(value.shape) * 0.01  # cluster_usage stays 1
    model.load_state_dict(state)
    model.eval()
    return model, {k: v.float().numpy() for k, v in state.items()}


def export(weights: dict[str, np.ndarray], cfg: MimiConfig, out: Path) -> dict[str, tuple[Path, list[TensorSpec]]]:
    graphs = {}
    for kind, build in (("encoder", M.build_encoder), ("decoder", M.build_decoder)):
        path = out / f"mimi_{kind}.onnx"
        g = GraphBuilder(f"mimi_{kind}", data_path=Path(str(path) + ".data"))
        build(g, weights, cfg)
        g.save(path)
        graphs[kind] = (path, g.specs)
    return graphs


def ort_session(path: Path, threads: int, profile_dir: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # A spinning pool worker on a 2-vCPU VM steals the core the main thread needs:
    # measured 2-4x slower with spinning on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / f"{path.stem}_t{threads}")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# -- a lean streaming runner ------------------------------------------------------------


class Runner:
    """Carries one graph's states, ring caches and offset between calls, with as little
    Python per call as possible: one persistent feed dict, states swapped in, the two
    new cache entries written in place."""

    def __init__(self, session: ort.InferenceSession, specs: Sequence[TensorSpec], data_input: str,
                 output: str):
        self.session = session
        by_name = {s.name: s for s in specs}
        self.data_input, self.output = data_input, output
        self.feed: dict[str, np.ndarray] = {}
        self.states: list[tuple[str, str]] = []  # (output, input)
        self.caches: list[tuple[str, np.ndarray, int]] = []  # (update output, ring, slot axis)
        self.offsets: list[str] = []
        for s in specs:
            if s.role == "state_in":
                self.feed[s.name] = M.initial_state(s)
                self.states.append((s.pair, s.name))
            elif s.role == "cache":
                ring = M.initial_state(s)
                self.feed[s.name] = ring
                self.caches.append((s.pair, ring, s.slot_axis))
            elif s.role == "offset":
                self.offsets.append(s.name)
        self.names = [output] + [o for o, _ in self.states] + [u for u, _, _ in self.caches]
        assert all(n in by_name for n in self.names)
        self.offset = 0

    def __call__(self, value: np.ndarray) -> np.ndarray:
        feed = self.feed
        feed[self.data_input] = value
        for name in self.offsets:
            feed[name] = np.array([self.offset], np.int64)
        outs = self.session.run(self.names, feed)
        n_states = len(self.states)
        for (_, name), new in zip(self.states, outs[1:1 + n_states], strict=True):
            feed[name] = new
        steps = 0
        for (_, ring, axis), update in zip(self.caches, outs[1 + n_states:], strict=True):
            steps = update.shape[axis]
            slots = (self.offset + np.arange(steps)) % ring.shape[axis]
            index: list[Any] = [slice(None)] * ring.ndim
            index[axis] = slots
            ring[tuple(index)] = update
        self.offset += steps
        return outs[0]


# -- measurement ----------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    label: str
    threads: str
    step: Callable[[np.ndarray], np.ndarray]  # one frame -> codes (for the parity check)
    setup: Callable[[], None] = lambda: None
    times: list[float] = dataclasses.field(default_factory=list)
    codes: list[np.ndarray] = dataclasses.field(default_factory=list)


def ort_sequential(enc: Runner, dec: Runner) -> Callable[[np.ndarray], np.ndarray]:
    def step(frame: np.ndarray) -> np.ndarray:
        codes = enc(frame)
        dec(codes)
        return codes
    return step


def ort_concurrent(enc: Runner, dec: Runner, pool: ThreadPoolExecutor) -> Callable[[np.ndarray], np.ndarray]:
    """Encoder on this frame while the decoder runs the previous frame's codes."""
    pending = {"codes": np.zeros((1, 8), np.int64)}

    def step(frame: np.ndarray) -> np.ndarray:
        job = pool.submit(dec, pending["codes"])
        codes = enc(frame)
        job.result()
        pending["codes"] = codes
        return codes
    return step


def torch_step(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    def step(frame: np.ndarray) -> np.ndarray:
        codes = model.encode(torch.from_numpy(frame))
        model.decode(codes)
        return codes.numpy()[:, :, 0]
    return step


def measure(cfg: Config, frames: np.ndarray, warmup: int) -> None:
    """Run `frames` through `cfg`; time all but the first `warmup`."""
    cfg.setup()
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        codes = cfg.step(frame)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            cfg.times.append(elapsed * 1e3)
        cfg.codes.append(codes)


def load_frames(cfg: MimiConfig, count: int) -> np.ndarray:
    n = cfg.frame_samples
    if SPEECH.exists():
        import soundfile

        audio, _ = soundfile.read(SPEECH, dtype="float32")
    else:
        audio = np.random.default_rng(0).standard_normal(n * count).astype(np.float32) * 0.1
    audio = np.tile(audio, -(-count * n // len(audio)))[: count * n]
    return audio.reshape(count, 1, 1, n)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=40, help="timed frames per configuration per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8, help="untimed frames at the start of each round")
    ap.add_argument("--profile", type=Path, help="write ONNX Runtime profiles (JSON) here")
    args = ap.parse_args(argv)

    cfg = MimiConfig()
    print(f"machine: {os.cpu_count()} CPUs; onnxruntime {ort.__version__}; torch {torch.__version__}",
          flush=True)
    t0 = time.perf_counter()
    model, weights = upstream_mimi(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="bench_mimi_")
    graphs = export(weights, cfg, Path(tmp.name))
    del weights
    print(f"exported real-size Mimi graphs in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    sessions = {t: {k: ort_session(p, t, args.profile) for k, (p, _) in graphs.items()} for t in (1, 2)}

    def runners(threads: int) -> tuple[Runner, Runner]:
        return (Runner(sessions[threads]["encoder"], graphs["encoder"][1], "pcm", "codes"),
                Runner(sessions[threads]["decoder"], graphs["decoder"][1], "codes", "pcm"))

    pool = ThreadPoolExecutor(1)
    configs = [
        Config("onnxruntime enc+dec", "1", ort_sequential(*runners(1))),
        Config("onnxruntime enc+dec", "2", ort_sequential(*runners(2))),
        Config("onnxruntime enc||dec", "1+1", ort_concurrent(*runners(1), pool)),
    ]
    # Each torch configuration streams on its own upstream state, switched in before
    # its turn, so every configuration sees the same continuous audio stream.
    torch_configs = []
    for n in (1, 2):
        with model.streaming(1):  # fresh upstream state, kept after the context ends
            state = model.get_streaming_state()

        def setup(n: int = n, state: dict = state) -> None:
            torch.set_num_threads(n)
            model.set_streaming_state(state)
        torch_configs.append(Config("torch moshi streaming", str(n), torch_step(model), setup=setup))
    configs += torch_configs

    per_round = args.warmup + args.frames
    frames = load_frames(cfg, per_round * args.rounds)
    with torch.no_grad():
        for r in range(args.rounds):
            chunk = frames[r * per_round:(r + 1) * per_round]
            for c in configs:
                measure(c, chunk, args.warmup)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    pool.shutdown()

    report(configs, torch_configs)
    if args.profile:
        for by_kind in sessions.values():
            for s in by_kind.values():
                print("profile:", s.end_profiling())
    return 0


def report(configs: list[Config], torch_configs: list[Config]) -> None:
    print()
    print(f"{'backend':24s} {'threads':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'frames':>6s}")
    for c in configs:
        t = np.array(c.times)
        print(f"{c.label:24s} {c.threads:>7s} {np.percentile(t, 50):8.2f} {np.percentile(t, 95):8.2f} {len(t):6d}")
    ort_configs = [c for c in configs if c not in torch_configs]
    ort_best = min(ort_configs, key=lambda c: np.median(c.times))
    torch_best = min(torch_configs, key=lambda c: np.median(c.times))
    ort_p50, torch_p50 = np.median(ort_best.times), np.median(torch_best.times)
    verdict = "met" if ort_p50 <= TARGET_MS else "NOT met"
    print()
    print(f"best onnxruntime: {ort_best.label}, {ort_best.threads} thread(s): p50 {ort_p50:.2f} ms, "
          f"p95 {np.percentile(ort_best.times, 95):.2f} ms (target <= {TARGET_MS:.0f} ms: {verdict})")
    print(f"best torch:       {torch_best.threads} thread(s): p50 {torch_p50:.2f} ms, "
          f"p95 {np.percentile(torch_best.times, 95):.2f} ms")
    print(f"torch / onnxruntime (p50): {torch_p50 / ort_p50:.1f}x")
    # Same audio stream through every configuration: the codes must agree.
    for c in configs[1:]:
        same = sum(np.array_equal(a, b) for a, b in zip(configs[0].codes, c.codes, strict=True))
        print(f"codes equal to {configs[0].label} ({configs[0].threads}): {c.label} ({c.threads}) "
              f"{same}/{len(c.codes)} frames")


if __name__ == "__main__":
    sys.exit(main())
