"""Handler run time, measured only while someone asks for it.

How (bpf/timing.bpf.c says it in full): while timing is on, the dispatcher stamps each call
and a second sys_enter program, attached after it, takes the time once the handler returned,
per slot.  ``tailcallctl top`` renews a lease of a few seconds at every refresh; when the last
lease runs out the second program is detached and the stamp switched off, so closing top ends
the cost within seconds.  Nothing of it is pinned: a daemon that stops takes it along, and a
start switches off a stamp that a daemon killed with -9 left on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from . import bpfsys
from .bpf_object import BpfObject
from .dispatcher import COUNTS, TIMING, Dispatcher
from .errors import TailcalldError, TimingUnavailable

logger = logging.getLogger("tailcalld")

SOURCE = "timing.bpf.c"
PROGRAM = "tcd_time_end"
SLOT_TIME_FIELDS = ("hit_ns", "hits", "miss_ns", "misses")  # struct slot_time, u64 each
MAX_LEASE = 600.0  # seconds one request may keep timing on


def _run_entry(on: bool) -> bytes:
    """struct timing_run {on, start, misses_before, slot} with nothing in flight."""
    return struct.pack("=4Q", int(on), 0, 0, 0)


@dataclass(frozen=True)
class TimingTarget:
    """The dispatcher's maps the timing program shares (fds borrowed from the Dispatcher)."""

    counts_fd: int
    timing_fd: int
    nr_slots: int

    @property
    def cflags(self) -> list[str]:
        return [f"-DTAILCALLD_SLOTS={self.nr_slots}"]


def target_of(dispatcher: Dispatcher) -> TimingTarget:
    counts, timing = dispatcher.map_fd(COUNTS), dispatcher.map_fd(TIMING)
    assert counts is not None and timing is not None, "the dispatcher always has these maps"
    return TimingTarget(counts, timing, dispatcher.nr_slots)


def switch_off(target: TimingTarget) -> None:
    """Stop the dispatcher's stamping on every CPU (also what a start does: a daemon killed
    while timing was on leaves the stamp on, which costs every syscall a clock read)."""
    bpfsys.percpu_array_set(target.timing_fd, 0, _run_entry(False))


@dataclass(frozen=True)
class SlotTimes:
    """Per slot, since timing was switched on: dispatched calls and their nanoseconds, and
    calls that fell through and theirs."""

    hit_ns: list[int]
    hits: list[int]
    miss_ns: list[int]
    misses: list[int]

    def dispatch_ns(self) -> float | None:
        """Mean time of a fall-through over all slots: what of a hit's time is the dispatcher's."""
        calls = sum(self.misses)
        return sum(self.miss_ns) / calls if calls else None


class HandlerTimer:
    """The timing program attached after the dispatcher, and the stamp on; ``close()`` undoes both."""

    def __init__(self, obj: BpfObject, link_fd: int, target: TimingTarget) -> None:
        self._obj = obj
        self._link_fd: int | None = link_fd
        self._target = target
        self._times_fd = obj.map_fd("slot_times")

    @classmethod
    def attach(cls, data: bytes, target: TimingTarget) -> HandlerTimer:
        obj = BpfObject(data)
        link_fd = None
        try:
            obj.reuse_map("counts", target.counts_fd)
            obj.reuse_map("timing", target.timing_fd)
            fd = obj.load_all()[PROGRAM]
            # Attached before the stamp goes on: a stamp with nobody to take it would only cost.
            link_fd = bpfsys.raw_tracepoint_open("sys_enter", fd)
            bpfsys.percpu_array_set(target.timing_fd, 0, _run_entry(True))
            return cls(obj, link_fd, target)
        except BaseException:
            if link_fd is not None:
                os.close(link_fd)
            obj.close()
            raise

    def prog_ids(self) -> set[int]:
        """The timing program's id (the benchmark tells its own programs from others' by id)."""
        return {bpfsys.link_info(self._link_fd).prog_id} if self._link_fd is not None else set()

    def read(self) -> SlotTimes:
        columns = bpfsys.percpu_u64_columns(self._times_fd, self._target.nr_slots, len(SLOT_TIME_FIELDS))
        return SlotTimes(*columns)

    def close(self) -> None:
        if self._link_fd is None:
            return
        try:
            switch_off(self._target)  # first: the taker leaves only once nothing is stamped
        finally:
            with contextlib.suppress(OSError):
                os.close(self._link_fd)
            self._link_fd = None
            self._obj.close()


class OnDemandTiming:
    """Timing is on while a lease runs.  ``request`` starts it (building the program once) and
    extends the lease; ``expire`` stops it when nobody renewed it in time (a timer on the event
    loop, set again at each renewal)."""

    def __init__(self, build: Callable[[Sequence[str]], Awaitable[bytes]], target: TimingTarget,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self._target = target
        self._clock = clock
        self._object: bytes | None = None
        self._timer: HandlerTimer | None = None
        self._until = 0.0
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def on(self) -> bool:
        return self._timer is not None

    def seconds_left(self) -> float:
        return max(0.0, self._until - self._clock()) if self.on else 0.0

    async def request(self, seconds: float) -> float:
        """Keep timing on for at least ``seconds`` more (0: only ask how long it stays on)."""
        if seconds <= 0:
            return self.seconds_left()
        if self._timer is None:
            await self._start()
        self._until = max(self._until, self._clock() + min(seconds, MAX_LEASE))
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_later(self.seconds_left() + 0.01, self.expire)
        return self.seconds_left()

    async def _start(self) -> None:
        try:
            if self._object is None:  # built once: the dispatcher's layout is fixed for our lifetime
                self._object = await self._build(self._target.cflags)
            self._timer = HandlerTimer.attach(self._object, self._target)
        except (OSError, TailcalldError) as exc:
            raise TimingUnavailable(f"cannot switch handler timing on: {exc}",
                                    getattr(exc, "details", None)) from None
        logger.info("handler timing on: the dispatcher stamps calls, a second sys_enter program times them")

    def expire(self) -> bool:
        """Stop if the lease ran out; whether it did now."""
        if self._timer is None or self._clock() < self._until:
            return False
        self.stop()
        logger.info("handler timing off: nobody renewed it")
        return True

    def read(self) -> SlotTimes | None:
        return None if self._timer is None else self._timer.read()

    def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._timer is not None:
            timer, self._timer = self._timer, None
            timer.close()
        self._until = 0.0
