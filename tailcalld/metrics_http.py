"""The metrics over HTTP/1.x, served on the daemon's event loop: ``GET /metrics`` and nothing else.

Not prometheus_client's ``start_http_server``: it serves from a thread of its own, and the
daemon's state belongs to its event loop (uvloop).  This responder reads one request per
connection, answers it and closes (``Connection: close``; Prometheus copes), and bounds every
client: the request head to ``MAX_HEAD`` bytes and ``READ_TIMEOUT`` seconds in all (a slowloris
gets 408 and is gone), the reply to ``WRITE_TIMEOUT`` seconds, and ``MAX_CLIENTS`` connections
at once per endpoint (more get 503 at once).  The control socket is another server: nothing
here can hold it.

Where: a Unix socket (``metrics_socket``, beside the control socket unless set; its owner and
mode, and the peer check, are the control socket's: root and ``allowed_group`` only), and, when
asked, a TCP address (``metrics_listen``).  Both are claimed at start, before the daemon
touches the kernel, as the control socket is.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from .config import Settings
from .peers import Peer, may_control
from .server import SocketPlace

logger = logging.getLogger("tailcalld")

PATH = "/metrics"
MAX_HEAD = 8192  # bytes of request line and headers; Prometheus sends ~250
READ_TIMEOUT = 10.0  # seconds for the whole request head, however slowly it trickles
WRITE_TIMEOUT = 30.0  # seconds for a client to take the reply
MAX_CLIENTS = 16  # connections at once per endpoint
MAX_BODY = 64 << 20  # what tailcallctl metrics reads of a reply at most

_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(\d)\.(\d)")
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}

Render = Callable[[bool], bytes]  # gzip or not -> the exposition


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    def accepts_gzip(self) -> bool:
        """Whether Accept-Encoding asks for gzip (with a weight above 0, if it gives one)."""
        for part in self.headers.get("accept-encoding", "").split(","):
            coding, *params = (p.strip() for p in part.split(";"))
            if coding.lower() == "gzip":
                weight = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
                try:
                    return float(weight) > 0
                except ValueError:
                    return False
        return False


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def parse_head(head: bytes) -> Request:
    """The request line and headers (CRLF or bare LF line ends, the blank line included or not).
    Raises HttpError 400 for anything that is not an HTTP/1.x request head, 505 for another version."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HttpError(400, "not an HTTP request line")
    method, target, major = match.group(1).decode(), match.group(2), match.group(3)
    if major != b"1":
        raise HttpError(505, "only HTTP/1.x is served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or not name.isascii():
            raise HttpError(400, "malformed header line")
        headers[name.decode().lower()] = value.strip().decode("latin-1")
    path = target.split(b"?", 1)[0]
    try:
        return Request(method, path.decode("ascii"), headers)
    except UnicodeDecodeError:
        raise HttpError(400, "the request target is not ASCII") from None


def respond(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers)]
    if not any(name.lower() == "content-type" for name, _ in headers):
        lines.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def answer(request: Request, render: Render) -> bytes:
    """The whole reply to a parsed request."""
    if request.method not in ("GET", "HEAD"):
        raise HttpError(405, f"{request.method} is not served; GET {PATH}", (("Allow", "GET, HEAD"),))
    if request.path != PATH:
        raise HttpError(404, f"nothing at {request.path}; the metrics are at {PATH}")
    gzipped = request.accepts_gzip()
    headers = [("Content-Type", CONTENT_TYPE_LATEST)]
    if gzipped:
        headers.append(("Content-Encoding", "gzip"))
    return respond(200, render(gzipped), tuple(headers), head_only=request.method == "HEAD")


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Lines up to the blank one, MAX_HEAD bytes at most (HttpError 431 past it, 400 at an end
    of stream before it)."""
    head = b""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"the request head is larger than {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError:
            raise HttpError(400, "the request ended before its blank line") from None
        head += line
        if len(head) > MAX_HEAD:
            raise HttpError(431, f"the request head is larger than {MAX_HEAD} bytes")
        if line in (b"\r\n", b"\n"):
            return head


class MetricsServer:
    """One endpoint (a listening socket) answering GET /metrics with ``render``'s text.
    ``admit``: whether a connection's socket may read (the Unix socket's peer check)."""

    def __init__(self, render: Render, admit: Callable[[socket.socket], str | None] = lambda sock: None) -> None:
        self._render = render
        self._admit = admit  # the reason it may not, or None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        if sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_HEAD)
        else:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            # Its request is taken first (what came with the connect, a second at most): a socket
            # closed with unread data resets, and the client would not read the 503.
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await reader.read(MAX_HEAD)
            writer.write(respond(503, b"too many connections to the metrics endpoint at once\n"))
            writer.close()
            return
        self._clients.add(task)
        try:
            reply = await self._reply(reader, writer)
            writer.write(reply)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # gone, or not reading its reply: nothing more to say
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        head_only = False
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await read_head(reader)
            except TimeoutError:
                raise HttpError(408, f"no complete request within {READ_TIMEOUT:g} s") from None
            # The request is read before a refusal, so that the client is not reset but reads why.
            refusal = self._admit(writer.get_extra_info("socket"))
            if refusal is not None:
                raise HttpError(403, refusal)
            request = parse_head(head)
            head_only = request.method == "HEAD"
            return answer(request, self._render)
        except HttpError as err:
            return respond(err.status, f"{err.message}\n".encode(), err.headers, head_only)
        except Exception:  # a bug in a collector: say so, keep the traceback, keep serving
            logger.exception("internal error while rendering the metrics")
            return respond(500, b"internal error; see tailcalld's log\n", (), head_only)


def listen_tcp(address: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (``address`` as configured, for messages)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics_listen {address}: {exc.strerror}") from None


class Endpoints:
    """A daemon's metrics endpoints.  Made at start, before the kernel is touched: the socket's
    place locked (as the control socket's) and the TCP address bound, so that a taken port or
    socket stops the start with its name.  ``start`` serves them, ``stop`` closes them."""

    def __init__(self, settings: Settings, control_socket: Path) -> None:
        path = settings.metrics_socket_path(control_socket)
        self.place = SocketPlace(path) if path is not None else None
        self._tcp: socket.socket | None = None
        self._servers: list[MetricsServer] = []
        self._unix: socket.socket | None = None
        try:
            if self.place is not None:
                self.place.ensure_free()
            if settings.metrics_address is not None:
                self._tcp = listen_tcp(settings.metrics_listen, *settings.metrics_address)
        except BaseException:
            self.release()
            raise

    @property
    def where(self) -> list[str]:
        found = [str(self.place.path)] if self.place is not None else []
        if self._tcp is not None:
            host, port = self._tcp.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def start(self, render: Render, allowed_gid: Callable[[], int | None]) -> None:
        def admit(sock: socket.socket) -> str | None:
            peer = Peer.of_socket(sock)
            gid = None if peer.uid == 0 else allowed_gid()
            if may_control(peer, gid):
                return None
            logger.warning("refused a metrics connection from uid %d (pid %d, %s)", peer.uid, peer.pid, peer.comm,
                           extra={**peer.journal_fields(), "TAILCALLD_ACTION": "refused"})
            return f"uid {peer.uid} may not read tailcalld's metrics (root or allowed_group only)"

        if self.place is not None:
            self._unix = self.place.bind(allowed_gid())
            self._servers.append(unix := MetricsServer(render, admit))
            await unix.start(self._unix)
        if self._tcp is not None:
            self._servers.append(tcp := MetricsServer(render))
            await tcp.start(self._tcp)

    def set_access(self, allowed_gid: int | None) -> None:
        """A reload changed allowed_group: the socket file follows, as the control socket's does."""
        if self.place is not None and self._unix is not None:
            self.place.set_access(allowed_gid)

    async def stop(self) -> None:
        for server in self._servers:
            await server.close()
        self._servers.clear()
        self.release()

    def release(self) -> None:
        """Close the sockets, remove the socket file, unlock its place (idempotent)."""
        for sock in (self._unix, self._tcp):
            if sock is not None:
                sock.close()
        if self.place is not None:
            if self._unix is not None:
                with contextlib.suppress(OSError):
                    self.place.remove()
            self.place.close()
            self.place = None
        self._unix = self._tcp = None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class MetricsUnavailable(Exception):
    """The metrics socket answered, but not with the metrics (the reason is the message)."""


def fetch(path: Path, timeout: float = 30.0) -> bytes:
    """The exposition text from a metrics socket (tailcallctl metrics, tests).  Raises OSError
    when nobody listens, MetricsUnavailable when the answer is not 200."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", PATH)
        reply = conn.getresponse()
        body = reply.read(MAX_BODY)
    except http.client.HTTPException as exc:
        raise MetricsUnavailable(f"{path} did not answer as HTTP: {exc!r}") from None
    finally:
        conn.close()
    if reply.status != 200:
        raise MetricsUnavailable(f"{path}: {reply.status} {reply.reason}: {body.decode(errors='replace').strip()}")
    return body
