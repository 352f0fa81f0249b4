"""Weights are checked before use: play, serve and check refuse a build whose files or manifest
changed, in one line; a stamp spares the next start the hashing, but never hides a write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import play_args

from personaplex_edge.runtime.core.integrity import stamp_path
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, load_manifest, sha256_file
from personaplex_edge.runtime.errors import PpxError


@pytest.fixture
def build_copy(tiny_build: Path, tmp_path: Path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(tiny_build, out)
    return out


def _flip_byte(path: Path, keep_times: bool = False) -> None:
    """One byte of `path` changed in place; with `keep_times`, its mtime put back as before."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    if keep_times:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", *args],
                          capture_output=True, text=True, timeout=300)


def _play(build: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`play` in its own process (support.play_args), its reply to tmp_path/reply.wav."""
    return _cli(*play_args(build, tmp_path / "reply.wav", "--seed", "1"))


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_play_refuses_a_flipped_byte_in_the_weights(build_copy: Path, tmp_path: Path) -> None:
    _flip_byte(build_copy / "depformer.onnx.data")
    proc = _play(build_copy, tmp_path)
    assert proc.returncode == 2
    line = _one_line(proc)
    assert f"{build_copy / 'depformer.onnx.data'}: sha256 differs from the manifest" in line
    assert not (tmp_path / "reply.wav").exists()


def test_play_refuses_an_edited_manifest(build_copy: Path, tmp_path: Path) -> None:
    path = build_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["opset"] = 99
    path.write_text(json.dumps(data, indent=2))
    proc = _play(build_copy, tmp_path)
    assert proc.returncode == 2
    assert f"{path}: manifest_sha256: the manifest was modified or is corrupt" in _one_line(proc)


def test_a_manifest_without_its_digest_is_refused(build_copy: Path) -> None:
    path = build_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["manifest_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(PpxError, match=r"manifest_sha256: missing .*re-export"):
        load_manifest(build_copy)


def test_serve_exits_78_on_corrupt_weights_before_touching_audio(build_copy: Path,
                                                                 tmp_path: Path) -> None:
    _flip_byte(build_copy / "temporal_step.onnx")
    config = tmp_path / "runtime.yaml"
    config.write_text(f"build:\n  path: {build_copy}\n  backend: ort-cpu\n"
                      f"audio:\n  capture_device: no-such-device\n  playback_device: no-such-device\n"
                      f"snapshots:\n  dir: {tmp_path / 'snapshots'}\n"
                      f"control:\n  socket: {tmp_path / 'control.sock'}\n")
    proc = _cli("serve", "--config", str(config))
    assert proc.returncode == 78, proc.stderr
    line = _one_line(proc)
    assert line.startswith("<3>") or "error" in line  # journald priority prefix or plain
    assert f"{build_copy / 'temporal_step.onnx'}: sha256 differs from the manifest" in line


def test_stamp_skips_the_hash_until_a_file_is_written(build_copy: Path, tmp_path: Path) -> None:
    manifest = load_manifest(build_copy)
    stamps = tmp_path / "stamps"
    assert manifest.verify_files(stamps) == len(manifest.files)  # first start: everything hashed
    assert stamp_path(manifest, stamps).is_file()
    assert manifest.verify_files(stamps) == 0  # next start: nothing hashed
    # A write that puts the old mtime back still changes the ctime: hashed again, and caught.
    _flip_byte(build_copy / "mimi_decoder.onnx.data", keep_times=True)
    with pytest.raises(PpxError, match="mimi_decoder.onnx.data: sha256 differs"):
        manifest.verify_files(stamps)


def test_stamps_are_per_build(build_copy: Path, tiny_build: Path, tmp_path: Path) -> None:
    """Two builds sharing one stamp directory keep separate stamps (the manifest digest names them)."""
    a, b = load_manifest(tiny_build), load_manifest(build_copy)
    assert a.digest == b.digest  # the same build, copied: same content...
    assert a.verify_files(tmp_path) == len(a.files)
    assert b.verify_files(tmp_path) == len(b.files)  # ...but other inodes: the copy is hashed too
    assert a.verify_files(tmp_path) == len(a.files)  # and the stamp now describes the copy
    other = tmp_path / "other"
    shutil.copytree(tiny_build, other)
    data = json.loads((other / MANIFEST_NAME).read_text())
    data["producer"] = "another export"
    from personaplex_edge.runtime.core.manifest import write_manifest

    write_manifest(other, data)
    assert stamp_path(load_manifest(other), tmp_path) != stamp_path(a, tmp_path)


def test_unwritable_stamp_dir_still_verifies(build_copy: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manifest = load_manifest(build_copy)
    assert manifest.verify_files(blocker / "stamps") == len(manifest.files)
    assert "cannot record the verified build" in caplog.text


def test_check_hashes_everything_and_sees_what_a_stamp_cannot(build_copy: Path,
                                                              tmp_path: Path) -> None:
    """Bit rot under the file system keeps the file's identity: the stamp trusts it, check does not."""
    manifest = load_manifest(build_copy)
    stamps = tmp_path / "snapshots"
    manifest.verify_files(stamps)
    target = build_copy / "depformer.onnx.data"
    _flip_byte(target)
    stamp = stamp_path(manifest, stamps)
    recorded = json.loads(stamp.read_text())
    st = target.stat()
    recorded["depformer.onnx.data"] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    stamp.write_text(json.dumps(recorded))  # as if the bits had changed on the medium
    assert manifest.verify_files(stamps) == 0
    assert sha256_file(target) != manifest.files["depformer.onnx.data"]
    config = tmp_path / "runtime.yaml"
    config.write_text(f"build:\n  path: {build_copy}\n  backend: ort-cpu\n"
                      f"audio:\n  capture_device: \"null\"\n  playback_device: \"null\"\n"
                      f"snapshots:\n  dir: {stamps}\n"
                      f"control:\n  socket: {tmp_path / 'control.sock'}\n")
    proc = _cli("check", "--config", str(config))
    assert proc.returncode != 0
    assert "depformer.onnx.data: sha256 differs from the manifest" in proc.stdout + proc.stderr
