"""A small blocking client for the control socket, used by tailcallctl and the tests."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from collections.abc import Iterator

from . import reply_check
# Re-exported: their home is light (control_socket.py); protocol.py is imported only when a reply
# needs its models (reply_check.py), so that tailcallctl starts quickly.
from .control_socket import SOCKET_ENV, default_socket  # noqa: F401

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any


class RemoteError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class Client:
    def __init__(self, path: Path | str | None = None, timeout: float | None = 120.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def send_raw(self, data: bytes) -> None:
        self._sock.sendall(data)

    def read_reply(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("tailcalld closed the connection")
        reply = json.loads(line)
        if not reply_check.envelope_fits(reply):  # the wire format is the models', checked both ways
            from .protocol import response_adapter  # only for a reply the plain check doubts
            response_adapter.validate_python(reply)
        return reply

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def stream(self) -> Iterator[dict[str, Any]]:
        """The lines that follow a reply (``events`` with follow), each parsed, until the daemon closes."""
        while line := self._file.readline():
            yield json.loads(line)

    def chunks(self) -> Iterator[bytes]:
        """The same, as the bytes arrive (whole lines or not): for passing them on unparsed."""
        while chunk := self._file.read1(1 << 20):
            yield chunk

    def call(self, command: str, **fields: Any) -> dict[str, Any]:
        """Send one request; return its result or raise RemoteError."""
        rid = next(self._ids)
        payload = {"id": rid, "command": command, **{k: v for k, v in fields.items() if v is not None}}
        self.send_raw(json.dumps(payload).encode() + b"\n")
        reply = self.read_reply()
        # An error with no id answers a line the daemon could not read an id from (one over its
        # max_request_bytes, discarded unread): replies come in order, so it answers this one.
        unread = reply.get("id") is None and not reply["ok"]
        if reply.get("id") != rid and not unread:
            raise ConnectionError(f"reply for request {reply.get('id')!r}, expected {rid}")
        if not reply["ok"]:  # read_reply checked it: an ErrorResponse
            err = reply["error"]
            raise RemoteError(err["code"], err["message"], err.get("details"))
        return reply["result"]
