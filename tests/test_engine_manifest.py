"""The engines manifest and the device-side refusal: round trip, device and TensorRT mismatches,
tampered files, and the facts read from a Jetson (L4T release, board)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trt_sim import FakeCudart, FakeTensorRT

from personaplex_edge.export.engines import build_engines
from personaplex_edge.runtime.backends.tensorrt import device as trt_device
from personaplex_edge.runtime.backends.tensorrt.device import parse_nv_tegra_release
from personaplex_edge.runtime.core.engine_manifest import (
    DeviceInfo,
    check_engines,
    engine_manifest,
    ensure_compatible,
    trt_release,
)
from personaplex_edge.runtime.core.manifest import load_manifest, write_manifest
from personaplex_edge.runtime.errors import PpxError

ORIN = DeviceInfo("Orin", "8.7", "10.3.0.30", "NVIDIA Jetson AGX Orin Developer Kit", "36.4.0", 64 << 30)

TARGET = """\
name: orin-sim
gpu: {arch: ampere, compute_capability: "8.7", memory_gb: 64, bandwidth_gbps: 204.8}
tensorrt: ">=10.3, <11"
precision: {temporal: fp32, depformer: fp32, mimi_encoder: fp32, mimi_decoder: fp32}
context: 3000
prefill_max_steps: 32
memory_budget_gb: 8
"""


@pytest.fixture(scope="module")
def engines_dir(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("engines")
    (tmp / "orin.yaml").write_text(TARGET)
    out = tmp / "orin-engines"
    build_engines(tiny_build, tmp / "orin.yaml", out, trt=FakeTensorRT(FakeCudart()), device=ORIN, quiet=True)
    return out


@pytest.fixture
def engines_copy(engines_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(engines_dir, out)
    return out


def test_round_trip(engines_dir: Path, tiny_build: Path) -> None:
    e = engine_manifest(engines_dir)
    assert e.built_on == ORIN
    assert e.target == "orin-sim" and e.precision["temporal"] == "fp32"
    assert set(e.engines) == set(load_manifest(tiny_build).graphs)
    step = e.engines["temporal_step"]
    assert step.file == "temporal_step.engine" and step.bytes == (engines_dir / step.file).stat().st_size
    names = {io["name"]: io for io in step.io}
    assert names["tokens"]["mode"] == "input" and names["tokens"]["dtype"] == "int64"
    assert names["new_k.0"]["shape"] == [1, 4, 16, 1]
    prefill = {io["name"]: io for io in e.engines["temporal_prefill"].io}
    assert prefill["tokens"]["shape"] == [1, -1, 17] and prefill["tokens"]["max_steps"] == 32
    data = e.manifest.data["engines"]
    assert data["device"]["jetpack"] == "6" and data["device"]["l4t"] == "36.4.0"
    assert DeviceInfo.from_dict(data["device"]) == ORIN
    assert check_engines(engines_dir, device=ORIN) == []
    assert check_engines(load_manifest(engines_dir), device=ORIN) == []


@pytest.mark.parametrize("device,differs", [
    (DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", "10.3.0.30"), "compute capability differs"),
    (DeviceInfo("Orin", "8.7", "10.7.0.23", "NVIDIA Jetson AGX Orin Developer Kit"), "TensorRT version differs"),
    (DeviceInfo("Orin", "8.7", "10.3.0.30", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
     "board differs"),
    (DeviceInfo("NVIDIA Thor", "11.0", "10.13.0"), "TensorRT version and compute capability differ"),
])
def test_device_mismatch_is_one_clear_line(engines_dir: Path, device: DeviceInfo, differs: str) -> None:
    problems = check_engines(engines_dir, device=device)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0] == (f"{engines_dir}: engines were built for NVIDIA Jetson AGX Orin Developer Kit (SM 8.7, "
                           f"TensorRT 10.3.0) but this device is {device.describe()} ({differs}): rebuild with "
                           "`ppx-export engines` on this device")
    with pytest.raises(PpxError, match="engines were built for"):
        ensure_compatible(engine_manifest(engines_dir), device)


def test_patch_release_and_build_number(engines_dir: Path) -> None:
    """major.minor.patch must match; the packaging build number may differ."""
    assert check_engines(engines_dir, device=DeviceInfo("Orin", "8.7", "10.3.0.26", ORIN.board)) == []
    assert trt_release("10.3.0.30") == "10.3.0" and trt_release("10.7.0.post1") == "10.7.0"
    assert trt_release("11") == "11.0.0"


def test_gpu_names_compare_only_when_found_the_same_way(engines_dir: Path) -> None:
    tree = DeviceInfo("Orin (nvgpu)", "8.7", "10.3.0.30", ORIN.board, source="device-tree")
    assert check_engines(engines_dir, device=tree) == []
    other = DeviceInfo("Orin (nvgpu)", "8.7", "10.3.0.30", ORIN.board, source="cuda")
    assert "GPU model differs" in check_engines(engines_dir, device=other)[0]


def test_no_tensorrt_here(engines_dir: Path) -> None:
    problems = check_engines(engines_dir, device=DeviceInfo("Orin", "8.7", None, ORIN.board))
    assert problems == [f"{engines_dir}: TensorRT is not installed here; these engines need TensorRT 10.3.0 "
                        "(on a Jetson it comes with JetPack)"]


def test_tampered_engine_file(engines_copy: Path) -> None:
    path = engines_copy / "depformer.engine"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert check_engines(engines_copy, device=ORIN) == [
        f"{path}: sha256 differs from the manifest (modified or corrupt): re-export or copy the build again"]
    assert check_engines(engines_copy, device=ORIN, hash_files=False) == []  # start-up checks sizes only
    path.write_bytes(bytes(data[:-5]))
    problems = check_engines(engines_copy, device=ORIN)
    assert problems == [f"{path}: {len(data) - 5} bytes, the manifest says {len(data)} (truncated or replaced)"]
    with pytest.raises(PpxError, match="truncated or replaced"):
        ensure_compatible(engine_manifest(engines_copy), ORIN)
    path.unlink()
    assert check_engines(engines_copy, device=ORIN) == [f"{path}: engine listed in the manifest but missing"]


def test_tampered_manifest(engines_copy: Path) -> None:
    path = engines_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["engines"]["device"]["compute_capability"] = "8.9"
    write_manifest(path.parent, data)  # a well-formed manifest with these values
    assert "(compute capability differs)" in check_engines(engines_copy, device=ORIN)[0]
    data["engines"]["format_version"] = 99
    write_manifest(path.parent, data)  # a well-formed manifest with these values
    assert check_engines(engines_copy, device=ORIN) == [
        f"{path}: engines.format_version: 99, this runtime reads 1; rebuild the engines"]
    data["engines"]["format_version"] = 1
    del data["engines"]["device"]
    write_manifest(path.parent, data)  # a well-formed manifest with these values
    assert check_engines(engines_copy, device=ORIN)[0].startswith(
        f"{path}: engines: malformed section (KeyError: 'device')")
    path.write_text("{not json")
    assert check_engines(engines_copy, device=ORIN)[0].startswith(f"{path}: line 1: invalid JSON")


def test_an_onnx_build_is_not_engines(tiny_build: Path) -> None:
    problems = check_engines(tiny_build, device=ORIN)
    assert problems == [f"{tiny_build / 'manifest.json'}: this is an ONNX build, not TensorRT engines: build "
                        f"them on the device with `ppx-export engines --build {tiny_build} --target NAME --out DIR`"]


def test_device_query_failure_is_a_problem_line(engines_dir: Path) -> None:
    message = "no CUDA GPU found (no cuda-python device, no nvidia-smi, not a Jetson)"

    def no_gpu() -> DeviceInfo:
        raise PpxError(message)

    assert check_engines(engines_dir, query=no_gpu) == [message]


def test_jetson_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_nv_tegra_release("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
                                  "DATE: Fri Sep 13 04:36:44 UTC 2024\n") == "36.4.0"
    assert parse_nv_tegra_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic") == "36.4.3"
    assert parse_nv_tegra_release("# R38 (release), REVISION: 2.1, GCID: 1") == "38.2.1"
    assert parse_nv_tegra_release("garbage") is None
    assert DeviceInfo("x", "8.7", l4t="35.5.0").jetpack == "5"
    assert DeviceInfo("x", "11.0", l4t="38.2.1").jetpack == "7"
    # A Jetson without cuda-python: the device tree names the GPU.
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    monkeypatch.setattr(trt_device, "DEVICE_TREE_MODEL", model)
    monkeypatch.setattr(trt_device, "NV_TEGRA_RELEASE", release)
    monkeypatch.setattr(trt_device, "_cuda_properties", lambda: None)
    monkeypatch.setattr(trt_device, "_nvidia_smi", lambda: None)
    dev = trt_device.query_device(tensorrt_version="10.3.0.30")
    assert dev == DeviceInfo("Orin", "8.7", "10.3.0.30", "NVIDIA Jetson AGX Orin Developer Kit", "36.4.0", 0,
                             "device-tree")


def test_no_gpu_anywhere_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trt_device, "DEVICE_TREE_MODEL", tmp_path / "absent")
    monkeypatch.setattr(trt_device, "_cuda_properties", lambda: None)
    monkeypatch.setattr(trt_device, "_nvidia_smi", lambda: None)
    with pytest.raises(PpxError, match=r"^no CUDA GPU found \(no cuda-python device, no nvidia-smi, not a "
                                       r"Jetson\): TensorRT engines run only on the GPU they were built on$"):
        trt_device.query_device()
