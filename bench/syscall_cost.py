"""Part 1: what one getppid(2) costs with each kind of sys_enter program attached.

Every configuration is a context manager that attaches its program(s) and, on exit, detaches
them and waits until the kernel has really freed them, so that exactly one configuration is
ever attached by this benchmark.  Configurations are interleaved in rounds (the order rotates
each round); in each round a configuration's value is the minimum over several short runs,
because noise on these VMs only ever adds time.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailcalld.chain import CHAIN_DIR, Chains
from tailcalld.compiler import Compiler, Program
from tailcalld.config import LiveSettings, Settings
from tailcalld.dispatcher import EXIT, NR_SLOTS, Dispatcher
from tailcalld.scope import SCOPE_DIR, Scopes, cgroup2_mounts
from tailcalld.timing import SOURCE as TIMING_SOURCE
from tailcalld.timing import HandlerTimer, target_of
from tailcalld.syscalls import SyscallTable
from tests.harness import remove_pin_tree, slot_misses

from .util import (LinkWatch, PinDirs, median, perf_progs_of, perf_tracepoint_programs, pinned_link_progs,
                   prog_id_of_fd, raw_tp_link_progs, wait_progs_gone)

LOOP_SOURCE = Path(__file__).with_name("getppid_loop.c")
OTHER_SYSCALL = "fchmodat"  # where configuration 5 puts its handler: any syscall but getppid
BPFTRACE_PROGRAM = "tracepoint:raw_syscalls:sys_enter { @[args->id] = count(); }"

EMPTY_RAW_TP = "int bench_empty_raw_tp(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
EMPTY_TRACEPOINT = "int bench_empty_tp_getppid(void *ctx) { return 0; }\n"
EMPTY_HANDLER = "int bench_empty_handler(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


# -- the timed program -----------------------------------------------------------------------

@dataclass(frozen=True)
class LoopSize:
    calls: int  # getppid calls per run
    runs: int  # runs per configuration per round; the round keeps the fastest


def build_loop(workdir: Path) -> Path:
    binary = workdir / "getppid_loop"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(LOOP_SOURCE)], check=True)
    return binary


def run_loop(binary: Path, size: LoopSize) -> list[float]:
    out = subprocess.run([str(binary), str(size.calls), str(size.runs)],
                         capture_output=True, text=True, check=True).stdout
    return [float(line) for line in out.split()]


# -- what a configuration attaches -----------------------------------------------------------

@dataclass
class Attached:
    """What one configuration put on syscall entry, so that other users' programs can be told apart."""

    prog_ids: set[int]
    pids: set[int] = field(default_factory=set)  # owners of our perf-event attachments
    getppid_misses: Callable[[], int] | None = None  # the dispatcher's miss counter for getppid


@dataclass
class Env:
    """Shared by the configurations: one event loop and compiler for tailcalld's async API,
    the pin registry, and the empty handler (compiled once, put into each round's new prog array)."""

    loop: asyncio.AbstractEventLoop
    compiler: Compiler
    pins: PinDirs
    getppid_nr: int
    other_nr: int
    compat: dict[int, int] | None  # the ia32 table, as the daemon loads the dispatcher with it
    _handler: Program | None = None

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop, pins: PinDirs) -> Env:
        table = SyscallTable.for_this_machine(NR_SLOTS)
        compiler = Compiler(LiveSettings(Settings(compile_timeout=120.0)))
        return cls(loop, compiler, pins, table.resolve("getppid"), table.resolve(OTHER_SYSCALL), table.compat_table())

    def handler(self) -> Program:
        if self._handler is None:
            load = self.compiler.load(source=EMPTY_HANDLER, function="bench_empty_handler")
            self._handler = self.loop.run_until_complete(load)
        return self._handler

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None


Attacher = Callable[[Env], AbstractContextManager[Attached]]


