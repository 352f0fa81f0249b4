"""Per-stage latency statistics (p50 / p95 / max) for reports and metrics."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


class StageTimer:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.samples[name].append((time.perf_counter() - t0) * 1e3)

    def add(self, name: str, ms: float) -> None:
        self.samples[name].append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, values in self.samples.items():
            a = np.asarray(values)
            out[name] = {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                         "max": float(a.max()), "n": int(a.size)}
        return out

    def table(self) -> str:
        lines = [f"{'stage':<16}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'frames':>8}"]
        for name, s in self.summary().items():
            lines.append(f"{name:<16}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['max']:>9.2f}{s['n']:>8}")
        return "\n".join(lines)
