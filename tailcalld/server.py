"""The asyncio Unix-socket server: read a line, validate it, run it, write the reply.

One connection carries any number of requests, answered in order.  A bad line gets an
error reply and the connection stays usable; a client that goes away mid-command does
not cancel the command (it finishes, the reply is dropped).  Every connection's peer is
checked with SO_PEERCRED; a silent connection, or one that does not read its replies, is
closed after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import audit, protocol
from .commands import CommandContext, events_filter, execute
from .config import Settings
from .events import EventHub
from .errors import (AlreadyRunning, PermissionDenied, RequestError, RequestTooLarge, TailcalldError,
                     TooManyConnections, UnsafePath)
from .paths import open_trusted_dir
from .peers import Peer, may_control

logger = logging.getLogger("tailcalld")
ADMIT_WAIT = 1.0  # seconds a connection over the limit waits for a place before it is refused
# Places beyond max_connections that only root may take: however many silent connections
# other users hold, root can always get in to look and to take handlers out.
ROOT_RESERVE = 1


@dataclass
class _Activity:
    writer: asyncio.StreamWriter
    peer: Peer
    since: float  # monotonic time of the last read or write; inf while a command runs
    expired: bool = False


@dataclass(frozen=True)
class _Follow:
    """An events request that streams after its reply: the slot keys it wants (None: all)."""

    slots: frozenset[int] | None


def socket_mode(allowed_gid: int | None) -> tuple[int, int]:
    """(mode, group) for the socket file: root only, or root plus one group."""
    return (0o660, allowed_gid) if allowed_gid is not None else (0o600, 0)


class SocketPlace:
    """Where the socket lives: its folder checked and held (``paths``), and ``<name>.lock``
    flocked, so the socket is this daemon's before it loads or writes anything.  Every later
    use of the socket file (bind, chown, chmod, unlink) goes through the held folder, so a
    link swapped in for the socket or its folder is never followed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = open_trusted_dir(path.parent, "socket", create_mode=0o755)
        try:
            self._lock = os.open(f"{path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=self.dir.fd)
        except BaseException:
            self.dir.close()
            raise
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise AlreadyRunning(f"another tailcalld already owns {path}", {"path": str(path)}) from None
        except BaseException:
            self.close()
            raise

    @property
    def _via_fd(self) -> str:
        # The held folder by its fd (systemd does the same for long socket paths): bind and
        # connect then resolve no name of the folder's path again.
        return f"/proc/self/fd/{self.dir.fd}/{self.path.name}"

    def _kind(self) -> int | None:
        try:
            return stat.S_IFMT(os.stat(self.path.name, dir_fd=self.dir.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return None

    def ensure_free(self) -> None:
        """Refuse a live server at the path (another tailcalld, or systemd's socket unit); remove a
        dead daemon's socket file.  Anything else at the path is left alone and refused."""
        kind = self._kind()
        if kind is None:
            return
        if kind != stat.S_IFSOCK:
            raise UnsafePath(f"socket {self.path} exists and is not a socket; it is left alone",
                             {"path": str(self.path), "role": "socket"})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self._via_fd)
            except OSError:
                os.unlink(self.path.name, dir_fd=self.dir.fd)  # nobody listens: left by a daemon that died
            else:
                raise AlreadyRunning(f"another process is serving {self.path}")

    def bind(self, allowed_gid: int | None) -> socket.socket:
        self.ensure_free()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # never world-accessible, not even between bind and chmod
            try:
                sock.bind(self._via_fd)
            finally:
                os.umask(old_umask)
            self.set_access(allowed_gid)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def set_access(self, allowed_gid: int | None) -> None:
        """Owner, group and mode of the socket file, found through the held folder and never
        through a link: refused (UnsafePath) if the name is not a socket."""
        mode, gid = socket_mode(allowed_gid)
        fd = os.open(self.path.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir.fd)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise UnsafePath(f"socket {self.path} is not a socket; its owner and mode are left alone",
                                 {"path": str(self.path), "role": "socket"})
            # fchown/fchmod refuse an O_PATH fd; its /proc link reaches the same inode, and only it.
            os.chown(f"/proc/self/fd/{fd}", 0, gid)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        except OSError as exc:  # name the socket, not the /proc link
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self._kind() == stat.S_IFSOCK:
            os.unlink(self.path.name, dir_fd=self.dir.fd)

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with the next owner)."""
        lock, self._lock = self._lock, -1
        if lock >= 0:
            os.close(lock)
        self.dir.close()


class ControlServer:
    """Who is served, and for how long, follows the live settings (allowed_group,
    max_connections, idle_timeout): each is read when it is needed."""

    def __init__(self, ctx: CommandContext) -> None:
        self.ctx = ctx
        self.max_request_bytes = ctx.settings.current.max_request_bytes  # the stream limit: fixed at start
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._admitted = 0
        self._admitted_by_uid: Counter[int] = Counter()
        self._freed = asyncio.Condition()
        self._activity: dict[asyncio.Task[None], _Activity] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._followers: set[asyncio.Task[None]] = set()  # connections streaming events
        ctx.connections = lambda: self._admitted
        ctx.settings.on_reload(self._recheck_peers)

    @property
    def _settings(self) -> Settings:
        return self.ctx.settings.current

    async def start(self, sock: socket.socket) -> None:
        # The stream limit is what makes readuntil refuse an oversized line.
        self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                       limit=self.max_request_bytes + 1)
        self._sweeper = asyncio.create_task(self._sweep_idle())

    async def _sweep_idle(self) -> None:
        """Close connections silent (or not reading their replies) for idle_timeout.  One sweep a
        fraction of a second, instead of a timeout armed around every read: list is hot."""
        while True:
            await asyncio.sleep(min(1.0, self._settings.idle_timeout / 4))
            now = time.monotonic()
            for activity in list(self._activity.values()):
                if now - activity.since > self._settings.idle_timeout:
                    activity.expired = True
                    activity.writer.transport.abort()

    def _recheck_peers(self, old: Settings, new: Settings, changed: frozenset[str]) -> None:
        """A reload that narrows who may connect applies to the connections already open too:
        each peer is judged again, and one the new policy refuses is closed.  A command it sent
        before the reload (a compile under way) was allowed when sent: it finishes, and its
        reply is dropped with the connection."""
        if "allowed_group" not in changed:
            return
        for activity in list(self._activity.values()):
            peer = activity.peer
            if may_control(peer, None if peer.uid == 0 else new.allowed_gid):
                continue
            logger.warning("closed the connection of uid %d (pid %d, %s): the reloaded allowed_group %s does "
                           "not admit it", peer.uid, peer.pid, peer.comm, new.allowed_group,
                           extra={**peer.journal_fields(), "TAILCALLD_ACTION": "revoked"})
            activity.expired = True
            activity.writer.transport.abort()

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give running commands ``grace`` seconds, then cancel them."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for task in self._followers:
            task.cancel()  # a stream has no end to wait for
        current = asyncio.current_task()
        others = {t for t in self._clients if t is not current}
        if others:
            _done, pending = await asyncio.wait(others, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        admitted: Peer | None = None
        try:
            peer = Peer.of_socket(writer.get_extra_info("socket"))
            refusal = self._refusal(peer)
            if refusal is None:
                refusal = await self._admit(peer)
                admitted = peer if refusal is None else None
            if refusal is not None:
                await self._refuse(reader, writer, refusal)
            else:
                await self._converse(reader, writer, peer)
        except (ConnectionError, BrokenPipeError, TimeoutError):
            pass  # the client went away or went quiet; its last command (if any) has already run
        except Exception:  # a bug: keep the traceback, close this connection, keep serving the others
            logger.exception("internal error on a control connection")
        finally:
            if admitted is not None:
                async with self._freed:
                    self._admitted -= 1
                    self._admitted_by_uid[admitted.uid] -= 1
                    if not self._admitted_by_uid[admitted.uid]:
                        del self._admitted_by_uid[admitted.uid]
                    self._freed.notify_all()
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    async def _admit(self, peer: Peer) -> TooManyConnections | None:
        """Take a place, waiting a moment for one to free up (a client that just closed may not
        have been reaped yet); the refusal if none did."""
        async with self._freed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait_for(lambda: self._full(peer) is None), ADMIT_WAIT)
            refusal = self._full(peer)
            if refusal is not None:
                logger.warning("refused a connection from uid %d (pid %d, %s): %s", peer.uid, peer.pid, peer.comm,
                               refusal.message, extra=peer.journal_fields())
                return refusal
            self._admitted += 1
            self._admitted_by_uid[peer.uid] += 1
            return None

    def _full(self, peer: Peer) -> TooManyConnections | None:
        """Why ``peer`` cannot have one more connection now, if it cannot.  Other users are capped
        per uid, so that one of them cannot take every place; root has ROOT_RESERVE places on top
        of max_connections, so that all of them together cannot lock root out."""
        s = self._settings
        held = self._admitted_by_uid[peer.uid]
        if peer.uid != 0 and held >= s.max_connections_per_uid:
            return TooManyConnections(f"uid {peer.uid} holds {held} connections to tailcalld, the most one user "
                                      "may (max_connections_per_uid); close one or try again later",
                                      {"limit": s.max_connections_per_uid, "uid": peer.uid})
        if self._admitted >= s.max_connections + (ROOT_RESERVE if peer.uid == 0 else 0):
            return TooManyConnections(f"tailcalld serves {s.max_connections} connections at once; try again later",
                                      {"limit": s.max_connections})
        return None

    def _refusal(self, peer: Peer) -> TailcalldError | None:
        allowed_gid = None if peer.uid == 0 else self._settings.allowed_gid  # root needs no group lookup
        if may_control(peer, allowed_gid):
            return None
        logger.warning("refused a connection from uid %d (pid %d, %s): not root%s", peer.uid, peer.pid, peer.comm,
                       "" if allowed_gid is None else " nor in the allowed group",
                       extra={**peer.journal_fields(), "TAILCALLD_ACTION": "refused"})
        return PermissionDenied(f"uid {peer.uid} may not control tailcalld (root"
                                + (" or the allowed group" if allowed_gid is not None else "")
                                + " only)")

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      err: TailcalldError) -> None:
        """Answer the first request with the refusal (so the client can read why), then close."""
        rid: protocol.RequestId = None
        with contextlib.suppress(TailcalldError, TimeoutError):
            async with asyncio.timeout(min(self._settings.idle_timeout, 5.0)):
                line = await self._read_line(reader)
            try:
                rid, _ = protocol.parse_request(line or b"")
            except RequestError as bad:
                rid = bad.request_id
        await self._send(writer, protocol.encode_error(rid, err))

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        task = asyncio.current_task()
        assert task is not None
        activity = self._activity[task] = _Activity(writer, peer, time.monotonic())
        try:
            while True:
                try:
                    line = await self._read_line(reader)
                except RequestTooLarge as err:
                    line, reply, follow = b"", protocol.encode_error(None, err), None
                else:
                    if line is None or activity.expired:
                        return
                    if not line.strip():
                        continue
                    activity.since = math.inf  # a running command (a compile) is not idleness
                    reply, follow = await self._answer(line, peer)
                activity.since = time.monotonic()
                writer.write(reply)
                await writer.drain()  # blocks only past the high-water mark; the sweeper bounds it
                activity.since = time.monotonic()
                if follow is not None:
                    activity.since = math.inf  # a subscriber listens; it is not idle
                    await self._follow_events(reader, writer, follow.slots)
                    return
        finally:
            del self._activity[task]

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        writer.write(reply)
        # A client that never reads fills the socket buffer; do not wait on it forever.
        async with asyncio.timeout(self._settings.idle_timeout):
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

    async def _answer(self, line: bytes, peer: Peer) -> tuple[bytes, _Follow | None]:
        """The reply, and for an ``events --follow`` what to stream after it."""
        rid: protocol.RequestId = None
        try:
            rid, request = protocol.parse_request(line)
            result = await execute(self.ctx, request, peer)
            follow = None
            if isinstance(request, protocol.EventsRequest) and request.follow:
                follow = _Follow(events_filter(request, self.ctx.manager))
            return protocol.encode_ok(rid, result), follow
        except RequestError as bad:
            audit.invalid_request(line, peer, bad.error)
            return protocol.encode_error(bad.request_id, bad.error), None
        except TailcalldError as err:
            return protocol.encode_error(rid, err), None
        except Exception:  # a bug: say so on the wire, keep the traceback, keep serving
            logger.exception("internal error while serving a request")
            return protocol.encode_error(rid, TailcalldError("internal error; see the daemon's log")), None

    async def _follow_events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             slots: frozenset[int] | None) -> None:
        """Stream events to this connection until the client closes it (or the daemon stops).
        The hub writes without waiting: a client that does not read loses events, counted and
        told, and never slows the daemon or other clients."""
        hub = self.ctx.events
        assert hub is not None
        transport = writer.transport

        def write(data: bytes) -> None:
            if not transport.is_closing():
                transport.write(data)

        task = asyncio.current_task()
        assert task is not None
        self._followers.add(task)
        # Past events_client_bytes unread the client counts as full (the hub drops its events,
        # or pauses if everyone is full); below half of it, it has room again.
        limit = self.ctx.settings.current.events_client_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        sub = hub.subscribe(write, transport.get_write_buffer_size, slots)
        keeper = asyncio.create_task(_tell_room(hub, writer))
        try:
            while await reader.read(4096):
                pass  # the client has nothing more to say; EOF means it left
        finally:
            keeper.cancel()
            hub.unsubscribe(sub)
            self._followers.discard(task)


async def _tell_room(hub: EventHub, writer: asyncio.StreamWriter) -> None:
    """While the hub waits for a follower with room, wake it when this one has drained."""
    with contextlib.suppress(ConnectionError):
        while True:
            await hub.paused.wait()
            await writer.drain()  # returns once the socket's unread bytes are below the low mark
            hub.resume()
            await asyncio.sleep(0)  # let the hub read (and perhaps pause again) before looking


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