@dataclass(frozen=True)
class Configuration:
    key: str
    label: str
    attach: Attacher
    expect: str | None = None  # "miss" or "hit": what the getppid miss counter must show
    unavailable: Callable[[], str | None] = lambda: None  # a reason to skip, or None


@contextlib.contextmanager
def nothing(_env: Env) -> Iterator[Attached]:
    yield Attached(set())


def _close_bcc(b: Any) -> None:
    # Each BPF() registers its cleanup with atexit; drop it so the object can really go.
    b.cleanup()
    atexit.unregister(b.cleanup)


@contextlib.contextmanager
def empty_raw_tp(_env: Env) -> Iterator[Attached]:
    """The reference: the cheapest program a sys_enter raw tracepoint can run."""
    from bcc import BPF  # noqa: PLC0415 - libbcc/LLVM only when this part runs

    b = BPF(text=EMPTY_RAW_TP)
    ids: set[int] = set()
    try:
        ids = {prog_id_of_fd(b.load_func("bench_empty_raw_tp", BPF.RAW_TRACEPOINT).fd)}
        b.attach_raw_tracepoint(tp="sys_enter", fn_name="bench_empty_raw_tp")
        yield Attached(ids)
    finally:
        _close_bcc(b)
        wait_progs_gone(ids)


@contextlib.contextmanager
def tracepoint_getppid(_env: Env) -> Iterator[Attached]:
    """A per-syscall tracepoint: the kernel's syscall tracing runs on every syscall and calls
    the program only for getppid."""
    from bcc import BPF  # noqa: PLC0415

    b = BPF(text=EMPTY_TRACEPOINT)
    ids: set[int] = set()
    try:
        ids = {prog_id_of_fd(b.load_func("bench_empty_tp_getppid", BPF.TRACEPOINT).fd)}
        b.attach_tracepoint(tp="syscalls:sys_enter_getppid", fn_name="bench_empty_tp_getppid")
        yield Attached(ids, pids={os.getpid()})
    finally:
        _close_bcc(b)
        wait_progs_gone(ids)


@contextlib.contextmanager
def _bench_cgroup(scope: str | None) -> Iterator[str | None]:
    """The cgroup a scoped configuration's guard checks: "all", the cgroup v2 root (every task
    is in its subtree: the guard lets every call through); "none", an empty cgroup of the
    benchmark's own (the guard lets none through)."""
    mounts = [m for m in cgroup2_mounts() if m.is_dir()]
    if scope is None or not mounts:
        yield None
        return
    if scope == "all":
        yield str(mounts[0])
        return
    empty = mounts[0] / f"tailcalld-bench-{os.getpid()}"
    empty.mkdir(exist_ok=True)
    try:
        yield str(empty)
    finally:
        empty.rmdir()


def _no_cgroup2() -> str | None:
    return None if any(m.is_dir() for m in cgroup2_mounts()) else "no cgroup v2 hierarchy is mounted"


