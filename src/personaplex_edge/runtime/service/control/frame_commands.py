"""Hand-off of control requests to the frame loop: they run between frames, on its thread."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin on Python 3.10
from typing import Any, TypeVar

from personaplex_edge.runtime.errors import PpxError

T = TypeVar("T")


class NotApplied(PpxError):
    """The request timed out before the frame loop took it: it was withdrawn, nothing changed."""


class StillApplying(Exception):  # noqa: N818 - an outcome handed on, not an error
    """The frame loop took the request and is running it when the caller's time is up: it
    can no longer be withdrawn, so its outcome is `future`'s. Raised so the waiting worker
    goes free; the control server replies when the future is done (protocol.dispatch)."""

    def __init__(self, future: Future, timeout: float) -> None:
        super().__init__(f"the frame loop is still applying the request after {timeout:g} s")
        self.future = future


class FrameCommands:
    """Hand-off of state changes from control threads to the frame loop.

    The controller calls `call(fn, timeout)` (or `submit(fn)`); the frame loop
    calls `run_pending()` once per frame, between frames, which runs the queued
    closures in order on the loop's thread. A closure's exception goes back to
    its caller, never into the loop.

    A call that times out has a definite outcome: not yet taken by the loop, it is
    withdrawn (NotApplied: it never runs); already running, it will finish, and
    StillApplying hands its future on instead of holding the caller past `timeout`."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._queue.append((fn, future))
        return future

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        """Queue `fn` for the frame loop and wait at most `timeout` s for its result; then
        NotApplied (withdrawn) or StillApplying (taken: see the class docstring)."""
        future = self.submit(fn)
        try:
            return future.result(timeout)
        except FutureTimeout:
            pass
        # cancel() and the loop's set_running_or_notify_cancel() are atomic: exactly one wins.
        if future.cancel():
            raise NotApplied(f"not applied: the frame loop did not take the request within "
                             f"{timeout:g} s") from None
        raise StillApplying(future, timeout) from None

    def run_pending(self) -> int:
        """Run what is queued (frame loop thread only); returns how many ran."""
        with self._lock:
            items, self._queue = list(self._queue), collections.deque()
        ran = 0
        for fn, future in items:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)
            ran += 1
        return ran

    def __len__(self) -> int:
        return len(self._queue)
