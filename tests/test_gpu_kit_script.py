"""scripts/gpu_kit.sh before it installs anything, on CPU: a fake nvidia-smi stands in for the
driver, local HTTP servers for the package indexes. Every refusal (no GPU, a driver of another
CUDA major, NVIDIA's index out of reach, a wheel folder without TensorRT) is one line, and
nothing is created. `make gpu-kit` runs the kit without the test stamp (no ALSA)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UNREACHABLE = "http://127.0.0.1:9/simple"  # the discard port: connection refused


@pytest.fixture(scope="module")
def index_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An index that answers (404 for every project: reachable is all the kit asks)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def kit(tmp_path: Path, *args: str, cuda: str | None = "12.4", **env: str) -> subprocess.CompletedProcess:
    """The kit from a copy of scripts/ (so its .venv would land in tmp_path), with a fake
    nvidia-smi reporting `cuda` (None: no nvidia-smi at all)."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "gpu_kit.sh", tmp_path / "scripts" / "gpu_kit.sh")
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    path = os.environ["PATH"]
    if cuda is not None:
        (fake / "nvidia-smi").write_text(
            "#!/bin/sh\ncase \"$1\" in\n  --query-gpu=*) echo 'NVIDIA Fake GPU, 8.9, 24564 MiB, 550.54.15';;\n"
            f"  *) echo '| NVIDIA-SMI 550.54.15  Driver Version: 550.54.15  CUDA Version: {cuda}  |';;\nesac\n")
        (fake / "nvidia-smi").chmod(0o755)
    else:
        path = ":".join(p for p in path.split(":") if not (Path(p) / "nvidia-smi").exists())
    full_env = {**os.environ, "PATH": f"{fake}:{path}", "PPX_KIT_OUT": str(tmp_path / "out"), **env}
    for key in ("PPX_KIT_WHEELS", "PPX_KIT_TENSORRT"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_kit.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)


def refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stdout, proc.stderr
    return lines[0]


def nothing_created(tmp_path: Path) -> bool:
    return not (tmp_path / ".venv").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="a Jetson has its GPU")
def test_no_gpu(tmp_path: Path) -> None:
    assert refusal(kit(tmp_path, cuda=None)) == ("gpu_kit: no NVIDIA GPU here (no nvidia-smi, not a Jetson): "
                                                 "the GPU kit needs one")


def test_nvidia_index_out_of_reach(tmp_path: Path, index_url: str) -> None:
    """PyPI's tensorrt-cu12 is a stub that fetches the real wheels from NVIDIA's index."""
    line = refusal(kit(tmp_path, PPX_KIT_TORCH_INDEX=index_url, PPX_KIT_NVIDIA_INDEX=UNREACHABLE))
    assert line.startswith(f"gpu_kit: NVIDIA's package index {UNREACHABLE} is not reachable (")
    assert line.endswith("and PyPI's tensorrt-cu12 only fetches its wheels from there: set PPX_KIT_TENSORRT=DIR "
                         "to a wheel folder (scripts/gpu_kit.sh --fetch-wheels DIR --extra tensorrt-cu12 on a "
                         "connected machine), or on a Jetson use JetPack's TensorRT")
    assert nothing_created(tmp_path)


def test_no_torch_index_points_at_a_wheel_folder(tmp_path: Path) -> None:
    line = refusal(kit(tmp_path, PPX_KIT_TORCH_INDEX=UNREACHABLE))
    assert line.startswith(f"gpu_kit: PyTorch's CPU wheel index {UNREACHABLE} is not reachable (")
    assert line.endswith("on a machine without an index set PPX_KIT_WHEELS=DIR (scripts/gpu_kit.sh "
                         "--fetch-wheels DIR --extra tensorrt-cu12 on a connected machine)")
    assert nothing_created(tmp_path)


def test_wheel_folders(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    assert refusal(kit(tmp_path, "--check", PPX_KIT_WHEELS=str(tmp_path / "absent"))).startswith(
        f"gpu_kit: PPX_KIT_WHEELS={tmp_path / 'absent'} is not a folder")
    assert refusal(kit(tmp_path, cuda="13.0", PPX_KIT_WHEELS=str(wheels))) == (
        f"gpu_kit: {wheels} holds no tensorrt_cu13_libs wheel for this CUDA 13.0 driver: fill it with "
        "scripts/gpu_kit.sh --fetch-wheels DIR --extra tensorrt-cu13 on a connected machine")
    (wheels / "tensorrt_cu13_libs-10.16.1.11-py2.py3-none-manylinux_2_28_x86_64.whl").touch()
    proc = kit(tmp_path, "--check", cuda="13.0", PPX_KIT_WHEELS=str(wheels))
    assert proc.returncode == 0, proc.stderr
    assert "CUDA 13.0 driver: pip extra tensorrt-cu13" in proc.stdout
    assert proc.stdout.splitlines()[-1] == ("gpu_kit: ready (CUDA 13.0 driver, extra tensorrt-cu13): nothing "
                                            "installed or built (--check)")
    assert nothing_created(tmp_path)


def test_a_cuda_11_driver_is_refused(tmp_path: Path) -> None:
    assert refusal(kit(tmp_path, "--check", cuda="11.8")) == (
        "gpu_kit: the driver supports CUDA 11.8, and TensorRT 10 and cuda-python here need CUDA 12 or 13: "
        "update the driver to 525 or newer")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_kit_runs_the_kit_without_the_test_stamp(tmp_path: Path) -> None:
    """No device extra (pyalsaaudio needs gcc and ALSA headers), no system packages: the kit
    makes its own venv."""
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), "gpu-kit", "VENV=" + str(tmp_path / "venv")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if not line.startswith("make")] == [
        "PPX_KIT_FULL= scripts/gpu_kit.sh"]
