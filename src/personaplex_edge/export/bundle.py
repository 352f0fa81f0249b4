"""`ppx-export keygen` and `ppx-export bundle`: a signed, single-file build for the fleet.

The bundle format is the runtime's (runtime/update/bundle_format.py), which reads it. Each
build file is hashed while it is streamed into the tar and must match the manifest, so a
build changed on disk after export never ships under a valid signature.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from personaplex_edge.export.atomic import refuse_overlap
from personaplex_edge.runtime.core.durable import write_atomic
from personaplex_edge.runtime.core.engine_manifest import (
    engine_manifest,
    is_engines_build,
    trt_release,
)
from personaplex_edge.runtime.core.manifest import MANIFEST_NAME, Manifest, load_manifest
from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.extras import missing_extra
from personaplex_edge.runtime.update.bundle_format import (
    ANY_TARGET,
    BUILD_PREFIX,
    HEADER_NAME,
    SIGNATURE_NAME,
    BundleHeader,
    check_relative_path,
    parse_version,
)
from personaplex_edge.runtime.update.trust import crypto, key_id

CHUNK = 1 << 20
COMPRESSIONS = ("none", "zstd")


def _crypto() -> tuple[Any, Any]:
    _, serialization, ed25519 = crypto()
    return serialization, ed25519


def keygen(out: Path, force: bool = False) -> tuple[Path, Path]:
    """OUT.key (private, PEM PKCS#8, mode 0600) and OUT.pub (public, PEM) for the devices."""
    serialization, ed25519 = _crypto()
    out = Path(out)
    private, public = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for path in (private, public):
        if path.exists() and not force:
            raise PpxError(f"{path}: exists (use --force to replace the key pair)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private, private_pem, 0o600)
    _write_new(public, public_pem, 0o644)
    return private, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Whole or not at all, created with its final mode (a private key is never readable)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PpxError(f"{path.parent}: cannot create: {exc.strerror}") from None
    write_atomic(path, data, mode)


def load_private_key(path: Path) -> Any:  # cryptography's Ed25519PrivateKey
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PpxError(f"{path}: key not found (make one with `ppx-export keygen`)") from None
    except OSError as exc:
        raise PpxError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise PpxError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PpxError(f"{path}: not an ed25519 private key")
    return key


def _target_of(manifest: Manifest, target: str | None) -> tuple[str, str | None]:
    """Engines are bound to their target and TensorRT; ONNX graphs run anywhere."""
    if is_engines_build(manifest):
        engines = engine_manifest(manifest)
        if target is not None and target != engines.target:
            raise PpxError(f"--target {target}: the engines were built for {engines.target}")
        built = engines.built_on.tensorrt
        return engines.target, trt_release(built) if built else None
    return target or ANY_TARGET, None


def write_bundle(build: Path, key_path: Path, out: Path, version: str, *,
                 target: str | None = None, min_runtime: str = "0.1.0",
                 compress: str = "zstd", force: bool = False) -> BundleHeader:
    parse_version(version, "--version")
    parse_version(min_runtime, "--min-runtime")
    if compress not in COMPRESSIONS:
        raise PpxError(f"--compress {compress}: choose one of {', '.join(COMPRESSIONS)}")
    key = load_private_key(key_path)
    manifest = load_manifest(build)  # its own digest checked: an edited manifest is refused
    for name in manifest.files:
        check_relative_path(name, str(build / MANIFEST_NAME))
    out = Path(out)
    if out.exists() and not force:
        raise PpxError(f"{out}: exists (use --force to replace it)")
    refuse_overlap(out, {"build": Path(build)})
    bundle_target, tensorrt = _target_of(manifest, target)
    serialization = _crypto()[0]
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    sizes = {}
    for name in manifest.files:
        try:
            sizes[name] = (Path(build) / name).stat().st_size
        except OSError:
            raise PpxError(f"{Path(build) / name}: listed in the manifest but missing") from None
    header = BundleHeader(version=version, target=bundle_target, tensorrt=tensorrt,
                          min_runtime=min_runtime, manifest_sha256=manifest.digest,
                          key_id=key_id(public_raw),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sizes=sizes)
    raw_header = header.to_bytes()
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f, _compressed(f, compress) as stream:
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, HEADER_NAME, raw_header)
                _add_bytes(tar, SIGNATURE_NAME, key.sign(raw_header))
                _add_bytes(tar, BUILD_PREFIX + MANIFEST_NAME,
                           (Path(build) / MANIFEST_NAME).read_bytes())
                for name, digest in manifest.files.items():
                    _add_file(tar, Path(build) / name, BUILD_PREFIX + name, digest, sizes[name])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise PpxError(f"{out}: cannot write: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return header


@contextlib.contextmanager
def _compressed(f: IO[bytes], compress: str) -> Iterator[IO[bytes]]:
    if compress == "none":
        yield f
        return
    try:
        import zstandard
    except ModuleNotFoundError as exc:
        raise missing_extra(exc) or exc from None
    # Level 3 is zstd's default: fast enough not to dominate a 15 GB bundle.
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(f, closefd=False) as z:
        yield z


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


class _HashingReader(io.RawIOBase):
    """A file read once: into the tar and through sha256 at the same time."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.sha.update(block)
        return block


def _add_file(tar: tarfile.TarFile, path: Path, name: str, digest: str, signed_size: int
              ) -> None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != signed_size:
                raise PpxError(f"{path}: changed size while it was bundled: re-export the build")
            reader = _HashingReader(f)
            tar.addfile(_info(name, size), reader)
    except FileNotFoundError:
        raise PpxError(f"{path}: listed in the manifest but missing") from None
    if reader.sha.hexdigest() != digest:
        raise PpxError(f"{path}: sha256 differs from the manifest (changed since export): "
                       "re-export the build")