def tailcalld_dispatcher(fill: Callable[[Env], list[int]], exit_fill: Callable[[Env], list[int]] | None = None,
                         timed: bool = False, scope: str | None = None, chain: int = 0) -> Attacher:
    """tailcalld's own dispatcher, loaded and pinned by tailcalld's code in a fresh pin folder,
    with the empty handler in the slots ``fill`` names; with ``exit_fill``, the exit dispatcher
    too, the empty handler in those exit slots; ``timed``: handler timing switched on;
    ``scope``: the handler behind a cgroup guard (``_bench_cgroup``), as attach --cgroup puts it;
    ``chain``: that many copies of the handler in order behind a chain's runner (attach --priority)."""

    @contextlib.contextmanager
    def attach(env: Env) -> Iterator[Attached]:
        pin_dir = env.pins.new("dispatcher")
        dispatchers: list[Dispatcher] = []
        timer: HandlerTimer | None = None
        scopes: Scopes | None = None
        chains: Chains | None = None
        ids: set[int] = set()
        try:
            with _bench_cgroup(scope) as cgroup:
                enter = env.loop.run_until_complete(Dispatcher.open_or_load(pin_dir, env.compiler, env.compat))
                dispatchers.append(enter)
                for slot in fill(env):
                    if chain:
                        chains = chains or Chains(pin_dir / CHAIN_DIR, 2 * NR_SLOTS)
                        for priority in range(chain):
                            change = chains.put(slot, priority, env.handler().fd)
                            if not change.keep_slot and change.slot_fd is not None:
                                enter.set_slot(slot, change.slot_fd)
                            chains.installed(change)
                        continue
                    if cgroup is None:
                        enter.set_slot(slot, env.handler().fd)
                        continue
                    scopes = scopes or Scopes(pin_dir / SCOPE_DIR, 2 * NR_SLOTS)
                    guard = scopes.make_guard(slot, env.handler().fd, cgroup)
                    enter.set_slot(slot, guard.fd)
                    scopes.installed(slot, guard)
                if exit_fill is not None:
                    exit_ = env.loop.run_until_complete(
                        Dispatcher.open_or_load(pin_dir, env.compiler, env.compat, hook=EXIT))
                    dispatchers.append(exit_)
                    for slot in exit_fill(env):
                        exit_.set_slot(slot, env.handler().fd)
                if timed:
                    target = target_of(enter)
                    build = env.compiler.build_own_object(TIMING_SOURCE, target.cflags)
                    timer = HandlerTimer.attach(env.loop.run_until_complete(build), target)
                ids = {d.prog_id for d in dispatchers} | (timer.prog_ids() if timer else set())
                # Read from the pin, the way anyone but the daemon would see the counter.
                yield Attached(ids, getppid_misses=lambda: slot_misses(pin_dir, env.getppid_nr))
        finally:
            if timer is not None:
                timer.close()
            ids = ids or pinned_link_progs(pin_dir)
            remove_pin_tree(pin_dir)  # the link pins first: that detaches the dispatchers
            if scopes is not None:
                scopes.close()
            if chains is not None:
                chains.close()
            for d in dispatchers:
                d.close()  # our fds were the last references
            wait_progs_gone(ids)

    return attach


