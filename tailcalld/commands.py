"""What each protocol command does: the one place where the wire meets the core.

A request arrives here validated (protocol.py); its fields become the core's types
(an Artifact, a slot), the core does the work (slots.py), and its dataclass result becomes
the reply model.  No framing and no socket: the server, and tests, call ``execute``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from . import __version__, audit
from .config import LiveSettings, Settings
from .dialects import Artifact, detect
from .errors import BadRequest, DeadlinePassed, EventsUnavailable, SourceTooLarge, TailcalldError, TimingUnavailable
from .events import EventHub, EventStats
from .loader_settings import check_dialect, settings as loader_settings
from .metrics import Recorder
from .peers import Peer
from .plan import Applier, Change, Wanted, at_entry
from .protocol import (ApplyRequest, ApplyResult, AttachRequest, AttachResult, CheckRequest, CheckResult, DetachRequest,
                       DetachResult, EventsRequest, HandlerFile, HandlerOptions, ListRequest, ListResult, MapEntry,
                       PingRequest, PingResult, Request, SavedFile, SavedSlot, SaveRequest, SaveResult, ShowRequest,
                       ShowResult, SlotChange, SlotInfo, StatusRequest, StatusResult, SyscallEntry, SyscallsRequest,
                       SyscallsResult, TimingRequest, TimingResult, UnloadAllRequest, UnloadResult)
from .slot_details import slot_details
from .scope import check_cgroup_path
from .slots import SlotManager, SlotView, Status
from .state import SlotRecord
from .timing import OnDemandTiming, SlotTimes

logger = logging.getLogger("tailcalld")


class StopReason(enum.Enum):
    """Why the daemon's serving ends; what stays in the kernel depends on it."""

    SIGNAL = "signal"  # SIGTERM/SIGINT: the dispatcher and handlers stay pinned
    UNLOADED = "unloaded"  # unload-all: nothing of tailcalld is left in the kernel


@dataclass
class CommandContext:
    manager: SlotManager
    settings: LiveSettings
    request_stop: Callable[[StopReason], None]
    socket_path: str = ""
    connections: Callable[[], int] = lambda: 0
    list_cache: ListCache = field(default_factory=lambda: ListCache())
    timing: OnDemandTiming | None = None  # None: this daemon cannot time handlers (tests' fake kernel)
    events: EventHub | None = None  # None: no event channel (tests' fake kernel)
    recorder: Recorder = field(default_factory=lambda: Recorder())  # metrics that exist only as events
    applier: Applier = field(init=False)

    def __post_init__(self) -> None:
        self.applier = Applier(self.manager)  # one per daemon: applies run one at a time


def artifact_of(spec: AttachRequest | CheckRequest, settings: Settings) -> Artifact:
    """The wire's source/object/dialect fields, as the core's Artifact, within the size settings."""
    return artifact_from(spec, spec, settings)


def artifact_from(file: HandlerFile, options: HandlerOptions, settings: Settings) -> Artifact:
    """A handler's file made as ``options`` say, as the core's Artifact, within the size settings."""
    if file.object is not None:
        try:
            artifact = Artifact("object", base64.b64decode(file.object, validate=True), file.filename)
        except binascii.Error as exc:
            raise BadRequest(f"object is not valid base64: {exc}") from None
    else:
        assert file.source is not None
        dialect = detect(file.source) if options.dialect == "auto" else options.dialect
        artifact = Artifact(dialect, file.source.encode(), file.filename, headers=headers_of(file, settings))
    variables = loader_settings({name: str(value) for name, value in options.variables.items()})
    defines = loader_settings(options.defines)
    check_dialect(artifact.dialect, variables, defines)
    artifact = replace(artifact, variables=variables, defines=defines)
    setting = "max_object_bytes" if file.object is not None else "max_source_bytes"
    limit: int = getattr(settings, setting)
    if len(artifact.data) > limit:
        raise SourceTooLarge(f"the {'object' if file.object else 'source'} is {len(artifact.data)} bytes; "
                             f"the limit is {limit} ({setting})",
                             {"size": len(artifact.data), "limit": limit, "setting": setting})
    return artifact


def attach_artifact(request: AttachRequest, settings: Settings, m: SlotManager, peer: Peer) -> Artifact:
    """The attach's artifact; a request refused before it reaches the slots is audited as a
    failed attach too (a source too large, a --set the dialect cannot take)."""
    try:
        return artifact_of(request, settings)
    except TailcalldError as err:
        m.audit_failure("attach", peer, request.slot, request.hook, err,
                        audit.attach_fields(request.filename, request.function, None))
        raise


