"""Control socket and `ctl` client: real Unix sockets, a frame loop applying changes between frames."""

from __future__ import annotations

import argparse
import grp
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from personaplex_edge.runtime.errors import ConfigError, PpxError
from personaplex_edge.runtime.service import ctl
from personaplex_edge.runtime.service.control.frame_commands import FrameCommands
from personaplex_edge.runtime.service.control.protocol import parse_request
from personaplex_edge.runtime.service.control.server import ControlServer


class LoopController:
    """A stand-in daemon: a frame loop thread that applies queued changes between frames,
    the way the real daemon is expected to."""

    def __init__(self, hang: threading.Event | None = None):
        self.commands = FrameCommands()
        self.state = {"persona": "copilot", "muted": False, "paused": False, "busy": False, "resets": 0}
        self.frames = 0
        self.loop_errors: list[BaseException] = []
        self.applied_on: set[str] = set()
        self.hang = hang  # set_paused waits on it (a daemon that does not answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="frame-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.commands.run_pending()  # between frames
                self.frames += 1
            except BaseException as exc:  # noqa: BLE001 - the test asserts none reach the loop
                self.loop_errors.append(exc)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _apply(self, **changes: Any) -> dict[str, Any]:
        def change() -> dict[str, Any]:
            self.applied_on.add(threading.current_thread().name)
            self.state.update(changes)
            return dict(changes)
        return self.commands.call(change, timeout=1.0)

    # Controller protocol
    def status(self) -> dict[str, Any]:
        return {"state": "running", "frames": self.frames, **self.state}

    def switch_persona(self, name: str) -> dict[str, Any]:
        if name == "nobody":
            raise PpxError(f"persona {name!r}: not found (known: copilot, focus)")
        if name == "crash":
            raise RuntimeError("a bug in the daemon")
        return {**self._apply(persona=name), "pending": False}

    def reset(self) -> None:
        self._apply(resets=self.state["resets"] + 1)

    def set_muted(self, muted: bool) -> dict[str, Any]:
        return self._apply(muted=muted)

    def set_paused(self, paused: bool) -> dict[str, Any]:
        if self.hang is not None:
            self.hang.wait(10)
        return self._apply(paused=paused)

    def set_busy(self, busy: bool) -> dict[str, Any]:
        return self._apply(busy=busy)

    def metrics_text(self) -> str:
        return "# TYPE ppx_up gauge\nppx_up 1.0\n"


@pytest.fixture
def controller():
    c = LoopController()
    yield c
    c.stop()
    assert c.loop_errors == []


@pytest.fixture
def server(tmp_path: Path, controller: LoopController):
    srv = ControlServer(tmp_path / "run" / "control.sock", controller, group=_my_group(),
                        reply_timeout=1.0)
    srv.start()
    yield srv
    srv.stop()


