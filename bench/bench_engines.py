"""TensorRT engines per 80 ms frame: each network, and the LM step, against the bandwidth roofline.

At batch 1 the LM step (temporal transformer + depformer depth steps) is bound by
reading weights (and the KV cache the step attends over). For each network this
prints the per-call time and the bytes it must read per call, hence the achieved
bandwidth against the GPU's peak; for the LM step also the fraction of the
roofline reached (the issue's target: >= 85%).

  python bench/bench_engines.py --project                 # no GPU: roofline projection per target (7B)
  python bench/bench_engines.py --engines DIR [--frames 200] [--json out.json]   # on the GPU
  python bench/bench_engines.py --write-target PATH --precision fp16   # a target profile for this GPU

Peak bandwidth: --peak-gbps, else the CUDA device attributes (memory clock x bus
width x 2), else the engines' target profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.export.config import LMConfig, ModelConfig
from personaplex_edge.export.roofline import (
    FRAME_MS,
    ROOFLINE_EFFICIENCY,
    default_depformer_steps,
    format_projection,
    frame_bytes,
    lm_params,
    projection_rows,
)
from personaplex_edge.export.targets import PRECISIONS, list_targets, load_target, sm_tuple

# -- projection (no GPU) ------------------------------------------------------------------

WHAT_IF = ("fp16", "int8", "fp8", "int4-awq", "nvfp4")


def project(depformer_steps: int | None) -> str:
    """Each shipped target at its profile's LM precision (marked *) and at the other LM
    precisions its GPU has, for the 7B config."""
    lm = LMConfig()  # PersonaPlex-7B
    steps = default_depformer_steps(lm) if depformer_steps is None else depformer_steps
    variants = []
    for target in (load_target(n) for n in list_targets()):
        chosen = target.precision["temporal"]
        for precision in (WHAT_IF if chosen in WHAT_IF else (chosen, *WHAT_IF)):
            needs = PRECISIONS[precision]
            if precision != chosen and any(sm_tuple(cc) < needs.min_sm for cc in target.compute_capabilities):
                continue
            mark = "*" if precision == chosen else ""
            variants.append(replace(target, name=target.name + mark,
                                    precision={**target.precision, "temporal": precision, "depformer": precision}))
    rows = projection_rows(lm, variants, steps)
    return ("Roofline projection, PersonaPlex-7B LM step (no GPU: computed, not measured; * = the profile's "
            f"precision)\n{format_projection(rows, steps)}")


# -- inputs for one call --------------------------------------------------------------------

def call_inputs(graph: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plausible per-call inputs for a graph: audio, codes, tokens, greedy sampling settings."""
    out = {}
    for t in graph.inputs:
        if t.role != "input":
            continue
        shape = tuple(int(d) for d in t.shape)
        if t.name in ("pcm",):
            out[t.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif t.name == "codes":
            out[t.name] = rng.integers(0, int(graph.meta.get("cardinality", 2048)), shape).astype(np.int64)
        elif t.name in ("text_top_k", "top_k"):
            out[t.name] = np.ones(shape, np.int64)
        elif t.name in ("text_temperature", "temperature"):
            out[t.name] = np.full(shape, 0.8, np.float32)
        elif t.name in ("text_noise", "noise"):
            out[t.name] = rng.standard_exponential(shape).astype(np.float32)
        elif t.name == "force_mask":
            out[t.name] = np.zeros(shape, bool)
        elif t.dtype == "int64":
            out[t.name] = rng.integers(0, 32, shape).astype(np.int64)
        else:
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return out


# -- measurement --------------------------------------------------------------------------

def time_calls(fn, frames: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    ms = np.empty(frames)
    for i in range(frames):
        t0 = time.perf_counter()
        fn()
        ms[i] = (time.perf_counter() - t0) * 1e3
    return ms


def peak_bandwidth_gbps(cudart: Any) -> float | None:
    """Theoretical DRAM bandwidth from the device attributes (DDR: two transfers per clock)."""
    try:
        attr = cudart.cudaDeviceAttr
        err, clock_khz = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrMemoryClockRate, 0)
        err2, bus_bits = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrGlobalMemoryBusWidth, 0)
    except Exception:
        return None
    if int(err) or int(err2) or not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def bench(engines_dir: Path, frames: int, warmup: int, peak: float | None, cuda_graphs: bool,
          backend: Any = None, device: Any = None, cudart: Any = None) -> dict[str, Any]:
    """Time each network and the LM step. `backend`, `device`, `cudart` default to the real
    TensorRT backend, this GPU and cuda-python (the CPU tests pass the stand-ins)."""
    from personaplex_edge.runtime.backends.tensorrt import TrtBackend
    from personaplex_edge.runtime.backends.tensorrt.cuda_versions import import_cudart
    from personaplex_edge.runtime.backends.tensorrt.device import query_device
    from personaplex_edge.runtime.core.engine_manifest import engine_manifest
    from personaplex_edge.runtime.core.manifest import load_manifest

    manifest = load_manifest(engines_dir)
    engines = engine_manifest(manifest)
    device = device or query_device()
    cudart = cudart or import_cudart()
    target = engines.manifest.data["engines"]["target"]["profile"]
    peak_source = "--peak-gbps"
    if peak is None:
        peak, peak_source = peak_bandwidth_gbps(cudart), "CUDA device attributes"
    if peak is None:
        peak, peak_source = float(target["bandwidth_gbps"]), f"target {target['name']}"
    lm = ModelConfig.from_dict(manifest.model).lm
    steps = int(manifest.graph("depformer").meta.get("steps", lm.dep_q))
    params = lm_params(lm, steps)
    fb = frame_bytes(params, engines.precision["temporal"], engines.precision["depformer"])
    backend = backend or TrtBackend(cuda_graphs=cuda_graphs)
    rng = np.random.default_rng(0)
    nets = {name: backend.open(manifest, name) for name in ("mimi_encoder", "mimi_decoder", "temporal", "depformer")}
    calls = {
        "mimi_encoder": ("mimi_encoder", "mimi_encoder"),
        "mimi_decoder": ("mimi_decoder", "mimi_decoder"),
        "temporal_step": ("temporal", "temporal_step"),
        "depformer": ("depformer", "depformer"),
    }
    bytes_per_call = {"temporal_step": fb.temporal + fb.kv, "depformer": fb.depformer}
    for key in ("mimi_encoder", "mimi_decoder"):
        stored = float(manifest.graph(key).meta.get("weight_bytes", 0))
        bytes_per_call[key] = stored * PRECISIONS[engines.precision[key]].bytes_per_weight / \
            (4.0 if manifest.data.get("dtype", "fp32") == "fp32" else 2.0)
    results: dict[str, Any] = {"device": device.to_dict(), "engines": str(engines_dir), "peak_gbps": peak,
                               "peak_source": peak_source, "cuda_graphs": cuda_graphs, "frames": frames,
                               "precision": engines.precision, "networks": {}}
    for key, (net, graph) in calls.items():
        inputs = call_inputs(manifest.graph(graph), rng)
        ms = time_calls(lambda n=nets[net], g=graph, x=inputs: n.run(g, x), frames, warmup)
        results["networks"][key] = _row(ms, bytes_per_call[key], peak)
    # The LM step as the runtime runs it: temporal step, then the depformer on its hidden state.
    t_in = call_inputs(manifest.graph("temporal_step"), rng)
    d_in = call_inputs(manifest.graph("depformer"), rng)

    def lm_step() -> None:
        out = nets["temporal"].run("temporal_step", t_in)
        nets["depformer"].run("depformer", {**d_in, "hidden": out["hidden"], "text_token": out["text_token"]})

    ms = time_calls(lm_step, frames, warmup)
    results["lm_step"] = _row(ms, fb.total, peak)
    results["lm_step"]["roofline_ms"] = fb.total / (peak * 1e9) * 1e3
    results["lm_step"]["of_roofline"] = results["lm_step"]["roofline_ms"] / results["lm_step"]["p50_ms"]
    frame = results["lm_step"]["p50_ms"] + sum(results["networks"][k]["p50_ms"] for k in ("mimi_encoder", "mimi_decoder"))
    results["frame_p50_ms"] = frame
    results["rtf"] = frame / FRAME_MS
    for n in nets.values():
        n.close()
    return results


