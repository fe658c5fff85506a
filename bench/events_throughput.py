"""Event throughput: one event per getppid(2) of a 1 M-call loop, side by side in one run.

Each tracer sends one small event per call of the loop (filtered by its comm, as a person would
write it) to a reader in user space:

    none                  the loop alone: the floor of its time
    bpftrace printf       bpftrace's printf, to a file
    bcc perf buffer       BPF_PERF_OUTPUT read from Python (open_perf_buffer / perf_buffer_poll)
    bcc ring buffer       BPF_RINGBUF_OUTPUT read from Python (open_ring_buffer / ring_buffer_poll)
    tailcalld events      a handler's TC_EMIT in the getppid slot, read by `tailcallctl events -f --json`

and reports how much the loop slowed (x the floor), how many events arrived, how many were
lost or dropped and whether that was counted, and events/s delivered end to end (from the loop's
start until the reader has had its last).  While tailcalld's events flow, `list` is timed from
another connection: the daemon's other work must stay responsive.
"""

from __future__ import annotations

import contextlib
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.util import PinDirs, format_table
from tests.harness import DaemonProcess, start_daemon

NR_GETPPID = 110
COMM = "getppid_loop"
LOOP_SOURCE = Path(__file__).resolve().parent / "getppid_loop.c"


@dataclass
class ThroughputRow:
    tracer: str
    loop_s: float = float("nan")  # the traced loop's wall time
    slowdown: float = float("nan")  # x the untraced loop
    delivered: int = 0
    lost: int = 0  # in the kernel (ring or perf buffer full)
    dropped: int = 0  # by the reader's daemon (tailcalld: a slow client)
    counted: str = "-"  # whether the losses were reported (and so delivered + lost + dropped = emitted)
    per_second: float = float("nan")  # delivered / (loop start -> last event read)
    list_ms_max: float = float("nan")  # tailcalld: slowest `list` while events flowed
    skipped: str = ""
    notes: list[str] = field(default_factory=list)


def build_loop(workdir: Path) -> Path:
    binary = workdir / COMM
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(LOOP_SOURCE)], check=True)
    return binary


def loop_calls(calls: int) -> int:
    """getppid calls of one run of the loop: its warm-up tenth, then ``calls``."""
    return calls + calls // 10 + 1


