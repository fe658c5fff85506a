"""Small pieces the benchmark parts share: statistics, tables, pins, kernel object lifetimes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from tailcalld import bpfsys
from tests.harness import libbpf, pin_path, pinned_link_prog, prog_fd_by_id, remove_pin_tree


# -- statistics ------------------------------------------------------------------------------

def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: with few samples p99 is simply the largest, never interpolated."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# -- tables ----------------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown (GitHub) table: readable in a terminal and pasteable into BENCHMARKS.md."""
    return tabulate([[_cell(v) for v in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


# -- pins ------------------------------------------------------------------------------------

@dataclass
class PinDirs:
    """Every pin folder the benchmark makes, so that one ``sweep`` in a ``finally`` removes them."""

    made: list[Path] = field(default_factory=list)

    def new(self, purpose: str) -> Path:
        # Named like the tests' folders: a test run started meanwhile spares them while this
        # benchmark lives, and sweeps what a killed one left behind.
        path = pin_path("bench", purpose)
        self.made.append(path)  # recorded before it exists: a crash while loading is still swept
        return path

    def sweep(self) -> list[str]:
        """Remove what is left; returns the folders that still had something in them."""
        left = [str(p) for p in self.made if p.exists()]
        for path in self.made:
            remove_pin_tree(path)
        return left


# -- kernel object lifetimes -----------------------------------------------------------------

def prog_exists(prog_id: int) -> bool:
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def wait_progs_gone(prog_ids: Iterable[int], timeout: float = 15.0) -> None:
    """A program is freed only after its last attachment is gone, and removing a link pin
    detaches asynchronously: until the id disappears it may still run on every syscall."""
    pending = set(prog_ids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {p for p in pending if prog_exists(p)}
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"BPF programs {sorted(pending)} are still loaded {timeout:g} s after detaching")
        time.sleep(0.01)


def prog_id_of_fd(fd: int) -> int:
    return bpfsys.prog_info(fd).id


def pinned_link_progs(pin_dir: Path) -> set[int]:
    """The program behind a pinned link (empty if there is none): what to wait for after unpinning."""
    prog_id = pinned_link_prog(pin_dir)
    return set() if prog_id is None else {prog_id}


# -- other programs on sys_enter -------------------------------------------------------------

def _bpftool_json(*args: str) -> list[dict[str, object]]:
    try:
        out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30).stdout
        return json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def perf_tracepoint_programs() -> list[tuple[int, int]]:
    """(prog id, owner pid) of programs attached through perf events to raw_syscalls:sys_enter
    or a syscalls:sys_enter_* tracepoint (how bpftrace and bcc attach tracepoints).  raw_tp
    links are left to ``raw_tp_link_progs``, which is cheap enough to poll."""
    return [(int(e["prog_id"]), int(e["pid"])) for e in _bpftool_json("perf", "show")
            if e.get("fd_type") == "tracepoint"
            and (e.get("tracepoint") == "sys_enter" or str(e.get("tracepoint", "")).startswith("sys_enter_"))]


def raw_tp_link_progs() -> set[int]:
    """Programs behind every raw_tp link of the machine, read with a few bpf() calls: cheap
    enough to poll while a run is timed (bpftool would scan /proc each time)."""
    lib, progs, next_id = libbpf(), set(), ctypes.c_uint32(0)
    while lib.bpf_link_get_next_id(next_id.value, ctypes.byref(next_id)) == 0:
        fd = lib.bpf_link_get_fd_by_id(next_id.value)
        if fd < 0:
            continue  # went away meanwhile
        try:
            info = bpfsys.link_info(fd)
            if info.type == bpfsys.BPF_LINK_TYPE_RAW_TRACEPOINT:
                progs.add(info.prog_id)
        except OSError:
            pass
        finally:
            os.close(fd)
    return progs


class LinkWatch:
    """Notes raw_tp links of other programs than ``ours`` that show up while a run is timed:
    other users' sys_enter programs add their cost to every syscall of ours."""

    def __init__(self, ours: set[int], period: float = 0.01) -> None:
        self.ours = ours
        self.seen: set[int] = set()
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LinkWatch:
        self.seen |= raw_tp_link_progs() - self.ours
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seen |= raw_tp_link_progs() - self.ours

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.seen |= raw_tp_link_progs() - self.ours


def perf_progs_of(pid: int) -> list[int]:
    """Programs a process has attached through perf events (how bpftrace attaches tracepoints)."""
    return [int(e["prog_id"]) for e in _bpftool_json("perf", "show") if e.get("pid") == pid]


# -- memory ----------------------------------------------------------------------------------

def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM); None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None
