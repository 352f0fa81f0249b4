"""Target profiles, graph precision detection, the roofline, and the engine builder's refusals.

The builder runs here on the CPU stand-in for TensorRT (tests/trt_sim.py): its
control flow, the manifest it writes and its timing cache are real; only the
engines are JSON plans executed by ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_sim import FakeCudart, FakeTensorRT

from personaplex_edge.export.config import LMConfig
from personaplex_edge.export.engines import TIMING_CACHE, build_engines
from personaplex_edge.export.onnx_precision import graph_precision
from personaplex_edge.export.roofline import format_projection, lm_params, projection_rows
from personaplex_edge.export.targets import (
    TARGETS_DIR,
    check_device,
    list_targets,
    load_target,
    parse_target,
)
from personaplex_edge.runtime.core.engine_manifest import DeviceInfo
from personaplex_edge.runtime.core.manifest import load_manifest, sha256_file
from personaplex_edge.runtime.errors import ConfigError, PpxError

SIM_DEVICE = DeviceInfo("NVIDIA Sim GPU", "8.9", "10.3.0.30")

PROFILE = """\
name: test-target
description: a test profile
gpu:
  arch: ada
  compute_capability: "8.9"
  memory_gb: 8
  bandwidth_gbps: 100
tensorrt: ">=10.3"
precision:
  temporal: {temporal}
  depformer: {depformer}
  mimi_encoder: {mimi}
  mimi_decoder: {mimi}
context: 3000
batch: 1
prefill_max_steps: 64
builder:
  optimization_level: 2
  workspace_mb: 64
