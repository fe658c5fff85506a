"""The handlers' event channel: one pinned ring buffer, drained on the event loop, and where its
events go (subscribers of ``tailcallctl events``, the journal, the backlog, the counts).

    pin_dir/events        BPF_MAP_TYPE_RINGBUF that every handler writes with TC_PRINTF / TC_EMIT
    pin_dir/event_counts  per-CPU {emitted, lost} per slot key, counted by the handlers

The handlers get both as fds at compile time (tailcalld.h, compiler.py); the daemon reads the
ring through mmap (ringbuf.py) whenever its fd is readable, a bounded batch at a time so that
a flood never starves the control socket.  Loss is counted where it happens, never silent:
in the kernel (the ring was full: ``lost``, per slot), in the daemon for one subscriber that
does not keep up (its ``dropped``, told to it in the stream), and for the journal (a --journal
slot over events_journal_rate: ``suppressed``, logged).  For each subscriber
received + dropped + lost = emitted, counted from when it subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bpfsys
from .btf import BtfError, BtfTypes, JsonEncoders
from .misses import Snapshot
from .pins import open_or_create_map, pin_again
from .ringbuf import BPF_MAP_TYPE_RINGBUF, RingReader

logger = logging.getLogger("tailcalld")

EVENTS_PIN = "events"
COUNTS_PIN = "event_counts"
PINS = (EVENTS_PIN, COUNTS_PIN)
EVENT_MESSAGE_ID = "8c2e0f7a4b3d4e5f9a1b2c3d4e5f6a70"  # journal entries of handler events
# struct tc_event_header in tailcalld.h: time, slot, tag, pid, tid, uid, kind, flags, type id, size, comm
EVENT_HEADER = struct.Struct("<QIIIIIHHII16s")
KIND_TEXT, KIND_STRUCT = 1, 2
BATCH = 1024  # records handled per turn of the event loop before the socket gets its turn
COUNT_FIELDS = 2  # struct tc_event_counts: emitted, lost


# One event on the wire (protocol.EventRecord), written with %: json.dumps of a dict per event
# would cost more than all the rest of its handling.
_LINE = b'{"time_ns":%d,%s,"pid":%d,"tid":%d,"uid":%d,"comm":%s,"compat":%s,"message":%s,"fields":%s}\n'
_BOOL = (b"false", b"true")
HEADER_SIZE = EVENT_HEADER.size


class Decoder:
    """Structs encoded by the BTF of the handler that sent them, found by its tag."""

    def __init__(self, btf_of: Callable[[int], bytes | None]) -> None:
        self._btf_of = btf_of  # tag -> the handler's raw BTF (None: a bcc handler, or unknown)
        self._types: dict[int, JsonEncoders | None] = {}

    def forget(self) -> None:
        self._types.clear()

    def _encoders(self, tag: int) -> JsonEncoders | None:
        if tag in self._types:
            return self._types[tag]
        raw = self._btf_of(tag)
        try:
            found = JsonEncoders(BtfTypes(raw)) if raw else None
        except BtfError as err:
            logger.warning("the BTF of the handler with tag %08x is unreadable (%s): its events show as bytes", tag, err)
            found = None
        self._types[tag] = found
        return found

    def json(self, tag: int, type_id: int, data: bytes) -> bytes:
        """The struct as JSON text; ``{"bytes": hex}`` when its type is not known (bcc)."""
        encoders = self._encoders(tag) if type_id else None
        if encoders is not None:
            try:
                return encoders.encode(type_id, data)
            except (BtfError, struct.error, IndexError):
                pass  # cut short, or a type this BTF does not have: shown as bytes
        return b'{"bytes":"%s"}' % data.hex().encode()


def monotonic_to_wall() -> int:
    """What to add to bpf_ktime_get_ns() (CLOCK_MONOTONIC) for the wall clock."""
    return time.time_ns() - time.monotonic_ns()


@dataclass
class ChannelMaps:
    """The channel's two pinned maps, by fd (ours to close), and the ring's size."""

    events_fd: int
    counts_fd: int
    size: int
    nr_keys: int

    @classmethod
    def open(cls, pin_dir: Path, size: int, nr_keys: int) -> ChannelMaps:
        """Open the pinned maps, or make and pin them.  A ring pinned with another size is
        kept (handlers hold it): the new size takes effect after unload-all."""
        events = open_or_create_map(pin_dir / EVENTS_PIN, BPF_MAP_TYPE_RINGBUF, "tailcalld_event", 0, 0, size,
                                    any_entries=True)
        try:
            have = bpfsys.map_info(events).max_entries
            if have != size:
                logger.warning("the event ring buffer pinned at %s has %d bytes, not events_buffer_bytes (%d): "
                               "handlers hold it; the new size takes effect after unload-all",
                               pin_dir / EVENTS_PIN, have, size)
            counts = open_or_create_map(pin_dir / COUNTS_PIN, bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, "tailcalld_evcnt",
                                        4, 8 * COUNT_FIELDS, nr_keys)
        except BaseException:
            os.close(events)
            raise
        return cls(events, counts, have, nr_keys)

    def restore_pins(self, pin_dir: Path) -> list[str]:
        """Pin again what was unpinned while we run (an `rm` under pin_dir): our fds still hold
        the maps, and handlers compiled from now on reach them through the pins."""
        return pin_again(pin_dir, {EVENTS_PIN: self.events_fd, COUNTS_PIN: self.counts_fd})

    def totals(self) -> tuple[list[int], list[int]]:
        """(emitted, lost) per slot key, summed over the CPUs."""
        emitted, lost = bpfsys.percpu_u64_columns(self.counts_fd, self.nr_keys, COUNT_FIELDS)
        return emitted, lost

    def close(self) -> None:
        for fd in (self.events_fd, self.counts_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def remove_pins(pin_dir: Path) -> list[str]:
    removed = []
    for name in PINS:
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
            removed.append(str(pin_dir / name))
    return removed


@dataclass(frozen=True)
class EventStats:
    """Per slot key: events its handlers emitted and the kernel lost (pinned counters, since the
    channel was made), and those this daemon read."""

    emitted: list[int]
    lost: list[int]
    delivered: dict[int, int]

    def of(self, key: int) -> tuple[int, int, int]:
        inside = key < len(self.emitted)
        return (self.emitted[key] if inside else 0, self.lost[key] if inside else 0, self.delivered.get(key, 0))


@dataclass(eq=False)  # kept in a set, by identity
class Subscriber:
    """One ``tailcallctl events -f``: a writer the hub writes to without ever waiting on it."""

    write: Callable[[bytes], None]
    buffered: Callable[[], int]  # bytes written and not yet taken by the client
    slots: frozenset[int] | None  # slot keys it wants; None: all
    dropped: int = 0  # since its last notice
    lost_seen: dict[int, int] = field(default_factory=dict)  # kernel losses already told, per slot key

    def wants(self, slot: int) -> bool:
        return self.slots is None or slot in self.slots


class EventHub:
    """Where events go.  ``label`` turns a slot key into (syscall number, name, hook)."""

    def __init__(self, maps: ChannelMaps, decoder: Decoder, label: Callable[[int], tuple[int, str, str]],
                 journal_slots: Callable[[], set[int]], journal_rate: Callable[[], float],
                 backlog: Callable[[], int], client_bytes: Callable[[], int]) -> None:
        self.maps = maps
        self._ring = RingReader(maps.events_fd, maps.size)
        self._decoder = decoder
        self._label = label
        self._journal_slots = journal_slots
        self._journal_rate = journal_rate
        self._backlog_size = backlog
        self._client_bytes = client_bytes
        self._subscribers: set[Subscriber] = set()
        self._backlog: deque[tuple[int, bytes]] = deque(maxlen=backlog())  # (slot key, its JSON line)
        self._slot_text: dict[int, bytes] = {}  # slot key -> its part of an event's JSON
        self._comm_text: dict[bytes, bytes] = {}  # comm as the kernel gives it -> its JSON
        self.delivered: dict[int, int] = {}  # per slot key: read from the ring by this daemon
        self._buckets: dict[int, tuple[float, float]] = {}  # slot key -> (tokens, last refill)
        self.suppressed: dict[int, int] = {}  # journal entries not written, since the last notice
        # Since the start, for metrics: the per-notice counts above and in each Subscriber are reset.
        self.suppressed_total: dict[int, int] = {}  # per slot key
        self.dropped_total = 0  # events not sent to a follower that did not keep up, over all followers
        self._clock_offset = monotonic_to_wall()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.paused = asyncio.Event()  # set while the ring is not read: every follower is full
        self._totals = Snapshot(maps.totals)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.maps.events_fd, self._readable)
        self._readable()  # what was written while no daemon read

    def stop(self) -> None:
        if self._loop is not None:
            if not self.paused.is_set():
                self._loop.remove_reader(self.maps.events_fd)
            self._loop = None
        self._ring.close()

    def _readable(self) -> None:
        self._scheduled = False
        if self.paused.is_set():
            return
        if self.drain(BATCH) == BATCH and self._loop is not None and not self._scheduled and not self.paused.is_set():
            # More is waiting: read it on the next turn, after the control socket had its own.
            self._scheduled = True
            self._loop.call_soon(self._readable)

    def _pause_if_nobody_has_room(self, journal: set[int]) -> None:
        """Stop reading the ring while every follower has events_client_bytes unread and no slot
        writes to the journal: the ring holds the events meanwhile (compactly; what it cannot
        hold the kernel counts as lost), instead of the daemon reading them only to drop them.
        A follower with room, or a --journal slot, keeps the reading going."""
        if not self._subscribers or journal or self._loop is None:
            return
        limit = self._client_bytes()
        if all(sub.buffered() > limit for sub in self._subscribers):
            self._loop.remove_reader(self.maps.events_fd)
            self.paused.set()

    def resume(self) -> None:
        """A follower has room again (its socket drained below half its limit): read on."""
        if self.paused.is_set() and self._loop is not None:
            self.paused.clear()
            self._loop.add_reader(self.maps.events_fd, self._readable)
            self._loop.call_soon(self._readable)

    def drain(self, limit: int) -> int:
        """Read and hand out up to ``limit`` records; how many were read."""
        records = self._ring.read(limit)
        if not records:
            return 0
        if self._backlog.maxlen != self._backlog_size():  # events_backlog was reloaded
            self._backlog = deque(self._backlog, maxlen=self._backlog_size())
        journal = self._journal_slots()
        outs: list[tuple[Subscriber, frozenset[int] | None, list[bytes]]] = [
            (sub, sub.slots, []) for sub in self._subscribers]
        delivered, backlog, unpack, offset = self.delivered, self._backlog, EVENT_HEADER.unpack_from, self._clock_offset
        for record in records:
            try:
                time_ns, slot, tag, pid, tid, uid, kind, flags, type_id, size, comm = unpack(record)
            except struct.error:
                continue  # shorter than a header: not a tailcalld.h event
            payload = record[HEADER_SIZE:HEADER_SIZE + size]
            if kind == KIND_TEXT:
                message, fields = json.dumps(payload.split(b"\0", 1)[0].decode(errors="replace")).encode(), b"null"
            else:
                message, fields = b"null", self._decoder.json(tag, type_id, payload)
            line = _LINE % (time_ns + offset, self._slot_json(slot), pid, tid, uid, self._comm_json(comm),
                            _BOOL[flags & 1], message, fields)
            delivered[slot] = delivered.get(slot, 0) + 1
            backlog.append((slot, line))
            for _sub, slots, lines in outs:
                if slots is None or slot in slots:
                    lines.append(line)
            if slot in journal:
                self._to_journal(slot, line)
        for sub, _slots, lines in outs:
            if lines:
                self._send(sub, lines)
        self._pause_if_nobody_has_room(journal)
        return len(records)

    def _slot_json(self, key: int) -> bytes:
        found = self._slot_text.get(key)
        if found is None:
            nr, syscall, hook = self._label(key)
            found = self._slot_text[key] = b'"slot":%d,"hook":"%s","syscall":%s' % (nr, hook.encode(),
                                                                                    json.dumps(syscall).encode())
        return found

    def _comm_json(self, comm: bytes) -> bytes:
        found = self._comm_text.get(comm)
        if found is None:
            if len(self._comm_text) > 4096:  # a bound: every process of the host could pass by
                self._comm_text.clear()
            found = self._comm_text[comm] = json.dumps(comm.split(b"\0", 1)[0].decode(errors="replace")).encode()
        return found

    def _send(self, sub: Subscriber, lines: list[bytes]) -> None:
        if sub.buffered() > self._client_bytes():
            sub.dropped += len(lines)
            self.dropped_total += len(lines)
            return
        if sub.dropped:
            lines.insert(0, _dropped(sub.dropped))
            sub.dropped = 0
        sub.write(b"".join(lines))

    def backlog(self, slots: frozenset[int] | None, last: int | None) -> list[bytes]:
        """The latest events kept (each one JSON line), oldest first."""
        chosen = [line for slot, line in self._backlog if slots is None or slot in slots]
        return chosen[max(0, len(chosen) - last):] if last is not None else chosen

    def stats(self) -> EventStats:
        """For list and status: the counters as read at most SNAPSHOT_AGE ago (list is hot, and
        one read of the per-CPU map is most of a list's cost)."""
        emitted, lost = self._totals.get()
        return EventStats(emitted, lost, dict(self.delivered))

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self, write: Callable[[bytes], None], buffered: Callable[[], int],
                  slots: frozenset[int] | None) -> Subscriber:
        sub = Subscriber(write, buffered, slots)
        _emitted, lost = self.maps.totals()
        sub.lost_seen = {key: n for key, n in enumerate(lost) if n}
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        self.resume()  # the rest may have room (or nobody is left to wait for)

    def tell_losses(self) -> None:
        """Tell each subscriber what it missed since it last heard: events dropped for it (when
        it has room again: a quiet slot sends no batch to carry the notice), and what the
        kernel lost (the ring was full).  A subscriber still without room hears it later,
        added up: nothing piles up for it meanwhile."""
        if not self._subscribers:
            return
        _emitted, lost = self.maps.totals()
        for sub in self._subscribers:
            if sub.buffered() > self._client_bytes():
                continue
            if sub.dropped:
                sub.write(_dropped(sub.dropped))
                sub.dropped = 0
            for key, total in enumerate(lost):
                new = total - sub.lost_seen.get(key, 0)
                if new > 0 and sub.wants(key):
                    nr, syscall, hook = self._label(key)
                    sub.write(_json({"lost": new, "slot": nr, "hook": hook, "syscall": syscall, "where": "kernel",
                                     "reason": "the ring buffer was full (events_buffer_bytes)"}))
                sub.lost_seen[key] = total

    def _to_journal(self, slot: int, line: bytes) -> None:
        now = time.monotonic()
        rate = self._journal_rate()
        tokens, last = self._buckets.get(slot, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[slot] = (tokens, now)
            self.suppressed[slot] = self.suppressed.get(slot, 0) + 1
            self.suppressed_total[slot] = self.suppressed_total.get(slot, 0) + 1
            return
        self._buckets[slot] = (tokens - 1, now)
        event = json.loads(line)  # rate-limited: this slow way is taken a few times a second at most
        label = _slot_label(event)
        fields: dict[str, Any] = {"MESSAGE_ID": EVENT_MESSAGE_ID, "SYSCALL_NR": event["slot"],
                                  "SYSCALL_NAME": event["syscall"], "SLOT": label, "PID": event["pid"],
                                  "TID": event["tid"], "UID": event["uid"], "COMM": event["comm"]}
        if event["message"] is not None:
            text = event["message"]
        else:
            flat = list(_flat(event["fields"]))
            text = " ".join(f"{k}={v}" for k, v in flat)
            fields |= {f"EVENT_{k.upper()}": v for k, v in flat}
        logger.info("%s[%d] %s: %s", event["comm"], event["pid"], label, text, extra=fields)

    def log_suppressed(self) -> None:
        for key, count in self.suppressed.items():
            nr, syscall, hook = self._label(key)
            label = syscall if hook == "enter" else f"{syscall}:exit"
            logger.warning("%d events of slot %s were not written to the journal (over events_journal_rate)", count,
                           label, extra={"SYSCALL_NR": nr, "SYSCALL_NAME": syscall, "SLOT": label,
                                         "SUPPRESSED": count})
        self.suppressed.clear()


def _slot_label(wire: dict[str, Any]) -> str:
    return wire["syscall"] if wire["hook"] == "enter" else f"{wire['syscall']}:exit"


def _flat(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """A decoded struct as journal fields: nested names joined with '_'."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{prefix}{k}_" if isinstance(v, dict) else f"{prefix}{k}")
    else:
        yield prefix or "value", value


def _dropped(count: int) -> bytes:
    return _json({"dropped": count, "where": "daemon", "reason": "this client did not keep up (events_client_bytes)"})


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