def _row(ms: np.ndarray, nbytes: float, peak: float) -> dict[str, float]:
    p50 = float(np.percentile(ms, 50))
    gbps = nbytes / (p50 * 1e-3) / 1e9
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max()), "bytes": nbytes,
            "gbps": gbps, "of_peak": gbps / peak}


def report(r: dict[str, Any]) -> str:
    dev = r["device"]
    lines = [f"{dev.get('board') or dev['gpu']} (SM {dev['compute_capability']}, TensorRT {dev['tensorrt']}); "
             f"peak {r['peak_gbps']:.1f} GB/s ({r['peak_source']}); CUDA graphs {'on' if r['cuda_graphs'] else 'off'}; "
             f"{r['frames']} calls each",
             f"{'network':<16}{'precision':<10}{'p50 ms':>8}{'p90 ms':>8}{'GB/call':>9}{'GB/s':>8}{'of peak':>9}"]
    prec = r["precision"]
    names = {"temporal_step": prec["temporal"], "depformer": prec["depformer"],
             "mimi_encoder": prec["mimi_encoder"], "mimi_decoder": prec["mimi_decoder"]}
    for key, row in [*r["networks"].items(), ("LM step", r["lm_step"])]:
        lines.append(f"{key:<16}{names.get(key, prec['temporal']):<10}{row['p50_ms']:>8.2f}{row['p90_ms']:>8.2f}"
                     f"{row['bytes'] / 1e9:>9.3f}{row['gbps']:>8.1f}{row['of_peak']:>9.0%}")
    lm = r["lm_step"]
    lines.append(f"LM step: {lm['p50_ms']:.2f} ms vs roofline {lm['roofline_ms']:.2f} ms = {lm['of_roofline']:.0%} of "
                 f"the roofline (target >= {ROOFLINE_EFFICIENCY:.0%}); whole frame {r['frame_p50_ms']:.2f} ms, "
                 f"real-time factor {r['rtf']:.2f}")
    lines.append("GB/call for temporal_step includes the whole KV ring it attends over; Mimi's is its weights.")
    return "\n".join(lines)


