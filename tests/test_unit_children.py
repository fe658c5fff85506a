"""The daemon's own child processes (bpftool, clang on the dispatcher): bounded in time, and
nothing they started outlives the call."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailcalld import children
from tailcalld.errors import ToolFailed


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_output_and_status_come_back() -> None:
    done = asyncio.run(children.run(["sh", "-c", "cat; echo err >&2; exit 3"], 10, input=b"in"))
    assert (done.returncode, done.stdout, done.stderr) == (3, b"in", b"err\n")


def test_a_late_child_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    # The grandchild leaves the child's stdout alone, so only the group kill can end it.
    script = f"sleep 60 >/dev/null 2>&1 & echo $! > {pid_file}; sleep 60"
    started = time.monotonic()
    with pytest.raises(ToolFailed, match="longer than 0.5 s"):
        asyncio.run(children.run(["sh", "-c", script], 0.5))
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild outlived the call"


def test_a_missing_program_is_a_tool_failure() -> None:
    with pytest.raises(ToolFailed, match="cannot run"):
        asyncio.run(children.run([f"/nonexistent/tool-{os.getpid()}"], 5))


# Run in a process of its own, which takes the role of a container's PID 1: a subreaper, so the
# orphans of what it runs come to it.
AS_PID_1 = """
import asyncio, contextlib, ctypes, sys, time
from pathlib import Path
from tailcalld import children
from tailcalld.errors import ToolFailed

ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


async def main() -> None:
    for _ in range(3):  # a leader whose child outlives it (the worker and its clang), killed late
        with contextlib.suppress(ToolFailed):
            await children.run(["sh", "-c", "sleep 30 & wait"], 0.3)

asyncio.run(main())


def zombies() -> list[str]:
    kids = Path("/proc/self/task").glob("*/children")
    pids = [k for f in kids for k in f.read_text().split()]
    return [p for p in pids if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"]

deadline = time.monotonic() + 30
while zombies() and time.monotonic() < deadline:
    time.sleep(0.05)
print(zombies())
"""


def test_orphans_of_a_killed_group_are_reaped_when_they_come_to_us() -> None:
    r = subprocess.run([sys.executable, "-c", AS_PID_1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
