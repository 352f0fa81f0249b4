"""Shared by the update tests: keys, a trusted keys directory, bundles of the tiny build, a
config naming the slots, and tar files rewritten member by member (to tamper with them)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from personaplex_edge.export.bundle import keygen, write_bundle
from personaplex_edge.runtime.core.manifest import manifest_digest


def keys(tmp: Path, name: str = "fleet") -> Path:
    """A key pair; returns the private key path (its .pub sits beside it)."""
    private, _ = keygen(tmp / "keys" / name)
    return private


def trusted_dir(tmp: Path, *private_keys: Path) -> Path:
    d = tmp / "trusted"
    d.mkdir(exist_ok=True)
    for key in private_keys:
        pub = key.with_suffix(".pub")
        (d / pub.name).write_bytes(pub.read_bytes())
    return d


def bundle(build: Path, key: Path, out: Path, version: str = "1.0", **kw) -> Path:
    # A plain tar unless asked: the refusal tests edit its bytes where a member lies.
    write_bundle(build, key, out, version, **{"compress": "none", **kw})
    return out


def config(tmp: Path, build: Path, trusted: Path, extra: str = "") -> Path:
    path = tmp / "runtime.yaml"
    path.write_text(f"build: {{path: {build}, backend: ort-cpu}}\n"
                    f"snapshots: {{dir: {tmp / 'snapshots'}}}\n"
                    f"update: {{slots_dir: {tmp / 'slots'}, trusted_keys: {trusted}{extra}}}\n")
    return path


def update(config: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personaplex_edge.runtime.cli", "update",
                           "--config", str(config), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def read_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def reseal(manifest: bytes, change: Callable[[dict], object]) -> bytes:
    """An edited manifest with a correct self digest (what a careful attacker would send)."""
    data = json.loads(manifest)
    change(data)
    data["manifest_sha256"] = manifest_digest(data)
    return json.dumps(data).encode()


def resign(members: list[tuple[tarfile.TarInfo, bytes | None]], key: Path,
           change: Callable[[dict], object] | None = None) -> list:
    """The header rewritten to name the (edited) manifest's digest and `change`d, then signed
    again with `key`: what a holder of a trusted key could send."""
    from personaplex_edge.export.bundle import load_private_key

    manifest = next(data for info, data in members if info.name == "build/manifest.json")
    header = json.loads(members[0][1])
    header["manifest_sha256"] = json.loads(manifest)["manifest_sha256"]
    if change is not None:
        change(header)
    raw = json.dumps(header, sort_keys=True, indent=1).encode()
    out = list(members)
    out[0] = (members[0][0], raw)
    out[1] = (members[1][0], load_private_key(key).sign(raw))
    return out
