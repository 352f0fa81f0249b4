"""Mimi streaming encoder/decoder graphs vs upstream `moshi` streaming Mimi, frame by frame."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
sf = pytest.importorskip("soundfile")
loaders = pytest.importorskip("moshi.models.loaders")

from streaming_driver import StreamingSession  # noqa: E402
from trt_ops import TRT_10_3_OPS  # noqa: E402

from personaplex_edge.export.config import MimiConfig, tiny_config  # noqa: E402
from personaplex_edge.export.graphs import mimi as M  # noqa: E402
from personaplex_edge.export.graphs.builder import GraphBuilder  # noqa: E402
from personaplex_edge.export.synth import mimi_config_json  # noqa: E402

SPEECH = Path(__file__).parent / "data" / "speech_24k.wav"
PCM_TOL = 1e-4


def upstream_mimi(cfg: MimiConfig, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """Upstream Mimi with random weights (bf16-rounded, as real checkpoints) and its numpy state dict.

    Upstream initialises codebooks to zero; they get random centroids here, at the
    scale of a randomly initialised Mimi's projected latents (~0.01), and a few
    clusters an unused (0) usage to exercise the epsilon clamp.
    """
    torch.manual_seed(seed)
    model = loaders.get_mimi(None, mimi_config_json(cfg), num_codebooks=cfg.num_codebooks)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if key.endswith("embedding_sum"):
            usage = torch.rand(value.shape[0], generator=gen) * 2 + 0.5
            usage[:3] = 0.0
            centroids = torch.randn(value.shape, generator=gen) * 0.01
            state[key.replace("embedding_sum", "cluster_usage")] = usage
            # Unused clusters keep a non-zero sum: clamped, they become far-away centroids.
            state[key] = centroids * usage.clamp(min=1.0)[:, None]
    state = {k: v.to(torch.bfloat16).to(torch.float32) if v.is_floating_point() else v
             for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    return model, {k: v.numpy().astype(np.float32) for k, v in state.items()}


def build(kind: str, weights: dict[str, np.ndarray], cfg: MimiConfig, tmp: Path
          ) -> tuple[Any, GraphBuilder]:
    path = tmp / f"mimi_{kind}.onnx"
    g = GraphBuilder(f"mimi_{kind}", data_path=Path(str(path) + ".data"))
    (M.build_encoder if kind == "encoder" else M.build_decoder)(g, weights, cfg)
    g.save(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), g


def speech_frames(cfg: MimiConfig, repeat: int = 1) -> np.ndarray:
    audio, rate = sf.read(SPEECH, dtype="float32")
    assert rate == cfg.sample_rate and audio.ndim == 1
    audio = np.tile(audio, repeat)
    n = len(audio) // cfg.frame_samples
    return audio[: n * cfg.frame_samples].reshape(n, 1, 1, cfg.frame_samples)


def run_parity(cfg: MimiConfig, frames: np.ndarray, tmp: Path) -> None:
    model, weights = upstream_mimi(cfg)
    enc, g_enc = build("encoder", weights, cfg, tmp)
    dec, g_dec = build("decoder", weights, cfg, tmp)
    enc_run = StreamingSession(enc, g_enc.specs, M.initial_state)
    dec_run = StreamingSession(dec, g_dec.specs, M.initial_state)
    with torch.no_grad():
        with model.streaming(1):
            ref_codes = [model.encode(torch.from_numpy(f)).numpy()[:, :, 0] for f in frames]
        with model.streaming(1):
            ref_pcm = [model.decode(torch.from_numpy(c)[:, :, None]).numpy() for c in ref_codes]
    for i, (frame, want) in enumerate(zip(frames, ref_codes, strict=True)):
        got = enc_run.step(pcm=frame)["codes"]
        np.testing.assert_array_equal(got, want, err_msg=f"codes differ at frame {i}")
    worst = 0.0
    for i, (codes, want) in enumerate(zip(ref_codes, ref_pcm, strict=True)):
        got = dec_run.step(codes=codes)["pcm"]
        err = float(np.abs(got - want).max())
        worst = max(worst, err)
        assert err <= PCM_TOL, f"pcm differs at frame {i}: max abs diff {err:.3g}"
    assert np.abs(np.concatenate(ref_pcm)).max() > 1e-3, "decoder output is silent: vacuous test"
    assert len({tuple(c[0]) for c in ref_codes}) > len(ref_codes) // 4, "codes barely vary: vacuous test"
    print(f"{len(frames)} frames: codes identical, pcm max abs diff {worst:.2e}")


def test_tiny_mimi_streaming_parity_on_speech(tmp_path: Path) -> None:
    cfg = tiny_config().mimi
    frames = speech_frames(cfg)
    assert len(frames) >= 50
    run_parity(cfg, frames, tmp_path)


def test_tiny_mimi_ring_cache_wraps(tmp_path: Path) -> None:
    """A short attention context makes the KV ring wrap many times within the clip."""
    base = tiny_config().mimi
    cfg = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, context=7))
    run_parity(cfg, speech_frames(cfg)[:40], tmp_path)


def test_tiny_mimi_ring_cache_wraps_at_default_context(tmp_path: Path) -> None:
    """Past 124 frames the default ring (248 slots) wraps. Losing one key out of 250
    barely moves the outputs, so `test_tiny_mimi_ring_cache_wraps` is the sensitive one."""
    cfg = tiny_config().mimi
    run_parity(cfg, speech_frames(cfg, repeat=2)[:140], tmp_path)


def test_real_size_mimi_structure(tmp_path: Path) -> None:
    """Default (PersonaPlex) Mimi, random weights: a few frames of parity."""
    cfg = MimiConfig()
    start = time.perf_counter()
    run_parity(cfg, speech_frames(cfg)[10:13], tmp_path)
    assert time.perf_counter() - start < 120


def test_initial_state_and_roles(tmp_path: Path) -> None:
    cfg = tiny_config().mimi
    _, weights = upstream_mimi(cfg)
    _, g = build("encoder", weights, cfg, tmp_path)
    specs = {s.name: s for s in g.specs}
    assert M.initial_state(specs["enc.down.first"]).tolist() == [True]
    assert "initial value True" in specs["enc.down.first"].doc
    capacity = M.cache_capacity(cfg)
    assert g.meta["caches"] == {"capacity": capacity, "steps_per_call": 2, "context": 250}
    for i in range(cfg.transformer.num_layers):
        assert specs[f"enc.k.{i}"].shape == (1, 2, 16, capacity) and specs[f"enc.k.{i}"].slot_axis == 3
        assert specs[f"enc.new_v.{i}"].shape == (1, 2, 2, 16) and specs[f"enc.new_v.{i}"].slot_axis == 2
    for s in g.specs:
        if s.role == "state_in":
            assert specs[s.pair].role == "state_out" and specs[s.pair].pair == s.name
            assert s.name.startswith("enc.") and s.pair == s.name + "_next"
            if s.name not in M.NONZERO_INITIAL:
                assert not M.initial_state(s).any()


def test_missing_weight_names_the_key(tmp_path: Path) -> None:
    cfg = tiny_config().mimi
    _, weights = upstream_mimi(cfg)
    del weights["decoder.model.2.convtr.convtr.bias"]
    g = GraphBuilder("mimi_decoder")
    with pytest.raises(KeyError, match="decoder.model.2.convtr.convtr.bias"):
        M.build_decoder(g, weights, cfg)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_fp16_graphs_build_and_run(tmp_path: Path, kind: str) -> None:
    cfg = tiny_config().mimi
    _, weights = upstream_mimi(cfg)
    path = tmp_path / f"{kind}16.onnx"
    g = GraphBuilder(kind, weight_dtype=np.float16, data_path=Path(str(path) + ".data"))
    (M.build_encoder if kind == "encoder" else M.build_decoder)(g, weights, cfg)
    g.save(path)
    run = StreamingSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                           g.specs, M.initial_state)
    for frame in speech_frames(cfg)[:3]:
        if kind == "encoder":
            codes = run.step(pcm=frame)["codes"]
            assert codes.shape == (1, 8) and ((codes >= 0) & (codes < cfg.quantizer.bins)).all()
        else:
            pcm = run.step(codes=np.arange(8, dtype=np.int64).reshape(1, 8) * 100)["pcm"]
            assert pcm.dtype == np.float32 and np.isfinite(pcm).all()



@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_graphs_use_static_shapes_and_trt_ops(tmp_path: Path, kind: str) -> None:
    import onnx

    cfg = tiny_config().mimi
    _, weights = upstream_mimi(cfg)
    _, g = build(kind, weights, cfg, tmp_path)
    model = g.model()
    assert {n.op_type for n in model.graph.node} <= set(TRT_10_3_OPS)
    assert model.opset_import[0].version == 17
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name
    onnx.checker.check_model(str(tmp_path / f"mimi_{kind}.onnx"))  # reads the external data too
