"""The CUDA driver against cuda-python and TensorRT, on CPU through the stand-in (tests/trt_sim.py):
every mismatch - bindings newer than the driver, TensorRT of another CUDA major, no libcuda
(old cuda-python's RuntimeError included), trt.Runtime's TypeError, a Q/DQ graph of an fp32
export - is one line naming both sides and the fix, with no half-built engines left behind.
The pyproject extras pin one CUDA major each (checked offline)."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
from onnx import TensorProto
from packaging.requirements import Requirement
from packaging.version import Version
from test_targets import SIM_DEVICE, _linear_graph, profile
from trt_sim import FakeCudart, FakeTensorRT

from personaplex_edge.export.engine_plan import typing_mode as _typing_mode
from personaplex_edge.export.engines import build_engines
from personaplex_edge.export.onnx_precision import GraphPrecision
from personaplex_edge.export.targets import load_target
from personaplex_edge.runtime.backends.tensorrt import TrtBackend, kit
from personaplex_edge.runtime.backends.tensorrt import cuda_versions as cv
from personaplex_edge.runtime.backends.tensorrt import device as dev
from personaplex_edge.runtime.backends.tensorrt.cuda import Cuda
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError

ROOT = Path(__file__).parents[1]
NO_DRIVER = ("no CUDA driver: libcuda.so.1 cannot be loaded (in a container, start it with the NVIDIA runtime: "
             "`--runtime nvidia` on a Jetson, `--gpus all` elsewhere)")
BINDINGS_13_ON_12 = ("cuda-python's CUDA runtime is 13.0 but the driver supports CUDA 12.4, so every CUDA call "
                     "fails with error 35 (insufficient driver): pip install 'cuda-python>=12.2,<13', or update "
                     "the driver to 580 or newer")
TRT_13_ON_12 = ("TensorRT 10.3.0.30 is built for CUDA 13 but the driver supports CUDA 12.4: pip uninstall -y "
                "tensorrt tensorrt-cu13 tensorrt-cu13-libs tensorrt-cu13-bindings, then pip install "
                "'personaplex-edge[tensorrt-cu12]' --extra-index-url https://pypi.nvidia.com; or update the "
                "driver to 580 or newer")


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """This machine as the checks see it: the driver's CUDA (None: no libcuda), a Jetson or
    not, and the CUDA majors of pip-installed TensorRT wheels."""
    def set_machine(driver: int | None = 12040, jetson: bool = False, majors: frozenset[int] = frozenset({12})):
        monkeypatch.setattr(cv, "driver_version", lambda: driver)
        monkeypatch.setattr(cv, "is_jetson", lambda: jetson)
        monkeypatch.setattr(cv, "tensorrt_cuda_majors", lambda: set(majors))
    return set_machine


def install_cuda_python(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart, legacy: bool = False) -> None:
    """`cuda.bindings.runtime` (cuda-python >= 12.6) or only the older `cuda.cudart`."""
    cuda = types.ModuleType("cuda")
    if legacy:
        cuda.cudart = cudart  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # not there: ImportError
        monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    else:
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cudart  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda", cuda)


@pytest.fixture(scope="module")
def sim_engines(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cuda") / "engines"
    build_engines(tiny_build, profile(out.parent), out, trt=FakeTensorRT(FakeCudart()), device=SIM_DEVICE,
                  quiet=True)
    return out


# -- cuda-python against the driver ----------------------------------------------------------

def test_bindings_newer_than_the_driver_are_refused_in_one_line(monkeypatch, machine) -> None:
    """Current torch pulls cuda-bindings 13; on a CUDA 12 driver every call would be error 35."""
    machine(driver=12040)
    install_cuda_python(monkeypatch, FakeCudart(driver=12040, runtime=13000))
    with pytest.raises(PpxError) as err:
        cv.import_cudart()
    assert str(err.value) == BINDINGS_13_ON_12
    assert cv.import_cudart(required=False) is None
    # The device query falls back to nvidia-smi rather than failing on it.
    monkeypatch.setattr(dev, "_nvidia_smi", lambda: ("NVIDIA RTX A6000", "8.6", 48 << 30, "nvidia-smi"))
    assert dev.query_device(tensorrt_version="10.3.0").source == "nvidia-smi"
    # Older bindings on a newer driver are fine (backward compatible).
    install_cuda_python(monkeypatch, FakeCudart(driver=13000, runtime=12090))
    assert cv.import_cudart() is not None


def test_on_a_jetson_the_fix_keeps_jetpacks_cuda_minor(monkeypatch, machine) -> None:
    machine(driver=12060, jetson=True, majors=frozenset())
    install_cuda_python(monkeypatch, FakeCudart(driver=12060, runtime=13000))
    with pytest.raises(PpxError, match=r"driver supports CUDA 12\.6, .*: pip install 'cuda-python>=12\.2,<12\.7'"):
        cv.import_cudart()


def test_backend_refuses_mismatched_bindings_before_its_first_stream(sim_engines: Path, machine) -> None:
    machine(driver=12040)
    cudart = FakeCudart(driver=12040, runtime=13000)
    backend = TrtBackend(trt=FakeTensorRT(cudart), cudart=cudart, device=SIM_DEVICE)
    with pytest.raises(PpxError) as err:
        backend.open(load_manifest(sim_engines), "depformer")
    assert str(err.value) == BINDINGS_13_ON_12
    assert cudart.leaks() == 0


@pytest.mark.parametrize("legacy", [True, False], ids=["cuda-python-12.5", "cuda-bindings"])
def test_no_libcuda_is_no_cuda_in_one_line(monkeypatch, machine, tmp_path: Path, legacy: bool) -> None:
    """A Jetson container started without --runtime nvidia: cuda-python 12.5 and older raise
    RuntimeError('Failed to dlopen libcuda.so.1'), newer ones report driver version 0."""
    machine(driver=None, jetson=True, majors=frozenset())
    install_cuda_python(monkeypatch, FakeCudart(driver=None, runtime=12050, legacy=legacy), legacy=legacy)
    with pytest.raises(PpxError) as err:
        cv.import_cudart()
    expect = NO_DRIVER + ("; cuda-python: Failed to dlopen libcuda.so.1" if legacy else "")
    assert str(err.value) == expect
    assert cv.import_cudart(required=False) is None
    # query_device: "no CUDA" - the device tree still names the Jetson's GPU.
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(dev, "DEVICE_TREE_MODEL", model)
    monkeypatch.setattr(dev, "_nvidia_smi", lambda: None)
    assert dev.query_device(tensorrt_version="10.3.0").source == "device-tree"
    # The backend's CUDA wrapper, handed such bindings directly.
    with pytest.raises(PpxError, match="^no CUDA driver: libcuda.so.1 cannot be loaded"):
        Cuda(FakeCudart(driver=None, legacy=legacy))


def test_set_device_flags_raising_is_no_cuda(machine) -> None:
    cudart = FakeCudart()

    def dlopen_failed(flags: int):
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    cudart.cudaSetDeviceFlags = dlopen_failed  # type: ignore[method-assign]
    with pytest.raises(PpxError) as err:
        Cuda(cudart)
    assert str(err.value) == NO_DRIVER + "; cuda-python: Failed to dlopen libcuda.so.1"


def test_old_cuda_python_raising_in_the_device_query_is_no_cuda(monkeypatch) -> None:
    class Raising:
        def cudaGetDeviceCount(self):  # noqa: N802
            raise RuntimeError('Function "cuInit" not found')

    monkeypatch.setattr(dev, "import_cudart", lambda required=True: Raising())
    assert dev._cuda_properties() is None


def test_missing_cuda_python_names_the_drivers_major(monkeypatch, machine) -> None:
    machine(driver=13000)
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(PpxError, match=r"^cuda-python is not installed: pip install 'cuda-python>=13,<14' "):
        cv.import_cudart()


# -- TensorRT against the driver --------------------------------------------------------------

def test_trt_runtime_typeerror_is_one_line(sim_engines: Path, machine) -> None:
    """trt.Runtime raises TypeError (pybind's null factory) where it cannot start; it does not
    return None. A driver is there: no usable GPU."""
    machine(driver=12090)
    cudart = FakeCudart()
    backend = TrtBackend(trt=FakeTensorRT(cudart, no_gpu=True), cudart=cudart, device=SIM_DEVICE)
    with pytest.raises(PpxError) as err:
        backend.open(load_manifest(sim_engines), "depformer")
    assert str(err.value) == ("no CUDA GPU: TensorRT cannot create a runtime (createInferRuntime: CUDA "
                              "initialization failure with error: 35. Please check your CUDA installation)")


def test_tensorrt_of_a_newer_cuda_major_is_named_at_load(sim_engines: Path, machine) -> None:
    machine(driver=12040, majors=frozenset({13}))
    cudart = FakeCudart(driver=12040, runtime=12040)
    backend = TrtBackend(trt=FakeTensorRT(cudart, cuda_major=13), cudart=cudart, device=SIM_DEVICE)
    with pytest.raises(PpxError) as err:
        backend.open(load_manifest(sim_engines), "depformer")
    assert str(err.value) == TRT_13_ON_12


def test_tensorrt_of_a_newer_cuda_major_is_named_at_build(tiny_build: Path, tmp_path: Path, machine) -> None:
    machine(driver=12040, majors=frozenset({13}))
    trt = FakeTensorRT(FakeCudart(driver=12040, runtime=12040), cuda_major=13)
    out = tmp_path / "engines"
    with pytest.raises(PpxError) as err:
        build_engines(tiny_build, profile(tmp_path), out, trt=trt, device=SIM_DEVICE, quiet=True)
    assert str(err.value) == TRT_13_ON_12
    assert not out.exists()


def test_no_libcuda_at_build_is_one_line(tiny_build: Path, tmp_path: Path, machine) -> None:
    machine(driver=None)
    out = tmp_path / "engines"
    with pytest.raises(PpxError) as err:
        build_engines(tiny_build, profile(tmp_path), out, trt=FakeTensorRT(FakeCudart(driver=None)),
                      device=SIM_DEVICE, quiet=True)
    assert str(err.value) == (NO_DRIVER + "; TensorRT cannot create a builder (createInferBuilder: CUDA "
                              "initialization failure with error: 35. Please check your CUDA installation)")
    assert not out.exists()


def test_missing_tensorrt_names_the_extra_for_this_machine(monkeypatch, machine) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    machine(driver=13000, majors=frozenset())
    with pytest.raises(PpxError) as err:
        _ = TrtBackend().trt
    assert str(err.value) == ("tensorrt is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); "
                              "here pip install 'personaplex-edge[tensorrt-cu13]' --extra-index-url "
                              "https://pypi.nvidia.com")
    machine(driver=12060, jetson=True, majors=frozenset())
    assert cv.tensorrt_missing().endswith("then pip install 'personaplex-edge[jetpack6]'")
    machine(driver=None, majors=frozenset())
    assert cv.install_hint() == ("pip install 'personaplex-edge[tensorrt-cu12]' for a CUDA 12 driver, "
                                 "'[tensorrt-cu13]' for CUDA 13 (driver 580 or newer)")


def test_both_tensorrt_majors_installed(machine) -> None:
    line = cv.check_tensorrt(13000, {12, 13}, "10.16.1.11")
    assert line is not None and line.startswith("tensorrt-cu12 and tensorrt-cu13 are both installed")
    assert "pip uninstall -y tensorrt tensorrt-cu12 " in line and line.endswith("'personaplex-edge[tensorrt-cu13]' "
                                                                                "--extra-index-url https://pypi.nvidia.com")
    assert cv.check_tensorrt(13000, {12}) is None  # older TensorRT on a newer driver runs


# -- quantized graphs are strongly typed, from an fp16 export ---------------------------------------

def test_qdq_graph_of_an_fp32_export_is_refused(tiny_build: Path, tmp_path: Path) -> None:
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    _linear_graph(build / "temporal_step.onnx", TensorProto.INT8)  # weight-only INT8, fp32 compute
    out = tmp_path / "engines"
    with pytest.raises(PpxError) as err:
        build_engines(build, profile(tmp_path, temporal="int8", depformer="int8"), out,
                      trt=FakeTensorRT(FakeCudart()), device=SIM_DEVICE)
    assert str(err.value) == (f"target test-target: temporal_step ({build / 'temporal_step.onnx'}) is quantized "
                              "int8 with fp32 compute: quantize an fp16 export instead (`ppx-export onnx --dtype "
                              "fp16`, then `ppx-export quantize --precision int8`)")
    assert not out.exists()
    # From an fp16 export: strongly typed, no precision flags (kFP8/kINT4 only enable plugins).
    target = load_target(profile(tmp_path, temporal="int8"))
    for weak in (True, False):
        assert _typing_mode("temporal_step", "int8", GraphPrecision("fp16", "int8"), weak, build, target) == \
            (True, (), False)


# -- the GPU kit's plan ------------------------------------------------------------------------

def test_kit_plan_per_machine() -> None:
    bindings_13 = BINDINGS_13_ON_12
    # A fresh CUDA 12 workstation whose torch pulled cuda-bindings 13: TensorRT and cuda-python 12.
    assert kit.plan(12040, False, bindings_13, None, set()) == [
        "extra tensorrt-cu12", "install tensorrt-cu12>=10.3,<11", "install cuda-python>=12.2,<13"]
    # The `tensorrt` metapackage (TensorRT for CUDA 13) on a CUDA 12 driver: replaced.
    assert kit.plan(12080, False, None, "11.4.0.106", {13}) == [
        "extra tensorrt-cu12", "remove tensorrt tensorrt-cu13 tensorrt-cu13-libs tensorrt-cu13-bindings",
        "install tensorrt-cu12>=10.3,<11", "install cuda-python>=12.2,<13"]
    # Everything in place on a CUDA 13 workstation.
    assert kit.plan(13000, False, None, "10.16.1.11", {13}) == ["extra tensorrt-cu13"]
    # JetPack 6.2: JetPack's TensorRT, cuda-python 12.6 at most.
    assert kit.plan(12060, True, "cuda-python is not installed", "10.3.0", set()) == [
        "extra jetpack6", "install cuda-python>=12.2,<12.7"]
    with pytest.raises(PpxError, match="^tensorrt is not installed: on a Jetson it comes with JetPack"):
        kit.plan(12060, True, None, None, set())
    with pytest.raises(PpxError, match=r"^the driver supports CUDA 11\.8, .*update the driver to 525 or newer$"):
        kit.plan(11080, False, None, None, set())
    with pytest.raises(PpxError, match="^no CUDA driver"):
        kit.plan(None, False, None, None, set())


def test_kit_verify_is_one_line(monkeypatch, machine, capsys: pytest.CaptureFixture) -> None:
    machine(driver=12040)
    install_cuda_python(monkeypatch, FakeCudart(driver=12040, runtime=13000))
    monkeypatch.setattr(kit, "_tensorrt_version", lambda: "10.16.1.11")
    assert kit.main(["verify"]) == 1
    assert capsys.readouterr().err == f"gpu_kit: {BINDINGS_13_ON_12}\n"
    install_cuda_python(monkeypatch, FakeCudart(driver=12040, runtime=12090))
    assert kit.main(["verify"]) == 0
    assert capsys.readouterr().out == ("CUDA driver 12.4, cuda-python runtime 12.9, TensorRT 10.16.1.11 "
                                       "(pip extra tensorrt-cu12)\n")
    assert kit.main(["plan"]) == 0
    assert capsys.readouterr().out == "extra tensorrt-cu12\n"


# -- pyproject's extras: one CUDA major each (offline) --------------------------------------------

def _extras() -> dict[str, list[Requirement]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {k: [Requirement(r) for r in v] for k, v in data["project"]["optional-dependencies"].items()}


# Releases on PyPI of each line (cuda-python 12.2-12.5 are the monolithic package).
CUDA_PYTHON = ("11.8.7", "12.2.0", "12.6.2.post1", "12.9.10", "13.0.3", "13.4.4", "14.0.0")
TENSORRT = ("10.2.0", "10.3.0", "10.13.2.6", "10.16.1.11", "11.0.0.114", "11.4.0.106")


def _majors(req: Requirement) -> set[int]:
    """The CUDA majors a requirement can install."""
    name = req.name.lower().replace("_", "-")
    if name in ("cuda-python", "cuda-bindings"):
        return {Version(v).major for v in CUDA_PYTHON if req.specifier.contains(v, prereleases=True)}
    if name.startswith("tensorrt-cu"):
        return {int(name.removeprefix("tensorrt-cu").split("-")[0])}
    assert not name.startswith("tensorrt"), f"{req}: the bare tensorrt metapackage follows NVIDIA's newest CUDA"
    return set()


def test_each_tensorrt_extra_pins_one_cuda_major() -> None:
    extras = _extras()
    assert "tensorrt" not in extras  # resolved on x86 to TensorRT 11 for CUDA 13 beside cuda-python 12
    for name, reqs in extras.items():
        majors = set().union(*(_majors(r) for r in reqs))
        assert len(majors) <= 1, f"[{name}] mixes CUDA majors {sorted(majors)}"
    for major in (12, 13):
        reqs = {r.name: r for r in extras[f"tensorrt-cu{major}"]}
        assert set(reqs) == {f"tensorrt-cu{major}", "cuda-python"}
        trt = reqs[f"tensorrt-cu{major}"].specifier
        assert any(s.operator in (">=", ">") for s in trt) and any(s.operator in ("<", "<=") for s in trt)
        assert {v for v in TENSORRT if trt.contains(v)} <= {"10.3.0", "10.13.2.6", "10.16.1.11"}
        assert "10.16.1.11" in trt  # the newest TensorRT 10 of either major resolves
        assert _majors(reqs["cuda-python"]) == {major}
        # The kit's plan installs the same pins.
        assert str(reqs[f"tensorrt-cu{major}"]) == str(Requirement(cv.TENSORRT_WHEELS[major]))
        assert reqs["cuda-python"].specifier == Requirement(cv.cuda_python_requirement(major * 1000, False)).specifier
        assert cv.EXTRAS[(major, False)] == f"tensorrt-cu{major}"
    for jetpack, major in (("jetpack6", 12), ("jetpack7", 13)):
        (req,) = extras[jetpack]  # cuda-python only: TensorRT is JetPack's own
        assert req.name == "cuda-python" and _majors(req) == {major} and cv.EXTRAS[(major, True)] == jetpack

