"""Part 5: tailcallctl's start-up (issue 14 item 3), side by side with a bare Python start.

Each row is a whole process, as a person or a script runs it: fork, exec, the interpreter's start,
tailcallctl's imports, the request to a real tailcalld (its own socket, a few slots filled) and
the output (to /dev/null).  The rows are measured interleaved, round after round, so that other
users' load falls on all of them alike; each is reported as its median, its fastest run and both
as a ratio to the bare start of the same interpreter, and so is the CPU time the process used (user +
system: what other users' load changes least) (the venv's python, which tailcallctl's
console script runs on: the floor no Python CLI can go below).  The goal: list, status and
--help within 2x.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import VENV_BIN

from .control_plane import handler_source, running_daemon
from .util import PinDirs, format_table, median

GOAL = 2.0  # x the bare start, for list, status and --help
FILLED = ("getpgid", "getsid", "setpgid")  # slots the listed daemon has: rarely called, so quiet


@dataclass
class StartupRow:
    label: str
    command: list[str]
    ms: list[float] = field(default_factory=list)  # wall time of each run
    cpu_ms: list[float] = field(default_factory=list)  # its user + system CPU time
    goal: float | None = None  # x the bare start, where the issue sets one


def rows() -> list[StartupRow]:
    python, ctl = str(VENV_BIN / "python3"), str(VENV_BIN / "tailcallctl")
    return [StartupRow("python3 -c pass (bare start, the floor)", [python, "-c", "pass"]),
            StartupRow("tailcallctl --help", [ctl, "--help"], goal=GOAL),
            StartupRow(f"tailcallctl list ({len(FILLED)} slots)", [ctl, "list"], goal=GOAL),
            StartupRow("tailcallctl status", [ctl, "status"], goal=GOAL),
            StartupRow("tailcallctl list --json", [ctl, "list", "--json"])]


def _run_once(row: StartupRow, env: dict[str, str]) -> None:
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(row.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    row.ms.append((time.perf_counter() - start) * 1e3)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the one child just reaped
    row.cpu_ms.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3)
    if proc.returncode != 0:  # a failing command would be timing its error path
        raise RuntimeError(f"{' '.join(row.command)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")


def measure(pins: PinDirs, workdir: Path, rounds: int, log: Callable[[str], None]) -> list[StartupRow]:
    measured = rows()
    workdir.mkdir()  # a folder of its own: another part's state_dir would be restored
    with running_daemon(pins, workdir) as d:
        log(f"cli start-up: filling {len(FILLED)} slots")
        for i, slot in enumerate(FILLED):
            d.call("attach", slot=slot, source=handler_source(f"cli {i}", f"cli_handler_{i}"), filename=f"cli_{i}.c")
        # As an installed tailcallctl runs: from compiled bytecode (pip compiles at install; a
        # checkout's first run writes __pycache__), whatever this shell says.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["TAILCALLD_SOCKET"] = str(d.socket)
        for row in measured:  # once each, unmeasured: the page cache and .pyc files are warm for every row
            _run_once(row, env)
            row.ms.clear()
            row.cpu_ms.clear()
        log(f"cli start-up: {rounds} rounds of {len(measured)} commands")
        for _ in range(rounds):
            for row in measured:
                _run_once(row, env)
    return measured


HEADERS = ("command", "runs", "median ms", "fastest ms", "x bare (median)", "x bare (fastest)", "CPU ms (median)",
           "x bare (CPU)", "goal")


def table(measured: list[StartupRow]) -> str:
    bare = measured[0]
    bare_median, bare_min, bare_cpu = median(bare.ms), min(bare.ms), median(bare.cpu_ms)
    lines = [(r.label, len(r.ms), median(r.ms), min(r.ms), median(r.ms) / bare_median, min(r.ms) / bare_min,
              median(r.cpu_ms), median(r.cpu_ms) / bare_cpu if bare_cpu else float("nan"),
              f"<= {r.goal:g}x" if r.goal else "-") for r in measured]
    return format_table(HEADERS, lines)
