"""`--checkpoint org/name[@revision]`: resolution in a Hugging Face cache built here, offline."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from personaplex_edge.export.cli import main
from personaplex_edge.export.hf_cache import EXPORT_PATTERNS, resolve_checkpoint
from personaplex_edge.runtime.errors import PpxError

C1 = "1" * 40
C2 = "2" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty hub cache in tmp_path, HF_HUB_OFFLINE, and any socket connection fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes],
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """One snapshot in the hub's layout: blobs by hash, relative symlinks, refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as the hub writes it
    return snapshot


def files(tag: bytes) -> dict[str, bytes]:
    return {"config.json": b"{}", "model.safetensors": b"lm " + tag,
            "tokenizer-e351c8d8-checkpoint125.safetensors": b"mimi " + tag,
            "tokenizer_spm_32k_3.model": b"spm " + tag}


def run_onnx(checkpoint: str, out: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    rc = main(["onnx", "--checkpoint", checkpoint, "--out", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def test_repo_id_main_and_commit_resolve_to_their_snapshots(offline: Path) -> None:
    old = add_snapshot(offline, "acme/tiny", C1, files(b"v1"), refs=("v1",))
    new = add_snapshot(offline, "acme/tiny", C2, files(b"v2"), refs=("main",))
    assert resolve_checkpoint("acme/tiny") == new
    assert resolve_checkpoint("acme/tiny@main") == new
    assert resolve_checkpoint(f"acme/tiny@{C1}") == old
    assert resolve_checkpoint("acme/tiny@v1") == old
    assert (resolve_checkpoint("acme/tiny") / "model.safetensors").read_bytes() == b"lm v2"


def test_hf_home_is_honoured(offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = add_snapshot(tmp_path / "home" / "hub", "acme/tiny", C1, files(b"x"))
    assert resolve_checkpoint("acme/tiny") == snapshot


def test_an_existing_directory_is_a_path(offline: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    add_snapshot(offline, "acme/tiny", C1, files(b"x"))
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("acme/tiny") == Path("acme/tiny")
    assert resolve_checkpoint("./absent") == Path("./absent")  # path-shaped: the path's own error


def test_a_mistyped_local_path_is_no_such_directory(offline: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`out/ck` for `out/ckpt`: `out` is a local directory, so this is a path with a typo, not
    the Hub repo "out/ck" (whose licence page the user was sent to)."""
    (tmp_path / "out" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("out/ck") == Path("out/ck")
    rc, err = run_onnx("out/ck", tmp_path / "build", capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "out/ck" in err and "huggingface.co" not in err and "Hugging Face cache" not in err


def test_uncached_repo_is_one_line_and_writes_nothing(offline: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "build"
    rc, err = run_onnx("nvidia/personaplex-7b-v1", out, capsys)
    assert rc == 2
    assert err.count("\n") == 1
    assert "checkpoint nvidia/personaplex-7b-v1: not a directory, and not in the Hugging Face cache" \
        in err
    assert str(offline) in err
    assert "https://huggingface.co/nvidia/personaplex-7b-v1" in err
    assert "hf download nvidia/personaplex-7b-v1" in err and "--download" in err
    assert not out.exists()


@pytest.mark.parametrize("spec", ["a/b/c", "acme/tiny@", "acme/ti ny", "acme/-tiny", "acme/ti--ny",
                                  "acme/tiny@../../x", "acme/tiny@-rev", "acme/tiny@a b"])
def test_bad_repo_spec_is_one_line(offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   spec: str) -> None:
    add_snapshot(offline, "acme/tiny", C1, files(b"x"))
    out = tmp_path / "build"
    rc, err = run_onnx(spec, out, capsys)
    assert rc == 2
    assert err.count("\n") == 1
    assert f"checkpoint {spec}: neither a directory nor a Hugging Face repo id" in err
    assert not out.exists()


@pytest.mark.parametrize("revision", ["v9", "f" * 40])
def test_uncached_revision_is_one_line(offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       revision: str) -> None:
    add_snapshot(offline, "acme/tiny", C1, files(b"x"))
    out = tmp_path / "build"
    rc, err = run_onnx(f"acme/tiny@{revision}", out, capsys)
    assert rc == 2
    assert err.count("\n") == 1
    assert f"revision {revision} is not in the Hugging Face cache" in err
    assert "cached: main" in err and f"hf download acme/tiny --revision {revision}" in err
    assert not out.exists()


def test_broken_symlink_names_the_file(offline: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    snapshot = add_snapshot(offline, "acme/tiny", C1, files(b"x"))
    (snapshot / "model.safetensors").resolve().unlink()  # the blob goes, the link stays
    out = tmp_path / "build"
    rc, err = run_onnx("acme/tiny", out, capsys)
    assert rc == 2
    assert err.count("\n") == 1
    assert f"{snapshot / 'model.safetensors'}: blob missing" in err
    assert not out.exists()


def test_a_file_config_json_names_is_checked_too(offline: Path) -> None:
    snapshot = add_snapshot(offline, "acme/tiny", C1,
                            {**files(b"x"), "config.json": b'{"mimi_config_name": "mimi.json"}',
                             "mimi.json": b"{}"})
    (snapshot / "mimi.json").resolve().unlink()
    with pytest.raises(PpxError, match="mimi.json: blob missing"):
        resolve_checkpoint("acme/tiny")


def test_download_fetches_only_what_the_export_reads(offline: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []
    hub = {**files(b"x"), "config.json": b'{"mimi_config_name": "mimi.json"}', "mimi.json": b"{}",
           "voices.tgz": b"voices", "README.md": b"readme", "original/consolidated.pth": b"big"}

    def fake_download(repo_id: str, **kwargs: object) -> str:
        # Stands in for the Hub: materialises the files the patterns select.
        import fnmatch

        calls.append({"repo_id": repo_id, **kwargs})
        assert kwargs.get("local_files_only") is not True
        chosen = {n: d for n, d in hub.items()
                  if any(fnmatch.fnmatch(n, p) for p in kwargs["allow_patterns"])}
        snapshot = offline / "models--acme--tiny" / "snapshots" / C1
        for name, data in chosen.items():
            if not (snapshot / name).exists():
                add_snapshot(offline, repo_id, C1, {name: data})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    snapshot = resolve_checkpoint("acme/tiny@main", download=True)
    assert [c["allow_patterns"] for c in calls] == [list(EXPORT_PATTERNS), ["mimi.json"]]
    assert all(c["revision"] == "main" and Path(str(c["cache_dir"])) == offline for c in calls)
    got = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert got == sorted(n for n in hub if n not in ("README.md", "original/consolidated.pth"))


def test_download_gated_is_one_line(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id: str, **kwargs: object) -> str:
        # A stand-in 403 response: the error reads only its headers and request.
        response = SimpleNamespace(status_code=403, headers={}, request=None)
        raise GatedRepoError("403 gated", response=response)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PpxError) as info:
        resolve_checkpoint("nvidia/personaplex-7b-v1", download=True)
    assert str(info.value) == ("checkpoint nvidia/personaplex-7b-v1: gated: accept the licence at "
                               "https://huggingface.co/nvidia/personaplex-7b-v1 and log in "
                               "(`hf auth login` or HF_TOKEN)")


def test_export_from_the_cache_end_to_end(offline: Path, tmp_path: Path, tiny_checkpoint: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    tiny = {p.relative_to(tiny_checkpoint).as_posix(): p.read_bytes()
            for p in sorted(tiny_checkpoint.rglob("*")) if p.is_file()}
    snapshot = add_snapshot(offline, "acme/personaplex-tiny", C1, tiny)
    out = tmp_path / "build"
    rc, err = run_onnx("acme/personaplex-tiny", out, capsys, "--prefill-steps", "64")
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == str(snapshot.resolve())
    assert manifest["source"]["sha256"]["model.safetensors"] == \
        hashlib.sha256(tiny["model.safetensors"]).hexdigest()
    assert (out / "temporal_step.onnx").is_file() and "NATF2" in manifest["voices"]