def run_loop(binary: Path, calls: int) -> float:
    start = time.monotonic()
    subprocess.run([str(binary), str(calls), "1"], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


# -- tailcalld -------------------------------------------------------------------------------

HANDLER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

struct tick { u64 n; };

static __always_inline int is_loop(const char *comm)
{
    const char want[] = "getppid_loop";
#pragma unroll
    for (int i = 0; i < sizeof(want); i++)
        if (comm[i] != want[i])
            return 0;
    return 1;
}

SEC("raw_tp/sys_enter")
int tick(struct bpf_raw_tracepoint_args *ctx)
{
    char comm[16];
    TC_COMM(comm);
    if (!is_loop(comm))  // the loop only, as the other tracers filter it
        return 0;
    struct tick t = { .n = 1 };
    TC_EMIT(ctx, &t);
    return 0;
}
char _license[] SEC("license") = "GPL";
"""


def _slot_events(d: DaemonProcess) -> tuple[int, int, int]:
    [entry] = [s for s in d.call("list")["slots"] if s["slot"] == NR_GETPPID]
    return entry["events_emitted"], entry["events_lost"], entry["events_delivered"]


def tailcalld_row(binary: Path, calls: int, floor: float, pins: PinDirs, workdir: Path,
                  **settings: object) -> ThroughputRow:
    """`tailcallctl events -f --json | wc -l`: wc (C) takes the lines as fast as they come, as
    > /dev/null would, and still counts them; the notices of what was dropped or lost come on
    tailcallctl's stderr too."""
    row = ThroughputRow("tailcalld events -f --json")
    (workdir / "tailcalld").mkdir(exist_ok=True)
    d = start_daemon(workdir / "tailcalld", pins.new("events"), **settings)
    try:
        r = d.ctl("attach", "getppid", "-", input=HANDLER)
        if r.returncode != 0:
            row.skipped = f"attach failed: {r.stderr.strip()[:200]}"
            return row
        ctl = [str(Path(sys.executable).parent / "tailcallctl"), "--socket", str(d.socket), "events", "-f", "--json",
               "-n", "0", "--slot", "getppid"]
        errors = workdir / "events.err"
        with errors.open("w") as err:
            reader = subprocess.Popen(ctl, stdout=subprocess.PIPE, stderr=err)
        assert reader.stdout is not None
        counter = subprocess.Popen(["wc", "-l"], stdin=reader.stdout, stdout=subprocess.PIPE, text=True)
        reader.stdout.close()  # wc's now: it sees the end when tailcallctl ends
        try:
            _wait(lambda: d.call("status")["events_subscribers"] >= 1, 30)
            before = _slot_events(d)
            slowest = _ListTimer(d)
            start = time.monotonic()
            row.loop_s = run_loop(binary, calls)
            # The daemon has read every event once delivered + lost = emitted; the reader is at
            # most its socket's worth behind (events_client_bytes).
            _wait(lambda: _done(d, before, calls), 120, period=0.01)
            end = time.monotonic()
            row.list_ms_max = slowest.stop()
            emitted, lost, _ = (a - b for a, b in zip(_slot_events(d), before, strict=True))
            time.sleep(1.0)  # the reader takes what is left in its socket
            reader.send_signal(signal.SIGINT)  # tailcallctl ends on Ctrl-C; wc then prints its count
            reader.wait(30)
            lines = int(counter.communicate(timeout=30)[0].strip() or 0)
            said = errors.read_text()
            row.dropped = sum(int(m) for m in re.findall(r"(\d+) events dropped", said))
            told_lost = sum(int(m) for m in re.findall(r"(\d+) events of \S+ lost in the kernel", said))
            # --json writes each notice on stdout as well: a line that is no event
            row.delivered = lines - len(re.findall(r"events dropped|lost in the kernel", said))
            row.lost = lost
            row.per_second = row.delivered / max(end - start, 1e-9)
            row.slowdown = row.loop_s / floor
            exact = row.delivered + row.dropped + told_lost == emitted and told_lost == lost
            row.counted = ("yes, exact" if exact
                           else f"NO: {row.delivered} + {row.dropped} + {told_lost} != {emitted} (lost {lost})")
        finally:
            for proc in (reader, counter):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(OSError):
            d.ctl("unload-all")
        d.proc.wait(30)
    finally:
        if d.proc.poll() is None:
            d.stop()
    return row


def _done(d: DaemonProcess, before: tuple[int, int, int], calls: int) -> bool:
    emitted, lost, delivered = (a - b for a, b in zip(_slot_events(d), before, strict=True))
    return emitted >= calls and delivered + lost >= emitted  # the loop warms up first: more calls than `calls`


def _wait(condition: Callable[[], bool], timeout: float, period: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"still waiting after {timeout:g} s")
        time.sleep(period)


class _ListTimer:
    """`list` over and over from another connection; the slowest reply."""

    def __init__(self, d: DaemonProcess) -> None:
        self._d = d
        self._slowest = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._d.client(timeout=30) as c:
            while not self._stopping.is_set():
                start = time.monotonic()
                c.call("list")
                self._slowest = max(self._slowest, time.monotonic() - start)
                time.sleep(0.02)

    def stop(self) -> float:
        self._stopping.set()
        self._thread.join(30)
        return self._slowest * 1000


# -- bcc from Python -------------------------------------------------------------------------

BCC_COMMON = r"""
struct tick { u64 n; };
RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (ctx->args[1] != 110)
        return 0;
    char comm[16];
    const char want[] = "getppid_loop";
    bpf_get_current_comm(&comm, sizeof(comm));
#pragma unroll
    for (int i = 0; i < sizeof(want); i++)
        if (comm[i] != want[i])
            return 0;
    struct tick t = { .n = 1 };
    SUBMIT;
    return 0;
}
"""

BCC_READER = r"""
import sys, time
from bcc import BPF
kind, src = sys.argv[1], sys.argv[2]
b = BPF(text=src)
counted = [0, 0, 0.0]
def on_event(*_args):
    counted[0] += 1
    counted[2] = time.monotonic()
def on_lost(n):
    counted[1] += n
if kind == "perf":
    b["events"].open_perf_buffer(on_event, page_cnt=256, lost_cb=on_lost)
    poll = lambda: b.perf_buffer_poll(timeout=200)
else:
    b["events"].open_ring_buffer(on_event)
    poll = lambda: b.ring_buffer_poll(timeout=200)
print("ready", flush=True)
quiet = None
while True:
    before = counted[0]
    poll()
    if sys.stdin in __import__("select").select([sys.stdin], [], [], 0)[0]:
        quiet = quiet or time.monotonic()
    if quiet and counted[0] == before and time.monotonic() - quiet > 1.0:
        break
print(counted[0], counted[1], counted[2], flush=True)
"""


def bcc_row(kind: str, binary: Path, calls: int, floor: float, workdir: Path) -> ThroughputRow:
    row = ThroughputRow(f"bcc {'perf' if kind == 'perf' else 'ring'} buffer (Python)")
    if kind == "perf":
        src = "BPF_PERF_OUTPUT(events);\n" + BCC_COMMON.replace("SUBMIT", "events.perf_submit(ctx, &t, sizeof(t))")
    else:
        src = "BPF_RINGBUF_OUTPUT(events, 1024);\n" + BCC_COMMON.replace("SUBMIT",
                                                                            "events.ringbuf_output(&t, sizeof(t), 0)")
    script = workdir / "bcc_reader.py"
    script.write_text(BCC_READER)
    proc = subprocess.Popen([sys.executable, str(script), kind, src], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if not select.select([proc.stdout], [], [], 120)[0] or proc.stdout.readline().strip() != "ready":
            row.skipped = f"bcc reader did not start: {proc.stderr.read()[:300] if proc.stderr else ''}"
            return row
        start = time.monotonic()
        row.loop_s = run_loop(binary, calls)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=300)
        delivered, lost, last = out.split()
        row.delivered, row.lost = int(delivered), int(lost)
        row.per_second = row.delivered / max(float(last) - start, 1e-9)
        row.slowdown = row.loop_s / floor
        missing = loop_calls(calls) - row.delivered - row.lost
        row.counted = ("yes, exact" if missing == 0 else
                       f"NO: {missing} lost without a count" if missing > 0 else f"{-missing} extra (other callers)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return row


# -- bpftrace --------------------------------------------------------------------------------

BPFTRACE = 'tracepoint:raw_syscalls:sys_enter /args->id == 110 && comm == "getppid_loop"/ { printf("1\\n"); }'


def bpftrace_row(binary: Path, calls: int, floor: float, workdir: Path) -> ThroughputRow:
    row = ThroughputRow("bpftrace printf")
    if shutil.which("bpftrace") is None:
        row.skipped = "bpftrace is not installed (make bench installs it)"
        return row
    out = workdir / "bpftrace.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(["bpftrace", "-B", "full", "-e", BPFTRACE], stdout=sink, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while b"Attaching" not in out.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        start = time.monotonic()
        row.loop_s = run_loop(binary, calls)
        size = -1
        while out.stat().st_size != size:  # until bpftrace has written all it will
            size = out.stat().st_size
            time.sleep(0.5)
        last = time.monotonic() - 0.5
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
        row.delivered = out.read_bytes().count(b"1\n")  # "Attaching 1 probe...": "1 ", not "1\n"
        row.lost = sum(int(n) for n in re.findall(rb"Lost (\d+) events", err))
        row.per_second = row.delivered / max(last - start, 1e-9)
        row.slowdown = row.loop_s / floor
        missing = loop_calls(calls) - row.delivered - row.lost
        row.counted = "yes, exact" if missing == 0 else f"NO: {missing} unaccounted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return row


# -- the part --------------------------------------------------------------------------------

def measure(pins: PinDirs, calls: int, log: Callable[[str], None], workdir: Path | None = None) -> list[ThroughputRow]:
    with _workdir(workdir) as tmp:
        binary = build_loop(tmp)
        log("events: the loop alone")
        floor = min(run_loop(binary, calls) for _ in range(3))
        rows = [ThroughputRow("none (the loop alone)", loop_s=floor, slowdown=1.0)]
        for name, measure_one in (("bpftrace", lambda: bpftrace_row(binary, calls, floor, tmp)),
                                  ("bcc perf buffer", lambda: bcc_row("perf", binary, calls, floor, tmp)),
                                  ("bcc ring buffer", lambda: bcc_row("ring", binary, calls, floor, tmp)),
                                  ("tailcalld", lambda: tailcalld_row(binary, calls, floor, pins, tmp))):
            log(f"events: {name}")
            rows.append(measure_one())
        return rows


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="tailcalld-events-bench-") as tmp:
        yield Path(tmp)


def table(rows: list[ThroughputRow]) -> str:
    def num(x: float, fmt: str) -> str:
        return "-" if x != x else format(x, fmt)

    return format_table(
        ("tracer", "loop s", "x loop alone", "delivered", "lost (kernel)", "dropped (reader)", "losses counted",
         "delivered/s", "slowest list ms"),
        [(r.tracer, f"skipped: {r.skipped}", "", "", "", "", "", "", "") if r.skipped else
         (r.tracer, num(r.loop_s, ".3f"), num(r.slowdown, ".2f"), r.delivered, r.lost, r.dropped, r.counted,
          num(r.per_second, ",.0f"), num(r.list_ms_max, ".1f")) for r in rows])
