"""On a GPU: real TensorRT engines of the tiny build against ONNX Runtime through the backend
interface, the device-side refusals, and CUDA graph replay. Skipped without a GPU (conftest)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from personaplex_edge.runtime.audio.files import frames, read_audio
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.backends.tensorrt import TrtBackend
from personaplex_edge.runtime.backends.tensorrt.device import query_device
from personaplex_edge.runtime.core.engine_manifest import check_engines
from personaplex_edge.runtime.core.manifest import load_manifest, write_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.errors import PpxError

pytestmark = pytest.mark.gpu

DATA = Path(__file__).parents[1] / "data"
FRAMES = 25


def conversation(build: Path, backend, snapshots: Path, n: int = FRAMES):
    audio = read_audio(DATA / "speech_24k.wav")[: 1920 * n]
    persona = load_persona("copilot")
    persona = replace(persona, sampling=replace(persona.sampling, greedy=True))
    session = Session(load_manifest(build), backend, snapshots)
    ready = session.start(persona, seed=7)
    return ready, [session.step(f) for f in frames(audio, 1920)]


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2)) / noise)


def test_engines_match_this_device(gpu_engines: Path) -> None:
    assert check_engines(gpu_engines, query=query_device) == []
    data = load_manifest(gpu_engines).data["engines"]
    assert set(data["networks"]) == {"mimi_encoder", "mimi_decoder", "temporal_step", "temporal_prefill",
                                     "depformer"}
    assert (gpu_engines / "timing.cache").stat().st_size > 0


def test_fp32_engines_equal_onnx_runtime(tiny_build: Path, gpu_engines: Path, tmp_path: Path) -> None:
    """Same greedy tokens over every frame; Mimi audio within float tolerance."""
    _, ref = conversation(tiny_build, OrtBackend(), tmp_path / "ort")
    ready, got = conversation(gpu_engines, TrtBackend(), tmp_path / "trt")
    assert ready.compiled
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert np.array_equal(a.user_codes, b.user_codes), f"frame {i}: encoder codes differ"
        assert np.array_equal(a.frame, b.frame), f"frame {i}: LM tokens differ"
    pcm_ref = np.concatenate([r.pcm for r in ref])
    pcm_got = np.concatenate([r.pcm for r in got])
    assert np.abs(pcm_ref - pcm_got).max() < 1e-3
    assert snr_db(pcm_ref, pcm_got) > 60


def test_fp16_engines_stay_close(tiny_build: Path, gpu_engines_fp16: Path, tmp_path: Path) -> None:
    """FP16 compute, FP16 caches and state: the decoder's audio stays close to FP32 on the same codes."""
    ref_net = OrtBackend().open(load_manifest(tiny_build), "mimi_decoder")
    net = TrtBackend().open(load_manifest(gpu_engines_fp16), "mimi_decoder")
    rng = np.random.default_rng(0)
    ref, got = [], []
    for _ in range(FRAMES):
        codes = rng.integers(0, 2048, (1, 8))
        ref.append(ref_net.run("mimi_decoder", {"codes": codes})["pcm"])
        got.append(net.run("mimi_decoder", {"codes": codes})["pcm"])
    assert snr_db(np.concatenate(ref), np.concatenate(got)) > 25
    net.close()
    _, frames_fp16 = conversation(gpu_engines_fp16, TrtBackend(), tmp_path / "s")
    assert all(np.isfinite(f.pcm).all() for f in frames_fp16)


@pytest.mark.parametrize("network,graph,inputs", [
    ("mimi_decoder", "mimi_decoder", lambda rng: {"codes": rng.integers(0, 2048, (1, 8))}),
    ("mimi_encoder", "mimi_encoder", lambda rng: {"pcm": (0.1 * rng.standard_normal((1, 1, 1920))).astype(np.float32)}),
])
def test_cuda_graph_replay_equals_eager(gpu_engines: Path, network: str, graph: str, inputs) -> None:
    manifest = load_manifest(gpu_engines)
    outs = {}
    for graphs in (False, True):
        rng = np.random.default_rng(1)
        net = TrtBackend(cuda_graphs=graphs).open(manifest, network)
        outs[graphs] = [net.run(graph, inputs(rng)) for _ in range(12)] + [net.snapshot()]
        if graphs:
            engine = net._engines[graph]
            assert engine.graphs or not engine.capturable, "neither captured nor marked uncapturable"
            captured = set(engine.graphs)
        net.close()
    for a, b in zip(outs[False], outs[True], strict=True):
        for key in a:
            assert np.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    if not captured:
        pytest.skip("this engine cannot be captured in a CUDA graph on this GPU (eager fallback verified)")
    assert captured == {0, 1}


def test_temporal_graph_replay_and_prefill_release(gpu_engines: Path) -> None:
    manifest = load_manifest(gpu_engines)
    net = TrtBackend().open(manifest, "temporal")
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 32, (1, 40, 17))
    net.run("temporal_prefill", {"tokens": rows, "embeddings": np.zeros((1, 40, 64), np.float32)})
    assert "temporal_prefill" in net._engines and net.offset == 40
    step = {"tokens": rows[:, 0], "text_temperature": np.ones(1, np.float32), "text_top_k": np.ones(1, np.int64),
            "text_noise": np.ones((1, 256), np.float32)}
    tokens = [int(net.run("temporal_step", step)["text_token"][0]) for _ in range(6)]
    assert "temporal_prefill" not in net._engines  # released at the first step
    assert net.offset == 46 and len(tokens) == 6
    snap = net.snapshot(slots=46)
    net.reset()
    net.restore(snap)
    assert net.offset == 46
    net.close()


def test_tampered_manifest_and_corrupt_engine_are_refused(gpu_engines: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engines"
    shutil.copytree(gpu_engines, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    data["engines"]["device"]["compute_capability"] = "5.3"
    write_manifest(path.parent, data)
    with pytest.raises(PpxError, match=r"engines were built for .* \(SM 5.3, TensorRT .*\) but this device is .*: "
                                       r"rebuild with `ppx-export engines` on this device"):
        TrtBackend().open(load_manifest(copy), "depformer")
    shutil.rmtree(copy)
    shutil.copytree(gpu_engines, copy)
    engine = copy / "depformer.engine"
    blob = bytearray(engine.read_bytes())
    blob[: 64] = bytes(64)  # same size, broken header
    engine.write_bytes(bytes(blob))
    assert check_engines(copy, query=query_device)[0] == (
        f"{engine}: sha256 differs from the manifest (modified or corrupt): re-export or copy the build again")
    with pytest.raises(PpxError, match=r"depformer.engine: TensorRT cannot load the engine"):
        TrtBackend().open(load_manifest(copy), "depformer")
