"""The health gate of a trial slot: commit only after it served well for a while.

It loaded and the default persona compiled before the gate starts (the daemon is ready); then
`health_frames` frames and `health_s` seconds must pass with no failed frame and at most
`health_max_misses` frames slower than `health_deadline_ms`. Any failed frame or one miss too
many fails the gate at once: the daemon does not wait out a build that already disappoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from personaplex_edge.runtime.update.settings import UpdateSettings


class HealthGate:
    def __init__(self, settings: UpdateSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.started_at: float | None = None
        self.frames = self.misses = 0
        self.passed = False
        self.failure: str | None = None

    @property
    def decided(self) -> bool:
        return self.passed or self.failure is not None

    def ready(self) -> None:
        self.started_at = self.clock()

    def frame(self, ms: float) -> None:
        if self.decided or self.started_at is None:
            return
        s = self.settings
        self.frames += 1
        if ms > s.health_deadline_ms:
            self.misses += 1
            if self.misses > s.health_max_misses:
                self.failure = (f"{self.misses} of its first {self.frames} frames missed the "
                                f"{s.health_deadline_ms:g} ms deadline (health_max_misses "
                                f"{s.health_max_misses})")
                return
        if self.frames >= s.health_frames and self.clock() - self.started_at >= s.health_s:
            self.passed = True

    def frame_error(self, exc: BaseException) -> None:
        if not self.decided:
            self.failure = f"a frame failed ({type(exc).__name__}: {exc})"
