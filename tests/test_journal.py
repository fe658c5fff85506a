"""Tail-call misses reach the real journal: fields, message, one entry per slot per interval; and\nnothing is lost when journald goes away and comes back."""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

import pytest

from harness import NR_FCHMODAT, JournalEntry, counting_handler, fchmodat, journal, start_daemon, wait_journal
from private_journal import private_journal
from tailcalld.journal import MISS_MESSAGE_ID

INTERVAL = 1.0
NR_GETPPID = 110


def journal_entries(pid: int, **match: str) -> list[JournalEntry]:
    """One daemon's entries with ``match``."""
    if "SYSCALL_NAME" in match:  # miss entries only, not the audit lines of attach/detach
        match = {**match, "MESSAGE_ID": MISS_MESSAGE_ID}
    return journal(SYSLOG_IDENTIFIER="tailcalld", _PID=str(pid), **match)


def wait_for_entries(pid: int, minimum: int, timeout: float = 30, **match: str) -> list[JournalEntry]:
    return wait_journal(lambda: journal_entries(pid, **match), minimum, timeout)


@pytest.mark.usefixtures("journald")
def test_misses_are_logged_per_slot_per_interval(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=INTERVAL, watch_misses=["getppid"])
    try:
        pid = d.proc.pid
        with d.client() as c:
            # A slot that held a handler is watched from then on: after the detach, misses.
            c.call("attach", slot=NR_FCHMODAT, source=counting_handler(pin_root / "maps" / "count"))
            c.call("detach", slot=NR_FCHMODAT)
        started = time.monotonic()
        for _ in range(4):  # spread the calls over several intervals
            fchmodat(5000)
            for _ in range(100):
                os.getppid()
            time.sleep(INTERVAL / 2)
        entries = wait_for_entries(pid, 2, SYSCALL_NAME="fchmodat")
        elapsed = time.monotonic() - started
        assert entries, "no miss entry for fchmodat in the journal"
        for e in entries:
            assert e["SYSCALL_NR"] == str(NR_FCHMODAT)
            assert e["MESSAGE_ID"] == MISS_MESSAGE_ID
            assert re.fullmatch(r"fchmodat \(268\): \d+ tail-call misses in the last \d+ s", e["MESSAGE"])
            assert int(e["MISSES"]) > 0
        # Every call we made was a miss, and is counted once: 20000 calls were made, and
        # 20000 calls of fchmodat within a few seconds can only be ours plus a few others.
        assert sum(int(e["MISSES"]) for e in wait_for_entries(pid, 99, timeout=INTERVAL * 2,
                                                               SYSCALL_NAME="fchmodat")) >= 20_000
        # Bounded: 20000 misses produced at most one entry per interval, never one per call.
        assert len(entries) <= elapsed / INTERVAL + 2
        stamps = sorted(int(e["__REALTIME_TIMESTAMP"]) for e in entries)
        assert all(b - a >= INTERVAL * 0.5e6 for a, b in itertools.pairwise(stamps))
        # Configured watch: getppid; never watched: read(2), which misses all the time.
        assert wait_for_entries(pid, 1, SYSCALL_NAME="getppid")[0]["SYSCALL_NR"] == str(NR_GETPPID)
        assert journal_entries(pid, SYSCALL_NAME="read") == []
    finally:
        assert d.stop() == 0
    stop = journal_entries(pid, PRIORITY="6")
    assert any("stopping" in e["MESSAGE"] for e in stop)


TRIVIAL = "int nothing(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


def test_entries_outlive_a_journald_restart(tmp_path: Path, pin_root: Path) -> None:
    """journald goes away while tailcalld runs, then comes back (its own journald, in a mount
    namespace of its own: the machine's is never touched).  Meanwhile each entry is a plain
    stderr line, never a logging traceback, and once journald is back the journal gets it too,
    in order, before what came after."""
    with private_journal() as pj:
        pj.start()
        d = start_daemon(tmp_path, pin_root / "daemon", prefix=pj.prefix)
        try:
            def audit() -> list[JournalEntry]:
                return [e for e in pj.entries(_PID=str(d.pid)) if "TAILCALLD_ACTION" in e]

            with d.client() as c:
                c.call("attach", slot=600, source=TRIVIAL, filename="a.c")  # slots 600+: no syscall has them
            assert [e["TAILCALLD_ACTION"] for e in wait_journal(audit)] == ["attach"]
            pj.stop()
            with d.client() as c:
                detached = c.call("detach", slot=600)["prog_id"]
            log = d.output()
            assert "Logging error" not in log and "Traceback" not in log
            assert re.search(rf"tailcalld\[{d.pid}\] WARNING: the journal is unreachable", log), log
            assert re.search(rf"tailcalld\[{d.pid}\] INFO: detach program {detached} from slot \S+ \(600\)", log), log
            pj.start()
            with d.client() as c:
                c.call("attach", slot=601, source=TRIVIAL, filename="b.c")
            entries = wait_journal(audit, minimum=3)
            assert [(e["TAILCALLD_ACTION"], e["SLOT"]) for e in entries] == [
                ("attach", "600"), ("detach", "600"), ("attach", "601")]
            assert "TAILCALLD_LOGGED_AT" in entries[1] and "TAILCALLD_LOGGED_AT" not in entries[2]
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0
