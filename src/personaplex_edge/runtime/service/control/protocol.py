"""The control socket's protocol: line-delimited JSON requests and replies.

A Unix stream socket, group-restricted by file permissions. Each request is
one JSON object on one line; each gets exactly one JSON reply line, in order:

    {"cmd": "status"}                      -> {"ok": true, ...the daemon's status}
    {"cmd": "persona", "name": "focus"}    -> {"ok": true, ...}
    {"cmd": "reset"} {"cmd": "mute"} {"cmd": "unmute"} {"cmd": "pause"} {"cmd": "resume"}
    {"cmd": "busy", "on": true}            -> {"ok": true, ...}
    {"cmd": "metrics"}                     -> {"ok": true, "text": "<Prometheus exposition>"}
    {"cmd": "context", "action": "set", "text": "ETA 14:05, next: exit 12 in 3 km"}
    {"cmd": "context", "action": "clear"} {"cmd": "context", "action": "show"}
                                           -> {"ok": true, "context": ..., "prompt": ..., ...}
    anything wrong                         -> {"ok": false, "error": "one line"}
    timed out before the frame loop took it -> {"ok": false, "applied": false, "error": ...}

A request that times out has happened or not, and its reply says which: withdrawn
before the frame loop took it ("applied": false, nothing changed), or, once taken,
answered with its own outcome when the loop has finished it (`dispatch` returns a
future of the reply then, so no control worker waits past its timeout).

A request may carry an "id" (string or number), echoed in its reply.

This module parses requests and dispatches them to a `Controller`; `server`
owns the socket.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from personaplex_edge.runtime.errors import PpxError
from personaplex_edge.runtime.service.control.frame_commands import NotApplied, StillApplying

log = logging.getLogger("personaplex.control")

MAX_LINE = 4096  # bytes per request line, newline included
COMMANDS = ("status", "persona", "reset", "mute", "unmute", "pause", "resume", "busy", "metrics",
            "context")
STATE_CHANGES = frozenset(COMMANDS) - {"status", "metrics"}
CONTEXT_ACTIONS = ("set", "clear", "show")
_PERSONA_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # names only: no file paths over the socket

class Controller(Protocol):
    """What the daemon implements for the control socket.

    Every method is called from a control worker thread, never from the frame
    loop, possibly concurrently with another: implementations must be
    thread-safe. State changes must take effect *between frames*: set a flag
    the frame loop reads at the start of its next frame, or hand a closure to
    the loop with `FrameCommands`. Return promptly: e.g. `switch_persona`
    validates the name, hands the switch to the loop and answers with its
    outcome once applied, or within the reply timeout (a switch still applying
    then answers late). Raise `PpxError` for a request the daemon refuses (its
    message becomes the error reply); returned dicts are merged into the reply
    and must be JSON-serialisable."""

    def status(self) -> dict[str, Any]: ...

    def switch_persona(self, name: str) -> dict[str, Any]: ...

    def reset(self) -> dict[str, Any] | None: ...

    def set_muted(self, muted: bool) -> dict[str, Any] | None: ...

    def set_paused(self, paused: bool) -> dict[str, Any] | None: ...

    def set_busy(self, busy: bool) -> dict[str, Any] | None: ...

    def metrics_text(self) -> str: ...

    def context(self, action: str, text: str | None) -> dict[str, Any]: ...


# -- requests ---------------------------------------------------------------------------

class RequestError(Exception):
    """A bad request: the message is the error reply (with the request's id, once it was read)."""

    req_id: Any = None


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    id: Any = None


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) -> Request, or RequestError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON at column {exc.colno}: {exc.msg}") from None
    except (RecursionError, ValueError):
        raise RequestError("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("a request is a JSON object such as {\"cmd\": \"status\"}")
    req_id = data.pop("id", None)
    if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, str | int | float)):
        raise RequestError("id: expected a string or a number")
    if isinstance(req_id, str) and len(req_id) > 128:
        raise RequestError("id: longer than 128 characters")
    try:
        return _parse_command(data, req_id)
    except RequestError as exc:
        exc.req_id = req_id  # so a client matching replies by id gets this one too
        raise


