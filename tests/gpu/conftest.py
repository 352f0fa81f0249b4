"""GPU kit fixtures: real TensorRT engines of the tiny build, on this machine's GPU.

Every test here is skipped, with the reason, where there is no NVIDIA GPU
(no nvidia-smi and not a Jetson), no tensorrt or cuda-python, or TensorRT
cannot create a builder (no usable CUDA driver). `scripts/gpu_kit.sh` installs
what is missing and runs them.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from personaplex_edge.runtime.core.engine_manifest import NV_TEGRA_RELEASE, DeviceInfo


@functools.cache
def gpu_unavailable() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    if shutil.which("nvidia-smi") is None and not NV_TEGRA_RELEASE.is_file():
        return "no NVIDIA GPU here (nvidia-smi not found and not a Jetson)"
    try:
        import tensorrt as trt
    except ImportError:
        return "tensorrt is not installed (scripts/gpu_kit.sh installs it)"
    from personaplex_edge.runtime.core.engine_manifest import import_cudart

    if import_cudart(required=False) is None:
        return "cuda-python is not installed (scripts/gpu_kit.sh installs it)"
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


@pytest.fixture(scope="session")
def gpu_device() -> DeviceInfo:
    reason = gpu_unavailable()
    if reason:
        pytest.skip(f"GPU kit: {reason}")
    from personaplex_edge.runtime.core.engine_manifest import query_device

    return query_device()


def target_yaml(device: DeviceInfo, lm: str, mimi: str, prefill: int = 64) -> str:
    memory = max((device.memory_bytes or 8 << 30) / 2**30, 2.0)
    return (f"name: gpu-kit-{lm}\ngpu:\n  arch: sm{device.compute_capability.replace('.', '')}\n"
            f"  compute_capability: \"{device.compute_capability}\"\n  memory_gb: {memory:.1f}\n"
            f"  bandwidth_gbps: 100\ntensorrt: \">=10.0\"\n"
            f"precision: {{temporal: {lm}, depformer: {lm}, mimi_encoder: {mimi}, mimi_decoder: {mimi}}}\n"
            f"context: 3000\nprefill_max_steps: {prefill}\nbuilder: {{optimization_level: 2, workspace_mb: 1024}}\n"
            f"memory_budget_gb: {memory * 0.9:.1f}\n")


@pytest.fixture(scope="session")
def gpu_engines(tiny_build: Path, gpu_device: DeviceInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 engines of the tiny build (TF32 off): the parity reference against ONNX Runtime."""
    from personaplex_edge.export.engines import build_engines

    tmp = tmp_path_factory.mktemp("gpu")
    (tmp / "fp32.yaml").write_text(target_yaml(gpu_device, "fp32", "fp32"))
    return build_engines(tiny_build, tmp / "fp32.yaml", tmp / "engines-fp32", timing_cache=tmp / "timing.cache",
                         quiet=True)


@pytest.fixture(scope="session")
def gpu_engines_fp16(tiny_build: Path, gpu_device: DeviceInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP16 engines (weakly typed FP16 on TensorRT 10; skipped on TensorRT 11, which needs an fp16 export)."""
    import tensorrt as trt

    from personaplex_edge.export.engines import build_engines

    if not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip("TensorRT 11 builds strongly typed networks only: fp16 engines need an fp16 export")
    tmp = tmp_path_factory.mktemp("gpu16")
    (tmp / "fp16.yaml").write_text(target_yaml(gpu_device, "fp16", "fp16"))
    return build_engines(tiny_build, tmp / "fp16.yaml", tmp / "engines-fp16", quiet=True)
