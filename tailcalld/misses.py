"""The dispatcher's cumulative per-slot counters: read cheaply for list/status (Counters), and
the miss counters turned into bounded per-interval reports for the journal (MissMonitor)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
SNAPSHOT_AGE = 0.1  # seconds a read of the counters serves list/status requests


@dataclass(frozen=True)
class MissReport:
    nr: int
    syscall: str
    misses: int
    seconds: float
    abi: str | None = None  # "ia32": 32-bit calls of a syscall with no 64-bit slot, never dispatched
    hook: str = "enter"  # "exit": misses of the syscall's exit slot

    @property
    def message(self) -> str:
        if self.abi is not None:
            return (f"{self.syscall} ({self.abi} {self.nr}): {self.misses} calls in the last {self.seconds:.0f} s, "
                    f"not dispatched (no 64-bit syscall of that name)")
        where = " exit" if self.hook == "exit" else ""
        return f"{self.syscall}{where} ({self.nr}): {self.misses} tail-call misses in the last {self.seconds:.0f} s"


class Snapshot(Generic[T]):
    """A read (of a counter map) at most ``max_age`` seconds old: a burst of list/status
    requests shares one read instead of each paying for it."""

    def __init__(self, read: Callable[[], T], clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._clock = clock
        self._value: T | None = None
        self._time = 0.0

    def set(self, value: T, at: float) -> None:
        """``value`` was read at ``at`` (the clock's time)."""
        self._value, self._time = value, at

    def get(self, max_age: float = SNAPSHOT_AGE) -> T:
        now = self._clock()
        if self._value is None or now - self._time > max_age:
            self._value, self._time = self._read(), now
        return self._value


class Counters:
    """A per-slot counter map of the dispatcher (per-CPU sums), with the values at this
    daemon's start (``baseline``) and a short-lived snapshot shared by list/status requests."""

    def __init__(self, read_totals: Callable[[], list[int]], clock: Callable[[], float] = time.monotonic) -> None:
        self._read_totals = read_totals
        self.clock = clock
        self.baseline = read_totals()
        self.baseline_time = clock()
        self._snapshot = Snapshot(read_totals, clock)
        self._snapshot.set(self.baseline, self.baseline_time)

    def read(self) -> list[int]:
        """The counters now (one batch read of the map: callers on the event loop may run this
        in a thread and hand the result to ``MissMonitor.poll``)."""
        return self._read_totals()

    def recent_totals(self, max_age: float = SNAPSHOT_AGE) -> list[int]:
        """The counters read at most ``max_age`` seconds ago: a burst of list/status requests
        shares one read of the map instead of each paying for it."""
        return self._snapshot.get(max_age)

    def since_start(self, nr: int, totals: list[int]) -> int:
        return totals[nr] - self.baseline[nr]


class MissMonitor(Counters):
    """Remembers the counters at the previous poll; each poll yields at most one report per
    watched slot, however many syscalls happened, so the journal volume stays bounded.

    Watched: every slot that held a handler since start, plus ``extra`` (or all enter slots).
    ``split`` turns a slot key into (syscall number, hook) for the reports.
    """

    def __init__(self, read_totals: Callable[[], list[int]], label: Callable[[int], str],
                 watch_all: bool = False, extra: Iterable[int] = (),
                 clock: Callable[[], float] = time.monotonic, abi: str | None = None,
                 split: Callable[[int], tuple[int, str]] = lambda key: (key, "enter")) -> None:
        super().__init__(read_totals, clock)
        self._label = label
        self._abi = abi
        self._split = split
        self._held: set[int] = set()
        self.configure(watch_all, extra)
        self._last = list(self.baseline)
        self._last_time = self.baseline_time

    def configure(self, watch_all: bool, extra: Iterable[int]) -> None:
        self._watch_all = watch_all
        self._extra = set(extra)

    def held_handler(self, nr: int) -> None:
        self._held.add(nr)

    def watched(self, key: int) -> bool:
        return (self._watch_all and self._split(key)[1] == "enter") or key in self._held or key in self._extra

    def _number(self, key: int) -> tuple[int, str]:
        return self._split(key)[0], self._label(key)

    def poll(self, totals: list[int] | None = None) -> list[MissReport]:
        """What changed since the previous poll, from ``totals`` (read now if not given)."""
        if totals is None:
            totals = self._read_totals()
        now = self.clock()
        self._snapshot.set(totals, now)  # a fresh read: list/status may use it too
        seconds = now - self._last_time
        reports = [MissReport(*self._number(key), total - last, seconds, self._abi, self._split(key)[1])
                   for key, (total, last) in enumerate(zip(totals, self._last, strict=True))
                   if total > last and self.watched(key)]
        self._last, self._last_time = totals, now
        return reports
