"""Progress bars of `ppx-export`: silent under --quiet, plain lines when stderr is not a
terminal, redrawn bars on one, and TensorRT build phases through the progress monitor."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from test_targets import SIM_DEVICE, profile
from trt_sim import FakeCudart, FakeTensorRT

from personaplex_edge.export import engines, progress
from personaplex_edge.export.calibration import (
    clip_end_frames,
    conversation_frames,
    load_speech_dir,
    record_calibration,
)
from personaplex_edge.export.engines import build_engines


def _export(*args: str) -> subprocess.CompletedProcess:
    """`ppx-export` in a subprocess: stderr is a pipe, as under journald or in CI."""
    return subprocess.run([sys.executable, "-m", "personaplex_edge.export.cli", *args],
                          capture_output=True, text=True, timeout=300)


def _plain_lines(err: str) -> list[str]:
    assert "\r" not in err and "\x1b" not in err, repr(err[:400])
    assert err.endswith("\n"), repr(err[-200:])
    return err.splitlines()


def test_quiet_prints_nothing_on_stderr(tiny_checkpoint: Path, tmp_path: Path) -> None:
    synth = _export("synth", "--size", "tiny", "--out", str(tmp_path / "ckpt"), "--quiet")
    assert synth.returncode == 0 and synth.stderr == ""
    onnx = _export("onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "build"),
                   "--prefill-steps", "64", "--quiet")
    assert onnx.returncode == 0 and onnx.stderr == ""
    assert onnx.stdout == f"wrote build to {tmp_path / 'build'}\n"


def test_a_pipe_gets_one_plain_line_per_update(tiny_checkpoint: Path, tmp_path: Path) -> None:
    synth = _export("synth", "--size", "tiny", "--out", str(tmp_path / "ckpt"))
    assert synth.returncode == 0
    lines = _plain_lines(synth.stderr)
    assert lines[0].startswith("synth tiny:   0% ")
    assert lines[-1].startswith("synth tiny: 100% 10.8M/10.8M")

    onnx = _export("onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "build"),
                   "--prefill-steps", "64")
    assert onnx.returncode == 0
    lines = _plain_lines(onnx.stderr)
    assert lines[-1].startswith("onnx: 100% 7/7, checking and hashing the build [")
    # Per graph: the tensors it read from the checkpoint, named as they are read.
    for key in ("mimi_encoder", "mimi_decoder", "temporal_step", "temporal_prefill", "depformer"):
        assert any(line.startswith("onnx:") and line.split(" [")[0].endswith(f", building {key}")
                   for line in lines), key
        done = [line for line in lines if line.startswith(f"onnx {key}: ")][-1]
        assert int(done.split(": ")[1].split(" tensors")[0]) > 10, done


def test_lines_are_rate_limited_and_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.bar("stage", 1000, unit=" items") as b:
        for _ in range(1000):
            b.update(1)
    lines = _plain_lines(err.getvalue())
    assert len(lines) == 2, lines  # the start and the end: updates come faster than LOG_INTERVAL
    assert lines[0].startswith("stage:   0% 0/1000 [") and lines[1].startswith("stage: 100% 1000/1000 [")

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    err.seek(0), err.truncate()
    with progress.bar("count", unit=" tensors") as b:
        b.update(3)
        b.update(0)  # no new progress: no new line
    assert [line.split(" [")[0] for line in _plain_lines(err.getvalue())] == ["count: 0 tensors",
                                                                             "count: 3 tensors"]


def test_a_terminal_gets_a_redrawn_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.bar("stage", 3) as b:
        b.update(3)
    assert "\r" in err.getvalue() and "100%" in err.getvalue()

    err.seek(0), err.truncate()
    with progress.bar("stage", 3, quiet=True) as b:
        b.update(3)
    progress.bar("count", quiet=True).close()
    assert err.getvalue() == ""


def test_tensorrt_build_phases_are_reported(tiny_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    trt = FakeTensorRT(FakeCudart())
    build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=trt, device=SIM_DEVICE)
    lines = _plain_lines(capsys.readouterr().err)
    assert trt.stats["monitored_builds"] == 5
    # The top phase of every build, from its start to its last step; the nested phase is
    # shorter than PHASE_DELAY, so it draws nothing.
    phases = [line.split(" [")[0] for line in lines if line.startswith("engines: Building engine:")]
    assert phases == ["engines: Building engine:   0% 0/2", "engines: Building engine: 100% 2/2"] * 5
    assert not any("Tactic selection" in line for line in lines)
    assert lines[-2].startswith("engines: 100% 5/5, depformer (fp32, strongly typed) [")
    assert lines[-1] == f"engines: wrote {tmp_path / 'engines'}"

    build_engines(tiny_build, profile(tmp_path), tmp_path / "quiet", trt=trt, device=SIM_DEVICE, quiet=True)
    assert capsys.readouterr().err == ""
    assert trt.stats["monitored_builds"] == 5  # quiet: no monitor

    monkeypatch.setattr(engines, "PHASE_DELAY", 0.0)
    build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=trt, device=SIM_DEVICE, force=True)
    lines = _plain_lines(capsys.readouterr().err)
    assert any(line.startswith("engines: Tactic selection: 100% ") for line in lines)


def test_older_tensorrt_without_a_progress_monitor(tiny_build: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    trt = FakeTensorRT(FakeCudart(), progress_monitor=False)
    build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=trt, device=SIM_DEVICE)
    lines = _plain_lines(capsys.readouterr().err)
    assert trt.stats["monitored_builds"] == 0
    assert not any("Building engine" in line for line in lines)
    assert any(line.startswith("engines: 100% 5/5") for line in lines)


def test_ctrl_c_during_a_build_cancels_it_through_the_monitor(tiny_build: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(trt: object, quiet: bool = False) -> object:
        monitor = real(trt, quiet)
        monitor.interrupted = True  # as if Ctrl-C came inside a callback
        return monitor

    real = engines.progress_monitor
    monkeypatch.setattr(engines, "progress_monitor", interrupted)
    trt = FakeTensorRT(FakeCudart())
    with pytest.raises(KeyboardInterrupt):
        build_engines(tiny_build, profile(tmp_path), tmp_path / "engines", trt=trt, device=SIM_DEVICE)
    assert trt.stats["monitored_builds"] == 1
    assert not (tmp_path / "engines").exists()


def test_calibration_reports_each_clip(tiny_build: Path, capsys: pytest.CaptureFixture) -> None:
    clips = load_speech_dir(None)
    frames = len(conversation_frames(clips))
    ends = clip_end_frames(clips, frames)
    assert len(ends) == len(clips) and ends[-1] == frames and ends == sorted(ends)
    assert clip_end_frames(clips, ends[0] + 1) == [ends[0]]  # the gap after the first clip
    assert clip_end_frames(clips, ends[1] - 1) == [ends[0], ends[1] - 1]  # the cut ends the second

    record_calibration(tiny_build, samples={"depformer": 2}, graphs=("depformer",), max_frames=ends[1])
    lines = _plain_lines(capsys.readouterr().err)
    assert lines[0].startswith("calibration:   0% 0/2 [")
    assert lines[-1].startswith(f"calibration: 100% 2/2, {clips[1].path.name} [")
    record_calibration(tiny_build, samples={"depformer": 2}, graphs=("depformer",), max_frames=4, quiet=True)
    assert capsys.readouterr().err == ""
