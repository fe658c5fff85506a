"""Parts 2 and 3: a real tailcalld's control-plane latency and its memory.

The daemon is started by the tests' own harness (its own config, socket, state folder and a
pin folder under /sys/fs/bpf/tailcalld-test-<pid>-bench-*), and is driven over its socket.  Attach
and detach go through tailcalld's own client; list is timed with a bare connection because
the client validates every reply with pydantic, which would time the client, not the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailcalld import bpfsys
from tailcalld.client import Client
from tailcalld.compiler import Compiler
from tailcalld.config import LiveSettings, Settings
from tailcalld.dispatcher import NR_SLOTS
from tailcalld.syscalls import SyscallTable
from tests.harness import DaemonProcess, DaemonStuck, children_of, remove_pin_tree, start_daemon

from .util import PinDirs, percentile, pinned_link_progs, status_kib, wait_progs_gone

TIMED_SLOT = "getppid"  # cold/warm attaches go here; an empty handler on getppid bothers nobody
SECOND_SLOT = "getpgid"  # for "the same source into another slot"
LIST_REQUEST = b'{"id": 1, "command": "list"}\n'


def handler_source(tag: str, function: str = "bench_handler") -> str:
    """An empty handler; ``tag`` makes the text (so its hash) unique where a compile must be cold."""
    return f"// {tag}\nint {function}(struct bpf_raw_tracepoint_args *ctx) {{ return 0; }}\n"


@dataclass(frozen=True)
class ControlSize:
    attaches: int  # samples of cold attach, warm attach, detach and compile-only
    lists: int  # sequential lists on one connection
    clients: int  # concurrent list clients
    lists_per_client: int
    seconds: float  # window of the throughput readings
    handlers: int  # slots filled for the memory reading
    swaps: int  # kernel map updates timed


@dataclass
class Latency:
    operation: str
    n: int
    p50: float
    p99: float
    unit: str
    note: str = ""


@dataclass
class ControlResults:
    latencies: list[Latency] = field(default_factory=list)
    throughput: list[tuple[str, float]] = field(default_factory=list)  # (what, requests/s)
    memory: list[tuple[str, str]] = field(default_factory=list)  # (what, value)
    load: list[str] = field(default_factory=list)  # /proc/loadavg around the part: others' CPU use shows here

    def add(self, operation: str, samples: list[float], unit: str = "ms", note: str = "") -> None:
        self.latencies.append(Latency(operation, len(samples), percentile(samples, 50),
                                      percentile(samples, 99), unit, note))


# -- the daemon ------------------------------------------------------------------------------

@contextlib.contextmanager
def running_daemon(pins: PinDirs, workdir: Path) -> Iterator[DaemonProcess]:
    """A tailcalld of our own; on the way out it is stopped and its pins go, link first,
    and we wait until its dispatcher has left sys_enter."""
    pin_dir = pins.new("daemon")
    try:
        d = start_daemon(workdir, pin_dir)  # stops what it started if the daemon never answers
        try:
            yield d
        finally:
            with contextlib.suppress(DaemonStuck):  # killed instead: the numbers are taken already
                d.stop()
    finally:
        dispatcher = pinned_link_progs(pin_dir)  # a stop leaves the pins by design: they are ours to remove
        remove_pin_tree(pin_dir)
        wait_progs_gone(dispatcher)


# -- attach, detach, compile, swap -----------------------------------------------------------

def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cold_attaches(d: DaemonProcess, n: int) -> tuple[list[float], list[float]]:
    """Each source is new (a unique comment), so nothing compiled before can be reused; each
    attach is followed by a timed detach, so every attach fills an empty slot."""
    attach, detach = [], []
    with d.client() as c:
        for i in range(n):
            source = handler_source(f"cold {i} {secrets.token_hex(8)}")
            attach.append(_ms(lambda src=source: c.call("attach", slot=TIMED_SLOT, source=src, filename="cold.c")))
            detach.append(_ms(lambda: c.call("detach", slot=TIMED_SLOT)))
    return attach, detach


@dataclass
class Timed:
    """Latencies of repeated attaches, and how many of them reused an already loaded program."""

    ms: list[float] = field(default_factory=list)
    reused: int = 0

    def note(self) -> str:
        return f"{self.reused}/{len(self.ms)} reused a loaded program (no compile)"


def _timed_attach(c: Client, slot: str, source: str, into: Timed, reused_if: Callable[[dict[str, Any]], bool]) -> None:
    start = time.perf_counter()
    result = c.call("attach", slot=slot, source=source, filename="bench.c")
    into.ms.append((time.perf_counter() - start) * 1e3)
    into.reused += reused_if(result)


def warm_same_slot(d: DaemonProcess, n: int) -> Timed:
    """The same source again into the slot that already runs it."""
    source, out = handler_source(f"warm {secrets.token_hex(8)}"), Timed()
    with d.client() as c:
        c.call("attach", slot=TIMED_SLOT, source=source, filename="bench.c")  # now the daemon has it
        for _ in range(n):
            _timed_attach(c, TIMED_SLOT, source, out, lambda r: r["prog_id"] == r["replaced_prog_id"])
        c.call("detach", slot=TIMED_SLOT)
    return out


def warm_other_slot(d: DaemonProcess, n: int) -> Timed:
    """The source one slot runs, attached into a second slot (then detached from it again)."""
    source, out = handler_source(f"other {secrets.token_hex(8)}"), Timed()
    with d.client() as c:
        running = c.call("attach", slot=TIMED_SLOT, source=source, filename="bench.c")["prog_id"]
        for _ in range(n):
            _timed_attach(c, SECOND_SLOT, source, out, lambda r: r["prog_id"] == running)
            c.call("detach", slot=SECOND_SLOT)
        c.call("detach", slot=TIMED_SLOT)
    return out


def reattach_after_detach(d: DaemonProcess, n: int) -> Timed:
    """A source the daemon compiled before but no slot holds any more: only a compile cache
    that outlives the program would make this warm."""
    source, out = handler_source(f"again {secrets.token_hex(8)}"), Timed()
    with d.client() as c:
        c.call("attach", slot=TIMED_SLOT, source=source, filename="bench.c")
        c.call("detach", slot=TIMED_SLOT)
        for _ in range(n):
            _timed_attach(c, TIMED_SLOT, source, out, lambda r: False)  # a new load cannot be told from a compile
            c.call("detach", slot=TIMED_SLOT)
    return out


def compile_only(loop: asyncio.AbstractEventLoop, n: int) -> tuple[list[float], list[int]]:
    """tailcalld's Compiler (worker process, BCC, verifier) alone, in this process: the part of
    an attach that is not the swap.  Returns the timings and two program fds for ``kernel_swaps``."""
    compiler = Compiler(LiveSettings(Settings(compile_timeout=120.0)))
    times, fds = [], []
    for i in range(max(n, 2)):
        source = handler_source(f"compile {i} {secrets.token_hex(8)}")
        start = time.perf_counter()
        prog = loop.run_until_complete(compiler.load(source=source, function="bench_handler"))
        times.append((time.perf_counter() - start) * 1e3)
        fds.append(prog.fd)
    for fd in fds[2:]:
        os.close(fd)
    return times[:n], fds[:2]


def kernel_swaps(prog_fds: list[int], n: int) -> list[float]:
    """The swap itself: one prog-array update replacing a slot's program, in microseconds.
    A private, unpinned map, so nothing is attached and nothing is left behind."""
    map_fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_PROG_ARRAY, "bench_swap", 4, 4, NR_SLOTS)
    try:
        times = []
        for i in range(n):
            start = time.perf_counter()
            bpfsys.prog_array_set(map_fd, 110, prog_fds[i % 2])
            times.append((time.perf_counter() - start) * 1e6)
        return times
    finally:
        os.close(map_fd)


class WorkerWatch:
    """Samples the daemon's children while it compiles: the compile workers' RSS is real while
    they run, and none of them outlives its compile."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            for child in children_of(self.pid):
                self.seen.add(child)
                self.peak_kib = max(self.peak_kib, status_kib(child, "VmHWM") or 0)


