"""The TensorRT backend on CPU: its copy plans against the ONNX Runtime backend's ring writes,
and the whole backend (buffers, ring copies, double-buffered state, CUDA graph capture,
on-demand prefill engine, snapshots) through the Session on the TensorRT/CUDA stand-in
(tests/trt_sim.py), whose engines run the same ONNX graphs on ONNX Runtime: the outputs
must equal the ONNX Runtime backend's bit for bit. tests/gpu/ repeats the parity on a GPU."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trt_sim
from support import load_bench
from trt_sim import FakeCudart, FakeTensorRT

from personaplex_edge.export.engines import build_engines
from personaplex_edge.runtime.audio.files import frames, read_audio
from personaplex_edge.runtime.backends.base import ring_slots
from personaplex_edge.runtime.backends.ort import OrtBackend
from personaplex_edge.runtime.backends.tensorrt import TrtBackend
from personaplex_edge.runtime.backends.tensorrt.copies import apply_copy_2d, ring_copies, slots_copy
from personaplex_edge.runtime.core.engine_manifest import DeviceInfo
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.core.persona import load_persona
from personaplex_edge.runtime.core.session import Session
from personaplex_edge.runtime.errors import PpxError

DATA = Path(__file__).parent / "data"
DEVICE = DeviceInfo("NVIDIA Sim GPU", "8.9", "10.3.0.30")
TARGET = """\
name: sim
gpu: {{arch: ada, compute_capability: "8.9", memory_gb: 8, bandwidth_gbps: 100}}
tensorrt: ">=10.3"
precision: {{temporal: fp32, depformer: fp32, mimi_encoder: {mimi}, mimi_decoder: {mimi}}}
context: 3000
prefill_max_steps: 64
memory_budget_gb: 4
"""


# -- copy plans ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((1, 4, 16, 30), 3), ((1, 4, 30, 16), 2), ((2, 3, 30), 2),
                                        ((30, 5), 0)])
@pytest.mark.parametrize("offset,steps", [(0, 1), (7, 1), (29, 1), (58, 1), (0, 30), (25, 10), (3, 2), (28, 2)])
def test_ring_copies_write_what_the_onnx_runtime_backend_writes(shape, axis, offset, steps) -> None:
    rng = np.random.default_rng(offset * 31 + steps)
    cache = rng.standard_normal(shape).astype(np.float16)
    update_shape = list(shape)
    update_shape[axis] = steps
    update = rng.standard_normal(update_shape).astype(np.float16)
    expect = cache.copy()
    index = [slice(None)] * cache.ndim
    index[axis] = ring_slots(offset, steps, shape[axis])
    expect[tuple(index)] = update  # the ONNX Runtime backend's _write_ring
    got = cache.copy()
    copies = ring_copies(shape, axis, offset, steps, cache.itemsize)
    assert len(copies) == (1 if offset % shape[axis] + steps <= shape[axis] else 2)
    for c in copies:
        assert c.width <= c.dpitch and c.width <= c.spitch  # what cudaMemcpy2D requires
        apply_copy_2d(got, update, c)
    assert np.array_equal(got, expect)


def test_ring_copy_of_the_k_layout_is_a_strided_column() -> None:
    """K [1,H,D,C] slot axis 3: H*D rows of one element, pitch C; V [1,H,C,D]: H rows of D."""
    (k,) = ring_copies((1, 32, 128, 3000), 3, 4321, 1, 2)
    assert (k.dst_offset, k.dpitch, k.spitch, k.width, k.height) == (1321 * 2, 3000 * 2, 2, 2, 32 * 128)
    (v,) = ring_copies((1, 32, 3000, 128), 2, 4321, 1, 2)
    assert (v.dst_offset, v.dpitch, v.spitch, v.width, v.height) == (1321 * 256, 3000 * 256, 256, 256, 32)
    with pytest.raises(ValueError):
        ring_copies((1, 2, 8, 4), 3, 0, 5, 4)


@pytest.mark.parametrize("shape,axis,slots", [((1, 4, 16, 30), 3, 7), ((1, 4, 30, 16), 2, 30), ((1, 2, 30, 8), 2, 1)])
def test_partial_snapshot_copies(shape, axis, slots) -> None:
    rng = np.random.default_rng(slots)
    cache = rng.standard_normal(shape).astype(np.float32)
    packed_shape = list(shape)
    packed_shape[axis] = slots
    c = slots_copy(shape, axis, slots, 4)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, slots)
    # restore: packed -> the first slots of the cache
    packed = rng.standard_normal(packed_shape).astype(np.float32)
    restored = cache.copy()
    apply_copy_2d(restored, packed, c)
    expect = cache.copy()
    expect[tuple(index)] = packed
    assert np.array_equal(restored, expect)


# -- the backend on the stand-in ----------------------------------------------------------

@pytest.fixture(scope="module")
def sim_engines(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sim")
    (tmp / "sim.yaml").write_text(TARGET.format(mimi="fp32"))
    out = tmp / "engines"
    build_engines(tiny_build, tmp / "sim.yaml", out, trt=FakeTensorRT(FakeCudart()), device=DEVICE, quiet=True)
    return out


def _backend(**kwargs) -> tuple[TrtBackend, FakeCudart, FakeTensorRT]:
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart)
    return TrtBackend(trt=trt, cudart=cudart, device=DEVICE, **kwargs), cudart, trt


def _conversation(build: Path, backend, snapshots: Path, n_frames: int = 10):
    audio = read_audio(DATA / "speech_24k.wav")[: 1920 * n_frames]
    persona = load_persona("copilot")
    persona = replace(persona, sampling=replace(persona.sampling, greedy=True))
    session = Session(load_manifest(build), backend, snapshots)
    ready = session.start(persona, seed=3)
    return ready, [session.step(f) for f in frames(audio, 1920)], session


def test_session_on_engines_equals_onnx_runtime(tiny_build: Path, sim_engines: Path, tmp_path: Path) -> None:
    _, ref, _ = _conversation(tiny_build, OrtBackend(), tmp_path / "ort")
    backend, cudart, trt = _backend()
    ready, got, session = _conversation(sim_engines, backend, tmp_path / "trt")
    assert ready.compiled and ready.prompt_steps > 64  # compiled through several prefill calls
    for a, b in zip(ref, got, strict=True):
        assert a.text_token == b.text_token
        assert np.array_equal(a.frame, b.frame) and np.array_equal(a.user_codes, b.user_codes)
        assert np.array_equal(a.pcm, b.pcm)
    # The prefill engine was loaded for the compile and released at the first step.
    assert trt.stats["engines_loaded"] == 5 and trt.live_engines == 4
    # Static calls replay captured graphs: encoder and decoder one per parity, temporal and depformer one.
    assert cudart.stats["instantiate"] == 6 and cudart.stats["graph_launch"] > 0
    # A second start restores the snapshot instead of compiling; the conversation repeats exactly.
    backend2, _, trt2 = _backend()
    ready2, again, _ = _conversation(sim_engines, backend2, tmp_path / "trt")
    assert not ready2.compiled and trt2.stats["engines_loaded"] == 4  # no prefill engine needed
    for a, b in zip(got, again, strict=True):
        assert np.array_equal(a.pcm, b.pcm) and np.array_equal(a.frame, b.frame)
    for name in ("encoder", "decoder", "temporal", "depformer"):
        getattr(session, name).close()
    assert cudart.leaks() == 0


def _decoder_run(engines: Path, cuda_graphs: bool, calls: int = 9):
    backend, cudart, trt = _backend(cuda_graphs=cuda_graphs)
    net = backend.open(load_manifest(engines), "mimi_decoder")
    rng = np.random.default_rng(0)
    outs = [net.run("mimi_decoder", {"codes": rng.integers(0, 2048, (1, 8))})["pcm"] for _ in range(calls)]
    return outs, net.snapshot(), net, cudart, trt


def test_cuda_graph_replay_equals_eager_runs(sim_engines: Path) -> None:
    eager, eager_state, _, _, eager_trt = _decoder_run(sim_engines, cuda_graphs=False)
    graph, graph_state, net, cudart, trt = _decoder_run(sim_engines, cuda_graphs=True)
    for a, b in zip(eager, graph, strict=True):
        assert np.array_equal(a, b)
    for key in eager_state:
        assert np.array_equal(eager_state[key], graph_state[key]), key
    assert eager_trt.stats["enqueue"] == 9
    # Two eager warm-up calls (one per state parity), two captures, then launches only.
    assert trt.stats["enqueue"] == 4 and cudart.stats["graph_launch"] == 7
    graphs = net._engines["mimi_decoder"].graphs
    assert set(graphs) == {0, 1}
    # Each graph: offset + codes in, the engine, pcm out - no state or cache copies inside.
    assert all(len(ops) == 4 for ops in graphs.values())


def test_an_engine_that_cannot_be_captured_runs_eagerly(sim_engines: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = trt_sim.IExecutionContext.execute_async_v3

    def refuse_under_capture(self, stream_handle: int) -> bool:
        if self.engine.trt.cudart.capturing:
            return False  # as TensorRT does for an engine with uncapturable work
        return real(self, stream_handle)

    eager, *_ = _decoder_run(sim_engines, cuda_graphs=False)
    monkeypatch.setattr(trt_sim.IExecutionContext, "execute_async_v3", refuse_under_capture)
    fallback, _, net, cudart, _ = _decoder_run(sim_engines, cuda_graphs=True)
    for a, b in zip(eager, fallback, strict=True):
        assert np.array_equal(a, b)
    assert cudart.stats["graph_launch"] == 0 and not net._engines["mimi_decoder"].capturable


def test_fp16_state_engines_run_close_to_onnx_runtime(tiny_build: Path, tmp_path: Path) -> None:
    (tmp_path / "fp16.yaml").write_text(TARGET.format(mimi="fp16"))
    out = tmp_path / "fp16"
    build_engines(tiny_build, tmp_path / "fp16.yaml", out, trt=FakeTensorRT(FakeCudart()), device=DEVICE,
                  quiet=True)
    manifest = load_manifest(out)
    backend, _, _ = _backend()
    ort_net = OrtBackend().open(load_manifest(tiny_build), "mimi_decoder")
    trt_net = backend.open(manifest, "mimi_decoder")
    assert trt_net.snapshot()["dec.k.0"].dtype == np.float16
    rng = np.random.default_rng(1)
    for _ in range(6):
        codes = rng.integers(0, 2048, (1, 8))
        a = ort_net.run("mimi_decoder", {"codes": codes})["pcm"]
        b = trt_net.run("mimi_decoder", {"codes": codes})["pcm"]
        assert np.abs(a - b).max() <= 1e-2 * max(np.abs(a).max(), 1e-3)


def test_restore_checks_shapes_and_bad_inputs_are_one_line(sim_engines: Path) -> None:
    backend, _, _ = _backend()
    net = backend.open(load_manifest(sim_engines), "temporal")
    snap = net.snapshot(slots=5)
    assert snap["k.0"].shape == (1, 4, 16, 5) and snap["v.0"].shape == (1, 4, 5, 16)
    net.restore(snap)
    bad = dict(snap, **{"k.0": snap["k.0"].astype(np.float16)})
    with pytest.raises(PpxError, match=r"snapshot: temporal: k.0 has shape \(1, 4, 16, 5\) float16, the engines "
                                       r"need \(1, 4, 16, 5\) float32"):
        net.restore(bad)
    with pytest.raises(PpxError, match="snapshot: temporal: missing state v.1"):
        net.restore({k: v for k, v in snap.items() if k != "v.1"})
    with pytest.raises(PpxError, match=r"temporal_step: input tokens has shape \(1, 16\), the engine takes \(1, 17\)"):
        net.run("temporal_step", {"tokens": np.zeros((1, 16), np.int64)})
    with pytest.raises(PpxError, match=r"temporal_prefill: tokens has 65 steps; the engine takes 1..64"):
        net.run("temporal_prefill", {"tokens": np.zeros((1, 65, 17), np.int64),
                                     "embeddings": np.zeros((1, 65, 64), np.float32)})


def test_refusals_at_open(sim_engines: Path, tiny_build: Path, tmp_path: Path) -> None:
    manifest = load_manifest(sim_engines)
    with pytest.raises(PpxError, match=r"engines were built for NVIDIA Sim GPU \(SM 8.9, TensorRT 10.3.0\) but this "
                                       r"device is Orin \(SM 8.7, TensorRT 10.3.0\)"):
        TrtBackend(trt=FakeTensorRT(FakeCudart()), cudart=FakeCudart(),
                   device=DeviceInfo("Orin", "8.7", "10.3.0.30")).open(manifest, "depformer")
    with pytest.raises(PpxError, match="this is an ONNX build, not TensorRT engines"):
        _backend()[0].open(load_manifest(tiny_build), "depformer")
    # An engine file that passes the size check but is not an engine: TensorRT's own refusal.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sim_engines, broken)
    path = broken / "depformer.engine"
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(PpxError, match=r"depformer.engine: TensorRT cannot load the engine \(IRuntime::deserialize"
                                       r"CudaEngine: Error Code 1: Serialization .*\): rebuild it with"):
        _backend()[0].open(load_manifest(broken), "depformer")


def test_module_imports_without_tensorrt_or_cuda(sim_engines: Path) -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'cuda'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from personaplex_edge.runtime.backends.registry import make_backend\n"
        "from personaplex_edge.runtime.core.manifest import load_manifest\n"
        "from personaplex_edge.runtime.errors import PpxError\n"
        "backend = make_backend('tensorrt')\n"
        "try:\n"
        f"    backend.open(load_manifest({str(sim_engines)!r}), 'depformer')\n"
        "except PpxError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tensorrt is not installed: on a Jetson it comes with JetPack")


def test_engine_benchmark_runs_on_the_stand_in(sim_engines: Path, tiny_build: Path) -> None:
    bench_engines = load_bench("bench_engines")
    backend, cudart, _ = _backend()
    r = bench_engines.bench(sim_engines, 3, 1, None, True, backend=backend, device=DEVICE, cudart=cudart)
    text = bench_engines.report(r)
    assert set(r["networks"]) == {"mimi_encoder", "mimi_decoder", "temporal_step", "depformer"}
    assert r["peak_source"] == "target sim" and r["lm_step"]["p50_ms"] > 0
    assert text.splitlines()[1].split() == ["network", "precision", "p50", "ms", "p90", "ms", "GB/call", "GB/s",
                                            "of", "peak"]
    assert cudart.leaks() == 0
    p = bench_engines.parity(tiny_build, sim_engines, 3, 3, backend=backend)
    assert p["text_token_agreement"] == p["audio_token_agreement"] == p["mimi_code_agreement"] == 1.0
    assert p["text_logits_cosine_min"] > 0.99999 and p["mimi_decoder_snr_db"] == float("inf")
    assert bench_engines.parity_report(p).startswith("parity vs ONNX Runtime: 3 LM steps")
    assert cudart.leaks() == 0
