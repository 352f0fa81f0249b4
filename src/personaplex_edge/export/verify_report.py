"""The verify report: one `Check` per metric, the table the CLI prints and the JSON it writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from personaplex_edge.runtime.errors import PpxError


@dataclass(frozen=True)
class Check:
    network: str
    metric: str
    value: float
    threshold: float | None
    passed: bool
    informational: bool = False  # reported, never fails the build (threshold: none)


@dataclass
class VerifyReport:
    build: str
    reference: str
    backend: str
    precisions: dict[str, str]
    inputs: dict[str, Any]
    frames: int
    e2e_frames: int
    checks: list[Check] = field(default_factory=list)
    persona: str = ""  # the conversation's persona and voice, and why that one

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        rows = [f"conversation: {self.persona}"] if self.persona else []
        rows += [f"{'network':<14}{'metric':<34}{'value':>10}{'threshold':>12}  pass"]
        for c in self.checks:
            bound = "-" if c.informational else ">= " + _fmt(c.threshold)
            verdict = "info" if c.informational else "yes" if c.passed else "NO"
            rows.append(f"{c.network:<14}{c.metric:<34}{c.value:>10.4f}{bound:>12}  {verdict}")
        gating = sum(not c.informational for c in self.checks)
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failed())} of {gating} checks)"
        rows.append(f"verify: {verdict}: {self.build} ({_describe(self.precisions)}, "
                    f"{self.backend}) vs {self.reference}; {self.frames} frames, "
                    f"free-running {self.e2e_frames}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _describe(precisions: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in precisions.items())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PpxError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)

