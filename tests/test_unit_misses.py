"""Unit tests for MissMonitor / MissReport with fake counters and a fake clock."""

from __future__ import annotations


import pytest

from tailcalld.misses import MissMonitor, MissReport

NAMES = {268: "fchmodat", 110: "getppid", 1: "write"}
NR_SLOTS = 300


class Fake:
    """Counters to mutate and a clock to advance; read_totals returns a fresh list, like the real one."""

    def __init__(self, nr_slots: int = NR_SLOTS, start: float = 1000.0) -> None:
        self.totals = [0] * nr_slots
        self.now = start
        self.reads = 0

    def read_totals(self) -> list[int]:
        self.reads += 1
        return list(self.totals)

    def clock(self) -> float:
        return self.now

    def monitor(self, **kwargs: object) -> MissMonitor:
        return MissMonitor(self.read_totals, label, clock=self.clock, **kwargs)  # type: ignore[arg-type]


def label(nr: int) -> str:
    return NAMES.get(nr, f"syscall_{nr}")


@pytest.fixture
def fake() -> Fake:
    return Fake()


def test_message_format() -> None:
    r = MissReport(nr=268, syscall="fchmodat", misses=57, seconds=10.0)
    assert r.message == "fchmodat (268): 57 tail-call misses in the last 10 s"


@pytest.mark.parametrize("seconds,shown", [(9.6, "10"), (10.4, "10"), (0.2, "0"), (3600.0, "3600")])
def test_message_rounds_seconds(seconds: float, shown: str) -> None:
    r = MissReport(nr=1, syscall="write", misses=1, seconds=seconds)
    assert r.message == f"write (1): 1 tail-call misses in the last {shown} s"


def test_baseline_is_read_at_construction(fake: Fake) -> None:
    fake.totals[268] = 40
    fake.totals[5] = 7
    m = fake.monitor()
    assert fake.reads == 1
    assert m.baseline[268] == 40 and m.baseline[5] == 7
    assert len(m.baseline) == NR_SLOTS


def test_nothing_watched_by_default(fake: Fake) -> None:
    m = fake.monitor()
    assert not any(m.watched(nr) for nr in range(NR_SLOTS))
    fake.totals[268] += 100
    fake.now += 10
    assert m.poll() == []


def test_misses_before_start_are_not_reported(fake: Fake) -> None:
    fake.totals[268] = 1_000_000  # counters survive daemon restarts
    m = fake.monitor(extra=[268])
    fake.now += 10
    assert m.poll() == []
    fake.totals[268] += 57
    fake.now += 10
    assert m.poll() == [MissReport(268, "fchmodat", 57, 10.0)]


def test_poll_reports_only_watched_slots_with_increases(fake: Fake) -> None:
    m = fake.monitor(extra=[268, 110])
    fake.totals[268] += 57      # watched, increased
    fake.totals[1] += 1000      # increased, not watched
    # 110 watched, unchanged
    fake.now += 10
    reports = m.poll()
    assert reports == [MissReport(268, "fchmodat", 57, 10.0)]
    assert reports[0].message == "fchmodat (268): 57 tail-call misses in the last 10 s"


def test_poll_reports_increase_since_previous_poll(fake: Fake) -> None:
    m = fake.monitor(extra=[268])
    fake.totals[268] = 5
    fake.now += 10
    assert [r.misses for r in m.poll()] == [5]
    fake.totals[268] = 12
    fake.now += 10
    assert [r.misses for r in m.poll()] == [7]
    fake.now += 10
    assert m.poll() == []  # no new misses, no report


def test_one_report_per_slot_however_large_the_increase(fake: Fake) -> None:
    m = fake.monitor(extra=[268, 110])
    fake.totals[268] += 10**12
    fake.totals[110] += 3
    fake.now += 10
    reports = m.poll()
    assert [(r.nr, r.misses) for r in reports] == [(110, 3), (268, 10**12)]  # one each, ordered by slot


def test_seconds_come_from_the_clock(fake: Fake) -> None:
    m = fake.monitor(extra=[268])
    fake.now += 7.25
    fake.totals[268] += 1
    assert m.poll()[0].seconds == 7.25
    fake.now += 30.5
    fake.totals[268] += 1
    (r,) = m.poll()
    assert r.seconds == 30.5
    assert r.message.endswith("in the last 30 s")


def test_seconds_count_from_the_previous_poll_even_without_reports(fake: Fake) -> None:
    m = fake.monitor(extra=[268])
    fake.now += 10
    assert m.poll() == []
    fake.now += 4
    fake.totals[268] += 2
    assert m.poll()[0].seconds == 4


def test_held_handler_adds_a_watched_slot(fake: Fake) -> None:
    m = fake.monitor()
    assert not m.watched(268)
    m.held_handler(268)
    assert m.watched(268) and not m.watched(110)
    fake.totals[268] += 3
    fake.totals[110] += 3
    fake.now += 10
    assert [r.nr for r in m.poll()] == [268]


def test_watch_all(fake: Fake) -> None:
    m = fake.monitor(watch_all=True)
    assert all(m.watched(nr) for nr in range(NR_SLOTS))
    for nr in (0, 1, 110, 299):
        fake.totals[nr] += nr + 1
    fake.now += 10
    reports = m.poll()
    assert [(r.nr, r.syscall, r.misses) for r in reports] == [
        (0, "syscall_0", 1), (1, "write", 2), (110, "getppid", 111), (299, "syscall_299", 300)]


def test_configure_replaces_extra_and_watch_all(fake: Fake) -> None:
    m = fake.monitor(watch_all=True)
    m.held_handler(1)
    m.configure(False, [110])
    assert m.watched(110) and m.watched(1)  # held slots stay watched
    assert not m.watched(268)
    m.configure(False, [268])
    assert m.watched(268) and not m.watched(110)
    for nr in (1, 110, 268):
        fake.totals[nr] += 1
    fake.now += 10
    assert [r.nr for r in m.poll()] == [1, 268]
    m.configure(True, [])
    fake.totals[110] += 1
    fake.now += 10
    assert [r.nr for r in m.poll()] == [110]


def test_decreasing_counter_is_not_reported(fake: Fake) -> None:
    fake.totals[268] = 100
    m = fake.monitor(extra=[268])
    fake.totals[268] = 10  # counters recreated
    fake.now += 10
    assert m.poll() == []
    fake.totals[268] = 15
    fake.now += 10
    assert [r.misses for r in m.poll()] == [5]


def test_since_start(fake: Fake) -> None:
    fake.totals[268] = 40
    m = fake.monitor()
    assert m.since_start(268, m.recent_totals()) == 0
    fake.totals[268] = 97
    fake.totals[110] = 5
    fake.now += 1
    assert m.since_start(268, m.recent_totals()) == 57
    assert m.since_start(110, m.recent_totals()) == 5
    fake.totals[268] = 500
    fake.now += 10
    m.poll()
    assert m.since_start(268, m.recent_totals()) == 460  # polling does not move the baseline


def test_recent_totals_share_one_read(fake: Fake) -> None:
    m = fake.monitor()
    fake.totals[268] = 7
    fake.now += 0.05
    assert m.recent_totals()[268] == 0  # younger than 0.1 s: the read made at start serves
    fake.now += 0.1
    assert m.recent_totals()[268] == 7
    fake.totals[268] = 9
    m.poll()  # a poll refreshes the snapshot too
    assert m.recent_totals()[268] == 9