def _parse_command(data: dict[str, Any], req_id: Any) -> Request:
    cmd = data.pop("cmd", None)
    if not isinstance(cmd, str):
        raise RequestError("cmd: missing or not a string" if cmd is None else "cmd: expected a string")
    if cmd not in COMMANDS:
        raise RequestError(f"cmd: unknown command {cmd[:64]!r} (known: {', '.join(COMMANDS)})")
    expected = {"persona": {"name"}, "busy": {"on"}, "context": {"action"}}.get(cmd, set())
    optional = {"context": {"text"}}.get(cmd, set())
    for key in data:
        if key not in expected | optional:
            raise RequestError(f"{cmd}: unexpected field {key[:64]!r}")
    for key in expected:
        if key not in data:
            raise RequestError(f"{cmd}: missing field {key!r}")
    if cmd == "persona":
        name = data["name"]
        if not isinstance(name, str):
            raise RequestError("persona: name: expected a string")
        if not _PERSONA_NAME.match(name):
            raise RequestError("persona: name: expected a persona name (lowercase letters, digits, "
                               "'-' or '_', at most 64)")
    if cmd == "busy" and not isinstance(data["on"], bool):
        raise RequestError("busy: on: expected true or false")
    if cmd == "context":
        if data["action"] not in CONTEXT_ACTIONS:
            raise RequestError(f"context: action: expected one of {', '.join(CONTEXT_ACTIONS)}")
        if (data["action"] == "set") != ("text" in data):
            raise RequestError("context: text: required with set, and only with set")
    return Request(cmd, data, req_id)


def dispatch(controller: Controller, request: Request) -> dict[str, Any] | Future[dict[str, Any]]:
    """Run one request against the controller; returns the reply (never raises), or, for a
    request the frame loop is still applying when its time is up, a future of the reply
    (the worker goes free; the server sends the reply when the loop has finished)."""
    try:
        return _reply(request, _call(controller, request))
    except StillApplying as exc:
        later: Future[dict[str, Any]] = Future()
        later.set_running_or_notify_cancel()

        def finished(f: Future) -> None:
            later.set_result(_outcome(request, f))

        exc.future.add_done_callback(finished)
        return later
    except Exception as exc:  # noqa: BLE001 - every failure becomes one reply line
        return _failure(request, exc)


def _outcome(request: Request, future: Future) -> dict[str, Any]:
    """The reply for a frame-loop command that has finished (after its caller's timeout)."""
    try:
        return _reply(request, future.result())
    except Exception as exc:  # noqa: BLE001 - as in dispatch
        return _failure(request, exc)


def _failure(request: Request, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, NotApplied):  # timed out and withdrawn: say so, nothing changed
        return reply_to(request, {"ok": False, "applied": False, "error": str(exc)})
    if isinstance(exc, PpxError):
        return reply_to(request, {"ok": False, "error": str(exc) or type(exc).__name__})
    log.error("control: %s failed", request.cmd, exc_info=exc)
    return reply_to(request, {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})


def _reply(request: Request, result: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": True}
    if isinstance(result, dict):
        reply.update({k: v for k, v in result.items() if k not in ("ok", "error", "id")})
    return reply_to(request, reply)


def _call(controller: Controller, request: Request) -> Any:
    cmd, args = request.cmd, request.args
    if cmd == "status":
        return controller.status()
    if cmd == "persona":
        return controller.switch_persona(args["name"])
    if cmd == "reset":
        return controller.reset()
    if cmd in ("mute", "unmute"):
        return controller.set_muted(cmd == "mute")
    if cmd in ("pause", "resume"):
        return controller.set_paused(cmd == "pause")
    if cmd == "busy":
        return controller.set_busy(args["on"])
    if cmd == "metrics":
        return {"text": controller.metrics_text()}
    if cmd == "context":
        return controller.context(args["action"], args.get("text"))
    raise RequestError(f"cmd: unknown command {cmd!r}")  # parse_request rules this out


def reply_to(request: Request | None, reply: dict[str, Any]) -> dict[str, Any]:
    if request is not None and request.id is not None:
        reply["id"] = request.id
    return reply


def encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(reply, default=_jsonable, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.error("control: reply is not JSON-serialisable: %s", exc)
        text = json.dumps({"ok": False, "error": "internal error: the daemon's reply is not "
                           "JSON-serialisable", **({"id": reply["id"]} if "id" in reply else {})})
    return text.encode() + b"\n"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