# -- list ------------------------------------------------------------------------------------

class BareConnection:
    """One socket, pre-encoded requests, replies split at newlines and nothing else."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        line = self.file.readline()
        if not line.startswith(b'{"id":1,"ok":true'):
            raise RuntimeError(f"unexpected reply to list: {line[:300]!r}")
        return line

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def list_sequential(path: Path, n: int) -> list[float]:
    conn = BareConnection(path)
    try:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            conn.send(LIST_REQUEST)
            conn.reply()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    finally:
        conn.close()


def list_rate(path: Path, seconds: float, depth: int) -> float:
    """Lists per second on one connection, with ``depth`` requests in flight (1: request/reply)."""
    conn = BareConnection(path)
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            conn.send(LIST_REQUEST * depth)
            for _ in range(depth):
                conn.reply()
            done += depth
        return done / (time.perf_counter() - start)
    finally:
        conn.close()


def list_concurrent(path: Path, clients: int, per_client: int) -> tuple[list[float], float]:
    """``clients`` connections, each a thread issuing lists back to back; all start together.
    Returns every latency (ms) and the aggregate lists per second."""
    conns = [BareConnection(path) for _ in range(clients)]  # all connected before the clock starts
    barrier = threading.Barrier(clients + 1)
    results: list[list[float]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        barrier.wait()
        for _ in range(per_client):
            start = time.perf_counter()
            conns[i].send(LIST_REQUEST)
            conns[i].reply()
            results[i].append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        for conn in conns:
            conn.close()
    latencies = [x for r in results for x in r]
    if len(latencies) != clients * per_client:
        raise RuntimeError(f"only {len(latencies)} of {clients * per_client} concurrent lists completed")
    return latencies, len(latencies) / wall


# -- many handlers ---------------------------------------------------------------------------

def fill_slots(d: DaemonProcess, count: int, parallel: int = 2) -> float:
    """``count`` different handlers into ``count`` different slots (the highest syscall numbers,
    which are the rarely called ones); returns the wall time in seconds."""
    table = SyscallTable.for_this_machine(NR_SLOTS)
    slots = sorted((nr for nr in table.by_nr if nr != table.resolve(TIMED_SLOT)), reverse=True)[:count]

    def attach(i_slot: tuple[int, int]) -> None:
        i, slot = i_slot
        with d.client() as c:
            c.call("attach", slot=slot, source=handler_source(f"fill {i}", f"bench_handler_{i}"),
                   filename=f"handler_{i}.c")

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:  # tailcalld compiles two at a time
        list(pool.map(attach, enumerate(slots)))
    return time.perf_counter() - start


def _maps_llvm(pid: int) -> str:
    """Whether the daemon itself loaded bcc (and with it LLVM), which only compile workers need."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "libbcc" in line or "libLLVM" in line})
    return ", ".join(libs) if libs else "no"


