"""The `update:` section of the daemon config (validated by service/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UpdateSettings:
    # The A/B slots and their state file. While it holds no committed or trial slot, the
    # daemon runs build.path as before.
    slots_dir: Path = Path("/var/lib/personaplex/slots")
    # ed25519 public keys (*.pub, PEM) whose signatures this device accepts.
    trusted_keys: Path = Path("/etc/personaplex/trusted-keys")
    # This device's target profile name (engines/targets/); None accepts only portable ONNX
    # bundles (target "any").
    target: str | None = None
    # Starts a trial slot gets to prove itself before the daemon falls back by itself.
    max_starts: int = 2
    # The health gate: a trial slot is committed after health_frames frames and health_s
    # seconds of serving with at most health_max_misses frames over health_deadline_ms and
    # no failed frame.
    health_frames: int = 250
    health_s: float = 30.0
    health_deadline_ms: float = 80.0
    health_max_misses: int = 5
