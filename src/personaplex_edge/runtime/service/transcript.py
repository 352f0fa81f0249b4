"""The agent's words for the journal: one line per utterance, not one per 80 ms token.

The text stream gives one SentencePiece piece (or padding) per frame. Pieces are
gathered and a line is written when the agent goes quiet (`quiet_frames` frames
without a piece) or when the line grows past `max_chars`, cut where a word starts.
"""

from __future__ import annotations


class TranscriptLines:
    def __init__(self, quiet_frames: int = 12, max_chars: int = 200):
        self.quiet_frames, self.max_chars = quiet_frames, max_chars
        self._parts: list[str] = []
        self._chars = 0
        self._quiet = 0

    def add(self, piece: str) -> str | None:
        """One frame's piece ('' for a frame without text); returns a finished line or None."""
        if not piece:
            self._quiet += 1
            return self.flush() if self._quiet >= self.quiet_frames else None
        self._quiet = 0
        line = None
        # Cut before a new word once the line is long; a stream without word starts is cut
        # anyway at twice the length, so a line's size stays bounded.
        if self._chars >= self.max_chars and (piece[0].isspace() or
                                              self._chars >= 2 * self.max_chars):
            line = self.flush()
        self._parts.append(piece)
        self._chars += len(piece)
        return line

    def flush(self) -> str | None:
        """The gathered text as one line (None when there is none); starts a new line."""
        text = " ".join("".join(self._parts).split())
        self._parts.clear()
        self._chars = 0
        return text or None
