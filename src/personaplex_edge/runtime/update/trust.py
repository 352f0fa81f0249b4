"""Who may sign a build: ed25519 public keys, one PEM file each, in the trusted keys directory.

Keys are named by their id, the first 16 hex digits of the sha256 of the raw public key; the
bundle header says which key signed it, so a bundle from an unknown key is refused by name
before any signature arithmetic. Verification is `cryptography`'s; nothing here is hand-rolled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.extras import missing_extra

KEY_SUFFIX = ".pub"


def crypto() -> tuple[Any, Any, Any]:
    """(InvalidSignature, serialization, ed25519), imported late: a missing `cryptography` is
    one line, not a traceback (`ppx-export keygen/bundle` use it too)."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError as exc:
        raise missing_extra(exc) or exc from None
    return InvalidSignature, serialization, ed25519


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_key_raw(pem: bytes, where: str) -> bytes:
    """The 32 raw bytes of an ed25519 public key in PEM."""
    _, serialization, ed25519 = crypto()
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise PpxError(f"{where}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PpxError(f"{where}: not an ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_keys(directory: Path) -> dict[str, bytes]:
    """key id -> raw public key, for every *.pub in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PpxError(f"{directory}: trusted keys directory not found (update.trusted_keys): "
                       "install the fleet's public key there")
    keys = {}
    for path in sorted(directory.glob(f"*{KEY_SUFFIX}")):
        try:
            raw = public_key_raw(path.read_bytes(), str(path))
        except OSError as exc:
            raise PpxError(f"{path}: cannot read: {exc.strerror}") from None
        keys[key_id(raw)] = raw
    if not keys:
        raise PpxError(f"{directory}: no trusted keys (*{KEY_SUFFIX}) in the trusted keys directory")
    return keys


def verify_signature(keys: dict[str, bytes], signer: str, message: bytes, signature: bytes,
                     where: str) -> None:
    """Raise PpxError unless `signature` is `signer`'s ed25519 signature over `message`."""
    InvalidSignature, _, ed25519 = crypto()
    if signer not in keys:
        raise PpxError(f"{where}: signed by an unknown key {signer} (not in the trusted keys "
                       "directory)")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(keys[signer]).verify(signature, message)
    except InvalidSignature:
        raise PpxError(f"{where}: signature does not verify with trusted key {signer} (the header "
                       "was changed after signing, or the signature is not that key's)") from None
