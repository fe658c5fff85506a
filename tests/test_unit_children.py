"""The daemon's own child processes (bpftool, clang on the dispatcher): bounded in time, and
nothing they started outlives the call."""

from __future__ import annotations

import asyncio
import os
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
