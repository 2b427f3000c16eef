"""The local control socket: how ``edge-agent charge start|stop|status`` talks to the
running agent (DESIGN s5b: "the driver via the local control socket").

A Unix stream socket (``[channel] control_socket``, default ``<state_dir>/control.sock``,
mode 0600: only the agent's own user, and root, may start a session). One JSON object per
line each way::

    -> {"op": "start", "station": "cs-1", "connector": 1, "max_wh": 5000, "max_price": 400000}
    <- {"ok": true, "channel": "ab12..", "station": "cs-1", "connector": 1}
    <- {"ok": false, "reason": "not-plugged-in", "detail": "state A"}
    -> {"op": "stop"}        -> {"op": "status"}

A request is input like any other: a line that is not a JSON object, longer than
MAX_LINE_BYTES, or with fields of the wrong type gets ``{"ok": false, "reason":
"bad-request"}`` and the connection is closed; the agent goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.errors import EdgeAgentError

MAX_LINE_BYTES = 4096
Handler = Callable[[dict[str, object]], Awaitable[dict[str, object]]]


def _field(request: dict[str, object], name: str, kind: type, required: bool = False,
           ) -> object:
    value = request.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or \
            (isinstance(value, int) and value < 0):
        raise ValueError(f"{name}: expected {kind.__name__}")
    return value


def parse(line: bytes) -> dict[str, object]:
    """One request line -> a checked dict; ValueError says what is wrong."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    op = request.get("op")
    if op == "start":
        station = _field(request, "station", str, required=True)
        assert isinstance(station, str)
        if not station or len(station) > 64 or any(c in station for c in "/+#\0"):
            raise ValueError("station: not a device id")
        _field(request, "connector", int, required=True)
        _field(request, "max_wh", int)
        _field(request, "max_price", int)
    elif op not in ("stop", "status"):
        raise ValueError("op: expected start, stop or status")
    return request


async def serve(path: Path, handle: Handler) -> None:
    """Serve the socket until cancelled (the file is removed at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket file left by a killed agent

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\n")
            try:
                request = parse(line)
            except ValueError as exc:
                answer: dict[str, object] = {"ok": False, "reason": "bad-request",
                                             "detail": str(exc)}
            else:
                answer = await handle(request)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away, or sent a line too long: nothing to answer
        finally:
            writer.close()

    old = os.umask(0o177)  # the socket file is created 0600
    try:
        server = await asyncio.start_unix_server(client, path, limit=MAX_LINE_BYTES)
    finally:
        os.umask(old)
    try:
        async with server:
            await server.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def request(path: Path, message: dict[str, object], timeout_s: float = 30.0
            ) -> dict[str, object]:
    """Send one request to a running agent (blocking; the CLI's side)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise EdgeAgentError(f"no agent is listening at {path} (is `edge-agent run` running "
                             f"with a [channel] section?)", reason="no-agent") from None
    except PermissionError:
        raise EdgeAgentError(f"{path}: permission denied (run as the agent's user)",
                             reason="no-permission") from None
    except (ConnectionError, OSError) as exc:
        raise EdgeAgentError(f"{path}: {exc}", reason="no-agent") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise EdgeAgentError("the agent's answer is not JSON", reason="bad-answer") from None
    if not isinstance(answer, dict):
        raise EdgeAgentError("the agent's answer is not an object", reason="bad-answer")
    return answer
