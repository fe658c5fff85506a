"""Part 8: many slots (issue 14, item 4).  One tailcalld measured empty, then with N slots
filled (bcc and libbpf handlers alternating, each source different): tailcallctl list and
status (whole processes, interleaved with a bare python start, the floor), GET /metrics, the
daemon's memory, a restart (pins kept) and a reboot (pins gone, the compile cache warm)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tailcalld.dispatcher import NR_SLOTS
from tailcalld.metrics_http import fetch
from tailcalld.syscalls import SyscallTable
from tests.harness import VENV_BIN, DaemonProcess, children_of, remove_pin_tree, start_daemon

from .control_plane import handler_source
from .restore import start_timed
from .util import PinDirs, format_table, median, pinned_link_progs, status_kib, wait_progs_gone

FLOOR = "bare python start, python3 -c pass (the floor)"
CLI_GOAL = 2.0  # x the bare start (item 3's budget, kept at any number of slots)
MEMORY_GOAL_MIB = 100


def libbpf_source(tag: str, function: str) -> str:
    return (f"// {tag}\n#include \"vmlinux.h\"\n#include <bpf/bpf_helpers.h>\n"
            f"SEC(\"raw_tp/sys_enter\") int {function}(void *ctx) {{ return 0; }}\n"
            "char _license[] SEC(\"license\") = \"GPL\";\n")


@dataclass
class ScaleRow:
    what: str
    empty: list[float] = field(default_factory=list)
    filled: list[float] = field(default_factory=list)
    unit: str = "ms"
    goal: str = "-"


@dataclass
class ScaleResults:
    slots: int
    rounds: int
    fill_s: float
    rows: list[ScaleRow]


def fill(d: DaemonProcess, count: int, parallel: int = 4) -> float:
    """``count`` handlers into the ``count`` highest syscall slots, bcc and libbpf alternating."""
    table = SyscallTable.for_this_machine(NR_SLOTS)
    slots = sorted(table.by_nr, reverse=True)[:count]
    if len(slots) < count:
        raise RuntimeError(f"this machine has {len(slots)} syscalls, fewer than {count} slots to fill")

    def attach(i_slot: tuple[int, int]) -> None:
        i, slot = i_slot
        with d.client() as c:
            if i % 2:
                c.call("attach", slot=slot, source=libbpf_source(f"scale {i}", f"scale_{i}"), dialect="libbpf",
                       filename=f"scale_{i}.bpf.c")
            else:
                c.call("attach", slot=slot, source=handler_source(f"scale {i}", f"scale_{i}"),
                       filename=f"scale_{i}.c")

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(attach, enumerate(slots)))
    return time.perf_counter() - start


def _wall_ms(command: Sequence[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return (time.perf_counter() - start) * 1e3


def _readings(d: DaemonProcess, rounds: int, into: Callable[[str], list[float]]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["TAILCALLD_SOCKET"] = str(d.socket)
    ctl, python = str(VENV_BIN / "tailcallctl"), str(VENV_BIN / "python3")
    commands = {FLOOR: [python, "-c", "pass"], "list (tailcallctl, whole process)": [ctl, "list"],
                "status (tailcallctl, whole process)": [ctl, "status"],
                "list --json (tailcallctl, whole process)": [ctl, "list", "--json"]}
    for command in commands.values():  # warm: page cache, .pyc files
        _wall_ms(command, env)
    for _ in range(rounds):
        for what, command in commands.items():
            into(what).append(_wall_ms(command, env))
        start = time.perf_counter()
        body = fetch(d.socket.parent / "metrics.sock")
        into("GET /metrics (unix socket)").append((time.perf_counter() - start) * 1e3)
        into("GET /metrics size").append(len(body) / 1024)
    into("daemon RSS, running").append((status_kib(d.pid, "VmRSS") or 0) / 1024)
    into("idle compile workers' RSS, together").append(
        sum(status_kib(pid, "VmRSS") or 0 for pid in children_of(d.pid)) / 1024)


def measure(pins: PinDirs, workdir: Path, count: int, rounds: int, log: Callable[[str], None]) -> ScaleResults:
    rows: dict[str, ScaleRow] = {}
    goals = {"list (tailcallctl, whole process)": f"<= {CLI_GOAL:g}x the floor",
             "status (tailcallctl, whole process)": f"<= {CLI_GOAL:g}x the floor",
             "daemon RSS, running": f"< {MEMORY_GOAL_MIB} MiB", "restart (pins kept): all slots back": "<= 3 s",
             "reboot (cache warm): all slots back": "<= 3 s", "reboot (cache warm): socket answers": "<= 0.5 s"}
    units = {"GET /metrics size": "KiB", "daemon RSS, running": "MiB", "idle compile workers' RSS, together": "MiB"}

    def row(what: str, filled: bool) -> list[float]:
        r = rows.setdefault(what, ScaleRow(what, unit=units.get(what, "s" if ":" in what else "ms"),
                                           goal=goals.get(what, "-")))
        return r.filled if filled else r.empty

    pin_dir = pins.new("scale")
    try:
        for filled in (False, True):
            d = start_daemon(workdir, pin_dir)
            try:
                if filled:
                    log(f"scale: filling {count} slots, bcc and libbpf alternating")
                    fill_s = fill(d, count)
                log(f"scale: {rounds} rounds of list, status, metrics with {count if filled else 0} slots")
                _readings(d, rounds, lambda what, f=filled: row(what, f))  # type: ignore[misc]
            finally:
                d.stop()
            for way, reboot in (("restart (pins kept)", False), ("reboot (cache warm)", True)):
                log(f"scale: {way} with {count if filled else 0} slots")
                if reboot:
                    dispatcher = pinned_link_progs(pin_dir)
                    remove_pin_tree(pin_dir)
                    wait_progs_gone(dispatcher)
                d, answered, back = start_timed(workdir, pin_dir, {})
                try:
                    row(f"{way}: socket answers", filled).append(answered)
                    row(f"{way}: all slots back", filled).append(back)
                    if reboot:
                        row("daemon RSS after a reboot's restore", filled).append((status_kib(d.pid, "VmRSS") or 0) / 1024)
                        units_row = rows["daemon RSS after a reboot's restore"]
                        units_row.unit, units_row.goal = "MiB", f"< {MEMORY_GOAL_MIB} MiB"
                finally:
                    d.stop()
    finally:
        dispatcher = pinned_link_progs(pin_dir)
        remove_pin_tree(pin_dir)
        wait_progs_gone(dispatcher)
    return ScaleResults(count, rounds, fill_s, list(rows.values()))


def table(res: ScaleResults) -> str:
    floor = next(r for r in res.rows if r.what == FLOOR)

    def cell(r: ScaleRow, filled: bool) -> str:
        xs, base = (r.filled, floor.filled) if filled else (r.empty, floor.empty)
        if not xs:
            return "-"
        text = f"{median(xs):.2f}" if r.unit == "s" else f"{median(xs):.1f}"
        return f"{text} ({median(xs) / median(base):.2f}x)" if "(tailcallctl" in r.what else text

    return format_table(("what", "unit", "empty (median)", f"{res.slots} slots (median)", "goal"),
                        [(r.what, r.unit, cell(r, False), cell(r, True), r.goal) for r in res.rows])
