"""A fresh machine: `make demo` needs only python3 and make; `make test` names its system packages."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SYSTEM_DEPS = ROOT / "scripts" / "system_deps.sh"


def _fake_bin(tmp_path: Path, uid: int, installed: set[str]) -> dict[str, str]:
    """A PATH whose `id -u` and `dpkg-query` answer as an unprivileged user on a machine that
    lacks some packages; everything else is the real system."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    cases = "\n".join(f"    {p}) echo 'install ok installed';;" for p in sorted(installed))
    (bin_dir / "dpkg-query").write_text(
        f'#!/bin/sh\nfor last; do :; done\ncase "$last" in\n{cases}\n    *) exit 1;;\nesac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_system_deps_as_a_user_names_the_missing_packages_in_one_line(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path, uid=1000, installed={"gcc", "systemd", "alsa-utils"})
    proc = subprocess.run(["bash", str(SYSTEM_DEPS), "test"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    missing = lines[0].split("missing system packages:")[1].split(";")[0].split()
    assert {"libasound2-dev", "python3-dev", "chromium"} <= set(missing)
    assert not {"gcc", "systemd", "alsa-utils"} & set(missing)  # installed ones are not named
    assert lines[0].endswith("install them with: sudo apt-get install " + " ".join(missing))


def test_system_deps_with_everything_installed_is_silent(tmp_path: Path) -> None:
    packages = ("gcc python3-dev libasound2-dev libasound2-plugins alsa-utils systemd chromium "
                "fonts-dejavu-core").split()
    env = _fake_bin(tmp_path, uid=1000, installed=set(packages))
    proc = subprocess.run(["bash", str(SYSTEM_DEPS), "test"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""


def test_system_deps_rejects_an_unknown_group() -> None:
    proc = subprocess.run(["bash", str(SYSTEM_DEPS), "everything"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_makefile_demo_does_not_install_the_device_extra() -> None:
    """The demo's stamp installs the graph export and ONNX Runtime only: pyalsaaudio needs ALSA
    headers, and torch (754 MB) and Model Optimizer are for the export stack, not the demo."""
    proc = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "demo"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "VENV": "/nonexistent-venv"})
    assert proc.returncode == 0, proc.stderr
    installs = [line for line in proc.stdout.splitlines() if " install " in line and "-e " in line]
    assert installs and all("device" not in line and "dev," not in line for line in installs), installs
    assert "system_deps.sh test" not in proc.stdout
    assert all("export" not in line for line in installs), installs
    assert "torch" not in proc.stdout


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None,
                    reason="needs git and make")
def test_make_demo_on_a_fresh_clone_without_alsa_headers() -> None:
    """The whole newcomer path, on the committed tree: clone, `make demo` with /usr/include/alsa
    hidden (a private mount namespace, as root), a reply written, no alsaaudio in the demo venv."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_fresh_demo.sh")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "make demo passed on a fresh clone" in proc.stdout