memory_budget_gb: 4
"""


def profile(tmp_path: Path, temporal: str = "fp32", depformer: str = "fp32", mimi: str = "fp32") -> Path:
    path = tmp_path / "target.yaml"
    path.write_text(PROFILE.format(temporal=temporal, depformer=depformer, mimi=mimi))
    return path


def edited(tmp_path: Path, old: str, new: str, **precisions: str) -> Path:
    path = profile(tmp_path, **precisions)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


# -- profiles ---------------------------------------------------------------------------

def test_shipped_targets_follow_the_reference() -> None:
    assert set(list_targets()) >= {"agx-orin-64gb", "orin-nx-16gb", "thor", "workstation"}
    orin = load_target("agx-orin-64gb")
    assert orin.compute_capabilities == ("8.7",) and orin.bandwidth_gbps == 204.8
    assert orin.precision == {"temporal": "int8-sq", "depformer": "int8-sq", "mimi_encoder": "fp16",
                              "mimi_decoder": "fp16"}
    assert orin.tensorrt.contains("10.3.0.30") and not orin.tensorrt.contains("11.0")
    nx = load_target("orin-nx-16gb")
    assert nx.precision["temporal"] == nx.precision["depformer"] == "int4-awq" and nx.bandwidth_gbps == 102.4
    thor = load_target("thor")
    assert set(thor.compute_capabilities) == {"11.0", "10.1"} and thor.precision["temporal"] == "fp8"
    ws = load_target("workstation")
    assert set(ws.compute_capabilities) == {"8.9", "9.0"} and ws.precision["depformer"] == "fp8"
    for name in list_targets():
        t = load_target(TARGETS_DIR / f"{name}.yaml")  # by path too
        assert t.name == name and t.batch == 1 and t.context == 3000


@pytest.mark.parametrize("arch,cc,precision,why", [
    ("ampere", '"8.7"', "fp8", "fp8 needs FP8 tensor cores (Ada, Hopper, Blackwell), SM 8.9 or newer; "
                               "target test-target is SM 8.7 (ampere): use int8 or int4-awq"),
    ("ampere", '"8.7"', "nvfp4", "nvfp4 needs NVFP4 tensor cores (Blackwell), SM 10.0 or newer"),
    ("ada", '["8.9", "9.0"]', "nvfp4", "nvfp4 needs NVFP4 tensor cores (Blackwell), SM 10.0 or newer; "
                                      "target test-target is SM 8.9"),
    ("turing", '"7.5"', "int4-awq", "int4-awq needs INT4 weight-only (Ampere or newer), SM 8.0 or newer"),
])
def test_profile_asking_for_what_the_gpu_lacks_is_refused(tmp_path: Path, arch: str, cc: str, precision: str,
                                                         why: str) -> None:
    path = edited(tmp_path, 'compute_capability: "8.9"', f"compute_capability: {cc}", temporal=precision)
    path.write_text(path.read_text().replace("arch: ada", f"arch: {arch}"))
    with pytest.raises(ConfigError) as err:
        load_target(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:10: precision.temporal: {why}")
    assert "\n" not in msg


def test_nvfp4_needs_a_tensorrt_range_that_has_it(tmp_path: Path) -> None:
    path = edited(tmp_path, 'compute_capability: "8.9"', 'compute_capability: "11.0"', depformer="nvfp4")
    with pytest.raises(ConfigError, match=r"target.yaml:11: precision.depformer: nvfp4 needs TensorRT >= 10.8, "
                                          r"but tensorrt '>=10.3' allows older versions: raise it to '>=10.8'"):
        load_target(path)
    path.write_text(path.read_text().replace('">=10.3"', '">=10.8, <12"'))
    assert load_target(path).precision["depformer"] == "nvfp4"


@pytest.mark.parametrize("old,new,message", [
    ("batch: 1", "batch: 2", ":15: batch: 2: the streaming graphs run one conversation (batch 1)"),
    ("prefill_max_steps: 64", "prefill_max_steps: 4000", ":16: prefill_max_steps: 4000 is more than the context"),
    ("memory_budget_gb: 4", "memory_budget_gb: 9", ":20: memory_budget_gb: 9 GB is more than the GPU's memory"),
    ('compute_capability: "8.9"', "compute_capability: ampere", ":5: gpu.compute_capability: 'ampere' is not a "
                                                                 "compute capability"),
    ('tensorrt: ">=10.3"', 'tensorrt: "10.3+"', ":8: tensorrt: '10.3+' is not a version range"),
    ('tensorrt: ">=10.3"', 'tensorrt: "<11"', ":8: tensorrt: '<11' allows TensorRT before 10"),
    ("  temporal: fp32", "  temporal: int3", ":10: precision.temporal: 'int3' is not one of fp32, fp16"),
    ("  optimization_level: 2", "  optimization_level: 6", ":18: builder.optimization_level: 6 is outside 0..5"),
    ("context: 3000", "contxt: 3000", ":14: contxt: unknown field"),
    ("memory_budget_gb: 4\n", "", ":1: memory_budget_gb: required field is missing"),
])
def test_profile_errors_name_file_line_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = edited(tmp_path, old, new)
    with pytest.raises(ConfigError) as err:
        load_target(path)
    assert str(err.value).startswith(f"{path}{message}"), str(err.value)


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_target("jetson-nano")
    msg = str(err.value)
    assert msg.startswith("--target: no target named 'jetson-nano' (targets in ")
    assert "agx-orin-64gb, orin-nx-16gb, thor, workstation" in msg


def test_version_ranges() -> None:
    t = parse_target(Path("x.yaml"), PROFILE.format(temporal="fp16", depformer="fp16", mimi="fp16")
                     .replace('">=10.3"', '">=10.3, <10.8"'))
    assert t.tensorrt.contains("10.3.0.30") and t.tensorrt.contains("10.7.0.post1")
    assert not t.tensorrt.contains("10.8.0.43") and not t.tensorrt.contains("10.2.0")
    assert t.tensorrt.lowest == (10, 3)


def test_device_check_refuses_another_gpu_or_tensorrt() -> None:
    orin = load_target("agx-orin-64gb")
    check_device(orin, "8.7", "Orin", "10.3.0.30")
    with pytest.raises(PpxError, match=r"target agx-orin-64gb is for SM 8.7 \(ampere\), this GPU is NVIDIA H100 "
                                       r"80GB HBM3 \(SM 9.0\): pick the target for this device \(targets: "):
        check_device(orin, "9.0", "NVIDIA H100 80GB HBM3", "10.3.0.30")
    with pytest.raises(PpxError, match=r"target agx-orin-64gb needs TensorRT >=10.3, <11, this is TensorRT 11.1.0"):
        check_device(orin, "8.7", "Orin", "11.1.0")
    check_device(load_target("thor"), "10.1", "NVIDIA Thor", "10.13.0")  # Thor under CUDA 12


# -- graph precision ----------------------------------------------------------------------

def _linear_graph(path: Path, weight_type: int | None, float_type: int = TensorProto.FLOAT,
                  activation_q: bool = False) -> Path:
    """x @ W, with W stored as `weight_type` behind a DequantizeLinear (None: plain float)."""
    nodes, inits = [], []
    np_float = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[float_type]
    x = "x"
    if activation_q:
        inits += [numpy_helper.from_array(np.array(0.1, np_float), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
        x = "xd"
    if weight_type is None:
        inits.append(numpy_helper.from_array(np.ones((64, 64), np_float), "w"))
        w = "w"
    else:
        inits.append(helper.make_tensor("wq", weight_type, [64, 64], [1] * 4096))
        inits.append(numpy_helper.from_array(np.array(0.01, np_float), "ws"))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"]))
        w = "wd"
    inits.append(numpy_helper.from_array(np.ones(64, np_float), "norm"))
    nodes.append(helper.make_node("MatMul", [x, w], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", float_type, [1, 64])],
                              [helper.make_tensor_value_info("y", float_type, [1, 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


@pytest.mark.parametrize("weight_type,float_type,activation_q,expect", [
    (None, TensorProto.FLOAT, False, ("fp32", None)),
    (None, TensorProto.FLOAT16, False, ("fp16", None)),
    (TensorProto.INT8, TensorProto.FLOAT16, False, ("fp16", "int8")),
    (TensorProto.INT8, TensorProto.FLOAT, True, ("fp32", "int8-sq")),
    (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT16, True, ("fp16", "fp8")),
    (TensorProto.INT4, TensorProto.FLOAT16, False, ("fp16", "int4-awq")),
])
def test_graph_precision(tmp_path: Path, weight_type, float_type, activation_q, expect) -> None:
    gp = graph_precision(_linear_graph(tmp_path / "g.onnx", weight_type, float_type, activation_q))
    assert (gp.float_dtype, gp.quant) == expect


def test_graph_precision_of_a_corrupt_graph(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(PpxError, match="bad.onnx: not a readable ONNX graph"):
        graph_precision(bad)


# -- roofline -----------------------------------------------------------------------------

def test_roofline_of_the_7b() -> None:
    lm = LMConfig()
    p = lm_params(lm, 16)
    # ~6.7 B temporal + ~1.33 B for all 16 depth steps: the reference's ~8 B per frame.
    assert 6.6e9 < p.temporal_read < 6.8e9 and 1.30e9 < p.depformer_read < 1.36e9
    assert p.kv_elements == 32 * 2 * 4096 * 3000
    rows = {r["target"]: r for r in projection_rows(lm, [load_target(n) for n in list_targets()], 16)}
    orin, nx = rows["agx-orin-64gb"], rows["orin-nx-16gb"]
    assert orin["weights_ms"] == pytest.approx((p.temporal_read + p.depformer_read) / 204.8e9 * 1e3)
    assert 39 < orin["weights_ms"] < 40  # the reference: INT8 ~8.3 GB/frame -> >= 40 ms
    assert 20 < nx["weights_ms"] < 23 * 2  # INT4: about half the bytes at half the bandwidth
    text = format_projection(list(rows.values()), 16)
    assert text.splitlines()[0].split()[:3] == ["target", "GB/s", "temporal"]


# -- the engine builder ----------------------------------------------------------------

@pytest.fixture
def sim() -> tuple[FakeCudart, FakeTensorRT]:
    cudart = FakeCudart()
    return cudart, FakeTensorRT(cudart)


def test_refuses_a_target_the_build_does_not_carry_before_any_work(tiny_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    with pytest.raises(PpxError) as err:
        build_engines(tiny_build, profile(tmp_path, temporal="int8"), out)  # no tensorrt needed to refuse
    msg = str(err.value)
    assert msg.startswith("target test-target: temporal_step (") and "temporal_step.onnx) is unquantized fp32, " \
        "the target wants int8: run `ppx-export quantize --precision int8` on the build first" in msg
    assert not out.exists()


def test_refuses_context_and_memory_budget_mismatches(tiny_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    with pytest.raises(PpxError, match=r"target test-target: context 2000, but .* hold a 3000-step cache"):
        build_engines(tiny_build, edited(tmp_path, "context: 3000", "context: 2000"), out)
    # fp32 KV cache of the tiny model: 2 layers x 2 x 64 x 3000 x 4 bytes, + a 1 GB workspace
    tight = edited(tmp_path, "memory_budget_gb: 4", "memory_budget_gb: 0.5")
    tight.write_text(tight.read_text().replace("workspace_mb: 64", "workspace_mb: 1024"))
    with pytest.raises(PpxError, match=r"the engines need ~1\.1 GB at persona compile .* more than "
                                       r"memory_budget_gb 0\.5: quantize further or raise the budget"):
        build_engines(tiny_build, tight, out)
    assert not out.exists()


def test_no_gpu_fails_at_once_with_one_line(tiny_build: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver, but no usable GPU (tests/test_cuda_versions.py: no driver, another CUDA major)."""
    from personaplex_edge.runtime.backends.tensorrt import cuda_versions

    monkeypatch.setattr(cuda_versions, "driver_version", lambda: 12090)
    monkeypatch.setattr(cuda_versions, "tensorrt_cuda_majors", lambda: {12})
    cudart = FakeCudart()
    with pytest.raises(PpxError) as err:
        build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=FakeTensorRT(cudart, no_gpu=True),
                      device=SIM_DEVICE)
    assert str(err.value) == ("no CUDA GPU: engines must be built on the target device (createInferBuilder: "
                              "CUDA initialization failure with error: 35. Please check your CUDA installation)")
    assert not (tmp_path / "engines").exists()