def _mib(kib: int | None) -> str:
    return "gone" if kib is None else f"{kib / 1024:.1f} MiB"


# -- the whole part --------------------------------------------------------------------------

def measure(pins: PinDirs, workdir: Path, loop: asyncio.AbstractEventLoop, size: ControlSize,
            log: Callable[[str], None]) -> ControlResults:
    res = ControlResults()
    res.load.append(_loadavg())
    with running_daemon(pins, workdir) as d:
        time.sleep(0.5)  # let start-up garbage settle before the idle reading
        res.memory.append(("daemon VmRSS, idle (no handlers)", _mib(status_kib(d.pid, "VmRSS"))))
        worker_peak = _attach_latencies(d, loop, size, res, log)

        d.call("attach", slot=TIMED_SLOT, source=handler_source("listed"), filename="bench.c")
        _measure_lists(d, size, res, log)
        d.call("detach", slot=TIMED_SLOT)  # so that the next reading has exactly size.handlers

        log(f"control plane: filling {size.handlers} slots")
        fill_s = fill_slots(d, size.handlers)
        res.throughput.append((f"attaches/s filling {size.handlers} slots, 2 in parallel", size.handlers / fill_s))
        time.sleep(0.5)
        _memory_readings(d, size.handlers, worker_peak, res)
        _measure_lists(d, size, res, log)
    res.load.append(_loadavg())
    return res


