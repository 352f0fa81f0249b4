"""The device runtime never imports torch or the export stack, and runs on Python 3.10 syntax."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import import_guard

RUNTIME = Path(__file__).parents[1] / "src" / "personaplex_edge" / "runtime"
BLOCKED = ("torch", "onnx", "safetensors", "modelopt", "personaplex_edge.export", "moshi",
           "matplotlib")  # matplotlib: the optional report extra, imported only for --report



def _run_guarded(code: str) -> subprocess.CompletedProcess:
    script = import_guard(BLOCKED) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def _runtime_modules() -> list[str]:
    """Every module of the runtime, subpackages included, as dotted names."""
    names = []
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("personaplex_edge.runtime", *parts)))
    return names


def test_every_runtime_module_imports_without_torch_or_export() -> None:
    modules = _runtime_modules()
    assert "personaplex_edge.runtime.backends.tensorrt.backend" in modules  # subpackages are walked
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "assert not any(m.split('.')[0] in ('torch', 'onnx', 'moshi') for m in sys.modules)\nprint('ok')\n"
    proc = _run_guarded(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_each_room_imports_alone_without_onnx_or_onnxruntime() -> None:
    """`python -c "import personaplex_edge.runtime.<room>"` works on a device without torch or onnx,
    and the rooms other than backends.ort do not even need onnxruntime."""
    rooms = sorted(p.parent.name for p in RUNTIME.glob("*/__init__.py"))
    assert {"audio", "backends", "core", "play", "service"} <= set(rooms)
    for room in rooms:
        code = (f"import importlib\nimportlib.import_module('personaplex_edge.runtime.{room}')\n"
                "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules\nprint('ok')\n")
        proc = subprocess.run([sys.executable, "-c", import_guard(
                               (*BLOCKED, "onnxruntime")) + code],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (room, proc.stderr)


def test_play_runs_end_to_end_without_torch(tiny_build: Path, tmp_path: Path) -> None:
    code = (
        "from personaplex_edge.runtime.cli import main\n"
        f"rc = main(['play', {str(Path(__file__).parent / 'data' / 'speech_24k.wav')!r}, '--build', {str(tiny_build)!r},"
        f" '--out', {str(tmp_path / 'reply.wav')!r}, '--seed', '1', '--snapshot-dir', {str(tmp_path / 's')!r},"
        " '--quiet'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules\n"
    )
    proc = _run_guarded(code)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "reply.wav").stat().st_size > 100_000


def test_runtime_sources_parse_as_python_3_10() -> None:
    for path in RUNTIME.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
