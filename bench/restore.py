"""Part 7: reboot to traced.  A tailcalld with N recorded bcc handlers is started on an empty
pin folder (what a reboot leaves): how long until its socket answers, and until every slot
runs its handler again, with the compile cache warm and with it off (every handler compiled,
as many at once as there are cores); and a plain restart (pins kept: nothing to rebuild).
The ways are interleaved, round by round, on one machine."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tailcalld.journal import journald_listening
from tests.harness import DaemonProcess, journal, remove_pin_tree, start_daemon

from .control_plane import fill_slots
from .util import PinDirs, format_table, percentile, pinned_link_progs, wait_progs_gone

_SUMMARY = re.compile(r"restore: (\d+) of (\d+) slots rebuilt in ([\d.]+) s(?:, (\d+) loaded from the compile cache)?")
POLL = 0.01  # seconds between status requests while waiting for the restore's end

WAYS = {
    "reboot, compile cache warm": {"reboot": True, "settings": {}},
    "reboot, compile cache off (compiles)": {"reboot": True, "settings": {"compile_cache_bytes": 0}},
    "restart, pins kept (adopted)": {"reboot": False, "settings": {}},
}


@dataclass
class RestoreRow:
    way: str
    socket_s: list[float] = field(default_factory=list)  # start -> first answer on the socket
    all_back_s: list[float] = field(default_factory=list)  # start -> no slot restoring
    restore_s: list[float] = field(default_factory=list)  # the daemon's own count (its journal entry)
    from_cache: list[int] = field(default_factory=list)
    rebuilt: list[int] = field(default_factory=list)


@dataclass
class RestoreResults:
    handlers: int
    rounds: int
    rows: list[RestoreRow]


def start_timed(workdir: Path, pin_dir: Path, settings: dict[str, object]) -> tuple[DaemonProcess, float, float]:
    """A daemon; seconds until its socket answered, and until its restore had ended."""
    started = time.monotonic()
    d = start_daemon(workdir, pin_dir, restored=False, **settings)
    answered = time.monotonic() - started
    with d.client() as c:
        while c.call("status")["restoring"]:
            time.sleep(POLL)
    return d, answered, time.monotonic() - started


def _summary(d: DaemonProcess) -> tuple[int, int, float, int]:
    """(rebuilt, of, seconds, from cache) from the daemon's restore entry: in the journal when
    one listens, else on its stderr."""
    deadline = time.monotonic() + 10
    while True:
        found = _SUMMARY.findall(d.output())
        if not found and journald_listening():
            found = _SUMMARY.findall("\n".join(e.get("MESSAGE", "")
                                               for e in journal(_PID=str(d.pid), TAILCALLD_RESTORE="1")))
        if found:
            rebuilt, of, seconds, cached = found[-1]
            return int(rebuilt), int(of), float(seconds), int(cached or 0)
        if time.monotonic() > deadline:  # journald stores what it was sent a little later
            raise RuntimeError(f"no restore entry of tailcalld {d.pid}, in the journal or its log:\n{d.output()[-2000:]}")
        time.sleep(0.1)


def measure(pins: PinDirs, workdir: Path, handlers: int, rounds: int, log: Callable[[str], None]) -> RestoreResults:
    pin_dir = pins.new("restore")
    rows = {way: RestoreRow(way) for way in WAYS}
    d = start_daemon(workdir, pin_dir)
    try:
        log(f"restore: filling {handlers} slots with bcc handlers")
        fill_slots(d, handlers)
    finally:
        d.stop()
    try:
        for r in range(rounds):
            for way, how in WAYS.items():
                log(f"restore: round {r + 1}/{rounds}, {way}")
                if how["reboot"]:
                    dispatcher = pinned_link_progs(pin_dir)
                    remove_pin_tree(pin_dir)
                    wait_progs_gone(dispatcher)
                d, answered, back = start_timed(workdir, pin_dir, how["settings"])  # type: ignore[arg-type]
                try:
                    rebuilt, _, seconds, cached = _summary(d)
                finally:
                    d.stop()
                row = rows[way]
                row.socket_s.append(answered)
                row.all_back_s.append(back)
                row.restore_s.append(seconds)
                row.rebuilt.append(rebuilt)
                row.from_cache.append(cached)
    finally:
        dispatcher = pinned_link_progs(pin_dir)
        remove_pin_tree(pin_dir)
        wait_progs_gone(dispatcher)
    return RestoreResults(handlers, rounds, list(rows.values()))


def table(res: RestoreResults) -> str:
    def p50(xs: list[float]) -> str:
        return f"{percentile(xs, 50):.2f}" if xs else "-"

    return format_table(
        ("way", "socket answers s (p50)", "all slots back s (p50)", "max", "restore s (daemon's count)",
         "rebuilt", "from cache"),
        [(r.way, p50(r.socket_s), p50(r.all_back_s), f"{max(r.all_back_s):.2f}" if r.all_back_s else "-",
          p50(r.restore_s), max(r.rebuilt, default=0), max(r.from_cache, default=0)) for r in res.rows])
