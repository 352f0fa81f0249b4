"""The demo's install has no torch (the `graphs` extra): `synth`, `onnx` and `inspect` run
without it, and the one thing that needs it, a released `.pt` voice preset, says so in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support import import_guard

WITHOUT_TORCH = ("torch", "modelopt", "safetensors")


def _export(argv: list[str]) -> subprocess.CompletedProcess:
    code = (import_guard(WITHOUT_TORCH) + "from personaplex_edge.export.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_the_demos_export_runs_without_torch(tmp_path: Path) -> None:
    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    for argv in (["synth", "--size", "tiny", "--out", str(ckpt), "--quiet"],
                 ["onnx", "--checkpoint", str(ckpt), "--out", str(build), "--prefill-steps", "64",
                  "--quiet"],
                 ["inspect", "--build", str(build)]):
        proc = _export(argv)
        assert proc.returncode == 0, (argv[0], proc.stderr[-2000:])
    assert (build / "manifest.json").is_file()


def test_a_pt_voice_without_torch_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    torch.save({"embeddings": torch.zeros(4, 1, 1, 8), "cache": torch.zeros(1, 17, 4)},
               ckpt / "voices" / "NATM1.pt")
    proc = _export(["onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "build"), "--quiet"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ppx-export: error: {ckpt / 'voices' / 'NATM1.pt'}: a .pt voice preset needs torch: "
        "pip install 'personaplex-edge[export]' (or make venv)")
    assert not (tmp_path / "build").exists()
