"""Bundles the car must refuse, each in one line naming the reason, with the active slot untouched:
unsigned, an unknown key, tampered after signing (an engine byte, the manifest, the header, an
added file), another target, an older version, truncated, and paths that escape the slot."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from update_kit import (
    bundle,
    config,
    file_member,
    keys,
    read_members,
    reseal,
    resign,
    trusted_dir,
    update,
    write_members,
)

from personaplex_edge.runtime.core.manifest import load_manifest
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.update.slots import Slots

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def car(tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A car whose slot a holds committed version 1.0; and the v2.0 bundle of the same build."""
    tmp = tmp_path_factory.mktemp("car")
    key = keys(tmp)
    trusted = trusted_dir(tmp, key)
    cfg = config(tmp, tiny_build, trusted, extra=", target: agx-orin-64gb")
    first = update(cfg, "install", str(bundle(tiny_build, key, tmp / "v1.ppxb", "1.0")))
    assert first.returncode == 0, first.stderr
    slots = Slots(tmp / "slots")
    slots.activate("a")
    assert slots.commit("a")
    v2 = bundle(tiny_build, key, tmp / "v2.ppxb", "2.0")
    return {"tmp": tmp, "key": key, "cfg": cfg, "slots": slots, "v2": v2, "build": tiny_build}


