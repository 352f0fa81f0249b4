"""Install time and peak memory of a large signed bundle, on this machine.

`--build DIR` measures a real build: the 7B-size one is `ppx-export synth --size full` then
`ppx-export onnx --dtype fp16` (about 15 GB; 3.4 and about 7 minutes on the 2-vCPU VM).
Without it, the tiny build is padded with one weights file of SIZE GB of random bytes (listed
and hashed in its manifest, like any graph's data): the install only sees bytes, and random
bytes are the worst case for zstd.

Measured: `ppx-export bundle` (read + hash + tar), `ppx-runtime update install` (stream +
hash + write + fsync into a slot), each as a child process: wall time and peak RSS
(ru_maxrss of the child). Needs SIZE x 3 GB of free disk (build, bundle, slot) in --dir.

Usage: python bench/bench_update.py [--build DIR | --size-gb 8] [--dir /var/tmp] [--zstd]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
from personaplex_edge.export.synth import synthesize
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, write_manifest

PAD = "temporal_pad.onnx.data"


def padded_build(out: Path, size_gb: float) -> Path:
    synthesize("tiny", seed=0, out=out / "ckpt", quiet=True)
    build = out / "build"
    export_onnx(out / "ckpt", build, ExportOptions(prefill_steps=64), quiet=True)
    digest = hashlib.sha256()
    remaining = int(size_gb * 1e9)
    with open(build / PAD, "wb") as f:
        while remaining > 0:
            chunk = os.urandom(min(remaining, 1 << 24))
            f.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    data = json.loads((build / MANIFEST_NAME).read_text())
    data["files"][PAD] = digest.hexdigest()
    write_manifest(build, data)
    return build


# A fresh parent per command, so ru_maxrss of its children is this command's alone.
MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(rc)")


def run(args: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MB of the command, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
    return wall, peak_mb, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", type=Path, help="a real build to bundle (else a padded tiny one)")
    parser.add_argument("--size-gb", type=float, default=8.0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--zstd", action="store_true", help="also a zstd bundle")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-update-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        if args.build is not None:
            build = args.build
            args.size_gb = sum(f.stat().st_size for f in build.rglob("*") if f.is_file()) / 1e9
            print(f"build {build}: {args.size_gb:.2f} GB")
        else:
            build = padded_build(work, args.size_gb)
            print(f"padded build: {args.size_gb:g} GB in {time.perf_counter() - t0:.0f} s")
        for cmd in (["personaplex_edge.export.cli", "keygen", "--out", str(work / "fleet")],):
            run(cmd)
        (work / "trusted").mkdir()
        shutil.copy(work / "fleet.pub", work / "trusted")
        cfg = work / "runtime.yaml"
        cfg.write_text(f"build: {{path: {build}}}\nupdate: {{slots_dir: {work / 'slots'}, "
                       f"trusted_keys: {work / 'trusted'}}}\n")
        for compress in ("none", "zstd") if args.zstd else ("none",):
            out = work / f"bundle-{compress}.ppxb"
            wall, rss, _ = run(["personaplex_edge.export.cli", "bundle", "--build", str(build),
                                "--key", str(work / "fleet.key"), "--out", str(out),
                                "--version", "1.0", "--compress", compress])
            size = out.stat().st_size / 1e9
            print(f"bundle ({compress}): {size:.2f} GB in {wall:.1f} s "
                  f"({size / wall:.2f} GB/s), peak RSS {rss:.0f} MB")
            wall, rss, _ = run(["personaplex_edge.runtime.cli", "update", "--config", str(cfg),
                                "install", "--allow-downgrade", str(out)])
            print(f"install ({compress}): {wall:.1f} s ({args.size_gb / wall:.2f} GB/s), "
                  f"peak RSS {rss:.0f} MB")
            out.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
