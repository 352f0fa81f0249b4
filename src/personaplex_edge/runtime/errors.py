"""The one error type both programs report as a single clear line."""

from __future__ import annotations


class PpxError(Exception):
    """A problem the user can fix: bad input, a missing file, a mismatched build.

    The command-line entry points print ``str(error)`` on one line and exit
    non-zero; no traceback. The message names the file, field or request.
    """


class ConfigError(PpxError):
    """Configuration or persona content is invalid (exit status 78, EX_CONFIG)."""