def _attach_latencies(d: DaemonProcess, loop: asyncio.AbstractEventLoop, size: ControlSize,
                      res: ControlResults, log: Callable[[str], None]) -> WorkerWatch:
    """Cold, warm, re-attach and detach through the daemon; compile and map update alone here.
    Returns the watch on the compile workers of the cold attaches."""
    log(f"control plane: {size.attaches} cold attaches + detaches")
    with WorkerWatch(d.pid) as watch:
        attach, detach = cold_attaches(d, size.attaches)
    res.add("cold attach (compile + load + swap)", attach)
    log(f"control plane: {size.attaches} x 3 warm attaches")
    warm = warm_same_slot(d, size.attaches)
    other = warm_other_slot(d, size.attaches)
    again = reattach_after_detach(d, size.attaches)
    res.add("warm attach: same source, same slot", warm.ms, note=warm.note())
    res.add("warm attach: same source into another slot", other.ms, note=other.note())
    res.add("re-attach after detach (source compiled before)", again.ms)
    res.add("detach", detach)

    log(f"control plane: {size.attaches} compiles alone, {size.swaps} kernel swaps")
    compiles, fds = compile_only(loop, size.attaches)
    try:
        swaps = kernel_swaps(fds, size.swaps)
    finally:
        for fd in fds:
            os.close(fd)
    res.add("compile + load alone (tailcalld Compiler, in the benchmark)", compiles)
    res.latencies.append(_swap_row(attach, compiles, warm))
    res.add("swap, kernel map update alone", swaps, "us", "one BPF_MAP_UPDATE_ELEM on a prog array")
    return watch


def _memory_readings(d: DaemonProcess, handlers: int, workers: WorkerWatch, res: ControlResults) -> None:
    res.memory.append((f"daemon VmRSS, {handlers} handlers in {handlers} slots", _mib(status_kib(d.pid, "VmRSS"))))
    res.memory.append(("  of which anonymous (RssAnon)", _mib(status_kib(d.pid, "RssAnon"))))
    res.memory.append(("  of which file-backed, shared libraries (RssFile)", _mib(status_kib(d.pid, "RssFile"))))
    res.memory.append(("daemon VmHWM (peak RSS) over the whole run", _mib(status_kib(d.pid, "VmHWM"))))
    res.memory.append(("daemon has libbcc / libLLVM mapped", _maps_llvm(d.pid)))
    kids = children_of(d.pid)
    res.memory.append(("compile workers alive now, idle ones started ahead (their RSS)",
                       f"{len(kids)} ({sum(status_kib(k, 'VmRSS') or 0 for k in kids) / 1024:.1f} MiB)"))
    res.memory.append((f"compile worker peak RSS while compiling ({len(workers.seen)} seen)",
                       _mib(workers.peak_kib) if workers.seen else "none seen"))


def _loadavg() -> str:
    """Unlike the per-syscall part, latencies here cannot discard other users' CPU load; say how much there was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _swap_row(cold: list[float], compiles: list[float], warm: Timed) -> Latency:
    """The daemon's swap (socket, JSON, state file, map update) without the compile: measured
    directly when every warm attach reused a loaded program, else estimated (and noisy)."""
    if warm.ms and warm.reused == len(warm.ms):
        return Latency("swap: attach without compile (= warm attach, same slot)", len(warm.ms),
                       percentile(warm.ms, 50), percentile(warm.ms, 99), "ms",
                       "socket, JSON, state file (fsync), map update")
    return Latency("swap: cold attach p50 - compile p50 (estimate)", len(cold),
                   percentile(cold, 50) - percentile(compiles, 50), float("nan"), "ms",
                   "difference of two ~300 ms medians: noisy, can come out negative")


def _measure_lists(d: DaemonProcess, size: ControlSize, res: ControlResults, log: Callable[[str], None]) -> None:
    filled = len(d.call("list")["slots"])  # the label says what the daemon had, not what we meant it to have
    state = f"{filled} slot{'s' if filled != 1 else ''} filled"
    log(f"control plane: list, {state}")
    res.add(f"list, 1 client ({state})", list_sequential(d.socket, size.lists))
    latencies, rate = list_concurrent(d.socket, size.clients, size.lists_per_client)
    res.add(f"list, {size.clients} concurrent clients ({state})", latencies,
            note=f"{size.lists_per_client} lists each, back to back")
    res.throughput.append((f"lists/s, {size.clients} concurrent clients ({state})", rate))
    res.throughput.append((f"lists/s, one connection, request/reply ({state})",
                           list_rate(d.socket, size.seconds, 1)))
    res.throughput.append((f"lists/s, one connection, 32 pipelined ({state})",
                           list_rate(d.socket, size.seconds, 32)))
