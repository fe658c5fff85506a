"""tailcallctl top: a live per-slot view, sampled from `list` (client side only).

Each refresh renews a short handler-timing lease (the `timing` command: timing stays on only
while top runs, see README) and reads `list`, and turns the change of each slot's counters
since the previous read into rates: hits and misses per second, the mean handler time of the
runs in between, and their share of the machine's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tabulate import tabulate

from .client import Client
from .protocol import ListResult, SlotInfo, TimingResult

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: what top(1) does between refreshes


@dataclass(frozen=True)
class SlotRate:
    slot: int
    syscall: str
    function: str | None
    hits_per_s: float
    misses_per_s: float
    avg_ns: float | None  # mean handler run between the samples (None: timing off, or no run)
    cpu_percent: float | None  # those runs' time over the interval's CPU time, all CPUs
    events_per_s: float = 0.0  # TC_PRINTF / TC_EMIT calls of the slot's handler
    events_lost_per_s: float = 0.0  # of them, lost in the kernel (the ring buffer was full)


def lease_for(interval: float) -> float:
    """Long enough to outlast a refresh that is late, short enough that timing ends soon
    after top does."""
    return min(600.0, max(5.0, 3 * interval))


def rates(before: ListResult, after: ListResult, seconds: float, cpus: int | None = None) -> list[SlotRate]:
    """Per-slot rates between two samples; a slot new in ``after`` counts from zero, and a counter
    that went down (the daemon restarted between samples) counts from its new value."""
    old = {_key(s): s for s in before.slots}
    return sorted((_rate(old.get(_key(s)), s, seconds, cpus or os.cpu_count() or 1) for s in after.slots),
                  key=lambda r: (-(r.hits_per_s + r.misses_per_s), r.slot))


def _key(s: SlotInfo) -> tuple[int, str, int | None]:
    """A row: a slot, or one of the handlers of a slot that runs several."""
    return s.slot, s.hook, s.priority


def _delta(now: int, then: int) -> int:
    return now - then if now >= then else now


def _rate(old: SlotInfo | None, new: SlotInfo, seconds: float, cpus: int) -> SlotRate:
    def per_s(now: int, then: int) -> float:
        return _delta(now, then) / seconds if seconds > 0 else 0.0

    avg_ns = cpu = None
    if new.timed_runs is not None and new.timed_ns is not None:
        # Timing switched on between the samples: the old sample had none, count from zero.
        runs = _delta(new.timed_runs, old.timed_runs or 0 if old else 0)
        ns = _delta(new.timed_ns, old.timed_ns or 0 if old else 0)
        avg_ns = ns / runs if runs else None
        cpu = 100.0 * ns / (seconds * 1e9 * cpus) if seconds > 0 else None
    function = new.function if new.priority is None else f"{new.function or '?'} (priority {new.priority})"
    return SlotRate(new.slot, new.syscall, function, per_s(new.hits, old.hits if old else 0),
                    per_s(new.misses, old.misses if old else 0), avg_ns, cpu,
                    per_s(new.events_emitted, old.events_emitted if old else 0),
                    per_s(new.events_lost, old.events_lost if old else 0))


def table(sample: list[SlotRate], printable: Callable[[str], str], legend: bool = True) -> str:
    rows = [[r.slot, printable(r.syscall), printable(r.function or "?"), f"{r.hits_per_s:.0f}",
             f"{r.misses_per_s:.0f}", "-" if r.avg_ns is None else f"{r.avg_ns:.0f}",
             "-" if r.cpu_percent is None else f"{r.cpu_percent:.2f}", f"{r.events_per_s:.0f}",
             f"{r.events_lost_per_s:.0f}"] for r in sample]
    headers = ["SLOT", "SYSCALL", "FUNCTION", "HITS/S", "MISSES/S", "AVG NS", "CPU%", "EVENTS/S", "LOST/S"]
    return tabulate(rows, headers=headers if legend else [], tablefmt="plain", disable_numparse=True)


def _sample(client: Client, args: argparse.Namespace) -> ListResult:
    if not args.no_time:
        TimingResult.model_validate(client.call("timing", seconds=lease_for(args.interval)))
    return ListResult.model_validate(client.call("list"))


def run(client: Client, args: argparse.Namespace, printable: Callable[[str], str]) -> int:
    """Refresh every ``args.interval`` seconds until Ctrl-C or ``args.iterations`` refreshes;
    with ``--json``, print one sample (two reads ``interval`` apart) and stop."""
    before, then = _sample(client, args), time.monotonic()
    shown = 0
    while args.iterations is None or shown < args.iterations:
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        after, now = _sample(client, args), time.monotonic()
        sample = rates(before, after, now - then)
        if args.json:
            print(json.dumps({"interval": round(now - then, 3), "slots": [asdict(r) for r in sample]}, indent=2))
            return 0
        if sys.stdout.isatty():
            print(CLEAR, end="")
        if not args.no_legend:
            print(f"tailcalld top: {len(sample)} slots, every {args.interval:g} s (Ctrl-C to stop)\n")
        print(table(sample, printable, legend=not args.no_legend), flush=True)
        before, then, shown = after, now, shown + 1
    return 0
