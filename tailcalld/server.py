"""The asyncio Unix-socket server: read a line, validate it, run it, write the reply.

One connection carries any number of requests, answered in order.  A bad line gets an
error reply and the connection stays usable; a client that goes away mid-command does
not cancel the command (it finishes, the reply is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from . import protocol
from .commands import execute
from .errors import AlreadyRunning, RequestTooLarge, TailcalldError
from .slots import SlotManager

logger = logging.getLogger("tailcalld")


def bind_unix_socket(path: Path, mode: int = 0o600) -> socket.socket:
    """Bind ``path``, replacing a stale socket file but never a live daemon's."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # nobody listens: left over from a daemon that died
            else:
                raise AlreadyRunning(f"another process is serving {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class ControlServer:
    def __init__(self, manager: SlotManager, max_request_bytes: int) -> None:
        self.manager = manager
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        # The stream limit is what makes readuntil refuse an oversized line.
        self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                       limit=self.max_request_bytes + 1)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give running commands ``grace`` seconds, then cancel them."""
        if self._server is not None:
            self._server.close()
        if self._clients:
            _done, pending = await asyncio.wait(self._clients, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client went away; its last command (if any) has already run
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await self._read_line(reader)
            except RequestTooLarge as err:
                writer.write(protocol.encode_error(None, err))
                await writer.drain()
                continue
            if line is None:
                return
            if not line.strip():
                continue
            writer.write(await self._answer(line))
            await writer.drain()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as eof:
            return eof.partial or None  # a last request without its newline still counts
        except asyncio.LimitOverrunError as over:
            await _discard_line(reader, over.consumed)
            raise RequestTooLarge(f"request larger than {self.max_request_bytes} bytes; it was discarded",
                                  {"limit": self.max_request_bytes}) from None

    async def _answer(self, line: bytes) -> bytes:
        rid: protocol.RequestId = None
        try:
            rid, request = protocol.parse_request(line)
            result = await execute(self.manager, request)
            return protocol.encode_ok(rid, result)
        except TailcalldError as err:
            return protocol.encode_error(getattr(err, "request_id", rid), err)
        except Exception:  # a bug: say so on the wire, keep the traceback, keep serving
            logger.exception("internal error while serving a request")
            return protocol.encode_error(rid, TailcalldError("internal error; see the daemon's log"))


async def _discard_line(reader: asyncio.StreamReader, consumed: int) -> None:
    """Drop the rest of an oversized line (up to and including its newline, or EOF)."""
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as over:
            consumed = over.consumed
        except asyncio.IncompleteReadError:
            return