def _fingerprint(slots: Slots) -> tuple:
    """What must not change: which slot is good or on trial, its record and every byte of it.
    (The inactive slot may be emptied: an install starts by clearing it.)"""
    digest = hashlib.sha256()
    for path in sorted(slots.path("a").rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    state = slots.read()
    return state.good, state.trial, state.info("a"), digest.hexdigest()


def _refused(car: dict, bundle_path: Path, *words: str, args: tuple[str, ...] = ()) -> str:
    before = _fingerprint(car["slots"])
    proc = update(car["cfg"], "install", str(bundle_path), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("ppx-runtime: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert _fingerprint(car["slots"]) == before  # the good slot and the state: untouched
    assert car["slots"].wanted() == "a"
    assert not list(car["slots"].dir.glob(".*.partial-*"))  # nothing half-written left
    load_manifest(car["slots"].path("a")).verify_files()
    return lines[0]


def _members(car: dict) -> list:
    return read_members(car["v2"])


def _rewrite(car: dict, name: str, members: list) -> Path:
    return write_members(car["tmp"] / name, members)


def test_unsigned_bundle_is_refused(car: dict) -> None:
    members = [m for m in _members(car) if m[0].name != "ppx-bundle.sig"]
    _refused(car, _rewrite(car, "unsigned.ppxb", members), "unsigned bundle")


def test_bundle_signed_by_an_unknown_key_is_refused(car: dict) -> None:
    stranger = keys(car["tmp"], "stranger")
    other = bundle(car["build"], stranger, car["tmp"] / "stranger.ppxb", "3.0")
    _refused(car, other, "unknown key")


def test_header_edited_after_signing_is_refused(car: dict) -> None:
    members = _members(car)
    info, data = members[0]
    members[0] = (info, data.replace(b'"2.0"', b'"9.0"'))
    _refused(car, _rewrite(car, "header.ppxb", members), "signature does not verify")


def test_flipped_byte_in_a_weights_file_is_refused(car: dict) -> None:
    members = _members(car)
    i = next(i for i, (m, _) in enumerate(members) if m.name.endswith("temporal.onnx.data"))
    data = bytearray(members[i][1])
    data[len(data) // 2] ^= 0x01
    members[i] = (members[i][0], bytes(data))
    _refused(car, _rewrite(car, "flipped.ppxb", members), "temporal.onnx.data", "sha256 differs")


def test_edited_manifest_is_refused_even_when_resealed(car: dict) -> None:
    members = _members(car)
    i = next(i for i, (m, _) in enumerate(members) if m.name == "build/manifest.json")
    members[i] = (members[i][0], reseal(members[i][1], lambda d: d.update(opset=99)))
    _refused(car, _rewrite(car, "manifest.ppxb", members), "manifest.json",
             "differs from the signed manifest digest")


def test_added_file_is_refused(car: dict) -> None:
    members = _members(car) + [file_member("build/plugin.so", b"\x7fELF not a build file")]
    _refused(car, _rewrite(car, "added.ppxb", members), "build/plugin.so", "not listed")


def test_bundle_for_another_target_is_refused(car: dict) -> None:
    thor = bundle(car["build"], car["key"], car["tmp"] / "thor.ppxb", "3.0", target="thor")
    _refused(car, thor, "target 'thor'", "agx-orin-64gb")


def test_older_version_is_refused_unless_downgrade_is_allowed(car: dict) -> None:
    old = bundle(car["build"], car["key"], car["tmp"] / "old.ppxb", "0.9")
    _refused(car, old, "0.9 is older than", "1.0", "--allow-downgrade")
    proc = update(car["cfg"], "install", str(old), "--allow-downgrade")
    assert proc.returncode == 0, proc.stderr
    state = car["slots"].read()
    assert state.good == "a" and state.info("b")["version"] == "0.9"  # in b, not active


def test_truncated_bundle_is_refused(car: dict) -> None:
    data = car["v2"].read_bytes()
    with tarfile.open(car["v2"]) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size  # the tar's real end: padding and end blocks follow
    assert last.size > 0 and end < len(data)
    for cut in (len(data) // 2, end - 1, last.offset_data):
        path = car["tmp"] / f"truncated-{cut}.ppxb"
        path.write_bytes(data[:cut])
        _refused(car, path, "truncated")


def test_zstd_bundle_truncated_is_refused(car: dict) -> None:
    pytest.importorskip("zstandard")
    z = bundle(car["build"], car["key"], car["tmp"] / "z.ppxb", "2.0", compress="zstd")
    data = z.read_bytes()
    (car["tmp"] / "zcut.ppxb").write_bytes(data[: len(data) // 2])
    _refused(car, car["tmp"] / "zcut.ppxb", "truncated")


def test_member_larger_than_its_signed_size_is_refused_before_it_is_written(car: dict) -> None:
    members = _members(car)
    i = next(i for i, (m, _) in enumerate(members) if m.name.endswith("temporal.onnx.data"))
    size = len(members[i][1])
    members[i] = (members[i][0], members[i][1] + bytes(1 << 20))  # a MiB of zeros appended
    _refused(car, _rewrite(car, "inflated.ppxb", members), "build/temporal.onnx.data",
             f"{size + (1 << 20)} bytes in the bundle, the signed header says {size}")


def test_oversized_tar_extended_header_is_refused_before_the_signature(car: dict) -> None:
    """A pax header (here a 200 kB name) is read whole by tarfile: capped before it is."""
    long_name = file_member("build/" + "x" * 200_000, b"")
    members = [long_name, *_members(car)]
    _refused(car, _rewrite(car, "long-name.ppxb", members), "tar extended headers",
             "not a bundle from ppx-export")


def test_header_without_signed_sizes_is_refused(car: dict) -> None:
    members = resign(_members(car), car["key"], lambda h: h.pop("sizes"))
    _refused(car, _rewrite(car, "nosizes.ppxb", members), "ppx-bundle.json: sizes")


def _with(car: dict, info: tarfile.TarInfo, data: bytes | None = None) -> list:
    return _members(car) + [(info, data)]


def test_paths_that_escape_the_slot_are_refused(car: dict) -> None:
    dotdot = file_member("build/../../../etc/evil", b"x")
    _refused(car, _rewrite(car, "dotdot.ppxb", _with(car, *dotdot)), "escapes the slot")
    absolute = file_member("/etc/evil", b"x")
    _refused(car, _rewrite(car, "abs.ppxb", _with(car, *absolute)), "escapes the slot")
    link = tarfile.TarInfo("build/voices/evil.wav")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    _refused(car, _rewrite(car, "symlink.ppxb", _with(car, link)), "symlink")
    hard = tarfile.TarInfo("build/evil")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/shadow"
    _refused(car, _rewrite(car, "hardlink.ppxb", _with(car, hard)), "hardlink")
    device = tarfile.TarInfo("build/evil")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    _refused(car, _rewrite(car, "device.ppxb", _with(car, device)), "device")
    # A manifest that names a path outside the slot, signed by a trusted key (the header names
    # the edited manifest's digest and is signed again): still refused, by the path check.
    members = _members(car)
    i = next(i for i, (m, _) in enumerate(members) if m.name == "build/manifest.json")
    members[i] = (members[i][0], reseal(members[i][1],
                                        lambda d: d["files"].update({"../escape": "0" * 64})))
    members = resign(members, car["key"], lambda h: h["sizes"].update({"../escape": 0}))
    _refused(car, _rewrite(car, "manifest-escape.ppxb", members), "manifest.json",
             "'../escape': path escapes the slot")


def test_unpacked_bundle_with_a_symlink_out_is_refused(car: dict, tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    with tarfile.open(car["v2"]) as tar:
        tar.extractall(unpacked, filter="data")
    target = unpacked / "build" / "tokenizer.model"
    target.unlink()
    target.symlink_to("/etc/passwd")
    _refused(car, unpacked, "tokenizer.model", "symlink")


def test_missing_trusted_keys_refuse_before_reading(car: dict, tmp_path: Path) -> None:
    cfg = tmp_path / "runtime.yaml"
    cfg.write_text(car["cfg"].read_text().replace(str(car["tmp"] / "trusted"),
                                                  str(tmp_path / "none")))
    proc = update(cfg, "install", str(car["v2"]))
    assert proc.returncode == 2 and "trusted keys directory not found" in proc.stderr


def test_good_bundles_install_plain_zstd_and_unpacked(car: dict, tmp_path: Path) -> None:
    """Last: each install replaces slot b (never a, the good one)."""
    pytest.importorskip("zstandard")
    z = bundle(car["build"], car["key"], car["tmp"] / "good-z.ppxb", "2.1", compress="zstd")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(car["v2"]) as tar:
        tar.extractall(unpacked, filter="data")
    for source, version in ((car["v2"], "2.0"), (z, "2.1"), (unpacked, "2.0")):
        proc = update(car["cfg"], "install", str(source))
        assert proc.returncode == 0, proc.stderr
        assert f"version {version} into slot b" in proc.stdout
        # hashed while installed, so stamped: the daemon's first start hashes nothing again
        assert load_manifest(car["slots"].path("b")).verify_files(car["tmp"] / "snapshots") == 0
        assert car["slots"].read().good == "a"
    status = update(car["cfg"], "status")
    assert "slot a: version 1.0 (target any), committed: the good build" in status.stdout
    assert "slot b: version 2.0 (target any), installed, not activated" in status.stdout


def test_engines_for_another_tensorrt_are_refused() -> None:
    from personaplex_edge.runtime.update.bundle_format import BundleHeader
    from personaplex_edge.runtime.update.install import check_fits

    header = BundleHeader(version="2.0", target="agx-orin-64gb", tensorrt="10.3.0",
                          min_runtime="0.1.0", manifest_sha256="0" * 64, key_id="k")
    fits = {"where": "b.ppxb", "device_target": "agx-orin-64gb", "runtime_version": "0.1.0",
            "active": None, "allow_downgrade": False}
    check_fits(header, **fits, device_tensorrt=lambda: "10.3.0.30")  # same release: fine
    with pytest.raises(PpxError, match=r"engines built for TensorRT 10\.3\.0, this device has "
                                       r"TensorRT 10\.7\.0"):
        check_fits(header, **fits, device_tensorrt=lambda: "10.7.0.23")
    with pytest.raises(PpxError, match="this device has no TensorRT"):
        check_fits(header, **fits, device_tensorrt=lambda: None)
    with pytest.raises(PpxError, match=r"needs runtime 9\.0 or newer, this is 0\.1\.0"):
        check_fits(BundleHeader(**{**header.__dict__, "min_runtime": "9.0"}), **fits)


def test_export_bundle_refuses_in_one_line(car: dict, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "personaplex_edge.export.cli", "bundle",
                               *args], capture_output=True, text=True, timeout=120)

    build = tmp_path / "build"
    shutil.copytree(car["build"], build)
    out = tmp_path / "b.ppxb"
    base = ("--build", str(build), "--key", str(car["key"]), "--out", str(out))
    for args, message in (
            ((*base, "--version", "1.x"), "--version: '1.x' is not a version"),
            (("--build", str(build), "--key", str(tmp_path / "none.key"), "--out", str(out),
              "--version", "1"), "none.key: key not found"),
            (("--build", str(build), "--key", str(car["key"].with_suffix(".pub")), "--out",
              str(out), "--version", "1"), "not an unencrypted PEM private key"),
            ((*base, "--version", "1", "--out", str(build / "x.ppxb")), "inside the build")):
        proc = export(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    data = build / "mimi_decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # changed after export
    data.write_bytes(bytes(raw))
    proc = export(*base, "--version", "1")
    assert proc.returncode == 2 and "changed since export" in proc.stderr, proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.ppxb.partial-*"))  # nothing half-written