# -- parity against ONNX Runtime (the full-size check of the kit) ---------------------------

def parity(build: Path, engines_dir: Path, steps: int, frames: int, backend: Any = None) -> dict[str, Any]:
    """The engines against the ONNX build on ONNX Runtime (CPU), same inputs: LM logits cosine and
    greedy token agreement over `steps` steps from an empty cache, Mimi codes agreement and decoder
    SNR over `frames` frames of speech."""
    from personaplex_edge.runtime.audio.files import frames as cut
    from personaplex_edge.runtime.audio.files import read_audio
    from personaplex_edge.runtime.backends.ort import OrtBackend
    from personaplex_edge.runtime.backends.tensorrt import TrtBackend
    from personaplex_edge.runtime.core.manifest import load_manifest

    ref_m, eng_m = load_manifest(build), load_manifest(engines_dir)
    ort, trt = OrtBackend(), backend or TrtBackend()
    rng = np.random.default_rng(0)
    r: dict[str, Any] = {"steps": steps, "frames": frames}
    cos_t, cos_a, same_t, same_a = [], [], 0, 0
    nets = [(ort.open(ref_m, n), trt.open(eng_m, n)) for n in ("temporal", "depformer")]
    (ot, tt), (od, td) = nets
    card = int(ref_m.model["lm"]["card"])
    for _ in range(steps):
        x = call_inputs(ref_m.graph("temporal_step"), rng)
        x["tokens"] = rng.integers(0, min(card, int(ref_m.model["lm"]["text_card"])), x["tokens"].shape)
        a, b = ot.run("temporal_step", x), tt.run("temporal_step", x)
        cos_t.append(_cosine(a["text_logits"], b["text_logits"]))
        same_t += int(a["text_token"][0] == b["text_token"][0])
        d = call_inputs(ref_m.graph("depformer"), rng)
        d["text_token"] = a["text_token"]
        da = od.run("depformer", {**d, "hidden": a["hidden"]})
        db = td.run("depformer", {**d, "hidden": b["hidden"].astype(a["hidden"].dtype)})
        cos_a.append(_cosine(da["audio_logits"], db["audio_logits"]))
        same_a += int(np.sum(da["audio_tokens"] == db["audio_tokens"]))
    r["text_logits_cosine_min"] = float(min(cos_t))
    r["text_token_agreement"] = same_t / steps
    r["audio_logits_cosine_min"] = float(min(cos_a))
    r["audio_token_agreement"] = same_a / (steps * len(da["audio_tokens"]))
    speech = Path(__file__).resolve().parents[1] / "tests" / "data" / "speech_24k.wav"
    enc = (ort.open(ref_m, "mimi_encoder"), trt.open(eng_m, "mimi_encoder"))
    dec = (ort.open(ref_m, "mimi_decoder"), trt.open(eng_m, "mimi_decoder"))
    same_codes, ref_pcm, got_pcm, n = 0, [], [], 0
    for chunk in cut(read_audio(speech), 1920)[:frames]:
        pcm = chunk.reshape(1, 1, -1)
        ca, cb = (e.run("mimi_encoder", {"pcm": pcm})["codes"] for e in enc)
        same_codes += int(np.sum(ca == cb))
        n += ca.size
        ref_pcm.append(dec[0].run("mimi_decoder", {"codes": ca})["pcm"].reshape(-1))
        got_pcm.append(dec[1].run("mimi_decoder", {"codes": ca})["pcm"].reshape(-1))
    ref, got = np.concatenate(ref_pcm), np.concatenate(got_pcm)
    r["mimi_code_agreement"] = same_codes / max(n, 1)
    noise = float(np.sum((ref - got) ** 2))
    r["mimi_decoder_snr_db"] = float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref ** 2) / noise))
    for net in (tt, td, enc[1], dec[1]):
        net.close()
    return r


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def parity_report(r: dict[str, Any]) -> str:
    return (f"parity vs ONNX Runtime: {r['steps']} LM steps: text logits cosine >= {r['text_logits_cosine_min']:.5f}, "
            f"text tokens {r['text_token_agreement']:.0%} equal; audio logits cosine >= "
            f"{r['audio_logits_cosine_min']:.5f}, audio tokens {r['audio_token_agreement']:.0%} equal; "
            f"Mimi {r['frames']} frames: codes {r['mimi_code_agreement']:.0%} equal, decoder SNR "
            f"{r['mimi_decoder_snr_db']:.1f} dB")


