"""GPU kit fixtures: real TensorRT engines of the tiny build, on this machine's GPU.

Every test here is skipped, with the reason, where there is no NVIDIA GPU
(no nvidia-smi and not a Jetson), no tensorrt or no usable cuda-python (none, no
libcuda, or a CUDA runtime newer than the driver), or TensorRT cannot create a
builder (no usable CUDA driver). `scripts/gpu_kit.sh` installs what is missing
and runs them.

Under the kit (PPX_GPU_KIT_OUT=its output folder) the tiny builds and both
engine sets are the ones the kit has just made, so nothing is exported or built
twice; run alone, the fixtures make their own, sharing one timing cache.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

from personaplex_edge.runtime.backends.tensorrt.device import NV_TEGRA_RELEASE, query_device
from personaplex_edge.runtime.core.engine_manifest import DeviceInfo
from personaplex_edge.runtime.errors import PpxError

KIT_OUT = "PPX_GPU_KIT_OUT"


@functools.cache
def gpu_unavailable() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    if shutil.which("nvidia-smi") is None and not NV_TEGRA_RELEASE.is_file():
        return "no NVIDIA GPU here (nvidia-smi not found and not a Jetson)"
    try:
        import tensorrt as trt
    except ImportError:
        return "tensorrt is not installed (scripts/gpu_kit.sh installs it)"
    from personaplex_edge.runtime.backends.tensorrt.cuda_versions import import_cudart

    try:
        import_cudart()
    except PpxError as exc:  # not installed, no libcuda, or newer than the driver: one line
        return str(exc)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # no usable driver: CUDA initialization failure (error 35)
        return f"TensorRT cannot create a builder ({type(exc).__name__}: {exc})"
    if builder is None:
        return "TensorRT cannot create a builder"
    return None


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    reason = gpu_unavailable()
    if reason:
        pytest.skip(f"GPU kit: {reason}")


def kit_made(name: str) -> Path | None:
    """A build or engines directory the GPU kit made under PPX_GPU_KIT_OUT, else None."""
    root = os.environ.get(KIT_OUT)
    path = Path(root) / name if root else None
    return path if path is not None and (path / "manifest.json").is_file() else None


@pytest.fixture(scope="session")
def gpu_device() -> DeviceInfo:
    reason = gpu_unavailable()
    if reason:
        pytest.skip(f"GPU kit: {reason}")
    return query_device()


def _export(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory, dtype: str) -> Path:
    from personaplex_edge.export.export_onnx import ExportOptions, export_onnx

    out = tmp.mktemp("build") / f"tiny-{dtype}"
    export_onnx(request.getfixturevalue("tiny_checkpoint"), out, ExportOptions(dtype=dtype, prefill_steps=64),
                quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 build (tests/conftest.py's), or the kit's identical one."""
    return kit_made("tiny-build") or _export(request, tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def tiny_build_fp16(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint exported in fp16: strongly typed FP16 engines on TensorRT 10 and 11."""
    return kit_made("tiny-build-fp16") or _export(request, tmp_path_factory, "fp16")


@pytest.fixture(scope="session")
def timing_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TensorRT timing cache for every engine built in the session (the kit's, under it)."""
    root = os.environ.get(KIT_OUT)
    return Path(root) / "timing.cache" if root else tmp_path_factory.mktemp("trt-cache") / "timing.cache"


def target_yaml(device: DeviceInfo, lm: str, mimi: str, prefill: int = 64) -> str:
    memory = max((device.memory_bytes or 8 << 30) / 2**30, 2.0)
    return (f"name: gpu-kit-{lm}\ngpu:\n  arch: sm{device.compute_capability.replace('.', '')}\n"
            f"  compute_capability: \"{device.compute_capability}\"\n  memory_gb: {memory:.1f}\n"
            f"  bandwidth_gbps: 100\ntensorrt: \">=10.0\"\n"
            f"precision: {{temporal: {lm}, depformer: {lm}, mimi_encoder: {mimi}, mimi_decoder: {mimi}}}\n"
            f"context: 3000\nprefill_max_steps: {prefill}\nbuilder: {{optimization_level: 2, workspace_mb: 1024}}\n"
            f"memory_budget_gb: {memory * 0.9:.1f}\n")


def _engines(build: Path, device: DeviceInfo, precision: str, tmp: pytest.TempPathFactory,
             cache: Path) -> Path:
    from personaplex_edge.export.engines import build_engines

    out = tmp.mktemp(f"gpu-{precision}")
    (out / "target.yaml").write_text(target_yaml(device, precision, precision))
    return build_engines(build, out / "target.yaml", out / "engines", timing_cache=cache, quiet=True)


@pytest.fixture(scope="session")
def gpu_engines(tiny_build: Path, gpu_device: DeviceInfo, tmp_path_factory: pytest.TempPathFactory,
                timing_cache: Path) -> Path:
    """FP32 engines of the tiny build (TF32 off): the parity reference against ONNX Runtime."""
    return kit_made("tiny-engines-fp32") or _engines(tiny_build, gpu_device, "fp32", tmp_path_factory,
                                                      timing_cache)


@pytest.fixture(scope="session")
def gpu_engines_fp16(tiny_build_fp16: Path, gpu_device: DeviceInfo, tmp_path_factory: pytest.TempPathFactory,
                     timing_cache: Path) -> Path:
    """Strongly typed FP16 engines of the fp16 export (the kit's benchmark engines)."""
    return kit_made("tiny-engines-fp16") or _engines(tiny_build_fp16, gpu_device, "fp16", tmp_path_factory,
                                                      timing_cache)
