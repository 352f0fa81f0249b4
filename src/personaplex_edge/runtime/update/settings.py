"""The `update:` section of the daemon config (loaded by service/config.py; each field declared
once, as every section is: type, default, range and its documentation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personaplex_edge.runtime.yaml_schema import setting


@dataclass(frozen=True)
class UpdateSettings:
    slots_dir: Path = setting(
        "path", Path("/var/lib/personaplex/slots"),
        "the A/B slots and their state file; while it holds no committed or trial slot, the "
        "daemon runs build.path as before", section="update")
    trusted_keys: Path = setting(
        "path", Path("/etc/personaplex/trusted-keys"),
        "ed25519 public keys (*.pub, PEM) whose bundle signatures this device accepts",
        section="update")
    target: str | None = setting(
        "text", None, "this device's target profile name (engines/targets/), which a bundle's "
        "target must match", null="only portable ONNX bundles (target any) install",
        section="update")
    max_starts: int = setting(
        "int", 2, "starts a trial slot gets to prove itself before the daemon falls back to the "
        "last good one by itself", lo=1, hi=100, section="update")
    health_frames: int = setting(
        "int", 250, "the health gate: a trial slot is committed after this many frames...",
        lo=1, hi=1_000_000, section="update")
    health_s: float = setting(
        "float", 30.0, "...and this many seconds of serving...", lo=0.0, hi=86400.0,
        section="update")
    health_deadline_ms: float = setting(
        "float", 80.0, "...with at most health_max_misses frames over this many milliseconds...",
        lo=0.001, hi=10000.0, section="update")
    health_max_misses: int = setting(
        "int", 5, "...and no failed frame", lo=0, hi=1_000_000, section="update")
