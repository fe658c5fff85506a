"""tailcallctl top: a live per-slot view, sampled from `list` (client side only).

Each refresh reads `list` and turns the change of each slot's hit and miss counters since the
previous read into rates.  Handler run time is not measured yet, so there is no time column.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tabulate import tabulate

from .client import Client
from .protocol import ListResult, SlotInfo

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: what top(1) does between refreshes


@dataclass(frozen=True)
class SlotRate:
    slot: int
    syscall: str
    function: str | None
    hits_per_s: float
    misses_per_s: float


def rates(before: ListResult, after: ListResult, seconds: float) -> list[SlotRate]:
    """Per-slot rates between two samples; a slot new in ``after`` counts from zero, and a counter
    that went down (the daemon restarted between samples) counts from its new value."""
    old = {s.slot: s for s in before.slots}
    return sorted((_rate(old.get(s.slot), s, seconds) for s in after.slots),
                  key=lambda r: (-(r.hits_per_s + r.misses_per_s), r.slot))


def _rate(old: SlotInfo | None, new: SlotInfo, seconds: float) -> SlotRate:
    def per_s(now: int, then: int) -> float:
        return (now - then if now >= then else now) / seconds if seconds > 0 else 0.0

    return SlotRate(new.slot, new.syscall, new.function, per_s(new.hits, old.hits if old else 0),
                    per_s(new.misses, old.misses if old else 0))


def table(sample: list[SlotRate], printable: Callable[[str], str]) -> str:
    rows = [[r.slot, printable(r.syscall), printable(r.function or "?"), f"{r.hits_per_s:.0f}",
             f"{r.misses_per_s:.0f}"] for r in sample]
    return tabulate(rows, headers=["SLOT", "SYSCALL", "FUNCTION", "HITS/S", "MISSES/S"], tablefmt="plain",
                    disable_numparse=True)


def run(client: Client, args: argparse.Namespace, printable: Callable[[str], str]) -> int:
    """Refresh every ``args.interval`` seconds until Ctrl-C or ``args.iterations`` refreshes;
    with ``--json``, print one sample (two reads ``interval`` apart) and stop."""
    before, then = ListResult.model_validate(client.call("list")), time.monotonic()
    shown = 0
    while args.iterations is None or shown < args.iterations:
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        after, now = ListResult.model_validate(client.call("list")), time.monotonic()
        sample = rates(before, after, now - then)
        if args.json:
            print(json.dumps({"interval": round(now - then, 3), "slots": [asdict(r) for r in sample]}, indent=2))
            return 0
        if sys.stdout.isatty():
            print(CLEAR, end="")
        print(f"tailcalld top: {len(sample)} slots, every {args.interval:g} s (Ctrl-C to stop)\n")
        print(table(sample, printable), flush=True)
        before, then, shown = after, now, shown + 1
    return 0