def test_no_tensorrt_is_one_line(tiny_build: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(PpxError, match=r"^tensorrt is not installed: on a Jetson it comes with JetPack"):
            build_engines(tiny_build, profile(tmp_path), tmp_path / "engines")
    else:
        pytest.skip("tensorrt is installed here")


def test_wrong_device_for_the_target_is_refused(tiny_build: Path, tmp_path: Path, sim) -> None:
    with pytest.raises(PpxError, match=r"target test-target is for SM 8.9 \(ada\), this GPU is Orin \(SM 8.7\)"):
        build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=sim[1],
                      device=DeviceInfo("Orin", "8.7", "10.3.0.30"))


def test_builds_every_graph_with_a_manifest_and_a_reused_timing_cache(tiny_build: Path, tmp_path: Path,
                                                                      sim) -> None:
    cudart, trt = sim
    out = tmp_path / "engines"
    build_engines(tiny_build, profile(tmp_path), out, trt=trt, device=SIM_DEVICE, quiet=True)
    manifest = load_manifest(out)
    manifest.verify_files()
    data = manifest.data
    assert data["producer"] == "ppx-export engines"
    assert sorted(data["graphs"]) == sorted(load_manifest(tiny_build).graphs)
    assert data["graphs"]["temporal_prefill"]["meta"]["max_steps"] == 64
    assert data["graphs"]["temporal_step"]["file"] == "temporal_step.engine"
    eng = data["engines"]
    assert eng["tensorrt"] == "10.3.0.30" and eng["device"]["compute_capability"] == "8.9"
    assert eng["target"]["name"] == "test-target" and eng["precision"]["temporal"] == "fp32"
    assert eng["source_build"]["manifest_sha256"] == sha256_file(tiny_build / "manifest.json")
    step = eng["networks"]["temporal_step"]
    assert step["strongly_typed"] and step["flags"] == [] and step["bytes"] > 0
    plan = json.loads((out / "temporal_step.engine").read_text())
    assert "TF32" not in plan["flags"] and plan["level"] == 2 and plan["workspace"] == 64 << 20
    prefill = json.loads((out / "temporal_prefill.engine").read_text())
    tokens = next(t for t in prefill["io"] if t["name"] == "tokens")
    assert tokens["shape"] == [1, -1, 17] and tokens["profile"] == [[1, 1, 17], [1, 64, 17], [1, 64, 17]]
    assert {"tokenizer.model", "voices/NATF2.wav"} <= set(manifest.files)
    assert (out / TIMING_CACHE).is_file() and TIMING_CACHE not in manifest.files
    assert trt.stats["timing_cache_hits"] == 0
    # A rebuild in the same place starts from the kept timing cache.
    build_engines(tiny_build, profile(tmp_path), out, trt=trt, device=SIM_DEVICE, quiet=True, force=True)
    assert trt.stats["timing_cache_hits"] == 5
    with pytest.raises(PpxError, match="directory exists and is not empty"):
        build_engines(tiny_build, profile(tmp_path), out, trt=trt, device=SIM_DEVICE, quiet=True)


