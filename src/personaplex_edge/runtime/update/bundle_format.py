"""The bundle: one tar file (optionally zstd-compressed) carrying a build and its signature.

Members, in this order (the reader depends on it, so nothing is written before it is trusted):
  ppx-bundle.json   the header: version, target, minimum runtime, the build manifest's digest
                    and every build file's size (so a member's size is checked before a byte
                    of it is written: a bundle cannot fill the disk before its hash fails)
  ppx-bundle.sig    ed25519 signature over the header's exact bytes
  build/manifest.json
  build/<file>      every file the manifest lists, nothing else
The signature covers the header, the header names the manifest's digest, and the manifest holds
every file's sha256: one signature covers every byte of the build.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from personaplex_edge.runtime.errors import PpxError

FORMAT = "personaplex-edge/bundle"
FORMAT_VERSION = 2  # 2: the header lists every build file's size
HEADER_NAME = "ppx-bundle.json"
SIGNATURE_NAME = "ppx-bundle.sig"
BUILD_PREFIX = "build/"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ANY_TARGET = "any"  # ONNX graphs: they run on any device the runtime supports
MAX_HEADER_BYTES = 256 * 1024
# Tar's own extended headers (pax, GNU long names) are read whole into memory before anything
# is verified: a bundle from ppx-export needs a few hundred bytes of them per member.
MAX_TAR_EXTENDED_BYTES = 64 * 1024
_VERSION = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")


@dataclass(frozen=True)
class BundleHeader:
    version: str  # dotted numbers, compared numerically: "2026.12.1", "1.4"
    target: str  # a target profile name (engines/targets/) or "any"
    tensorrt: str | None  # TensorRT release engines were built with; None for ONNX builds
    min_runtime: str  # the oldest personaplex-edge runtime that reads this build
    manifest_sha256: str
    key_id: str  # which trusted key signed it
    created: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # build file -> bytes, as the manifest

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @staticmethod
    def from_bytes(raw: bytes, where: str) -> BundleHeader:
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            raise PpxError(f"{where}: {HEADER_NAME}: not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PpxError(f"{where}: {HEADER_NAME}: not a PersonaPlex Edge bundle header")
        if data.get("format_version") != FORMAT_VERSION:
            raise PpxError(f"{where}: {HEADER_NAME}: format_version {data.get('format_version')!r}, "
                           f"this runtime reads {FORMAT_VERSION}")
        fields: dict[str, Any] = {}
        for name in ("version", "target", "min_runtime", "manifest_sha256", "key_id"):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise PpxError(f"{where}: {HEADER_NAME}: {name}: missing or not a string")
            fields[name] = value
        for name in ("version", "min_runtime"):
            parse_version(fields[name], f"{where}: {HEADER_NAME}: {name}")
        sizes = data.get("sizes")
        if not isinstance(sizes, dict) or not all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in sizes.items()):
            raise PpxError(f"{where}: {HEADER_NAME}: sizes: missing or not file -> bytes")
        tensorrt = data.get("tensorrt")
        return BundleHeader(**fields, tensorrt=tensorrt if isinstance(tensorrt, str) else None,
                            created=str(data.get("created", "")), sizes=sizes)


def parse_version(text: str, where: str) -> tuple[int, ...]:
    if not isinstance(text, str) or not _VERSION.match(text):
        raise PpxError(f"{where}: {text!r} is not a version (dotted numbers, e.g. 1.4.2)")
    return tuple(int(part) for part in text.split("."))


def version_key(text: str) -> tuple[int, ...]:
    """Comparable form: 1.4 == 1.4.0 < 1.10."""
    parts = list(parse_version(text, "version"))
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def build_member_name(member: str) -> str | None:
    """The build-relative path of a `build/...` member, or None if it is outside build/."""
    return member[len(BUILD_PREFIX):] if member.startswith(BUILD_PREFIX) else None


def check_relative_path(name: str, where: str) -> str:
    """Refuse a path that could land outside the slot: absolute, `..`, empty parts, odd bytes."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise PpxError(f"{where}: {name!r}: path escapes the slot (absolute or malformed)")
    parts = PurePosixPath(name).parts
    if any(part in ("..", ".", "") for part in name.split("/")) or not parts:
        raise PpxError(f"{where}: {name!r}: path escapes the slot ('..' or empty part)")
    if any(ord(ch) < 32 for ch in name):
        raise PpxError(f"{where}: {name!r}: control character in a file name")
    return name
