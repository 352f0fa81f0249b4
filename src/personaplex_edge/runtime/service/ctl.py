"""`ppx-runtime ctl`: the control socket's command-line client.

    ppx-runtime ctl [--socket PATH | --config FILE] [--json] [--timeout S] COMMAND [ARG]

Exit status: 0 when the daemon answers ok, 1 when it answers with an error,
2 when it cannot be reached (no socket, permission denied, no reply) or the
command line is wrong.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any, TextIO

from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.service.config import ControlConfig

DEFAULT_SOCKET = ControlConfig.socket
COMMANDS = ("status", "persona", "reset", "mute", "unmute", "pause", "resume", "busy", "metrics",
            "context")
MAX_REPLY = 16 << 20  # a metrics reply is a few KiB; anything near this is not our daemon

EXIT_OK, EXIT_ERROR_REPLY, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_TIMEOUT_S = 5.0  # without a config: the daemon's default reply_timeout_s (2 s) twice, and a beat


class Unreachable(PpxError):
    """The daemon could not be asked (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ctl` subcommand's arguments (for `ppx-runtime`, runtime/cli.py)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help=f"control socket (default: $PPX_CONTROL_SOCKET, "
                                                   f"else {DEFAULT_SOCKET})")
    where.add_argument("--config", type=Path, help="take the socket path from this daemon config")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the reply (default: 5, or with --config what its "
                             "control.reply_timeout_s lets a late reply take)")
    parser.add_argument("ctl_command", metavar="COMMAND", choices=COMMANDS,
                        help="status | persona NAME | reset | mute | unmute | pause | resume | "
                             "busy on|off | metrics | context set TEXT|clear|show")
    parser.add_argument("ctl_arg", metavar="ARG", nargs="?",
                        help="persona name, on/off for busy, set/clear/show for context")
    parser.add_argument("ctl_text", metavar="TEXT", nargs="?",
                        help="context set: the vehicle's facts, e.g. \"ETA 14:05, 180 km range\"")


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `ctl` from parsed arguments (see `add_arguments`); returns the exit status."""
    socket_path, timeout = args.socket, args.timeout
    if socket_path is None and args.config is not None:
        from personaplex_edge.runtime.service.config import load_config

        try:
            control = load_config(args.config).control
        except PpxError as exc:
            print(f"ppx-runtime ctl: error: {exc}", file=err or sys.stderr)
            return EXIT_UNREACHABLE
        socket_path = control.socket
        if timeout is None:  # a frame-loop command may answer late: two reply timeouts and a beat
            timeout = max(DEFAULT_TIMEOUT_S, 2 * control.reply_timeout_s + 1.0)
    return run(args.ctl_command, args.ctl_arg, socket_path=socket_path, as_json=args.json,
               timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout, out=out, err=err,
               text=args.ctl_text)


def run(command: str, arg: str | None = None, socket_path: Path | None = None, as_json: bool = False,
        timeout: float = 5.0, out: TextIO | None = None, err: TextIO | None = None,
        text: str | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    path = Path(socket_path or os.environ.get("PPX_CONTROL_SOCKET") or DEFAULT_SOCKET)
    if not (math.isfinite(timeout) and timeout > 0):  # socket.settimeout would raise
        print(f"ppx-runtime ctl: error: --timeout: expected a positive number of seconds, "
              f"got {timeout:g}", file=err)
        return EXIT_UNREACHABLE
    try:
        req = build_request(command, arg, text)
    except ValueError as exc:
        print(f"ppx-runtime ctl: error: {exc}", file=err)
        return EXIT_UNREACHABLE
    try:
        reply = request(path, req, timeout)
    except Unreachable as exc:
        print(f"ppx-runtime ctl: error: {exc}", file=err)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(reply, ensure_ascii=False, sort_keys=True), file=out)
    if reply.get("ok") is not True:
        if not as_json:
            error = str(reply.get("error", "error reply"))
            # The daemon's request errors already name the command ("persona: name: ...").
            lead = "" if error.startswith(f"{command}: ") else f"{command}: "
            print(f"ppx-runtime ctl: {lead}{error}", file=err)
        return EXIT_ERROR_REPLY
    if not as_json:
        text = describe(command, reply, arg)
        print(text, file=out, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


def build_request(command: str, arg: str | None, text: str | None = None) -> dict[str, Any]:
    """The JSON request for a command line (ValueError on a usage mistake)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    if command == "context":
        if arg not in ("set", "clear", "show"):
            raise ValueError('context: give set "TEXT", clear or show, e.g. '
                             '`ppx-runtime ctl context set "ETA 14:05"`')
        if (arg == "set") != (text is not None):
            raise ValueError("context: set takes the facts as one argument; clear and show none")
        return {"cmd": "context", "action": arg, **({"text": text} if text is not None else {})}
    if text is not None:
        raise ValueError(f"{command}: takes at most one argument (got {text!r} too)")
    if command == "persona":
        if not arg:
            raise ValueError("persona: give a persona name, e.g. `ppx-runtime ctl persona focus`")
        return {"cmd": "persona", "name": arg}
    if command == "busy":
        if arg not in ("on", "off"):
            raise ValueError("busy: give on or off, e.g. `ppx-runtime ctl busy on`")
        return {"cmd": "busy", "on": arg == "on"}
    if arg is not None:
        raise ValueError(f"{command}: takes no argument (got {arg!r})")
    return {"cmd": command}


def request(path: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request, return the reply object (Unreachable when there is none)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise Unreachable(f"no daemon socket at {path} (is `ppx-runtime serve` running? "
                              "--socket names another path)") from None
        except ConnectionRefusedError:
            raise Unreachable(_refused(path)) from None
        except PermissionError:
            raise Unreachable(f"permission denied on {path} (are you in the socket's group? "
                              "`ls -l` shows it)") from None
        except TimeoutError:
            raise Unreachable(f"{path}: the daemon did not accept within {timeout:g} s") from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK or exc.errno == errno.ECONNREFUSED:
                raise Unreachable(f"{path} is not the daemon's socket ({exc.strerror})") from None
            raise Unreachable(f"cannot connect to {path}: {exc.strerror}") from None
        try:
            try:
                sock.sendall(json.dumps(req).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused and closed at once ("too many clients"): its reply is still there
            data = bytearray()
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY:
                    raise Unreachable(f"{path}: reply longer than {MAX_REPLY} bytes")
        except TimeoutError:
            raise Unreachable(f"{path}: no reply from the daemon within {timeout:g} s") from None
        except OSError as exc:
            raise Unreachable(f"{path}: connection failed: {exc.strerror}") from None
    finally:
        sock.close()
    line = bytes(data).split(b"\n", 1)[0]
    if not line:
        raise Unreachable(f"{path}: the daemon closed the connection without replying")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        raise Unreachable(f"{path}: the reply is not JSON (is this the daemon's socket?)") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise Unreachable(f"{path}: the reply is not a control reply")
    return reply


def _refused(path: Path) -> str:
    """Why a connect was refused: Linux says the same for a stale socket and a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFSOCK
    if not stat.S_ISSOCK(mode):
        kind = " (a directory)" if stat.S_ISDIR(mode) else (
            " (a regular file)" if stat.S_ISREG(mode) else "")
        return f"{path} is not a socket{kind}; --socket names the daemon's control socket"
    return f"nothing listens on {path} (the daemon is not running; the socket file is stale)"


# -- human-readable output ------------------------------------------------------------------

# `ctl status` for a person: one line per subject, absent values left out (--json has all).
_STATUS_HEAD = ("persona", "uptime_s", "frames", "deadline_misses", "frame_errors")
_STATUS_GROUPS = (
    ("speech", lambda k: k in ("muted", "paused", "busy")),
    ("conversation", lambda k: k.startswith(("conversation_", "context_", "last_"))
     or k in ("reanchors", "idle_resets")),
)
_AUDIO_GROUPS = (
    ("devices", lambda k: k.endswith(("_open", "reopens", "reopen_count")) or k in (
        "degraded", "reason")),
    ("flow", lambda k: k in ("frames_captured", "frames_played", "capture_reads", "capture_queue",
                             "playback_queue", "dropped_frames", "playback_dropped")),
    ("xruns", lambda k: k in ("overruns", "underruns", "model_underruns", "silence_inserted_s")),
    ("playback FIFO", lambda k: k.startswith("fifo_") or k in ("latency_trims", "rebuild_silence_s")),
    ("echo", lambda k: k.startswith("echo_")),
)


def describe(command: str, reply: dict[str, Any], arg: str | None = None) -> str:
    """What a person reads: a line (status: a few grouped lines; metrics: the text as it is)."""
    body = {k: v for k, v in reply.items() if k not in ("ok", "id")}
    if command == "metrics":
        return str(body.get("text", ""))
    if command == "status":
        return _status(body)
    if command == "context":
        lines = [f"context: {body.get('context') or '(none)'}", f"prompt: {body.get('prompt')}"]
        if body.get("pending"):
            lines.append(f"pending (next pause): {body.get('pending_prompt')}")
        return "\n".join(lines)
    done = {"persona": "persona", "reset": "conversation reset", "mute": "microphone muted",
            "unmute": "microphone unmuted", "pause": "speech paused", "resume": "speech resumed",
            "busy": f"driver busy: {arg}"}[command]
    if command == "persona":
        done = f"persona {body.pop('persona', None) or arg}"
    elif command == "busy":
        body.pop("busy", None)
    extra = ", ".join(f"{_label(k)} {_fmt(k, v)}" for k, v in sorted(body.items()))
    return f"{done} ({extra})" if extra else done


def _status(body: dict[str, Any]) -> str:
    left = {k: v for k, v in body.items() if v not in (None, "", {}, [])}
    audio = dict(left.pop("audio", None) or {})
    head = [f"{_label(k)} {_fmt(k, left.pop(k))}" for k in _STATUS_HEAD if k in left]
    lines = [f"{left.pop('state', 'running')}: " + ", ".join(head)]
    frame = [f"p{q} {left.pop(f'frame_ms_p{q}'):.1f}" for q in (50, 95, 99)
             if f"frame_ms_p{q}" in left]
    if frame:
        lines.append("frame loop (ms): " + ", ".join(frame))
    total, parts = left.pop("mic_to_speaker_ms", None), audio.pop("latency_ms", None) or {}
    if total is not None:
        lines.append(f"mic to speaker: {total:.1f} ms (" + ", ".join(
            f"{k} {v}" for k, v in parts.items() if k != "total") + ")")
    network = left.pop("network", None) or {}
    if network.get("enabled"):  # off: nothing to say (the JSON still has it)
        lines.append("network: " + ", ".join(f"{_label(k)} {_fmt(k, v)}" for k, v in network.items()
                                             if k != "enabled" and v not in (None, "")))
    lines += _grouped(left, _STATUS_GROUPS)
    lines += ["audio " + line for line in _grouped(
        {k: v for k, v in audio.items() if v not in (None, "")}, _AUDIO_GROUPS)]
    return "\n".join(lines)


def _grouped(values: dict[str, Any], groups) -> list[str]:
    """One line per group that has values (taken out of `values`), then the rest on one line."""
    lines = []
    for name, member in (*groups, ("other", lambda k: True)):
        keys = [k for k in values if member(k)]
        if keys:
            lines.append(f"{name}: " + ", ".join(f"{_label(k)} {_fmt(k, values.pop(k))}"
                                                 for k in keys))
    return lines


def _label(key: str) -> str:
    return key.removesuffix("_s").removesuffix("_ms").replace("_", " ")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_s") and isinstance(value, int | float):
        s = int(value)
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
            f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{value:.1f}s")
    if key.endswith("_ms") and isinstance(value, int | float):
        return f"{value:.1f} ms"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_label(k)} {_fmt(k, v)}" for k, v in value.items()
                               if v not in (None, "")) + "}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