def headers_of(spec: HandlerFile, settings: Settings) -> dict[str, str]:
    """The local headers of the request, within max_headers and max_headers_bytes."""
    headers = spec.headers or {}
    size = sum(len(text.encode()) for text in headers.values())
    for setting, found, what in (("max_headers", len(headers), "local headers"),
                                 ("max_headers_bytes", size, "bytes of local headers")):
        limit: int = getattr(settings, setting)
        if found > limit:
            raise SourceTooLarge(f"the source brings {found} {what}; the limit is {limit} ({setting})",
                                 {"size": found, "limit": limit, "setting": setting})
    return headers


def wanted_of(request: ApplyRequest, m: SlotManager, settings: Settings) -> list[Wanted]:
    """The apply request's slots as the core's Wanted; a bad one is refused naming its entry."""
    wanted = []
    for i, s in enumerate(request.slots):
        file = request.files[s.file]
        try:
            key = m.syscalls.link_key(m.syscalls.key(m.syscalls.resolve(s.slot), s.hook), s.priority)
            artifact = artifact_from(file, s, settings)
            if s.cgroup is not None and s.priority is not None:
                raise BadRequest("a handler with a priority cannot be scoped to a cgroup (yet): give priority or "
                                 "cgroup, not both", {"cgroup": s.cgroup, "priority": s.priority})
            if s.cgroup is not None:
                check_cgroup_path(s.cgroup)
        except TailcalldError as err:
            raise at_entry(err, request.source, i, file.filename) from None
        wanted.append(Wanted(i, key, artifact, s.function, s.journal, file.filename, s.cgroup))
    return wanted


async def run_apply(ctx: CommandContext, request: ApplyRequest, peer: Peer) -> ApplyResult:
    """An apply, from a client or from the daemon's desired_slots."""
    m = ctx.manager
    await m.restored()  # planned against the slots as the start's restore leaves them, not half-way
    try:
        changes = await ctx.applier.apply(wanted_of(request, m, ctx.settings.current), peer, request.source,
                                          request.dry_run, request.atomic)
    except TailcalldError as err:
        if not request.dry_run:  # the metrics count an apply's failure as one failed attach, as a client sees it
            ctx.recorder.attach_result(err.code)
        raise
    if not request.dry_run:
        for c in changes:
            if c.step.action in ("add", "replace"):
                ctx.recorder.attach_result("ok")
    return ApplyResult(dry_run=request.dry_run, changes=[slot_change(c, m) for c in changes])


def slot_change(c: Change, m: SlotManager) -> SlotChange:
    s = c.step
    nr, hook = m.syscalls.split(s.key)
    before = s.current
    return SlotChange(action=s.action, slot=nr, hook=hook, priority=m.syscalls.priority(s.key),
                      syscall=m.syscalls.label(s.key),
                      index=s.wanted.index if s.wanted else None, function=c.function,
                      filename=s.wanted.filename if s.wanted else (before.filename if before else None),
                      prog_id=c.prog_id, replaced_prog_id=before.prog_id if before and s.action != "unchanged" else None,
                      replaced_function=before.function if before and s.action == "replace" else None,
                      replaced_filename=before.filename if before and s.action == "replace" else None,
                      why=s.why, log=c.log, warnings=list(c.warnings))


def save_result(m: SlotManager) -> SaveResult:
    """Every wanted slot, and each handler file once (by its identity) however many slots run it.
    A slot whose source is unknown (adopted from the kernel) or unreadable has no file."""
    files: list[SavedFile] = []
    index: dict[tuple[str, str], int | None] = {}
    slots = []
    for key, r in sorted(m.registry.wanted().items()):
        nr, hook = m.syscalls.split(key)
        file = None
        if r.source_sha256 is not None:
            found = (r.source_sha256, r.dialect)
            if found not in index:
                index[found] = _saved_file(m, r, files)
            file = index[found]
        slots.append(SavedSlot(slot=nr, hook=hook, syscall=m.syscalls.label(key), function=r.function,
                               dialect=r.dialect if r.source_sha256 else None, filename=r.filename,
                               journal=r.journal, cgroup=r.cgroup, priority=r.priority, variables=r.variables,
                               defines=r.defines,
                               prog_id=r.prog_id,
                               file=file))
    return SaveResult(slots=slots, files=files)


def _saved_file(m: SlotManager, r: SlotRecord, files: list[SavedFile]) -> int | None:
    assert r.source_sha256 is not None
    try:
        a = m.registry.store.artifact(r.source_sha256, r.dialect, r.headers)
    except (OSError, ValueError) as exc:
        logger.error("save: the kept source of %s (%s) cannot be read: %s", r.function, r.source_sha256[:12], exc)
        return None
    data = {"object": base64.b64encode(a.data).decode()} if a.dialect == "object" else {"source": a.data.decode()}
    files.append(SavedFile(sha256=r.source_sha256, filename=r.filename, headers=dict(a.headers), **data))
    return len(files) - 1