def test_timing_cache_from_another_device_starts_afresh(tiny_build: Path, tmp_path: Path, sim,
                                                       capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "shared.cache"
    cache.write_text(json.dumps({"device": "other", "entries": {}}))
    build_engines(tiny_build, profile(tmp_path), tmp_path / "e", trt=sim[1], device=SIM_DEVICE, quiet=True,
                  timing_cache=cache)
    assert "timing cache is from another device or TensorRT; starting afresh" in capsys.readouterr().err
    assert json.loads(cache.read_text())["entries"]  # written back for the next build


def test_fp16_target_on_an_fp32_build(tiny_build: Path, tmp_path: Path) -> None:
    """TensorRT 10: a weakly typed network with the FP16 flag, caches and conv state as FP16 I/O.
    TensorRT 11 has strongly typed networks only: the build must be exported in fp16."""
    cudart = FakeCudart()
    out = tmp_path / "engines"
    build_engines(tiny_build, profile(tmp_path, mimi="fp16"), out, trt=FakeTensorRT(cudart), device=SIM_DEVICE,
                  quiet=True)
    enc = load_manifest(out).graph("mimi_encoder")
    dtypes = {t.name: t.dtype for t in (*enc.inputs, *enc.outputs)}
    assert dtypes["enc.k.0"] == dtypes["enc.new_k.0"] == "float16"
    assert dtypes["enc.conv0.state"] == dtypes["enc.conv0.state_next"] == "float16"
    assert dtypes["pcm"] == "float32" and dtypes["enc.down.first"] == "bool"
    record = load_manifest(out).data["engines"]["networks"]["mimi_encoder"]
    assert record["flags"] == ["FP16"] and not record["strongly_typed"]
    trt11 = FakeTensorRT(cudart, version="11.1.0", strongly_typed_only=True)
    with pytest.raises(PpxError, match=r"mimi_encoder .* is fp32 and this TensorRT builds strongly typed networks "
                                       r"only: export with `ppx-export onnx --dtype fp16` for a fp16 target"):
        build_engines(tiny_build, profile(tmp_path, mimi="fp16"), tmp_path / "e11", trt=trt11,
                      device=DeviceInfo("NVIDIA Sim GPU", "8.9", "11.1.0"))


def test_an_engines_build_is_not_a_source(tiny_build: Path, tmp_path: Path, sim) -> None:
    out = tmp_path / "engines"
    build_engines(tiny_build, profile(tmp_path), out, trt=sim[1], device=SIM_DEVICE, quiet=True)
    with pytest.raises(PpxError, match="already TensorRT engines; --build takes an ONNX build"):
        build_engines(out, profile(tmp_path), tmp_path / "again", trt=sim[1], device=SIM_DEVICE)


def test_projection_prints_without_a_gpu() -> None:
    import subprocess
    import sys

    bench = Path(__file__).parents[1] / "bench" / "bench_engines.py"
    proc = subprocess.run([sys.executable, str(bench), "--project"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Roofline projection, PersonaPlex-7B LM step (no GPU: computed, not measured")
    chosen = {line.split()[0] for line in lines if line.split() and line.split()[0].endswith("*")}
    assert chosen == {"agx-orin-64gb*", "orin-nx-16gb*", "thor*", "workstation*"}
    orin_fp8 = [line for line in lines if line.startswith("agx-orin-64gb ") and " fp8 " in line]
    assert not orin_fp8  # Orin has no FP8: not even a what-if row


def test_projection_prints_each_targets_frame_target() -> None:
    """docs/quantization.md's projection table has a target column: the bench prints it from the profiles."""
    import subprocess
    import sys

    bench = Path(__file__).parents[1] / "bench" / "bench_engines.py"
    proc = subprocess.run([sys.executable, str(bench), "--project"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].endswith(" LM target")
    last = {line.split()[0]: line.split()[-1] for line in lines[2:] if line.split()}
    assert (last["agx-orin-64gb*"], last["orin-nx-16gb*"], last["thor*"]) == ("48", "64", "80")
    assert "LM target: the LM frame time in ms each profile aims for" in proc.stdout


def test_frame_target_is_optional_and_within_a_frame(tmp_path: Path) -> None:
    assert load_target(profile(tmp_path)).frame_target_ms == 80.0  # default: real time
    with pytest.raises(ConfigError, match=r":\d+: frame_target_ms: 90 is outside 1\.0\.\.80\.0"):
        parse_target(tmp_path / "t.yaml", (tmp_path / "target.yaml").read_text() + "frame_target_ms: 90\n")
