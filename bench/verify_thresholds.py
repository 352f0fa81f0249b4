"""How `ppx-export verify`'s thresholds were derived: its metrics over seeds, references and inputs.

For each seed of the tiny synthetic checkpoint (`ppx-export synth --size tiny --seed S`),
the fp16 and fp32 builds (`ppx-export onnx`, CLI defaults) are each quantized at every
precision `quantize` offers (CLI defaults: the shipped calibration set, default sample
counts), and every quantized build is verified against its own full-precision build on
two input sets: the shipped calibration speech (verify's default) and the held-out speech
of tests/data (what the tests use). The fp16 build is also verified against the fp32 one
(the "fp16" row of the table). Controls: the fp32 build with its depformer or temporal
weights shuffled, verified at the loosest thresholds (`--precision int4-awq`): the bounds
must still fail those.

Printed per precision and metric: runs, min / p10 / median / max, the threshold in
export/verify.py, and the rule's bound; then per THRESHOLDS key the rule's bound next to
the current one. The rule (metrics whose ideal is 1: token agreement and cosine):

    bound = min - max(2 * (median - min), (1 - min) / 2)

the observed lower half-spread taken twice more below the worst run (about 4 sigma below
the median for a normal spread), and at least half the worst run's error again, so that
a metric that barely varies keeps a margin too; rounded down (agreement to 0.01, cosine:
its error rounded up to two significant digits). A key shared by several metrics (token
agreement: temporal text and depformer audio) takes the lowest bound, and bounds never
rise from one precision to the next lower one (ORDER in verify.py). Mimi is not quantized
by default (code agreement 1, SNR at the cap): its bounds are not derived here.

Usage: python bench/verify_thresholds.py [--seeds 8] [--fp32-seeds 2] [--precisions ...]
           [--work DIR] [--results runs.jsonl] [--table-only]
Each run appends one JSON line to --results, so an interrupted sweep keeps what it measured
and `--table-only` reprints the table from the file. On 2 shared CPU cores a seed takes
about 1.5 min with the fp16 reference alone and 3 to 4.5 min with fp32 and the controls
too (quantize: int8 ~5 s, int8-sq and fp8 15-50 s, int4-awq 25-70 s; verify 3-8 s); the
default sweep took 18 min.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
from personaplex_edge.export.quantize import PRECISIONS, quantize_build
from personaplex_edge.export.synth import synthesize
from personaplex_edge.export.verify import verify
from personaplex_edge.export.verify_metrics import ORDER, THRESHOLDS
from personaplex_edge.sim.builds import scrambled

ROOT = Path(__file__).resolve().parent.parent
INPUTS = {"calib": None, "held-out": ROOT / "tests" / "data"}
# (network, metric as verify names it) -> THRESHOLDS key
KEYS = {
    ("temporal", "prefill hidden cosine min"): "prefill_cos_min",
    ("temporal", "text token agreement"): "token_agreement",
    ("temporal", "text logit cosine mean"): "cos_mean",
    ("temporal", "text logit cosine min"): "cos_min",
    ("depformer", "audio token agreement"): "token_agreement",
    ("depformer", "audio logit cosine mean"): "cos_mean",
    ("depformer", "audio logit cosine min"): "cos_min",
    ("end_to_end", "teacher-forced text agreement"): "e2e_text",
    ("end_to_end", "teacher-forced audio agreement"): "e2e_audio",
    ("end_to_end", "free-running text agreement"): None,
    ("end_to_end", "free-running audio agreement"): None,
    ("mimi_encoder", "code agreement"): "code_agreement",
    ("mimi_decoder", "round-trip SNR dB"): "snr_db",
}


def record(results: Path, row: dict[str, Any]) -> None:
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_verify(results: Path, build: Path, reference: Path, row: dict[str, Any],
               precision: str | None = None) -> None:
    for name, inputs in INPUTS.items():
        t0 = time.perf_counter()
        report = verify(build, reference, inputs=inputs, precision=precision, quiet=True)
        values = {f"{c.network}|{c.metric}": c.value for c in report.checks}
        record(results, {**row, "inputs": name, "passed": report.passed, "values": values,
                         "verify_s": round(time.perf_counter() - t0, 1)})
        failed = ", ".join(c.metric for c in report.failed())
        verdict = f"FAIL: {failed}" if failed else "PASS"
        print(f"  {row['label']:<10} ref {row['reference']:<5} seed {row['seed']} {name:<9} "
              f"{verdict}", flush=True)


def sweep(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="ppx-thresholds-"))
    work.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.seeds):
        t_seed = time.perf_counter()
        ckpt = work / f"ck{seed}"
        synthesize("tiny", seed=seed, out=ckpt, force=True, quiet=True)
        refs = ["fp16"] + (["fp32"] if seed < args.fp32_seeds else [])
        builds = {}
        for dtype in refs:
            builds[dtype] = work / f"s{seed}-{dtype}"
            export_onnx(ckpt, builds[dtype], ExportOptions(dtype=dtype), force=True, quiet=True)
        if "fp32" in builds:
            run_verify(args.results, builds["fp16"], builds["fp32"],
                       {"seed": seed, "reference": "fp32", "label": "fp16", "precision": "fp16"})
            for network in args.controls:
                bad = scrambled(builds["fp32"], work / f"s{seed}-scrambled-{network}",
                                f"{network}.onnx.data")
                run_verify(args.results, bad, builds["fp32"],
                           {"seed": seed, "reference": "fp32", "label": f"scr-{network[:4]}",
                            "precision": "int4-awq", "control": network}, precision="int4-awq")
                shutil.rmtree(bad)
        for dtype in refs:
            for precision in args.precisions:
                t0 = time.perf_counter()
                out = quantize_build(builds[dtype], precision, None,
                                     work / f"s{seed}-{dtype}-{precision}", force=True, quiet=True)
                row = {"seed": seed, "reference": dtype, "label": precision, "precision": precision,
                       "quantize_s": round(time.perf_counter() - t0, 1)}
                run_verify(args.results, out, builds[dtype], row)
                shutil.rmtree(out)
        print(f"seed {seed}: {time.perf_counter() - t_seed:.0f} s", flush=True)
    if not args.work:
        shutil.rmtree(work)


COSINES = ("cos_mean", "cos_min", "prefill_cos_min")


def bound(key: str, values: np.ndarray) -> float | None:
    """The rule (see the docstring) for one metric's runs; None where it does not apply."""
    if key in ("snr_db", "code_agreement"):
        return None
    lo, med = float(values.min()), float(np.median(values))
    error = (1.0 - lo) + max(2.0 * (med - lo), (1.0 - lo) / 2.0)
    if key in COSINES:
        if error <= 0:
            return 1.0
        digit = 10.0 ** (math.floor(math.log10(error)) - 1)
        return round(1.0 - math.ceil(error / digit - 1e-9) * digit, 10)
    return math.floor((1.0 - error) * 100 + 1e-9) / 100