def _my_group() -> str:
    return grp.getgrgid(os.getgid()).gr_name


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _lines(s: socket.socket, n: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _ask(s: socket.socket, payload: bytes) -> dict[str, Any]:
    s.sendall(payload)
    return _lines(s, 1)[0]


# -- socket file ------------------------------------------------------------------------

def test_socket_mode_group_and_removal(tmp_path: Path, controller: LoopController) -> None:
    path = tmp_path / "run" / "control.sock"
    srv = ControlServer(path, controller, mode=0o660, group=_my_group())
    srv.start()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()
    assert [p.name for p in path.parent.iterdir()] == ["control.sock"]  # no temporary left
    srv.stop()
    assert not path.exists()


def test_missing_group_is_a_clear_config_error(tmp_path: Path, controller: LoopController) -> None:
    path = tmp_path / "control.sock"
    srv = ControlServer(path, controller, group="ppx-no-such-group")
    with pytest.raises(ConfigError, match="control.group: group 'ppx-no-such-group' does not exist"):
        srv.start()
    assert not path.exists()


def test_stale_socket_is_replaced_live_one_and_files_are_not(tmp_path: Path,
                                                             controller: LoopController) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a crashed daemon's socket: the file stays, nobody listens
    stale.close()
    first = ControlServer(path, controller)
    first.start()
    try:
        with _connect(path) as s:
            assert _ask(s, b'{"cmd": "status"}\n')["ok"] is True
        second = ControlServer(path, controller)
        with pytest.raises(PpxError, match="another daemon is already listening"):
            second.start()
        with _connect(path) as s:  # the first daemon is undisturbed
            assert _ask(s, b'{"cmd": "status"}\n')["ok"] is True
    finally:
        first.stop()
    path.write_text("not a socket")
    with pytest.raises(PpxError, match="exists and is not a socket"):
        ControlServer(path, controller).start()
    assert path.read_text() == "not a socket"


def test_stop_leaves_a_newer_daemons_socket_alone(tmp_path: Path, controller: LoopController) -> None:
    path = tmp_path / "control.sock"
    old = ControlServer(path, controller)
    old.start()
    os.unlink(path)  # e.g. an operator removed it and a new daemon started
    new = ControlServer(path, controller)
    new.start()
    old.stop()
    assert path.exists()
    new.stop()
    assert not path.exists()


# -- protocol ---------------------------------------------------------------------------

def test_every_command_is_applied_by_the_frame_loop(server: ControlServer,
                                                    controller: LoopController) -> None:
    with _connect(server.path) as s:
        for payload, expect in [
            ({"cmd": "mute"}, {"muted": True}),
            ({"cmd": "unmute"}, {"muted": False}),
            ({"cmd": "pause"}, {"paused": True}),
            ({"cmd": "resume"}, {"paused": False}),
            ({"cmd": "busy", "on": True}, {"busy": True}),
            ({"cmd": "persona", "name": "focus"}, {"persona": "focus"}),
            ({"cmd": "reset"}, {}),
        ]:
            reply = _ask(s, json.dumps(payload).encode() + b"\n")
            assert reply["ok"] is True, reply
            assert expect.items() <= reply.items()
        status = _ask(s, b'{"cmd": "status", "id": 41}\n')
        assert status["ok"] and status["id"] == 41
        assert status["persona"] == "focus" and status["busy"] is True and status["resets"] == 1
        metrics = _ask(s, b'{"cmd": "metrics"}\n')
        assert metrics["ok"] and "ppx_up 1.0" in metrics["text"]
    assert controller.applied_on == {"frame-loop"}


@pytest.mark.parametrize("payload, error", [
    (b"not json\n", "malformed JSON"),
    (b"\xff\xfe{}\n", "not UTF-8"),
    (b"[1, 2]\n", "a request is a JSON object"),
    (b"{}\n", "cmd: missing"),
    (b'{"cmd": 3}\n', "cmd: expected a string"),
    (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
    (b'{"cmd": "status", "verbose": true}\n', "unexpected field 'verbose'"),
    (b'{"cmd": "persona"}\n', "missing field 'name'"),
    (b'{"cmd": "persona", "name": 7}\n', "name: expected a string"),
    (b'{"cmd": "persona", "name": "../../etc/x.yaml"}\n', "expected a persona name"),
    (b'{"cmd": "busy", "on": "yes"}\n', "on: expected true or false"),
    (b'{"cmd": "busy", "on": 1}\n', "on: expected true or false"),
    (b'{"cmd": "status", "id": [1]}\n', "id: expected a string or a number"),
    (b"[" * 5000 + b"\n", "request line longer than 4096 bytes"),
    (b"[" * 3000 + b"\n", "nested too deeply"),
    (b'{"cmd": "persona", "name": "nobody"}\n', "persona 'nobody': not found"),
    (b'{"cmd": "persona", "name": "crash"}\n', "internal error: RuntimeError: a bug in the daemon"),
])
def test_bad_requests_get_an_error_and_the_connection_stays_usable(server: ControlServer,
                                                                   payload: bytes, error: str) -> None:
    with _connect(server.path) as s:
        reply = _ask(s, payload)
        assert reply["ok"] is False and error in reply["error"], reply
        assert _ask(s, b'{"cmd": "status"}\n')["ok"] is True


def test_a_bad_request_with_a_valid_id_gets_it_back(server: ControlServer) -> None:
    """Was: a request refused while parsing was answered without its id, so a client matching
    replies by id could not tell which request failed."""
    with _connect(server.path) as s:
        reply = _ask(s, b'{"cmd": "reboot", "id": "r-7"}\n')
        assert reply == {"ok": False, "id": "r-7", "error": reply["error"]}
        assert "unknown command 'reboot'" in reply["error"]
        assert "id" not in _ask(s, b'{"cmd": "status", "id": [1]}\n')  # no valid id to give back


def test_oversized_line_is_not_buffered_and_later_requests_work(server: ControlServer) -> None:
    with _connect(server.path) as s:
        junk = b"x" * (1 << 20)  # 1 MiB without a newline, then a newline and two requests
        s.sendall(junk + b'\n{"cmd": "status", "id": 1}\r\n\n{"cmd": "mute", "id": 2}\n')
        replies = _lines(s, 3)
        assert replies[0] == {"ok": False, "error": "request line longer than 4096 bytes"}
        assert [r.get("id") for r in replies[1:]] == [1, 2] and all(r["ok"] for r in replies[1:])
        assert all(len(c.inbuf) <= 2 * server.max_line for c in server._clients.values())


def test_last_request_without_newline_is_answered_at_eof(server: ControlServer) -> None:
    with _connect(server.path) as s:
        s.sendall(b'{"cmd": "status"}\n{"cmd": "mute"}')
        s.shutdown(socket.SHUT_WR)
        replies = _lines(s, 3)
        assert [r["ok"] for r in replies] == [True, True]
        assert s.recv(10) == b""  # then the server closes


def test_many_clients_at_once_get_their_replies_in_order(server: ControlServer) -> None:
    failures: list[str] = []

    def client(k: int) -> None:
        try:
            with _connect(server.path) as s:
                batch = b"".join(json.dumps({"cmd": "status", "id": f"{k}-{i}"}).encode() + b"\n"
                                 for i in range(25))
                s.sendall(batch)  # pipelined: all requests before any reply
                replies = _lines(s, 25)
                if [r.get("id") for r in replies] != [f"{k}-{i}" for i in range(25)]:
                    failures.append(f"client {k}: {replies[:3]}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_too_many_clients_are_refused_with_an_error(tmp_path: Path, controller: LoopController) -> None:
    with ControlServer(tmp_path / "c.sock", controller, max_clients=2) as srv:
        held = [_connect(srv.path), _connect(srv.path)]
        for s in held:
            assert _ask(s, b'{"cmd": "status"}\n')["ok"]
        with _connect(srv.path) as extra:
            assert _lines(extra, 1) == [{"ok": False, "error": "too many clients connected"}]
        held.pop().close()
        deadline = time.monotonic() + 5
        while srv.clients > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with _connect(srv.path) as again:
            assert _ask(again, b'{"cmd": "status"}\n')["ok"]
        held[0].close()


def test_a_hung_daemon_call_is_bounded_and_does_not_block_others(tmp_path: Path) -> None:
    hang = threading.Event()
    controller = LoopController(hang=hang)
    try:
        with ControlServer(tmp_path / "c.sock", controller, reply_timeout=0.3) as srv:
            with _connect(srv.path) as slow, _connect(srv.path) as other:
                slow.sendall(b'{"cmd": "pause", "id": "p"}\n')
                # Answered while the pause call is still stuck in the daemon:
                assert _ask(other, b'{"cmd": "status"}\n')["paused"] is False
                t0 = time.monotonic()
                reply = _lines(slow, 1)[0]
                assert reply["ok"] is False and reply["id"] == "p"
                assert "did not answer within 0.3 s" in reply["error"]
                assert time.monotonic() - t0 < 5  # bounded by reply_timeout, not by the call
                assert not hang.is_set()
                assert _ask(slow, b'{"cmd": "mute"}\n')["ok"]  # the connection still works
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 3  # stop() does not wait for the stuck call
    finally:
        hang.set()
        controller.stop()
    assert controller.loop_errors == []


def test_clients_vanishing_mid_request_do_not_disturb_the_server(server: ControlServer,
                                                                 controller: LoopController) -> None:
    for payload in (b'{"cmd": "sta', b'{"cmd": "mute"}\n', b"x" * 9000):
        s = _connect(server.path)
        s.sendall(payload)
        s.close()
    s = _connect(server.path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.sendall(b'{"cmd": "status"}\n' * 50)
    s.close()  # reset with replies unread
    with _connect(server.path) as ok:
        assert _ask(ok, b'{"cmd": "status"}\n')["ok"]
    assert controller.loop_errors == []


def test_frame_commands_time_out_when_the_loop_is_stalled() -> None:
    commands = FrameCommands()
    ran: list[int] = []
    with pytest.raises(PpxError, match="did not take the request within 0.05 s"):
        commands.call(lambda: ran.append(1), timeout=0.05)
    assert commands.run_pending() == 0 and ran == []  # withdrawn: not applied late

    def boom() -> None:
        raise ValueError("bad change")

    future = commands.submit(boom)
    assert commands.run_pending() == 1  # the loop does not see the exception
    with pytest.raises(ValueError, match="bad change"):
        future.result()


def test_parse_request_accepts_the_documented_forms() -> None:
    assert parse_request(b'{"cmd": "busy", "on": false, "id": "x"}').args == {"on": False}
    assert parse_request(b'{"cmd": "persona", "name": "road-trip_2"}').args == {"name": "road-trip_2"}


# -- ctl ----------------------------------------------------------------------------------

def test_ctl_commands_print_a_line_and_exit_zero(server: ControlServer, capsys) -> None:
    expected = {
        ("mute", None): "microphone muted",
        ("unmute", None): "microphone unmuted",
        ("pause", None): "speech paused",
        ("resume", None): "speech resumed",
        ("busy", "on"): "driver busy: on",
        ("busy", "off"): "driver busy: off",
        ("persona", "roadtrip"): "persona roadtrip",
        ("reset", None): "conversation reset",
    }
    for (command, arg), text in expected.items():
        assert ctl.run(command, arg, socket_path=server.path) == 0
        out = capsys.readouterr().out
        assert out.startswith(text) and out.count("\n") == 1, out
    assert ctl.run("status", socket_path=server.path) == 0
    out = capsys.readouterr().out
    # A few lines for a person, one subject each: the state and persona first.
    assert out.startswith("running: persona roadtrip, frames ") and "\nspeech: muted no" in out
    assert "None" not in out and len(max(out.splitlines(), key=len)) < 200
    assert ctl.run("metrics", socket_path=server.path) == 0
    assert "ppx_up 1.0" in capsys.readouterr().out
    assert ctl.run("status", socket_path=server.path, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["persona"] == "roadtrip"


def test_ctl_error_reply_exits_one(server: ControlServer, capsys) -> None:
    assert ctl.run("persona", "nobody", socket_path=server.path) == 1
    err = capsys.readouterr().err
    assert err == "ppx-runtime ctl: persona: persona 'nobody': not found (known: copilot, focus)\n"


def test_ctl_unreachable_daemon_exits_two_naming_the_socket(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "absent.sock"
    assert ctl.run("status", socket_path=missing) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "is `ppx-runtime serve` running?" in err and err.count("\n") == 1
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert ctl.run("status", socket_path=stale) == 2
    assert "nothing listens on" in capsys.readouterr().err


def test_ctl_times_out_on_a_silent_socket(tmp_path: Path, capsys) -> None:
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # accepts (kernel backlog) but never answers
    try:
        assert ctl.run("status", socket_path=path, timeout=0.2) == 2
        assert "no reply from the daemon within 0.2 s" in capsys.readouterr().err
    finally:
        listener.close()


def test_ctl_argument_parsing_and_usage_errors(server: ControlServer, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="ppx-runtime ctl")
    ctl.add_arguments(parser)
    assert ctl.main(parser.parse_args(["--socket", str(server.path), "busy", "on"])) == 0
    assert capsys.readouterr().out == "driver busy: on\n"
    config = tmp_path / "runtime.yaml"
    config.write_text(f"control:\n  socket: {server.path}\n")
    assert ctl.main(parser.parse_args(["--config", str(config), "--json", "mute"])) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "muted": True}
    assert ctl.main(parser.parse_args(["--socket", str(server.path), "busy", "maybe"])) == 2
    assert "busy: give on or off" in capsys.readouterr().err
    assert ctl.main(parser.parse_args(["--socket", str(server.path), "persona"])) == 2
    assert ctl.main(parser.parse_args(["--socket", str(server.path), "status", "extra"])) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["reboot"])


# -- idle clients (issue 11) ------------------------------------------------------------------

def test_idle_clients_are_closed_so_ctl_is_not_locked_out(tmp_path: Path,
                                                           controller: LoopController,
                                                           capsys) -> None:
    with ControlServer(tmp_path / "c.sock", controller, max_clients=2, idle_timeout=0.4) as srv:
        idle = [_connect(srv.path), _connect(srv.path)]  # connect and never send a request
        partial = idle[1]
        partial.sendall(b'{"cmd": "sta')  # half a request is no activity either
        deadline = time.monotonic() + 5
        while srv.clients < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctl.run("status", socket_path=srv.path) == 1  # every slot held
        assert "too many clients connected" in capsys.readouterr().err
        time.sleep(0.8)
        assert ctl.run("status", socket_path=srv.path) == 0, capsys.readouterr().err
        for s in idle:
            assert s.recv(10) == b""  # closed by the server
            s.close()


def test_a_client_waiting_for_its_reply_or_talking_is_not_idle(tmp_path: Path) -> None:
    hang = threading.Event()
    controller = LoopController(hang=hang)
    try:
        with ControlServer(tmp_path / "c.sock", controller, reply_timeout=0.8,
                           idle_timeout=0.3) as srv:
            with _connect(srv.path) as waiting, _connect(srv.path) as chatty:
                waiting.sendall(b'{"cmd": "pause", "id": "p"}\n')  # stuck in the daemon
                for _ in range(6):  # requests every 0.15 s: never idle for 0.3 s
                    assert _ask(chatty, b'{"cmd": "status"}\n')["ok"]
                    time.sleep(0.15)
                reply = _lines(waiting, 1)[0]  # answered (timeout reply), not dropped
                assert reply["id"] == "p" and "did not answer" in reply["error"]
                assert _ask(waiting, b'{"cmd": "mute"}\n')["ok"]
    finally:
        hang.set()
        controller.stop()


def test_idle_timeout_comes_from_the_config(tmp_path: Path, controller: LoopController) -> None:
    from personaplex_edge.runtime.service.config import load_config

    config = tmp_path / "runtime.yaml"
    config.write_text(f"control:\n  socket: {tmp_path / 'c.sock'}\n  idle_timeout_s: 0.25\n")
    srv = ControlServer.from_config(load_config(config).control, controller)
    assert srv.idle_timeout == 0.25


# -- ctl: every bad input one line (issue 11) ---------------------------------------------------

def test_ctl_negative_timeout_is_one_usage_line(server: ControlServer, capsys) -> None:
    parser = argparse.ArgumentParser(prog="ppx-runtime ctl")
    ctl.add_arguments(parser)
    for value in ("-1", "0", "nan", "inf"):
        args = parser.parse_args(["--socket", str(server.path), "--timeout", value, "status"])
        assert ctl.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("ppx-runtime ctl: error: --timeout: ") and err.count("\n") == 1, err


def test_ctl_persona_with_a_path_has_no_doubled_prefix(server: ControlServer, capsys) -> None:
    assert ctl.run("persona", "../etc", socket_path=server.path) == 1
    err = capsys.readouterr().err
    assert err.startswith("ppx-runtime ctl: persona: name: expected a persona name"), err
    assert "persona: persona:" not in err and err.count("\n") == 1


def test_ctl_socket_that_is_a_regular_file_is_named_so(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a socket\n")
    assert ctl.run("status", socket_path=path) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a socket (a regular file)" in err and "stale" not in err, err
    assert err.count("\n") == 1


def test_status_for_a_person_is_grouped_lines_with_nothing_lost_and_no_none() -> None:
    """`ctl status` was one ~900-character line of a flattened dict with None values: now a line
    per subject, absent values left out, every present one shown (--json keeps them all)."""
    body = {"ok": True, "persona": "copilot", "state": "listening", "muted": False,
            "paused": False, "busy": False, "frames": 8000, "deadline_misses": 4,
            "frame_errors": 0, "frame_ms_p50": 8.2, "frame_ms_p95": 12.0, "frame_ms_p99": 19.2,
            "mic_to_speaker_ms": 133.5, "conversation_age_s": 62.3, "context_fill": "812/3000",
            "reanchors": 1, "last_idle_reset_ago_s": None, "context_pending": False,
            "audio": {"overruns": 0, "model_underruns": 2, "latency_trims": 3, "reason": "",
                      "capture_open": True, "echo_cancel": "webrtc", "echo_delay_ms": 29.9,
                      "fifo_target_ms": 20.0, "capture_reads": 700,
                      "realtime": {"capture": True, "playback": False, "why_not": "playback: x"},
                      "latency_ms": {"total": 133.5, "frame": 80.0, "playback": 19.8}}}
    text = ctl.describe("status", body)
    lines = text.splitlines()
    assert lines[0] == "listening: persona copilot, frames 8000, deadline misses 4, frame errors 0"
    assert lines[1] == "frame loop (ms): p50 8.2, p95 12.0, p99 19.2"
    assert lines[2] == "mic to speaker: 133.5 ms (frame 80.0, playback 19.8)"
    assert "speech: muted no, paused no, busy no" in lines
    assert any(line.startswith("conversation: conversation age 1m02s") for line in lines)
    assert "audio xruns: overruns 0, model underruns 2" in lines
    assert "audio playback FIFO: latency trims 3, fifo target 20.0 ms" in lines
    assert "audio echo: echo cancel webrtc, echo delay 29.9 ms" in lines
    assert "why not playback: x" in text and "capture reads 700" in text
    assert "None" not in text and "last idle reset" not in text and "reason" not in text
    # The network endpoint: one line while it is on, nothing while it is off.
    assert "network" not in ctl.describe("status", {**body, "network": {"enabled": False}})
    on = ctl.describe("status", {**body, "network": {
        "enabled": True, "policy": "exclusive", "sessions": 2, "last_end": None,
        "cabin_quiet_s": 12.5, "session": None}})
    assert "network: policy exclusive, sessions 2, cabin quiet 12.5s" in on.splitlines()
