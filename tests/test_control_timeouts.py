"""Control requests that time out (house issue 15): the reply says whether the request
happened, and no control worker is held past its timeout. A real ControlServer on a Unix
socket in front of a frame loop thread that applies FrameCommands between frames."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from personaplex_edge.runtime.service import ctl
from personaplex_edge.runtime.service.control.frame_commands import FrameCommands
from personaplex_edge.runtime.service.control.server import ControlServer

TIMEOUT = 0.5  # the daemon passes its reply_timeout_s to both the server and FrameCommands


class SlowLoop:
    """A stand-in daemon: `reset` goes through the frame loop, which can be held between
    frames (`stall`) or made to spend `apply_s` on a command (a replay, a persona start)."""

    def __init__(self) -> None:
        self.commands = FrameCommands()
        self.resets = 0
        self.apply_s = 0.0
        self.running = threading.Event()  # set while the loop runs a command
        self.stall = threading.Event()  # set: the loop takes nothing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.stall.is_set():
                self.commands.run_pending()
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _reset(self) -> dict[str, Any]:
        self.running.set()
        time.sleep(self.apply_s)
        self.resets += 1
        self.running.clear()
        return {"resets": self.resets}

    # the Controller protocol, as far as these tests use it
    def status(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def reset(self) -> dict[str, Any]:
        return self.commands.call(self._reset, TIMEOUT)


@pytest.fixture
def loop():
    lp = SlowLoop()
    yield lp
    lp.stop()


def _ask(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    return ctl.request(path, request, timeout)  # the client `ppx-runtime ctl` uses


def test_a_request_the_loop_never_took_is_withdrawn_and_the_reply_says_so(
        tmp_path: Path, loop: SlowLoop) -> None:
    loop.stall.set()
    with ControlServer(tmp_path / "c.sock", loop, reply_timeout=TIMEOUT) as srv:
        reply = _ask(srv.path, {"cmd": "reset", "id": 1})
        assert reply["ok"] is False and reply["id"] == 1
        assert reply["applied"] is False and "not applied" in reply["error"], reply
        loop.stall.clear()  # the loop comes back: the withdrawn reset must not run late
        time.sleep(0.2)
        assert loop.resets == 0 and len(loop.commands) == 0
        assert _ask(srv.path, {"cmd": "reset"}) == {"ok": True, "resets": 1}


def test_a_request_the_loop_took_is_answered_with_what_happened_and_frees_its_worker(
        tmp_path: Path, loop: SlowLoop) -> None:
    loop.apply_s = 2 * TIMEOUT  # taken at once, finished a timeout after the reset's timeout
    with ControlServer(tmp_path / "c.sock", loop, reply_timeout=TIMEOUT, workers=1) as srv:
        replies: list[dict[str, Any]] = []
        t0 = time.monotonic()
        asker = threading.Thread(target=lambda: replies.append(_ask(srv.path, {"cmd": "reset"})))
        asker.start()
        assert loop.running.wait(2)
        time.sleep(TIMEOUT + 0.15)  # past the reset's timeout, the loop still on it
        assert loop.running.is_set()
        t1 = time.monotonic()
        assert _ask(srv.path, {"cmd": "status"}) == {"ok": True, "resets": 0}
        assert time.monotonic() - t1 < 0.25  # the only worker is free again
        asker.join(10)
        # Not "may still take effect" at the timeout: the reset's own reply, once it happened.
        assert replies == [{"ok": True, "resets": 1}]
        assert time.monotonic() - t0 >= loop.apply_s


def test_a_wedged_frame_loop_gets_a_reply_that_says_it_took_the_request(
        tmp_path: Path, loop: SlowLoop) -> None:
    loop.apply_s = 4 * TIMEOUT  # past the server's second wait as well
    with ControlServer(tmp_path / "c.sock", loop, reply_timeout=TIMEOUT) as srv:
        t0 = time.monotonic()
        reply = _ask(srv.path, {"cmd": "reset"})
        assert time.monotonic() - t0 < 3 * TIMEOUT  # bounded, as ctl's own timeout needs
        assert reply["ok"] is False and "took the request" in reply["error"], reply


def test_frame_commands_call_returns_at_its_timeout_with_the_running_command() -> None:
    commands = FrameCommands()
    release = threading.Event()
    loop = threading.Thread(target=commands.run_pending, daemon=True)
    result: list[BaseException] = []

    def caller() -> None:
        try:
            commands.call(lambda: release.wait(10) and "done", 0.2)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result.append(exc)

    t = threading.Thread(target=caller)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.05)
    loop.start()  # the loop takes the command and runs it past the caller's timeout
    t.join(5)
    assert time.monotonic() - t0 < 0.2 + 0.15  # not held for a second timeout
    assert len(result) == 1 and type(result[0]).__name__ == "StillApplying"
    release.set()
    assert result[0].future.result(5)  # type: ignore[attr-defined] == "done"  # it happened: the outcome is handed on
    loop.join(5)


def test_ctl_with_a_config_waits_as_long_as_its_reply_timeout_lets_a_late_reply_take(
        tmp_path: Path, loop: SlowLoop, capsys) -> None:
    """Was: `ctl` gave up after 5 s whatever the daemon's control.reply_timeout_s, so a command the
    frame loop finished late (up to two reply timeouts) read as "no reply" though it happened."""
    import argparse

    reply_timeout = 3.0
    loop.apply_s = 5.5  # past ctl's old 5 s, within 2 x 3 s
    config = tmp_path / "runtime.yaml"
    config.write_text(f"control: {{socket: {tmp_path / 'c.sock'}, group: null, "
                      f"reply_timeout_s: {reply_timeout}}}\n")
    parser = argparse.ArgumentParser()
    ctl.add_arguments(parser)
    with ControlServer(tmp_path / "c.sock", loop, reply_timeout=reply_timeout) as srv:
        loop.commands.call = _with_timeout(loop.commands.call, reply_timeout)
        assert ctl.main(parser.parse_args(["--config", str(config), "reset"])) == 0, \
            capsys.readouterr().err
        assert loop.resets == 1 and srv.path.exists()
    assert capsys.readouterr().out.startswith("conversation reset")


def _with_timeout(call, timeout: float):
    """FrameCommands.call with the daemon's reply timeout (SlowLoop's is the module's 0.5 s)."""
    return lambda fn, _timeout: call(fn, timeout)
