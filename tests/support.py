"""Helpers shared by the test files: `play` on a build, a session stepped through the shipped
speech, loading a benchmark script under test, and CabinAudio answering its own frames on
clocked virtual devices."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np

from personaplex_edge.runtime.audio.files import frames, read_audio
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.constants import FRAME_SAMPLES
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.session import Session

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes the blocked packages unimportable (as if not installed): the
# prelude of a `python -c` script, then the real work.
_IMPORT_GUARD = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)  # as if absent
        return None
sys.meta_path.insert(0, Block())
"""


def import_guard(blocked: tuple[str, ...]) -> str:
    """Python source that makes `blocked` (packages or modules) unimportable from then on."""
    return _IMPORT_GUARD.format(blocked=tuple(blocked))
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


@contextmanager
def answering_cabin(work: Path, clock_lib: Path, monkeypatch, **settings) -> Iterator[tuple]:
    """CabinAudio on clocked virtual ALSA devices at 48 kHz (real alsa-lib, a mic of silence),
    with a model loop that answers each frame at once as the daemon's loop does; yields
    (audio, stall): set `stall` and the loop sleeps 200 ms before its next reply."""
    from personaplex_edge.runtime.audio.cabin import CabinAudio
    from personaplex_edge.runtime.audio.settings import AudioSettings
    from personaplex_edge.sim.devices import VirtualCabin

    cabin = VirtualCabin.create(work / "cabin", mic_audio=np.zeros(48000 * 60, np.float32),
                                mic_rate=48000, mic_channels=1, spk_rate=48000, spk_channels=1,
                                clock_lib=clock_lib)
    monkeypatch.setenv("ALSA_CONFIG_PATH", cabin.config_path)
    audio = CabinAudio(AudioSettings(**{
        "capture_device": "ppx_mic", "playback_device": "ppx_spk", "capture_rate": 48000,
        "playback_rate": 48000, "channels": 1, "clockless": False, "rt_priority": 0,
        **settings}))
    stall, stop = threading.Event(), threading.Event()

    def model_loop() -> None:
        while not stop.is_set():
            frame = audio.read_frame(timeout=0.2)
            if frame is None:
                continue
            if stall.is_set():
                stall.clear()
                time.sleep(0.2)
            audio.write_frame(np.zeros_like(frame))

    audio.start()
    loop = threading.Thread(target=model_loop, daemon=True)
    loop.start()
    try:
        yield audio, stall
    finally:
        stop.set()
        loop.join(timeout=2)
        assert audio.stop()