def deadline(request: AttachRequest) -> datetime | None:
    """When an attach --for/--until ends; raises DeadlinePassed for an --until already past."""
    now = datetime.now(UTC)
    if request.for_seconds is not None:
        return now + timedelta(seconds=request.for_seconds)
    if request.until is None:
        return None
    if request.until <= now:
        raise DeadlinePassed(f"until {request.until.isoformat()} is past (it is {now:%Y-%m-%dT%H:%M:%SZ}); "
                             "nothing was changed", {"until": request.until.isoformat()})
    return request.until.astimezone(UTC)


def slot_info(view: SlotView) -> SlotInfo:
    r = view.record
    # model_construct: these values come from our own validated records; list is the
    # hottest request and validation would double its cost.
    return SlotInfo.model_construct(
        slot=view.nr, hook=view.hook, syscall=view.syscall, function=r.function, dialect=r.dialect if r.source_sha256 else None,
        prog_id=r.prog_id, filename=r.filename, source_sha256=r.source_sha256, attached_at=r.attached_at,
        attached_by_uid=r.attached_by_uid, journal=r.journal, variables=r.variables, defines=r.defines,
        expires_at=r.expires_at, cgroup=r.cgroup, priority=r.priority, state=view.state,
        kernel_prog_id=view.kernel_prog_id, hits=view.hits, misses=view.misses, scope_misses=view.scope_misses)


class ListCache:
    """``list`` replies serialised fast: list is the hottest request, and a slot's entry only
    changes when its record does, so each entry is serialised once (by the SlotInfo model) and
    only its last fields (state, kernel program, hits, misses, timing) are written per request."""

    _TAIL = (b',"state":"kernel-empty","kernel_prog_id":null,"hits":0,"misses":0,"scope_misses":0,"timed_runs":null,'
             b'"timed_ns":null,"events_emitted":0,"events_lost":0,"events_delivered":0}')

    def __init__(self) -> None:
        self._heads: dict[tuple[int, int | None], tuple[SlotRecord, bytes]] = {}

    def reply(self, views: list[SlotView], times: SlotTimes | None = None, events: EventStats | None = None) -> bytes:
        entries = [self._head(v) + self._tail(v, times, events) for v in views]
        return b'{"slots":[' + b",".join(entries) + b"]}"

    def _tail(self, v: SlotView, times: SlotTimes | None, events: EventStats | None) -> bytes:
        kernel = b"null" if v.kernel_prog_id is None else b"%d" % v.kernel_prog_id
        slot = v.record.slot
        # Exit slots are not timed (the stamp is the enter dispatcher's): null, as with timing off.
        timed = (b"null,\"timed_ns\":null" if times is None or slot >= len(times.hits)
                 else b"%d,\"timed_ns\":%d" % (times.hits[slot], times.hit_ns[slot]))
        emitted, lost, delivered = events.of(slot) if events is not None else (0, 0, 0)
        return (b'"%s","kernel_prog_id":%s,"hits":%d,"misses":%d,"scope_misses":%d,"timed_runs":%s,'
                b'"events_emitted":%d,"events_lost":%d,"events_delivered":%d}') % (
            v.state.encode(), kernel, v.hits, v.misses, v.scope_misses, timed, emitted, lost, delivered)

    def _head(self, view: SlotView) -> bytes:
        cached = self._heads.get((view.record.slot, view.record.priority))
        if cached is not None and cached[0] is view.record:
            return cached[1]
        text = slot_info(SlotView(view.record, view.syscall, view.nr, view.hook, None, 0, 0, 0)).model_dump_json().encode()
        assert text.endswith(self._TAIL), "state ... timed_ns must stay SlotInfo's last fields"
        head = text[:-len(self._TAIL)] + b',"state":'
        self._heads[(view.record.slot, view.record.priority)] = (view.record, head)
        return head


def status_result(status: Status, ctx: CommandContext) -> StatusResult:
    d, s = status.dispatcher, ctx.settings.current
    events = ctx.events.stats() if ctx.events is not None else None
    return StatusResult(
        events_emitted=sum(events.emitted) if events else 0, events_lost=sum(events.lost) if events else 0,
        events_delivered=sum(events.delivered.values()) if events else 0,
        events_subscribers=ctx.events.subscribers if ctx.events is not None else 0,
        events_buffer_bytes=ctx.events.maps.size if ctx.events is not None else 0,
        version=__version__, pid=status.pid, started_at=status.started_at, pin_dir=str(d.pin_dir),
        socket=ctx.socket_path, dispatcher_prog_id=d.prog_id, dispatcher_link_id=d.link_id, adopted=d.adopted,
        upgraded_from=d.upgraded_from, slots_used=status.slots_used, nr_slots=d.nr_slots, restoring=status.restoring,
        next_expiry=status.next_expiry, scoped=status.scoped, chained=status.chained,
        atomic_applies=status.atomic_applies,
        hits_total=status.hits_total, misses_total=status.misses_total, miss_log_interval=s.miss_log_interval,
        connections=ctx.connections(), timing_seconds_left=ctx.timing.seconds_left() if ctx.timing else 0.0,
        corrections=status.corrections)


