"""Bad command-line input is one line and a clean exit, never a traceback (issue 11): builds
that are not directories or not UTF-8, seeds out of range, outputs over their own inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import play

from personaplex_edge.export.cli import main as export_main
from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError

README = Path(__file__).parents[1] / "README.md"


def _one_line(capsys: pytest.CaptureFixture[str], program: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{program}: error: "), err
    return err[0][len(f"{program}: error: "):]


@pytest.fixture
def latin1_build(tiny_build: Path, tmp_path: Path) -> Path:
    """The tiny build with one non-UTF-8 byte in its manifest (line 3)."""
    build = tmp_path / "latin1"
    shutil.copytree(tiny_build, build)
    text = (build / "manifest.json").read_text()
    lines = text.split("\n")
    assert lines[2].strip().startswith('"')
    lines[2] = lines[2].replace('"', '"\xe9', 1)
    (build / "manifest.json").write_bytes("\n".join(lines).encode("latin-1"))
    return build


def test_a_manifest_that_is_not_utf8_is_one_line(latin1_build: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    manifest = latin1_build / "manifest.json"
    with pytest.raises(PpxError, match=rf"^{manifest}:3: not UTF-8 text: byte 0xe9 at offset \d+"):
        load_manifest(latin1_build)
    assert play(latin1_build, tmp_path / "o.wav") == 2
    assert _one_line(capsys, "ppx-runtime").startswith(f"{manifest}:3: not UTF-8 text")
    assert export_main(["inspect", "--build", str(latin1_build)]) == 2
    assert _one_line(capsys, "ppx-export").startswith(f"{manifest}:3: not UTF-8 text")


def test_a_build_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert play(README, tmp_path / "o.wav") == 2
    assert _one_line(capsys, "ppx-runtime") == (f"{README}: not a directory (--build takes the build "
                                                "directory from `ppx-export onnx`)")
    assert export_main(["inspect", "--build", str(README)]) == 2
    _one_line(capsys, "ppx-export")


def test_a_negative_seed_is_one_line(tiny_build: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert play(tiny_build, tmp_path / "o.wav", "--seed", "-1") == 2
    assert _one_line(capsys, "ppx-runtime") == f"seed -1: expected 0..{2**63 - 1}"
    assert not (tmp_path / "o.wav").exists()


def test_a_manifest_that_is_not_an_object_is_one_line(tiny_build: Path, tmp_path: Path) -> None:
    build = tmp_path / "list"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(PpxError, match="format: not a PersonaPlex Edge build manifest"):
        load_manifest(build)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root's parent: (size, mtime_ns), to prove nothing was touched."""
    return {str(p.relative_to(root.parent)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.parent.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "work" / "ck3"
    shutil.copytree(tiny_checkpoint, ck)
    return ck


@pytest.fixture
def build(tiny_build: Path, tmp_path: Path) -> Path:
    b = tmp_path / "work" / "b16"
    shutil.copytree(tiny_build, b)
    return b


@pytest.mark.parametrize("where, how", [(".", "is"), ("..", "contains"), ("sub", "is inside")])
def test_onnx_never_writes_over_its_checkpoint(checkpoint: Path, where: str, how: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = {".": checkpoint, "..": checkpoint.parent, "sub": checkpoint / "sub"}[where]
    before = _tree(checkpoint)
    assert export_main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--force",
                        "--quiet"]) == 2
    assert _one_line(capsys, "ppx-export").startswith(f"--out {out}: {how} the --checkpoint directory")
    assert _tree(checkpoint) == before


@pytest.mark.parametrize("where, how", [(".", "is"), ("..", "contains"), ("sub", "is inside")])
def test_quantize_and_engines_never_write_over_their_build(build: Path, where: str, how: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = {".": build, "..": build.parent, "sub": build / "sub"}[where]
    before = _tree(build)
    assert export_main(["quantize", "--build", str(build), "--precision", "int8", "--out", str(out),
                        "--force", "--quiet"]) == 2
    assert _one_line(capsys, "ppx-export").startswith(f"--out {out}: {how} the --build directory")
    assert export_main(["engines", "--build", str(build), "--target", "agx-orin-64gb", "--out", str(out),
                        "--force", "--quiet"]) == 2
    assert _one_line(capsys, "ppx-export").startswith(f"--out {out}: {how} the --build directory")
    assert _tree(build) == before


def test_verify_never_writes_its_report_into_a_build(build: Path, tiny_build: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(build)
    for builds in (("--build", str(build), "--reference", str(tiny_build)),
                   ("--build", str(tiny_build), "--reference", str(build))):
        assert export_main(["verify", *builds, "--json", str(build / "manifest.json"), "--quiet"]) == 2
        flag = builds[builds.index(str(build)) - 1]
        assert _one_line(capsys, "ppx-export").startswith(
            f"--json {build / 'manifest.json'}: is inside the {flag} directory")
    assert _tree(build) == before


def test_onnx_warns_when_the_builtin_personas_have_no_voice(checkpoint: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(checkpoint / "voices")
    assert export_main(["onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"),
                        "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ppx-export: warning: {checkpoint}: no voice NATF2 (build voices: none): the "
                   "built-in personas copilot, focus, roadtrip will fail on this build; give "
                   "personas a voice it has or a .wav voice"], err


def test_onnx_with_the_builtin_voices_does_not_warn(tiny_checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"),
                        "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
