"""Part 5: tailcallctl's start-up (issue 14 item 3), side by side with a bare Python start.

Each row is a whole process, as a person or a script runs it: fork, exec, the interpreter's start,
tailcallctl's imports, the request to a real tailcalld (its own socket, a few slots filled) and
the output (to /dev/null).  The rows are measured interleaved, round after round, so that other
users' load falls on all of them alike.  Each is reported as its median and its fastest run, and
its CPU time (user + system: what other users' load changes least), each also as a ratio to the
bare start of the same interpreter (the floor no Python CLI can go below).  The goal: list,
status and --help within 2x.

The checkout's venv has tailcalld installed editable: its bare start runs setuptools' editable
finder, which imports pathlib, re and importlib.util -- modules tailcallctl needs too, so there the
floor carries part of tailcallctl's own cost.  An installed tailcallctl (`make install`: a venv
without that finder) starts like the system's python3.  So the second group of rows does that:
/usr/bin/python3 (the venv's base interpreter) bare, and running tailcallctl's main from this
checkout as pip's console script does (import, call main), with no site-packages needed.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
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
    group: str = "venv"  # the rows of a group are compared with its first (its bare start)


REPO = Path(__file__).resolve().parent.parent
# What pip's console script does, from this checkout, for a python3 without tailcalld installed.
AS_INSTALLED = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tailcalld.ctl import main; sys.exit(main())"


def rows() -> list[StartupRow]:
    python, ctl = str(VENV_BIN / "python3"), str(VENV_BIN / "tailcallctl")
    base = str(Path(sys.base_prefix) / "bin" / "python3")
    installed = [base, "-c", AS_INSTALLED]
    return [StartupRow("python3 -c pass (the venv's: bare start, the floor)", [python, "-c", "pass"]),
            StartupRow("tailcallctl --help", [ctl, "--help"], goal=GOAL),
            StartupRow(f"tailcallctl list ({len(FILLED)} slots)", [ctl, "list"], goal=GOAL),
            StartupRow("tailcallctl status", [ctl, "status"], goal=GOAL),
            StartupRow("tailcallctl list --json", [ctl, "list", "--json"]),
            StartupRow(f"{base} -c pass (no venv, no editable finder)", [base, "-c", "pass"], group="installed"),
            StartupRow("as installed: tailcallctl --help", [*installed, "--help"], goal=GOAL, group="installed"),
            StartupRow("as installed: tailcallctl list", [*installed, "list"], goal=GOAL, group="installed"),
            StartupRow("as installed: tailcallctl status", [*installed, "status"], goal=GOAL, group="installed")]


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
    bare: dict[str, StartupRow] = {}  # each group's first row
    for r in measured:
        bare.setdefault(r.group, r)
    lines = []
    for r in measured:
        b = bare[r.group]
        b_cpu = median(b.cpu_ms)
        lines.append((r.label, len(r.ms), median(r.ms), min(r.ms), median(r.ms) / median(b.ms), min(r.ms) / min(b.ms),
                      median(r.cpu_ms), median(r.cpu_ms) / b_cpu if b_cpu else float("nan"),
                      f"<= {r.goal:g}x" if r.goal else "-"))
    return format_table(HEADERS, lines)
