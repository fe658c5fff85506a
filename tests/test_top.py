"""tailcallctl top: rates from two `list` samples, and a live run against a real daemon."""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, start_daemon
from tailcalld import ctl
from tailcalld.protocol import ListResult, SlotInfo
from tailcalld.top import SlotRate, rates, table

UNUSED_NR = 1000  # past every syscall table, but sys_enter still fires: only this test calls it


def sample(hits: int, misses: int, slot: int = 268, timed: tuple[int, int] | None = None) -> ListResult:
    runs, ns = timed if timed else (None, None)
    return ListResult(slots=[SlotInfo(slot=slot, syscall="fchmodat", function="h", prog_id=1, filename=None,
                                      source_sha256=None, attached_at=None, hits=hits, misses=misses,
                                      timed_runs=runs, timed_ns=ns)])


def test_rates_are_the_change_per_second() -> None:
    assert rates(sample(100, 10), sample(300, 30), 2.0) == [SlotRate(268, "fchmodat", "h", 100.0, 10.0, None, None)]


def test_a_new_slot_counts_from_zero_and_a_reset_counter_from_its_new_value() -> None:
    assert rates(ListResult(slots=[]), sample(50, 0), 1.0)[0].hits_per_s == 50.0
    assert rates(sample(500, 5), sample(20, 1), 2.0)[0] == SlotRate(268, "fchmodat", "h", 10.0, 0.5, None, None)


def test_handler_time_is_the_mean_of_the_runs_between_samples_and_their_cpu_share() -> None:
    [r] = rates(sample(0, 0, timed=(1000, 50_000)), sample(0, 0, timed=(3000, 250_000)), 2.0, cpus=4)
    assert r.avg_ns == 100.0  # 200 000 ns over 2000 runs
    assert r.cpu_percent == pytest.approx(100 * 200_000 / (2.0 * 1e9 * 4))


def test_timing_switched_on_between_samples_counts_from_zero() -> None:
    [r] = rates(sample(0, 0), sample(0, 0, timed=(10, 5000)), 1.0, cpus=1)
    assert r.avg_ns == 500.0
    [idle] = rates(sample(0, 0, timed=(10, 5000)), sample(0, 0, timed=(10, 5000)), 1.0, cpus=1)
    assert (idle.avg_ns, idle.cpu_percent) == (None, 0.0)


def test_event_rates_come_from_the_slot_s_counters() -> None:
    def with_events(emitted: int, lost: int) -> ListResult:
        [slot] = sample(0, 0).slots
        return ListResult(slots=[slot.model_copy(update={"events_emitted": emitted, "events_lost": lost})])

    [r] = rates(with_events(1000, 10), with_events(5000, 110), 2.0)
    assert (r.events_per_s, r.events_lost_per_s) == (2000.0, 50.0)
    assert "EVENTS/S" in ctl_table([r]) and "LOST/S" in ctl_table([r])


def ctl_table(sample_rates: list[SlotRate]) -> str:
    return table(sample_rates, ctl.printable)


def test_the_busiest_slot_comes_first() -> None:
    before = ListResult(slots=sample(0, 0, 1).slots + sample(0, 0, 2).slots)
    after = ListResult(slots=sample(1, 0, 1).slots + sample(9, 0, 2).slots)
    assert [r.slot for r in rates(before, after, 1.0)] == [2, 1]


def test_each_handler_of_a_chained_slot_and_each_hook_has_its_row() -> None:
    def rows(hits: int) -> ListResult:
        [slot] = sample(hits, 0).slots
        return ListResult(slots=[slot.model_copy(update={"priority": 10, "function": "audit"}),
                                 slot.model_copy(update={"priority": 50, "function": "debug"}),
                                 slot.model_copy(update={"hook": "exit", "hits": 2 * hits})])

    found = rates(rows(100), rows(300), 2.0)
    assert sorted((r.function, r.hits_per_s) for r in found) == [
        ("audit (priority 10)", 100.0), ("debug (priority 50)", 100.0), ("h", 200.0)]


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "x"])
def test_interval_must_be_positive(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the parser raises instead of exiting since #13 item 6 (so that main can say it as JSON); main exits 2
    with pytest.raises(ctl.ArgumentsError):
        ctl.build_parser().parse_args(["top", "--interval", bad])
    assert ctl.main(["top", "--interval", bad]) == 2
    assert "--interval" in capsys.readouterr().err


@pytest.fixture
def busy(tmp_path: Path, pin_root: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        d.call("attach", slot=UNUSED_NR, source="int busy(struct bpf_raw_tracepoint_args *c) { return 0; }")
        yield d
    finally:
        d.stop()


def test_top_shows_a_busy_slot_live(busy: DaemonProcess) -> None:
    d, stop = busy, threading.Event()
    libc = ctypes.CDLL(None, use_errno=True)

    def call_forever() -> None:
        while not stop.is_set():
            for _ in range(1000):
                libc.syscall(UNUSED_NR)

    caller = threading.Thread(target=call_forever)
    caller.start()
    try:
        r = d.ctl("top", "--json", "--interval", "0.5")
        assert r.returncode == 0, r.stderr
        [slot] = json.loads(r.stdout)["slots"]
        assert (slot["slot"], slot["function"], slot["misses_per_s"]) == (UNUSED_NR, "busy", 0)
        assert slot["hits_per_s"] > 1000
        assert slot["avg_ns"] > 0 and 0 < slot["cpu_percent"] <= 100  # top switched timing on for itself
        assert d.call("timing", seconds=0)["on"]
        shown = d.ctl("top", "--iterations", "2", "--interval", "0.2")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("HITS/S") == 2 and "\x1b" not in shown.stdout  # no screen clearing into a pipe
    finally:
        stop.set()
        caller.join()
