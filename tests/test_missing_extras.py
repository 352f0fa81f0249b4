"""A missing optional package is one line and exit 78 (no traceback, no systemd restart loop):
`serve` and `play` without onnxruntime, `serve` without pyalsaaudio. The packages are made
unimportable as if not installed (test_runtime_lean's import guard)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import SPEECH, import_guard

from personaplex_edge.runtime.extras import OPTIONAL, missing_extra


def _without(modules: tuple[str, ...], argv: list[str]) -> subprocess.CompletedProcess:
    code = (import_guard(modules) + "from personaplex_edge.runtime.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def _config(tmp_path: Path, build: Path) -> Path:
    config = tmp_path / "runtime.yaml"
    config.write_text(f"""
build: {{path: {build}, backend: ort-cpu, threads: 1}}
audio: {{capture_device: "null", playback_device: "null", echo_cancel: "off"}}
snapshots: {{dir: {tmp_path / 'snapshots'}}}
control: {{socket: {tmp_path / 'control.sock'}, group: null}}
metrics: {{enabled: false}}
""")
    return config


def _one_line(proc: subprocess.CompletedProcess, module: str) -> str:
    assert proc.returncode == 78, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ppx-runtime: error: {module} is not installed; "), line
    assert "pip install 'personaplex-edge[" in line, line
    return line


def test_serve_and_play_without_onnxruntime(tiny_build: Path, tmp_path: Path) -> None:
    serve = _without(("onnxruntime",), ["serve", "--config", str(_config(tmp_path, tiny_build))])
    assert "[onnx]" in _one_line(serve, "onnxruntime")
    play = _without(("onnxruntime",), ["play", str(SPEECH), "--build", str(tiny_build),
                                       "--out", str(tmp_path / "reply.wav"), "--quiet"])
    _one_line(play, "onnxruntime")
    assert not (tmp_path / "reply.wav").exists()


def test_serve_without_pyalsaaudio(tiny_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("alsaaudio")  # the same run with it installed must get further
    serve = _without(("alsaaudio",), ["serve", "--config", str(_config(tmp_path, tiny_build))])
    assert "[device]" in _one_line(serve, "alsaaudio")


def test_only_optional_packages_become_one_line() -> None:
    for module in OPTIONAL:
        found = missing_extra(ModuleNotFoundError(f"No module named '{module}.sub'",
                                                  name=f"{module}.sub"))
        assert found is not None and str(found).startswith(f"{module} is not installed; ")
    # A module of ours or a core dependency missing is a broken install: keep the traceback.
    for module in ("numpy", "personaplex_edge.runtime.nothing", None):
        assert missing_extra(ModuleNotFoundError("No module", name=module)) is None


def test_update_install_without_cryptography(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "fleet.pub").write_text("not read: the import fails first\n")
    config = tmp_path / "runtime.yaml"
    config.write_text(f"update: {{slots_dir: {tmp_path / 'slots'}, trusted_keys: {tmp_path / 'keys'}}}\n")
    proc = _without(("cryptography",), ["update", "--config", str(config), "install",
                                        str(tmp_path / "b.ppxb")])
    assert "[update]" in _one_line(proc, "cryptography")
    assert not (tmp_path / "slots").exists()  # refused before anything was written