def _bpftrace_missing() -> str | None:
    return None if shutil.which("bpftrace") else "bpftrace is not installed"


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read bpftrace's output until ``marker`` without blocking past ``timeout``."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"bpftrace printed no {marker!r} within {timeout:g} s:\n{seen.decode(errors='replace')}")
        if select.select([proc.stdout], [], [], min(left, 0.1))[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # end of file: bpftrace exited
                raise RuntimeError(f"bpftrace exited with status {proc.wait()}:\n{seen.decode(errors='replace')}")
            seen += chunk
    return seen


def _wait_perf_attached(pid: int, timeout: float) -> list[int]:
    """bpftrace prints "Attaching" before it attaches: wait until the kernel shows the attachment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = perf_progs_of(pid)
        if ids:
            return ids
        time.sleep(0.02)
    raise RuntimeError(f"bpftrace (pid {pid}) printed 'Attaching' but no attached program showed up")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # bpftrace prints its map and detaches
    try:
        proc.communicate(timeout=15)  # also drains the map it prints, so it cannot block on the pipe
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@contextlib.contextmanager
def bpftrace_counting(_env: Env) -> Iterator[Attached]:
    # -B none: with a pipe as stdout bpftrace would hold "Attaching ..." back until it exits.
    proc = subprocess.Popen(["bpftrace", "-B", "none", "-e", BPFTRACE_PROGRAM],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ids: list[int] = []
    try:
        _read_until(proc, b"Attaching", timeout=60)
        ids = _wait_perf_attached(proc.pid, timeout=30)
        yield Attached(set(ids), pids={proc.pid})
    finally:
        _stop(proc)
        wait_progs_gone(ids)


def configurations() -> list[Configuration]:
    getppid: Callable[[Env], list[int]] = lambda env: [env.getppid_nr]  # noqa: E731
    other: Callable[[Env], list[int]] = lambda env: [env.other_nr]  # noqa: E731
    return [
        Configuration("floor", "no BPF (floor)", nothing),
        Configuration("raw_tp", "empty raw_tp on sys_enter (bcc)", empty_raw_tp),
        Configuration("miss", "tailcalld, getppid slot empty (miss)", tailcalld_dispatcher(lambda env: []), "miss"),
        Configuration("hit", "tailcalld, empty handler in getppid slot (hit)", tailcalld_dispatcher(getppid), "hit"),
        Configuration("other", f"tailcalld, handler on {OTHER_SYSCALL} only", tailcalld_dispatcher(other), "miss"),
        Configuration("exit", "tailcalld, empty handler in getppid exit slot (both dispatchers)",
                      tailcalld_dispatcher(lambda env: [], exit_fill=getppid), "miss"),
        Configuration("timed", "tailcalld, hit, handler timing on", tailcalld_dispatcher(getppid, timed=True), "hit"),
        Configuration("scoped", "tailcalld, hit through a cgroup guard (attach --cgroup, caller inside)",
                      tailcalld_dispatcher(getppid, scope="all"), "hit", unavailable=_no_cgroup2),
        Configuration("scoped_out", "tailcalld, cgroup guard, caller outside (a scope miss)",
                      tailcalld_dispatcher(getppid, scope="none"), "hit", unavailable=_no_cgroup2),
        Configuration("chained", "tailcalld, 2 empty handlers in order (attach --priority)",
                      tailcalld_dispatcher(getppid, chain=2), "hit"),
        Configuration("chained4", "tailcalld, 4 empty handlers in order (attach --priority)",
                      tailcalld_dispatcher(getppid, chain=4), "hit"),
        Configuration("bpftrace", "bpftrace raw_syscalls:sys_enter count by id", bpftrace_counting,
                      unavailable=_bpftrace_missing),
        Configuration("tracepoint", "tracepoint syscalls:sys_enter_getppid (bcc)", tracepoint_getppid),
    ]


# -- measuring -------------------------------------------------------------------------------

@dataclass
class Sample:
    config: str
    round: int
    runs: list[float]  # ns per call of each short run that counts
    discarded: int  # runs thrown away because another user's program was on sys_enter meanwhile
    foreign: list[str]  # other users' programs seen on syscall entry around this sample
    problem: str | None  # the miss counter contradicts the configuration

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def disturbed(self) -> bool:
        return bool(self.foreign)


# Longest wait, per configuration and round, for other users' sys_enter programs to go away;
# after that the runs are taken as they come and the sample is flagged as disturbed.
QUIET_BUDGET_S = 30.0


def _foreign_tracepoints(ours: Attached) -> set[str]:
    return {f"perf tracepoint prog {prog} of pid {pid}" for prog, pid in perf_tracepoint_programs()
            if prog not in ours.prog_ids and pid not in ours.pids}


def _check_misses(expect: str | None, delta: int | None, calls: int) -> str | None:
    """The counter proves which path ran: every getppid misses, or none does."""
    if expect is None or delta is None:
        return None
    if expect == "miss" and delta < calls:
        return f"only {delta} getppid misses counted for {calls} calls"
    if expect == "hit" and delta != 0:
        return f"{delta} getppid misses counted although the slot is filled"
    return None


def _quiet_runs(ours: Attached, binary: Path, size: LoopSize) -> tuple[list[float], int, set[int]]:
    """``size.runs`` runs with no other raw_tp link on the machine, waiting for quiet moments
    (another developer's tests attach dispatchers for seconds at a time); a run during which
    one showed up is discarded.  Returns the runs kept, how many were discarded, and the
    foreign programs that were there during the kept runs (none unless the quiet budget ran
    out and disturbed runs had to be kept)."""
    one = LoopSize(size.calls, 1)
    clean: list[float] = []
    dirty: list[float] = []
    seen_dirty: set[int] = set()
    deadline = time.monotonic() + QUIET_BUDGET_S
    while len(clean) < size.runs:
        late = time.monotonic() > deadline
        if late and (clean or len(dirty) >= size.runs):
            break
        if not late and raw_tp_link_progs() - ours.prog_ids:
            time.sleep(0.02)
            continue
        with LinkWatch(ours.prog_ids) as watch:
            ns = run_loop(binary, one)[0]
        if watch.seen:
            dirty.append(ns)
            seen_dirty |= watch.seen
        else:
            clean.append(ns)
    if clean:
        return clean, len(dirty), set()
    return dirty, 0, seen_dirty


def measure_one(config: Configuration, env: Env, binary: Path, size: LoopSize, rnd: int) -> Sample:
    with config.attach(env) as ours:
        foreign = _foreign_tracepoints(ours)
        before = ours.getppid_misses() if ours.getppid_misses else None
        runs, discarded, kept_dirty = _quiet_runs(ours, binary, size)
        after = ours.getppid_misses() if ours.getppid_misses else None
        foreign |= _foreign_tracepoints(ours)
    foreign |= {f"raw_tp link prog {p}" for p in kept_dirty}
    delta = None if before is None or after is None else after - before
    made = size.calls * (len(runs) + discarded)  # every timed call went through sys_enter
    return Sample(config.key, rnd, runs, discarded, sorted(foreign), _check_misses(config.expect, delta, made))


def measure_all(configs: list[Configuration], env: Env, binary: Path, size: LoopSize, rounds: int,
                log: Callable[[str], None]) -> list[Sample]:
    active = [c for c in configs if c.unavailable() is None]
    samples: list[Sample] = []
    for rnd in range(rounds):
        shift = rnd % len(active)  # rotate, so no configuration always follows the same one
        for config in active[shift:] + active[:shift]:
            sample = measure_one(config, env, binary, size, rnd)
            samples.append(sample)
            log(f"round {rnd + 1}/{rounds}  {config.label:<48} {sample.best:8.1f} ns/call"
                + (f"  ({sample.discarded} disturbed runs discarded)" if sample.discarded else "")
                + (f"  (others on sys_enter: {', '.join(sample.foreign)})" if sample.foreign else "")
                + (f"  CHECK: {sample.problem}" if sample.problem else ""))
    return samples


# -- summary ---------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    label: str
    skipped: str | None = None
    per_round: list[float] = field(default_factory=list)  # the best run of each round
    disturbed: int = 0  # rounds whose kept runs had other users' programs on syscall entry too
    discarded: int = 0  # runs thrown away because of other users' programs
    problems: list[str] = field(default_factory=list)
    median: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    over_median: float = float("nan")  # median - floor median
    ratio_median: float = float("nan")  # over_median / raw_tp over_median
    over_best: float = float("nan")  # min over rounds - floor min over rounds
    ratio_best: float = float("nan")


def summarize(configs: list[Configuration], samples: list[Sample]) -> list[Row]:
    rows: dict[str, Row] = {}
    for c in configs:
        mine = [s for s in samples if s.config == c.key]
        row = Row(c.key, c.label, skipped=c.unavailable())
        if mine:
            row.per_round = [s.best for s in mine]
            row.disturbed = sum(1 for s in mine if s.disturbed)
            row.discarded = sum(s.discarded for s in mine)
            row.problems = [f"round {s.round + 1}: {s.problem}" for s in mine if s.problem]
            row.median, row.low, row.high = median(row.per_round), min(row.per_round), max(row.per_round)
        rows[c.key] = row
    floor, ref = rows["floor"], rows["raw_tp"]
    for row in rows.values():
        row.over_median = row.median - floor.median
        row.over_best = row.low - floor.low
    for row in rows.values():
        row.ratio_median = _ratio(row.over_median, ref.over_median)
        row.ratio_best = _ratio(row.over_best, ref.over_best)
    return list(rows.values())


def _ratio(over: float, ref: float) -> float:
    return over / ref if ref > 0 else float("nan")
