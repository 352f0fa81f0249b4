"""Progress bars for the long stages of `ppx-export` (tqdm, on stderr).

On a terminal tqdm redraws its bar in place. Anywhere else (journald, a CI log, a
pipe) every update is one plain line instead: no carriage returns, at most one line
per bar every LOG_INTERVAL seconds, plus one when the bar starts and one when it
ends. Under --quiet (`quiet=True`) nothing is printed at all.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 5.0  # seconds between two lines of one bar when stderr is not a terminal
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}, {rate_fmt}]"
_COUNT_FORMAT = "{desc}: {n_fmt}{unit}{postfix} [{elapsed}, {rate_fmt}]"


class _Lines:
    """A stream for one tqdm bar that writes each redraw ('\\r' + meter + padding) as one
    line, and skips a redraw that shows the same progress as the line before (the closing
    redraw after a final update, say)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            line = line.rstrip()
            progress = line.rsplit(" [", 1)[0]  # without the timings
            if line and progress != self._last:
                self._last = progress
                self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(desc: str, total: float | None = None, *, quiet: bool = False, unit: str = "it",
        nested: bool = False, **kwargs: Any) -> tqdm:
    """A progress bar on stderr. `total` None counts without a percentage; `nested` is a bar
    shown below another one (on a terminal it is removed when it closes)."""
    if quiet:
        return tqdm(total=total, disable=True)
    stream = sys.stderr
    if stream.isatty():
        return tqdm(desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True,
                    leave=not nested, **kwargs)
    # No bar graphic and no cursor movement; what changed comes before the timings.
    fmt = (_LINE_FORMAT if total else _COUNT_FORMAT)
    return tqdm(desc=desc, total=total, unit=unit, file=_Lines(stream), bar_format=fmt, ascii=True,
                mininterval=LOG_INTERVAL, position=0, leave=True, **kwargs)


def note(message: str) -> None:
    """One line on stderr that does not tear an open bar on a terminal."""
    tqdm.write(message, file=sys.stderr)
