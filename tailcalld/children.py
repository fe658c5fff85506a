"""Child processes the daemon runs itself, outside the compile worker: bpftool (vmlinux.h) and
clang on tailcalld's own dispatcher source.

Each runs in a process group of its own, bounded in time, and the whole group is killed when
it is done, late, or its caller is cancelled (a stop during a start): nothing it started can
outlive the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolFailed


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the leader and all it started are gone already
        os.killpg(pgid, signal.SIGKILL)


def reap_group(pgid: int) -> None:
    """Wait for what is left of a killed group once its leader has been waited for (by its own
    waiter, which needs its status).  Orphans of the group (the compile worker's clang) go to
    init, which reaps them; when tailcalld is PID 1 of a container, they come to tailcalld, and
    each would stay a zombie.  Never blocks: members not dead yet get a thread that waits for
    them.  Nothing but this group is waited for (a pgid is not reused while a member lives)."""
    while True:
        try:
            pid, _status = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return  # no member of the group is ours: the usual case
        if pid == 0:
            threading.Thread(target=_wait_group, args=(pgid,), name=f"reap-{pgid}", daemon=True).start()
            return


def _wait_group(pgid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-pgid, 0)


async def run(argv: Sequence[str], timeout: float, input: bytes | None = None, cwd: Path | None = None) -> Finished:
    """Run ``argv`` to its end, ``input`` on its stdin.  Raises ToolFailed when it cannot be
    started or takes longer than ``timeout`` seconds (it is killed then)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise ToolFailed(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        raise ToolFailed(f"{argv[0]} took longer than {timeout:g} s and was killed", {"timeout": timeout}) from None
    finally:
        kill_group(proc.pid)
        if proc.returncode is None:
            await proc.wait()
        reap_group(proc.pid)
    assert proc.returncode is not None
    return Finished(proc.returncode, out, err)
