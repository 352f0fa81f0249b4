"""Progress lines for long stages (stderr; one line per step on a non-terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, title: str, total: int, quiet: bool = False, unit: str = ""):
        self.title = title
        self.total = max(total, 1)
        self.quiet = quiet
        self.unit = unit
        self.done_amount = 0
        self.start = time.monotonic()
        self._last_print = 0.0
        self._tty = sys.stderr.isatty()

    def advance(self, amount: int, what: str = "") -> None:
        self.done_amount += amount
        now = time.monotonic()
        if self.quiet or (now - self._last_print < (0.2 if self._tty else 5.0)):
            return
        self._last_print = now
        pct = 100.0 * self.done_amount / self.total
        line = f"{self.title}: {pct:5.1f}% {what}"
        if self._tty:
            sys.stderr.write("\r" + line[:100].ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        end = "\n" if not self._tty else ""
        prefix = "\r" if self._tty else ""
        sys.stderr.write(f"{prefix}{self.title}: done in {elapsed:.1f} s".ljust(100) + "\n" + end[:0])
        sys.stderr.flush()