def failures(row: dict[str, Any]) -> list[str]:
    """The checks of one recorded run that fail verify's current THRESHOLDS."""
    precision = row["precision"]
    mimi = row["reference"] if precision in PRECISIONS else precision  # the build's dtype
    nets = {"mimi_encoder": mimi, "mimi_decoder": mimi, "temporal": precision,
            "depformer": precision}
    nets["end_to_end"] = max(nets.values(), key=ORDER.index)
    out = []
    for name, value in row["values"].items():
        network, metric = name.split("|")
        key = KEYS.get((network, metric))
        if key and value < THRESHOLDS[nets[network]][key]:
            out.append(name)
    return out


def table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    good = [r for r in rows if "control" not in r]
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in good:
        for name, value in r["values"].items():
            groups[r["precision"], name].append(value)
    seeds = sorted({r["seed"] for r in good})
    failing = sum(bool(failures(r)) for r in good)
    print(f"\n{len(good)} verify runs of good builds: seeds {seeds[0]}..{seeds[-1]}, fp16/fp32 "
          f"references, inputs {', '.join(INPUTS)}; failing the current thresholds: {failing} "
          f"(when run: {sum(not r['passed'] for r in good)})")
    print(f"{'precision':<10}{'metric':<46}{'n':>4}{'min':>9}{'p10':>9}{'median':>9}{'max':>9}"
          f"{'err max/med':>12}{'threshold':>11}{'rule':>9}")
    for precision in ORDER:
        for (network, metric), key in KEYS.items():
            values = groups.get((precision, f"{network}|{metric}"))
            if not values:
                continue
            v = np.asarray(values)
            lo, p10, med, hi = v.min(), np.percentile(v, 10), np.median(v), v.max()
            ratio = float("nan")
            if key not in (None, "snr_db") and med < 1:
                ratio = (1 - lo) / (1 - med)
            threshold = THRESHOLDS[precision][key] if key else None
            rule = bound(key, v) if key else None
            flag = " <- fails a good run" if threshold is not None and lo < threshold else ""
            name = f"{network} {metric}"
            print(f"{precision:<10}{name:<46}{len(v):>4}{lo:>9.4f}{p10:>9.4f}{med:>9.4f}"
                  f"{hi:>9.4f}{ratio:>12.2f}{'-' if threshold is None else f'{threshold:.4g}':>11}"
                  f"{'-' if rule is None else f'{rule:.4g}':>9}{flag}")
    print("\nper THRESHOLDS key: the rule's bound (lowest over the metrics sharing the key, "
          "never above a more precise precision's) / current")
    keys = sorted({k for k in KEYS.values() if k and k not in ("snr_db", "code_agreement")})
    print(f"{'precision':<10}" + "".join(f"{k:>20}" for k in keys))
    previous: dict[str, float] = {}
    for precision in ORDER:
        cells = []
        for key in keys:
            names = [f"{n}|{m}" for (n, m), k in KEYS.items() if k == key]
            bounds = [bound(key, np.asarray(groups[precision, name])) for name in names
                      if (precision, name) in groups]
            if not bounds:
                cells.append("-")
                continue
            candidates = [b for b in bounds if b is not None]
            previous[key] = min(candidates + ([previous[key]] if key in previous else []))
            cells.append(f"{previous[key]:.4g} / {THRESHOLDS[precision][key]:.4g}")
        if any(c != "-" for c in cells):
            print(f"{precision:<10}" + "".join(f"{c:>20}" for c in cells))
    controls = [r for r in rows if "control" in r]
    if controls:
        print("\ncontrols (scrambled weights, verified at the int4-awq thresholds): worst (max) "
              "value of each check that should fail")
        for network in sorted({r["control"] for r in controls}):
            runs = [r for r in controls if r["control"] == network]
            worst: dict[str, float] = defaultdict(lambda: -math.inf)
            for r in runs:
                for name, value in r["values"].items():
                    if name.startswith((network, "end_to_end|teacher")):
                        worst[name] = max(worst[name], value)
            caught = sum(not r["passed"] for r in runs)
            print(f"  scrambled {network}: {caught} of {len(runs)} runs fail; "
                  + ", ".join(f"{k.split('|')[1]} {v:.4f}" for k, v in worst.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 with the fp16 reference")
    parser.add_argument("--first-seed", type=int, default=0, help="resume a sweep at this seed")
    parser.add_argument("--fp32-seeds", type=int, default=2,
                        help="the first N seeds also with the fp32 reference")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--controls", nargs="*", default=["depformer", "temporal"],
                        choices=["depformer", "temporal"])
    parser.add_argument("--work", help="keep checkpoints and builds here (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=Path("verify_thresholds.jsonl"),
                        help="one JSON line per verify run (appended)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table from --results, run nothing")
    args = parser.parse_args(argv)
    if not args.table_only:
        sweep(args)
    table(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
