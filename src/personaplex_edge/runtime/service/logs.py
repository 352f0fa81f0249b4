"""Daemon logging: one line per record on stdout, with journald priority prefixes.

Under systemd, stdout goes to the journal, which reads a leading `<N>` as the
record's syslog priority (SyslogLevelPrefix=, on by default). Records never
span lines: a message's newlines are escaped and an unexpected exception is
summarised as `Type: message (at file:line in func <- ...)`. Expected errors
(`PpxError`) carry no traceback at all.

Records are queued and written by a background thread, so the audio threads
never block on a slow journal; when the queue is full, records are dropped
and counted (the count is logged once the queue drains).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import traceback
from typing import TextIO

from personaplex_edge.runtime.errors import PpxError

LOGGER = "personaplex"  # the daemon's modules log under personaplex.*
TRANSCRIPT_LOGGER = "personaplex.transcript"  # the agent's words: silent unless enabled

# syslog priorities (sd-daemon.h): journald reads these from a line's start.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` is connected to the journal: systemd sets $JOURNAL_STREAM to the
    `device:inode` of the stream it connected (stdout, and stderr when it inherits it)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """`<6>personaplex.daemon: message` (with prefix) or `info personaplex.daemon: message`."""

    def __init__(self, prefix: bool = True):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {_summarise(record.exc_info[1])}"
        elif record.exc_text:
            message = f"{message}: {record.exc_text}"
        if record.stack_info:
            message = f"{message} [stack: {record.stack_info.splitlines()[-1].strip()}]"
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        lead = f"<{priority(record.levelno)}>" if self.prefix else f"{record.levelname.lower()} "
        return f"{lead}{record.name}: {message}"


def _summarise(exc: BaseException) -> str:
    """One line for an exception: the message alone for an expected error, else where it came from."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, PpxError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {text}" + (f" (at {where})" if where else "")


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: a full queue drops the record and counts it."""

    def __init__(self, q: queue.Queue):
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Keep exc_info for the formatter's one-line summary (the base class would
        # render a multi-line traceback here); the summary is computed now, while
        # the traceback is alive, so the record stays small and picklable.
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _summarise(record.exc_info[1])
            record.exc_info = None
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        record.ppx_dropped_before = self.dropped  # so the drop note lands where the gap is
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _DropReporter(logging.Handler):
    """Writes records to the stream, noting first how many were dropped just before each."""

    def __init__(self, inner: logging.Handler, source: _DroppingQueueHandler):
        super().__init__()
        self.inner, self.source, self.reported = inner, source, 0

    def handle(self, record: logging.LogRecord) -> bool:
        self.note_drops(getattr(record, "ppx_dropped_before", self.source.dropped))
        return self.inner.handle(record)

    def note_drops(self, dropped: int) -> None:
        if dropped > self.reported:
            note = logging.LogRecord(LOGGER + ".logs", logging.WARNING, __file__, 0,
                                     "%d log records dropped (stdout too slow)",
                                     (dropped - self.reported,), None)
            self.inner.handle(note)
            self.reported = dropped

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        self.inner.emit(record)


class LogSetup:
    """What `setup_logging` installed; `stop()` flushes the queue and puts things back."""

    def __init__(self, listener: logging.handlers.QueueListener, handler: _DroppingQueueHandler,
                 reporter: _DropReporter, saved: tuple[int, bool, bool]):
        self.listener, self.handler, self.reporter, self._saved = listener, handler, reporter, saved

    def stop(self) -> None:
        root = logging.getLogger(LOGGER)
        root.removeHandler(self.handler)
        self.listener.stop()  # processes what is queued, then joins the thread
        self.reporter.note_drops(self.handler.dropped)  # drops after the last written record
        root.setLevel(self._saved[0])
        root.propagate = self._saved[1]
        logging.getLogger(TRANSCRIPT_LOGGER).disabled = self._saved[2]


def setup_logging(level: str = "info", transcripts: bool = False, stream: TextIO | None = None,
                  prefix: bool | None = None, queue_size: int = 10000) -> LogSetup:
    """Route the `personaplex` loggers to `stream` (stdout) through a non-blocking queue.

    `prefix`: journald priority prefixes; by default on when stdout is the journal
    ($JOURNAL_STREAM) or not a terminal. Transcripts (`personaplex.transcript`)
    are emitted only with `transcripts=True`."""
    stream = sys.stdout if stream is None else stream
    if prefix is None:
        prefix = bool(os.environ.get("JOURNAL_STREAM")) or not _isatty(stream)
    out = logging.StreamHandler(stream)
    out.setFormatter(JournalFormatter(prefix=prefix))
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    handler = _DroppingQueueHandler(q)
    reporter = _DropReporter(out, handler)
    listener = logging.handlers.QueueListener(q, reporter)
    root = logging.getLogger(LOGGER)
    transcript = logging.getLogger(TRANSCRIPT_LOGGER)
    saved = (root.level, root.propagate, transcript.disabled)
    for old in [h for h in root.handlers if isinstance(h, _DroppingQueueHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    root.propagate = False  # the daemon's records go only here, once
    transcript.disabled = not transcripts
    transcript.setLevel(logging.INFO)
    listener.start()
    return LogSetup(listener, handler, reporter, saved)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