def show_result(m: SlotManager, request: ShowRequest, ctx: CommandContext) -> ShowResult:
    d = slot_details(m, request.slot, request.hook, request.priority)
    # The slot's entry as list writes it (counters, timing and events included): one source of truth.
    entry = ListCache().reply([d.view], ctx.timing.read() if ctx.timing else None,
                              ctx.events.stats() if ctx.events is not None else None)
    slot = ListResult.model_validate_json(entry).slots[0]
    return ShowResult(slot=slot, maps=[MapEntry(**vars(e)) for e in d.maps], maps_note=d.maps_note, source=d.source,
                      object_bytes=d.object_bytes, headers=d.headers, priorities=d.priorities)


def events_filter(request: EventsRequest, m: SlotManager) -> frozenset[int] | None:
    """The slot keys an events request asks for; None: all."""
    if request.slot is None:
        return None
    return frozenset({m.syscalls.key(m.syscalls.resolve(request.slot), request.hook)})


async def execute(ctx: CommandContext, request: Request, peer: Peer) -> BaseModel | bytes:
    """The command's result: a result model, or (for list, the hot one) its JSON."""
    m = ctx.manager
    settings = ctx.settings.current
    match request:
        case PingRequest():
            return PingResult(version=__version__, pid=os.getpid())
        case AttachRequest():
            with ctx.recorder.attaching():
                a = await m.attach(request.slot, attach_artifact(request, settings, m, peer), request.function,
                                   request.filename, peer, request.fresh, request.hook, request.journal,
                                   request.expect, deadline(request), request.cgroup, request.priority)
            return AttachResult(slot=m.syscalls.split(a.slot)[0], hook=request.hook, priority=request.priority,
                                syscall=a.syscall,
                                function=a.function, prog_id=a.prog_id, insns=a.insns,
                                replaced_prog_id=a.replaced_prog_id, log=a.log, warnings=list(a.warnings),
                                unchanged=a.unchanged)
        case CheckRequest():
            c = await m.check(artifact_of(request, settings), request.function)
            return CheckResult(function=c.function, dialect=c.dialect, prog_type="raw_tracepoint", insns=c.insns,
                               log=c.log, warnings=list(c.warnings))
        case DetachRequest():
            d = await m.detach(request.slot, peer, request.hook, request.expect, request.priority)
            return DetachResult(slot=m.syscalls.split(d.slot)[0], hook=request.hook, priority=request.priority,
                                syscall=d.syscall,
                                prog_id=d.prog_id)
        case ListRequest():
            return ctx.list_cache.reply(m.list_slots(), ctx.timing.read() if ctx.timing else None,
                                        ctx.events.stats() if ctx.events is not None else None)
        case StatusRequest():
            return status_result(m.status(), ctx)
        case ShowRequest():
            return show_result(m, request, ctx)
        case SyscallsRequest():
            return SyscallsResult(syscalls=[
                SyscallEntry(abi=v.abi, nr=v.nr, name=v.name, slot=v.slot,
                             prog_id=v.record.prog_id if v.record else None,
                             function=v.record.function if v.record else None)
                for v in m.syscall_table(request.pattern)])
        case TimingRequest():
            if ctx.timing is None:
                raise TimingUnavailable("this daemon cannot time handlers")
            left = await ctx.timing.request(request.seconds)
            times = ctx.timing.read()
            return TimingResult(on=ctx.timing.on, seconds_left=left, dispatch_ns=times.dispatch_ns() if times else None)
        case EventsRequest():
            if ctx.events is None:
                raise EventsUnavailable("this daemon has no event channel")
            slots = events_filter(request, m)
            last = request.last if request.last is not None else (10 if request.follow else None)
            # The events are JSON already (events.py writes each once): framed by hand, as list's.
            lines = ctx.events.backlog(slots, last)
            return b'{"events":[%s],"following":%s}' % (b",".join(line.rstrip(b"\n") for line in lines),
                                                       b"true" if request.follow else b"false")
        case ApplyRequest():
            return await run_apply(ctx, request, peer)
        case SaveRequest():
            return save_result(m)
        case UnloadAllRequest():
            if ctx.timing is not None:
                ctx.timing.stop()  # its program reads the dispatcher's maps, about to be unpinned
            u = await m.unload_all(peer)
            ctx.request_stop(StopReason.UNLOADED)
            return UnloadResult(slots_emptied=u.slots, pins_removed=u.pins)
    raise AssertionError(f"unhandled request type {type(request).__name__}")
