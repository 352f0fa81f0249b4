"""Helpers shared by the test files: `play` on a build, a session stepped through the shipped
speech, and loading a benchmark script under test."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from personaplex_edge.runtime.audio.files import frames, read_audio
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.session import Session

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SPEECH = DATA / "speech_24k.wav"


def play_args(build: Path, out: Path, *extra: str, input_path: Path = SPEECH) -> list[str]:
    """`ppx-runtime play` arguments: `input_path` through `build`, the reply to `out`, the
    persona snapshots in `out`'s folder/snaps, quiet; `extra` appended."""
    return ["play", str(input_path), "--build", str(build), "--out", str(out),
            "--snapshot-dir", str(out.parent / "snaps"), "--quiet", *extra]


def play(build: Path, out: Path, *extra: str, input_path: Path = SPEECH) -> int:
    """`ppx-runtime play` in this process (play_args); its exit status."""
    from personaplex_edge.runtime.cli import main

    return main(play_args(build, out, *extra, input_path=input_path))


def new_session(build: Path, snapshots: Path) -> Session:
    """A Session on `build` (ONNX Runtime, one thread), its persona snapshots in `snapshots`."""
    return Session(load_manifest(build), OrtBackend(threads=1), snapshots)


def step_speech(session: Session, n: int) -> np.ndarray:
    """The first `n` frames of the shipped speech through a started session: its n output frames."""
    user = frames(read_audio(SPEECH), FRAME_SAMPLES)[:n]
    return np.stack([session.step(f).frame for f in user])


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module, loaded from its file (bench/ is scripts, not a package)."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench.{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
