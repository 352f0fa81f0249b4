"""Builds for the benchmarks and the soak: the tiny one (`tiny_build`), and builds made wrong on
purpose for the tests and the benchmarks of `ppx-export verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, sha256_file, write_manifest


def tiny_build(work: Path) -> Path:
    """The built-in tiny model's checkpoint (seed 0) exported to ONNX under `work`: work/build."""
    from personaplex_edge.export.export_onnx import ExportOptions, export_onnx
    from personaplex_edge.export.synth import synthesize

    synthesize("tiny", 0, work / "checkpoint", quiet=True)
    export_onnx(work / "checkpoint", work / "build", ExportOptions(), quiet=True)
    return work / "build"


def scrambled(build: Path, out: Path, data_file: str, seed: int = 0) -> Path:
    """A copy of `build` at `out` whose `data_file` weights (float32) are shuffled, its manifest
    hashes updated so that it loads: only the numbers are wrong."""
    shutil.copytree(build, out)
    path = out / data_file
    weights = np.fromfile(path, np.float32)
    np.random.default_rng(seed).shuffle(weights)
    weights.tofile(path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"][data_file] = sha256_file(path)
    write_manifest(out, manifest)
    return out
