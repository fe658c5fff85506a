"""Compile workers started ahead of their compile, so that a cold attach does not wait for one.

A compile worker spends ~0.1 s starting (the interpreter, tailcalld's modules, and for bcc
libbcc with LLVM) before it reads its request on stdin.  Nothing of that depends on the
request, so the next worker of each kind ("bcc", "libbpf") is started when a compile of that
kind ends, and waits, idle, for the next request.  It is the same worker, started the same
way (a process group of its own, the result socket passed, dying with the daemon by
PR_SET_PDEATHSIG), only earlier: the limits, the compile's own folder and Landlock come with
its request, its time (compile_timeout) counts from the request, and after its one compile it
is killed with its group as any.  An idle one waits in the compile root, not in a compile's
folder: that is how it is told apart from a worker at work (tests/harness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import children

KINDS = ("bcc", "libbpf")  # a libbpf worker loads objects too


@dataclass
class Worker:
    """A started compile worker and our end of its result socket."""

    proc: asyncio.subprocess.Process
    sock: socket.socket

    def alive(self) -> bool:
        """Not ended, nor a zombie the event loop has not reaped yet (killed while idle)."""
        if self.proc.returncode is not None:
            return False
        try:
            state = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def discard(self) -> None:
        children.kill_group(self.proc.pid)
        self.sock.close()


async def spawn(kind: str, cwd: Path) -> Worker:
    """A compile worker (tailcalld.compile_worker) of ``kind``, waiting for its request."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with child:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tailcalld.compile_worker", str(child.fileno()), str(os.getpid()), kind,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                pass_fds=(child.fileno(),), cwd=cwd, start_new_session=True)
    except BaseException:
        parent.close()
        raise
    return Worker(proc, parent)


class Spares:
    """At most one idle worker of each kind.  ``cwd`` gives the folder they wait in."""

    def __init__(self, cwd: Callable[[], Path]) -> None:
        self._cwd = cwd
        self._idle: dict[str, Worker] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}

    async def take(self, kind: str) -> tuple[Worker, bool]:
        """The idle worker of ``kind``, or a new one when there is none (or it died idle); and
        whether it had been waiting."""
        worker = self._idle.pop(kind, None)
        if worker is not None and worker.alive():
            return worker, True
        if worker is not None:
            worker.discard()
        return await spawn(kind, self._cwd()), False

    def replenish(self, kind: str) -> None:
        """Start the next worker of ``kind`` in the background, unless one waits or starts."""
        if kind in self._idle or (kind in self._starting and not self._starting[kind].done()):
            return
        self._starting[kind] = asyncio.get_running_loop().create_task(self._start(kind))

    async def _start(self, kind: str) -> None:
        try:
            worker = await spawn(kind, self._cwd())
        except OSError:
            return  # out of processes or memory for now: the next compile starts its own
        old = self._idle.pop(kind, None)
        self._idle[kind] = worker
        if old is not None:
            old.discard()

    async def aclose(self) -> None:
        """``close``, then wait until the killed workers have ended and their pipes are closed:
        nothing of theirs is left for the garbage collector to close after the event loop."""
        starting, idle = list(self._starting.values()), list(self._idle.values())
        self.close()
        await asyncio.gather(*starting, return_exceptions=True)
        idle += [w for w in self._idle.values() if w not in idle]  # started while cancelled
        self.close()
        for worker in idle:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
            await worker.proc.wait()
            if worker.proc.stdout is not None:
                await worker.proc.stdout.read()
        await asyncio.sleep(0)  # the transports' connection_lost, scheduled by the reads' end

    def close(self) -> None:
        """Kill the idle workers (and stop any being started)."""
        for task in self._starting.values():
            task.cancel()
        self._starting.clear()
        for worker in self._idle.values():
            with contextlib.suppress(OSError):
                worker.discard()
        self._idle.clear()