# -- a target profile for the GPU at hand (the kit) -----------------------------------------

def write_target(path: Path, precision: str, mimi: str | None, name: str, prefill: int, level: int = 3) -> None:
    from personaplex_edge.runtime.backends.tensorrt.cuda_versions import import_cudart
    from personaplex_edge.runtime.backends.tensorrt.device import query_device

    dev = query_device()
    peak = peak_bandwidth_gbps(import_cudart(required=False)) if dev.source == "cuda" else None
    memory_gb = max((dev.memory_bytes or 8 << 30) / 2**30, 1.0)
    path.write_text(
        f"# Written by bench_engines.py --write-target for {dev.gpu} (SM {dev.compute_capability})\n"
        f"name: {name}\n"
        f"description: {dev.gpu} building engines for itself (GPU kit)\n"
        f"gpu:\n  arch: sm{dev.compute_capability.replace('.', '')}\n"
        f"  compute_capability: \"{dev.compute_capability}\"\n"
        f"  memory_gb: {memory_gb:.1f}\n  bandwidth_gbps: {peak or 100.0:.1f}\n"
        f"tensorrt: \">=10.0\"\n"
        f"precision:\n  temporal: {precision}\n  depformer: {precision}\n"
        f"  mimi_encoder: {mimi or precision}\n  mimi_decoder: {mimi or precision}\n"
        f"context: 3000\nbatch: 1\nprefill_max_steps: {prefill}\n"
        f"builder:\n  optimization_level: {level}\n  workspace_mb: 4096\n"
        f"memory_budget_gb: {memory_gb * 0.9:.1f}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", action="store_true", help="print the roofline projection per target (no GPU)")
    p.add_argument("--depformer-steps", type=int, help="depth steps per frame (default: the agent's, 8)")
    p.add_argument("--engines", type=Path, help="engines directory from `ppx-export engines`")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, help="the GPU's peak memory bandwidth")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--parity", type=Path, metavar="BUILD",
                   help="with --engines: compare them with this ONNX build on ONNX Runtime first")
    p.add_argument("--parity-steps", type=int, default=8)
    p.add_argument("--parity-frames", type=int, default=10)
    p.add_argument("--no-bench", action="store_true", help="with --parity: only the parity check")
    p.add_argument("--write-target", type=Path, help="write a target profile for this GPU and exit")
    p.add_argument("--precision", default="fp16", choices=tuple(PRECISIONS))
    p.add_argument("--mimi-precision", choices=tuple(PRECISIONS))
    p.add_argument("--target-name", default="this-gpu")
    p.add_argument("--prefill-max-steps", type=int, default=512)
    p.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                   help="the written target's TensorRT builder level (the kit's tiny engines: 2)")
    args = p.parse_args(argv)
    from personaplex_edge.runtime.errors import PpxError

    try:
        if args.write_target:
            write_target(args.write_target, args.precision, args.mimi_precision, args.target_name,
                         args.prefill_max_steps, args.optimization_level)
            load_target(args.write_target)  # validates: refuses precisions this GPU lacks
            print(f"wrote {args.write_target}")
        elif args.project:
            print(project(args.depformer_steps))
        elif args.engines:
            out: dict[str, Any] = {}
            if args.parity:
                out["parity"] = parity(args.parity, args.engines, args.parity_steps, args.parity_frames)
                print(parity_report(out["parity"]))
            if not args.no_bench:
                out["bench"] = bench(args.engines, args.frames, args.warmup, args.peak_gbps, not args.no_cuda_graphs)
                print(report(out["bench"]))
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))
        else:
            p.error("give --project, --engines DIR or --write-target PATH")
    except PpxError as exc:
        print(f"bench_engines: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
