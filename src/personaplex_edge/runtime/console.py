"""Warnings of the runtime's modules on stderr, one `PROGRAM: warning: ...` line each.

The core logs what a user should know but that is not an error (a prompt that crowds the
model's context) to the `personaplex` logger. The daemon sends that logger to the journal
(service/logs.py); the one-shot commands (`ppx-runtime play`, `ppx-export quantize`) call
`warnings_to_stderr` so the same records reach the terminal, prefixed like their errors.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "personaplex"


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr at emit time (a captured or replaced stream works)."""

    def __init__(self, program: str):
        super().__init__(logging.WARNING)
        self.program = program

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().replace("\n", " ")
            print(f"{self.program}: {record.levelname.lower()}: {message}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def warnings_to_stderr(program: str) -> None:
    """Route the `personaplex` logger's warnings and errors to stderr (once per process)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(program))
