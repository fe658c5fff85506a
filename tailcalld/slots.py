"""The core: the operations on syscall slots (attach, detach, check, unload-all) and the views
of them (list, status), in terms of the kernel seam and the registry.

No sockets and no wire format here: results are plain dataclasses, which ``commands.py``
turns into protocol replies, and tests drive these methods directly (on the real kernel, or on
the in-memory fake kernel for the failure paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from . import audit, reconcile
from .audit import Fields as AuditFields
from .compiler import Program
from .dialects import Artifact, Dialect
from .errors import BadRequest, Conflict, PriorityClash, SlotEmpty, StateUnwritable, TailcalldError, Unloading
from .kernel import DispatcherInfo, Kernel
from .loader_settings import settings
from .misses import Counters, MissMonitor
from .peers import Peer
from .registry import Handler, Registry, differences
from .scope import check_cgroup_path
from .state import SlotRecord, StateFile, StateStore, map_records
from .syscalls import Hook, SyscallTable
from .wire_limits import MAX_LINKS, MAX_PRIORITY

logger = logging.getLogger("tailcalld")


@dataclass(frozen=True)
class Attached:
    slot: int
    syscall: str
    function: str
    prog_id: int
    insns: int
    replaced_prog_id: int | None
    log: str = ""  # the compiler's warnings and the loader's messages (the user's file named)
    warnings: tuple[str, ...] = ()  # tailcalld's own (headers that do not match the kernel)
    unchanged: bool = False  # the slot ran this very handler already: nothing was done


@dataclass(frozen=True)
class Detached:
    slot: int
    syscall: str
    prog_id: int


@dataclass(frozen=True)
class Checked:
    function: str
    dialect: Dialect
    insns: int
    log: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unloaded:
    slots: list[int]
    pins: list[str]


EXPIRY_RETRY = 10.0  # seconds before an attach's end that could not be applied is tried again

# What a compare-and-swap expects a slot to hold: a program id, or nothing.
Expect = int | Literal["empty"]

# How a wanted slot's kernel content compares with what tailcalld wants there.
SlotState = Literal["in-sync", "kernel-empty", "kernel-other", "not-restored", "restoring"]


@dataclass(frozen=True, slots=True)
class SlotView:
    record: SlotRecord  # record.slot is the slot key (SyscallTable.key)
    syscall: str
    nr: int  # the syscall number
    hook: Hook
    kernel_prog_id: int | None  # what the kernel's slot holds now
    hits: int  # times the slot's handler ran since this daemon started
    misses: int  # tail-call misses of the slot since this daemon started
    scope_misses: int  # calls of tasks outside its cgroup (attach --cgroup) since this daemon started
    restored: bool = True  # False: recorded, but its handler could not be rebuilt at start
    restoring: bool = False  # the start is rebuilding its handler right now

    @property
    def state(self) -> SlotState:
        if self.restoring:
            return "restoring"
        if not self.restored:
            return "not-restored"
        if self.kernel_prog_id == self.record.prog_id:
            return "in-sync"
        return "kernel-empty" if self.kernel_prog_id is None else "kernel-other"


@dataclass(frozen=True)
class Counts:
    """Read together with one misses snapshot (``SlotManager._recent_counts``)."""

    calls: list[int]
    scope_misses: list[int]


@dataclass(frozen=True)
class SyscallView:
    abi: str
    nr: int
    name: str
    slot: int | None  # where its calls are dispatched; None: never
    record: SlotRecord | None  # what that slot holds, if anything


@dataclass(frozen=True)
class Status:
    started_at: datetime
    pid: int
    dispatcher: DispatcherInfo
    slots_used: int
    restoring: int
    next_expiry: datetime | None
    scoped: int  # slots whose handler runs for one cgroup only
    chained: int  # slots whose handlers were given priorities (attach --priority)
    atomic_applies: int  # apply --atomic changes since the start
    hits_total: int
    misses_total: int
    corrections: list[str]


class SlotManager:
    def __init__(self, kernel: Kernel, store: StateStore, syscalls: SyscallTable, misses: MissMonitor,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.kernel = kernel
        self.syscalls = syscalls
        self.misses = misses
        self.calls = Counters(kernel.call_totals, misses.clock)  # hits = calls - misses - scope misses
        self.scope_misses = Counters(kernel.scope_miss_totals, misses.clock)
        # (misses snapshot, calls and scope misses read with it)
        self._calls_seen: tuple[list[int], Counts] | None = None
        self.registry = Registry(kernel, store, syscalls)
        self.started_at = datetime.now(UTC)
        self._on_change = on_change  # e.g. to refresh systemd's STATUS=
        self._unloading = False
        self._exit_fills = 0  # attaches and applies between preparing the exit dispatcher and filling its slot
        self._restored = asyncio.Event()  # cleared while the start rebuilds slots
        self._deadlines_changed = asyncio.Event()  # an attach --for came or went: expire_due looks again
        self.atomic_applies = 0  # apply --atomic changes made since the start
        self._restored.set()

    # -- keeping kernel and desired state in step -----------------------------------------------

    async def restore(self) -> reconcile.Restore:
        """Rebuild the slot table at start, all at once (see ``reconcile``)."""
        plan = await self.begin_restore()
        await self.finish_restore(plan)
        return plan

    async def begin_restore(self) -> reconcile.Restore:
        """What the start needs before the socket is served (see ``reconcile.begin_restore``);
        the slots it leaves restoring are rebuilt by ``finish_restore``."""
        plan = await reconcile.begin_restore(self.registry)
        self._restored.clear()
        self._held_handlers()
        self.follow_cgroups()  # the scoped slots adopted as they run
        return plan

    async def finish_restore(self, plan: reconcile.Restore) -> None:
        try:
            await reconcile.finish_restore(self.registry, plan)
        finally:
            self._restored.set()
            self._held_handlers()
        self.follow_cgroups()
        self._release_idle_exit()  # an exit dispatcher whose slots all went away
        self._on_change()

    async def restored(self) -> None:
        """Wait for the end of the start's restore (an apply plans against the restored slots)."""
        await self._restored.wait()

    @property
    def unloading(self) -> bool:
        """unload-all began: the pins go, and nothing is changed or put back any more."""
        return self._unloading

    @property
    def restoring(self) -> int:
        """Slots the start is still rebuilding."""
        return len(self.registry.restoring)

    def _held_handlers(self) -> None:
        for slot in self.registry.handlers:
            self.misses.held_handler(self.syscalls.base(slot))

    async def repair_drift(self) -> None:
        """Undo changes made to our slots behind our back (see ``reconcile.repair_drift``).
        Reading every slot is 1024 map lookups: done in a thread, off the event loop."""
        generation = self.registry.generation
        kernel = await asyncio.to_thread(self.kernel.occupied)
        if not self._unloading:
            reconcile.repair_drift(self.registry, kernel, generation)
            self.follow_cgroups()
            self._release_idle_exit()
            self.registry.keep_programs()  # also pins again what an `rm -rf pin_dir` took
            self.registry.flush()

    def follow_cgroups(self) -> None:
        """Scoped slots follow their cgroup's path (scope.py): a service restarted by systemd runs
        in a cgroup made anew under the same path."""
        if self._unloading:
            return
        for slot, change in self.kernel.follow_cgroups(self._scoped()):
            self.registry.correct(f"slot {self.registry.label(slot)}: {change}")

    def restore_pins(self) -> None:
        """Pin the dispatcher again if its pins were removed while we run (see Kernel.restore_pins)."""
        if self._unloading:
            return
        restored = self.kernel.restore_pins()
        if restored:
            self.registry.correct(f"pins removed while tailcalld runs were pinned again from its handles: "
                                  f"{', '.join(restored)}", error=True)

    def _release_idle_exit(self) -> None:
        """Let the kernel detach the exit dispatcher once no exit slot is wanted.  While one is,
        it stays, and the kernel's exit prog array (1024 lookups) need not be read to know it."""
        if self._exit_fills:
            return
        if not any(self.syscalls.split(key)[1] == "exit" for key in self.registry.wanted()):
            self.kernel.release_idle()

    # -- changes --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def filling_exit_slots(self) -> Iterator[None]:
        """While an attach or an apply fills exit slots: the exit dispatcher it prepared stays,
        although no exit slot is wanted yet.  Without this the maintenance's drift repair, which
        runs while an apply awaits its next compile, would let it go in between."""
        self._exit_fills += 1
        try:
            yield
        finally:
            self._exit_fills -= 1

    @contextlib.asynccontextmanager
    async def _locked(self, slot: int) -> AsyncIterator[None]:
        """The lock of ``slot``; for a handler of a chained slot the slot's lock first: changes
        of one slot's chain (and of the slot without priority) are serialised, as their rules
        (``_check_chain``) look at the whole slot."""
        base = self.syscalls.base(slot)
        async with contextlib.AsyncExitStack() as held:
            if base != slot:
                await held.enter_async_context(self.registry.locks[base])
            await held.enter_async_context(self.registry.locks[slot])
            yield

    def links_of(self, base: int) -> dict[int, int]:
        """priority -> key of every handler tailcalld wants in slot ``base``'s chain."""
        return {priority: key for key in self.registry.wanted()
                if self.syscalls.base(key) == base and (priority := self.syscalls.priority(key)) is not None}

    def _check_chain(self, slot: int, filename: str, expect: Expect | None) -> None:
        """Raise PriorityClash unless handler key ``slot`` may be filled: a handler without a
        priority does not go beside handlers with one, nor the reverse; a priority taken by
        another file is replaced only when --expect names what it holds; a chain has at most
        MAX_LINKS handlers.  Called with the slot's lock held, before the commit."""
        base, priority = self.syscalls.base(slot), self.syscalls.priority(slot)
        reg = self.registry
        links = self.links_of(base)
        nr, hook = self.syscalls.split(base)
        details = {"slot": nr, "hook": hook, "priority": priority, "priorities": sorted(links)}
        label = reg.label(base)
        if priority is None:
            if links:
                raise PriorityClash(f"slot {label} runs {len(links)} handler{'s' if len(links) > 1 else ''} in order "
                                    f"(priorities {', '.join(map(str, sorted(links)))}): attach with --priority, "
                                    "or detach them first", details)
            return
        plain = reg.wanted().get(base)
        if plain is not None:
            raise PriorityClash(f"slot {label} holds {plain.function} (program {plain.prog_id}), attached without "
                                "--priority: a slot runs several handlers only when each has a priority; attach it "
                                "again with --priority, or detach it first", details)
        held = reg.wanted().get(slot)
        if held is not None and expect is None and held.filename != filename:
            raise PriorityClash(f"priority {priority} of slot {label} is taken by {held.function} from "
                                f"{held.filename} (program {held.prog_id}, attached by uid {held.attached_by_uid}): "
                                f"choose another priority, or replace it with --expect {held.prog_id}",
                                details | {"prog_id": held.prog_id, "filename": held.filename})
        if held is None and len(links) >= MAX_LINKS:
            raise PriorityClash(f"slot {label} runs {MAX_LINKS} handlers in order already, as many as one slot "
                                "can: detach one first", details)

    def _check_open(self) -> None:
        if self._unloading:
            raise Unloading("tailcalld is unloading everything; no more changes")

    def _held_before(self, slot: int) -> SlotRecord | None:
        """What an attach --for replaces, to come back when it ends: the slot's record (one that
        could not be rebuilt at start too), with its program id as it is now."""
        handler = self.registry.handlers.get(slot)
        return handler.record if handler is not None else self.registry.unrestored.get(slot)

    # -- attaches that end ----------------------------------------------------------------------

    async def expire_due(self, peer: Peer) -> None:
        """Forever: at each deadline of an attach --for/--until (the earliest first; one passed
        while the daemon was stopped, at once), the slot goes back to what it held before.  Any
        change of the slot meanwhile replaced that record: its deadline went with it."""
        while True:
            self._deadlines_changed.clear()
            deadlines = {slot: h.record.expires_at for slot, h in self.registry.handlers.items()
                         if h.record.expires_at is not None}
            now = datetime.now(UTC)
            stuck = False
            for slot in sorted(s for s, at in deadlines.items() if at <= now):
                if self._unloading:
                    return  # unload-all empties every slot: nothing comes back
                try:
                    await self._expire(slot, peer)
                except (TailcalldError, OSError) as err:  # a full disk, say: the slot keeps its handler for now
                    logger.error("slot %s: the end of an attach --for could not be applied (%s); retried in %g s",
                                 self.registry.label(slot), getattr(err, "message", err), EXPIRY_RETRY)
                    stuck = True
            if stuck:
                await asyncio.sleep(EXPIRY_RETRY)  # never a loop that does not yield
                continue
            if any(at <= now for at in deadlines.values()):
                continue  # what came back may have a deadline of its own, passed as well
            wait = min((at - now).total_seconds() for at in deadlines.values()) if deadlines else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deadlines_changed.wait(), wait)

    async def _expire(self, slot: int, peer: Peer) -> None:
        reg = self.registry
        async with self._locked(slot):
            handler = reg.handlers.get(slot)
            record = handler.record if handler is not None else None
            if record is None or record.expires_at is None or record.expires_at > datetime.now(UTC):
                return  # changed meanwhile
            back = record.previous
            prog = None
            if back is not None and back.source_sha256 is not None:
                try:
                    prog = await self._rebuild(back)
                except (TailcalldError, OSError, ValueError) as err:
                    logger.error("slot %s: the attach of %s ended, and %s, which it replaced, could not be rebuilt "
                                 "(%s); the slot is emptied", reg.label(slot), record.function, back.function, err)
            if prog is not None and back is not None:
                new = Handler(back.model_copy(update={"prog_id": prog.id, "maps": map_records(prog.maps)}), prog,
                              requested_function=back.function)
                try:
                    old = reg.commit(slot, new)
                except BaseException:
                    prog.close()
                    raise
                what = f"back to {back.function} as program {prog.id}"
            else:
                old = reg.commit(slot, None)
                what = "emptied" if back is None else f"emptied ({back.function} could not be rebuilt)"
            self._release_idle_exit()
            if old is not None:
                old.close()
                reg.release_unused_pins(old.record.source_sha256)
        self._on_change()
        self._audit("expire", peer, slot, record.prog_id, record.source_sha256,
                    f"{record.function} in slot {reg.label(slot)} (program {record.prog_id}) ended at "
                    f"{record.expires_at:%Y-%m-%dT%H:%M:%SZ}: {what}",
                    {"FILENAME": record.filename or "", "FUNCTION": record.function or ""})

    async def _rebuild(self, record: SlotRecord) -> Program:
        """A recorded handler loaded again from its saved source (the compile cache's, at once)."""
        await self.kernel.prepare(record.slot)
        return await reconcile.load_recorded(self.registry, record)

    def _check_expected(self, slot: int, expect: Expect | None) -> None:
        """Compare-and-swap: raise Conflict unless the slot holds the expected program.  Called
        with the slot's lock held, which every change of the slot takes: nothing can change it
        between this check and the change's commit."""
        if expect is None:
            return
        handler = self.registry.handlers.get(slot)
        current = handler.record.prog_id if handler is not None else None
        if current == (None if expect == "empty" else expect):
            return
        nr, hook = self.syscalls.split(slot)
        holds = f"holds program {current}" if current is not None else "is empty"
        wanted = "empty" if expect == "empty" else f"program {expect}"
        raise Conflict(f"slot {self.registry.label(slot)} {holds}, not {wanted} as expected; nothing was changed",
                       {"slot": nr, "hook": hook, "expected": expect, "current": current})

    async def attach(self, slot_spec: int | str, artifact: Artifact, function: str | None, filename: str,
                     peer: Peer, fresh: bool = False, hook: Hook = "enter", journal: bool = False,
                     expect: Expect | None = None, expires_at: datetime | None = None,
                     cgroup: str | None = None, priority: int | None = None) -> Attached:
        """Put the handler in the slot (its exit slot for ``hook="exit"``).  Unless ``fresh``, a
        program already loaded from the same artifact and function is reused (no compile): it then
        shares its maps with its other slots.  ``expect``: only if the slot holds that program
        (or is "empty"), else Conflict.  ``expires_at``: then the slot goes back to what it holds
        now (``expire_due``).  ``cgroup``: it runs only for tasks in that cgroup v2 subtree
        (scope.py).  ``priority``: one of the slot's handlers, run in order, lowest first
        (chain.py).  A failure is audited, then raised."""
        try:
            return await self._attach(slot_spec, artifact, function, filename, peer, fresh, hook, journal, expect,
                                      expires_at, cgroup, priority)
        except Exception as err:
            self.audit_failure("attach", peer, slot_spec, hook, err,
                               audit.attach_fields(filename, function, artifact, cgroup), priority)
            raise

    async def _attach(self, slot_spec: int | str, artifact: Artifact, function: str | None, filename: str,
                      peer: Peer, fresh: bool, hook: Hook, journal: bool, expect: Expect | None,
                      expires_at: datetime | None, cgroup: str | None, priority: int | None) -> Attached:
        slot = self._key(slot_spec, hook, priority)
        if cgroup is not None and priority is not None:
            raise BadRequest("a handler with a priority cannot be scoped to a cgroup (yet): give --priority or "
                             "--cgroup, not both", {"cgroup": cgroup, "priority": priority})
        if cgroup is not None:
            check_cgroup_path(cgroup)  # before any compile: a misspelt path costs nothing
        reg = self.registry
        self._check_open()  # before the lock: unload-all holds every lock for good
        async with self._locked(slot):
            self._check_open()
            self._check_expected(slot, expect)  # under the lock, so until the commit below
            self._check_chain(slot, filename, expect)
            # An attach with a deadline always replaces: what it replaces is what comes back.
            same = None if fresh or expires_at else self.running_as_asked(slot, artifact, function, journal, cgroup)
            if same is not None:  # not touched, not audited: nothing changes
                # Its warnings again (headers that do not match the kernel): they still hold.
                return Attached(slot, self.syscalls.label(slot), same.record.function or "?", same.record.prog_id,
                                same.prog.insns if same.prog is not None else 0, None,
                                warnings=same.prog.warnings if same.prog is not None else (), unchanged=True)
            prog = (None if fresh else self._already_loaded(artifact, function)) \
                or await self.kernel.load(artifact, function)
            try:
                with self.filling_exit_slots():  # the dispatcher prepare attaches stays until commit
                    try:
                        await self.kernel.prepare(slot)  # the exit dispatcher, before the first exit slot
                    except BaseException:
                        prog.close()
                        reg.release_unused_pins(artifact.sha256)
                        raise
                    # From here to the kernel update nothing awaits: no other change interleaves.
                    try:
                        replaced = self.kernel.slot(slot)
                        record = SlotRecord(slot=self.syscalls.base(slot), priority=priority, function=prog.function,
                                            prog_id=prog.id, dialect=artifact.dialect,
                                            source_sha256=reg.store.put_artifact(artifact), filename=filename,
                                            headers=artifact.header_sha256s, attached_by_uid=peer.uid,
                                            attached_at=datetime.now(UTC), journal=journal,
                                            variables=dict(artifact.variables), defines=dict(artifact.defines),
                                            maps=map_records(prog.maps), expires_at=expires_at, cgroup=cgroup,
                                            previous=self._held_before(slot) if expires_at else None)
                        old = reg.commit(slot, Handler(record, prog, requested_function=function))
                    except BaseException:
                        prog.close()
                        reg.release_unused_pins(artifact.sha256)
                        raise
            except BaseException:
                self._release_idle_exit()
                raise
            if old is not None:
                old.close()
                reg.release_unused_pins(old.record.source_sha256)
            self.misses.held_handler(self.syscalls.base(slot))
        self._on_change()
        self._deadlines_changed.set()
        self._audit("replace" if replaced is not None else "attach", peer, slot, prog.id, record.source_sha256,
                    f"{prog.function} ({artifact.dialect}) in slot {reg.label(slot)}: program {prog.id}"
                    + (f", for cgroup {cgroup}" if cgroup is not None else "")
                    + (f", was {replaced}" if replaced is not None else ""),
                    audit.attach_fields(filename, prog.function, None, cgroup))
        return Attached(slot, self.syscalls.label(slot), prog.function, prog.id, prog.insns, replaced, prog.log,
                        prog.warnings)

    def running_as_asked(self, slot: int, artifact: Artifact, function: str | None, journal: bool,
                         cgroup: str | None = None) -> Handler | None:
        """The slot's handler if it is this very handler (registry.differences), scoped alike, and
        the kernel's slot holds its program: asking for it again changes nothing."""
        h = self.registry.handlers.get(slot)
        if h is None or differences(h.record, artifact, function, journal, cgroup):
            return None
        if function is None and h.requested_function is not None:
            return None  # it was chosen among several: without --function the file may not say which
        return h if self.kernel.slot(slot) == h.record.prog_id else None

    def reusable_program(self, artifact: Artifact, function: str | None) -> Program | None:
        """For apply (plan.py): see _already_loaded."""
        return self._already_loaded(artifact, function)

    def check_open(self) -> None:
        """For apply (plan.py): refuse changes once unload-all began."""
        self._check_open()

    def audit(self, action: str, peer: Peer, slot: int | None, prog_id: int, sha: str | None, what: str) -> None:
        """For apply (plan.py): a change to the journal, as attach and detach write theirs."""
        self._audit(action, peer, slot, prog_id, sha, what)

    def transaction_done(self) -> None:
        """For apply --atomic (plan.py): one more all-or-nothing change made."""
        self.atomic_applies += 1

    def after_change(self, filled: list[int]) -> None:
        """For apply (plan.py), once its changes are made: the exit dispatcher let go if no exit
        slot is left, the miss counters told of the slots that hold a handler now, STATUS= redone."""
        self._release_idle_exit()
        for slot in filled:
            self.misses.held_handler(self.syscalls.base(slot))
        self._on_change()

    def _already_loaded(self, artifact: Artifact, function: str | None) -> Program | None:
        """The program another slot (or this one) already runs for the same handler, with an fd
        of its own: a warm attach needs no compile and no load.  The same handler is the same
        file, dialect, function and loader settings (--set, -D)."""
        for h in self.registry.handlers.values():
            r = h.record
            if (h.prog is not None and r.source_sha256 == artifact.sha256 and r.dialect == artifact.dialect
                    and h.requested_function == function and settings(r.variables) == artifact.variables
                    and settings(r.defines) == artifact.defines):
                return h.prog.dup()
        return None

    async def check(self, artifact: Artifact, function: str | None) -> Checked:
        """Compile and load for the verifier's verdict only; the program is dropped at once."""
        prog = await self.kernel.load(artifact, function)
        prog.close()
        self.registry.release_unused_pins(artifact.sha256)
        return Checked(prog.function, artifact.dialect, prog.insns, prog.log, prog.warnings)

    async def detach(self, slot_spec: int | str, peer: Peer, hook: Hook = "enter", expect: Expect | None = None,
                     priority: int | None = None) -> Detached:
        """Empty the slot (``priority``: take that handler out of its chain, the others stay).  A
        failure (an empty slot among them) is audited, then raised."""
        try:
            return await self._detach(slot_spec, peer, hook, expect, priority)
        except Exception as err:
            self.audit_failure("detach", peer, slot_spec, hook, err, {}, priority)
            raise

    def _key(self, slot_spec: int | str, hook: Hook, priority: int | None) -> int:
        if priority is not None and not 0 <= priority <= MAX_PRIORITY:
            raise BadRequest(f"priority {priority} is out of range: priorities are 0..{MAX_PRIORITY}",
                             {"priority": priority, "max": MAX_PRIORITY})
        return self.syscalls.link_key(self.syscalls.key(self.syscalls.resolve(slot_spec), hook), priority)

    async def _detach(self, slot_spec: int | str, peer: Peer, hook: Hook, expect: Expect | None,
                      priority: int | None) -> Detached:
        slot = self._key(slot_spec, hook, priority)
        reg = self.registry
        self._check_open()  # before the lock: unload-all holds every lock for good
        async with self._locked(slot):
            self._check_open()
            links = self.links_of(slot) if priority is None else {}
            if links:
                nr, hook = self.syscalls.split(slot)
                raise PriorityClash(f"slot {reg.label(slot)} runs handlers in order (priorities "
                                    f"{', '.join(map(str, sorted(links)))}): say which to detach with --priority",
                                    {"slot": nr, "hook": hook, "priority": None, "priorities": sorted(links)})
            self._check_expected(slot, expect)
            prog_id = self.kernel.slot(slot)
            known = slot in reg.handlers or slot in reg.unrestored
            if prog_id is None and not known:
                raise SlotEmpty(f"slot {reg.label(slot)} holds no handler", {"slot": slot})
            # Also when the kernel slot is empty already: what we recorded for it is forgotten.
            old = reg.commit(slot, None)
            if old is not None:
                old.close()
                reg.release_unused_pins(old.record.source_sha256)
            self._release_idle_exit()  # the last exit slot: the exit path runs no program again
            if prog_id is None:
                raise SlotEmpty(f"slot {reg.label(slot)} holds no handler", {"slot": slot})
        self._on_change()
        sha = old.record.source_sha256 if old else None
        self._audit("detach", peer, slot, prog_id, sha, f"program {prog_id} from slot {reg.label(slot)}")
        return Detached(slot, self.syscalls.label(slot), prog_id)

    async def unload_all(self, peer: Peer) -> Unloaded:
        """Empty every slot, forget the desired state and unpin the dispatcher: nothing of
        tailcalld stays in the kernel.  No change is accepted afterwards (the daemon stops)."""
        self._unloading = True  # refuse new changes; wait for those under way
        reg = self.registry
        for lock in list(reg.locks.values()):
            await lock.acquire()  # never released: the daemon exits after an unload
        slots = sorted(reg.handlers)
        reg.unrestored.clear()
        reg.restoring.clear()
        reg.store.save(StateFile())
        for slot in slots:
            self.kernel.clear_slot(slot)
            reg.handlers.pop(slot).close()
        pins = self.kernel.remove_pins()
        self._on_change()
        self._audit("unload", peer, None, self.kernel.info.prog_id, None,
                    f"everything: {len(slots)} slots emptied, dispatcher and pins removed")
        return Unloaded(sorted({self.syscalls.base(slot) for slot in slots}), pins)

    def _audit(self, action: str, peer: Peer, slot: int | None, prog_id: int, sha: str | None, what: str,
               more: AuditFields | None = None) -> None:
        fields: AuditFields = {"PROG_ID": prog_id, **(more or {})}
        if slot is not None:
            fields |= self._slot_fields(slot)
        if sha is not None:
            fields["SOURCE_SHA256"] = sha
        audit.changed(action, peer, what, fields)

    def audit_failure(self, action: str, peer: Peer, slot_spec: int | str, hook: Hook, err: BaseException,
                      fields: AuditFields, priority: int | None = None) -> None:
        """An attach or detach that failed, with the slot as resolved (as requested when it
        names no slot) and the error the client got."""
        try:
            slot = self._key(slot_spec, hook, priority)
        except TailcalldError:
            where, fields = f"slot {str(slot_spec)[:audit.MAX_SLOT_CHARS]!r}", fields | audit.requested_slot(slot_spec)
            filename = fields.get("FILENAME")
            audit.failed(action, peer, f"{filename} in {where}" if filename else where, err, fields)
        else:
            self.audit_failure_in(action, peer, slot, err, fields)

    def audit_failure_in(self, action: str, peer: Peer, slot: int, err: BaseException, fields: AuditFields) -> None:
        """As audit_failure, for a slot key already resolved (an apply's slots too)."""
        where, filename = f"slot {self.registry.label(slot)}", fields.get("FILENAME")
        audit.failed(action, peer, f"{filename} in {where}" if filename else where, err,
                     fields | self._slot_fields(slot))

    def _slot_fields(self, slot: int) -> AuditFields:
        nr, hook = self.syscalls.split(slot)
        fields: AuditFields = {"SLOT": nr, "SLOT_HOOK": hook, "SYSCALL_NAME": self.syscalls.label(slot)}
        priority = self.syscalls.priority(slot)
        if priority is not None:
            fields["SLOT_PRIORITY"] = priority
        return fields

    # -- views ----------------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        return len(self.registry.handlers)

    def list_slots(self) -> list[SlotView]:
        """Every wanted slot, with what the kernel holds there right now: a slot emptied or
        refilled behind our back shows as such before the next drift repair.  Slots whose
        handler could not be rebuilt at start are listed too (their kernel slot is empty or
        holds what was found there)."""
        missed, counts = self._recent_counts()
        label = self.syscalls.label
        reg = self.registry
        base = self.syscalls.base
        return [SlotView(record, label(slot), *self.syscalls.split(slot), self.kernel.slot(slot),
                         self._hits(base(slot), missed, counts), self.misses.since_start(base(slot), missed),
                         self._scope_missed(base(slot), counts), slot not in reg.unrestored, slot in reg.restoring)
                for slot, record in sorted(reg.wanted().items())]

    def _recent_counts(self) -> tuple[list[int], Counts]:
        """Misses, calls and scope misses as one snapshot, shared by list and status like the
        miss counters alone were.  The others are read right after the misses: a miss between
        the reads can only make a slot's hits one too high, never negative or stale by a whole
        interval.  The scope's counters are read only while some slot is scoped."""
        missed = self.misses.recent_totals()
        if self._calls_seen is None or self._calls_seen[0] is not missed:
            calls = self.calls.read()
            scoped = self.scope_misses.read() if self._scoped() else self.scope_misses.baseline
            self._calls_seen = (missed, Counts(calls, scoped))
        return missed, self._calls_seen[1]

    def _scoped(self) -> dict[int, str]:
        """Slot key -> cgroup path of every scoped slot tailcalld runs."""
        return {slot: h.record.cgroup for slot, h in self.registry.handlers.items() if h.record.cgroup is not None}

    def _chained(self) -> set[int]:
        """Slot keys whose handlers have priorities."""
        return {self.syscalls.base(key) for key in self.registry.handlers if self.syscalls.priority(key) is not None}

    def _scope_missed(self, slot: int, counts: Counts) -> int:
        return max(0, self.scope_misses.since_start(slot, counts.scope_misses))

    def _hits(self, slot: int, missed: list[int], counts: Counts) -> int:
        return max(0, self.calls.since_start(slot, counts.calls) - self.misses.since_start(slot, missed)
                   - self._scope_missed(slot, counts))

    def counted_slots(self) -> list[tuple[int, int, int]]:
        """(slot key, hits, misses) since this daemon started, from the snapshot list and status
        share: every wanted slot, and every watched one whose calls moved (the misses of a slot
        whose handler was detached, a watch_misses slot).  For metrics."""
        missed, counts = self._recent_counts()
        moved = (key for key in range(len(counts.calls))
                 if self.calls.since_start(key, counts.calls) and self.misses.watched(key))
        return [(key, self._hits(key, missed, counts), self.misses.since_start(key, missed))
                for key in sorted({self.syscalls.base(k) for k in self.registry.wanted()}.union(moved))]

    def syscall_table(self, pattern: str | None) -> list[SyscallView]:
        held: dict[int, SlotRecord] = {}  # slot key -> its handler (the first, when it runs several)
        for key, h in sorted(self.registry.handlers.items(), reverse=True):
            held[self.syscalls.base(key)] = h.record
        return [SyscallView(abi, nr, name, slot, held.get(slot) if slot is not None else None)
                for abi, nr, name, slot in self.syscalls.matching(pattern)]

    def status(self) -> Status:
        missed, counts = self._recent_counts()
        # Hits of the slots tailcalld fills: elsewhere calls and misses are equal, and summing
        # two racing totals over every syscall of the machine would only add noise.
        hits = sum(self._hits(slot, missed, counts) for slot in {self.syscalls.base(k) for k in self.registry.handlers})
        ends = [h.record.expires_at for h in self.registry.handlers.values() if h.record.expires_at is not None]
        return Status(self.started_at, os.getpid(), self.kernel.info, self.slots_in_use, self.restoring,
                      min(ends, default=None), len(self._scoped()), len(self._chained()), self.atomic_applies, hits,
                      sum(missed) - sum(self.misses.baseline), list(self.registry.corrections))

    def close(self) -> None:
        """Drop our program fds and the state folder; the pinned prog array keeps every handler running."""
        try:
            self.registry.flush()
        except StateUnwritable as err:
            logger.error("the state file could not be brought up to date: %s", err.message)
        for h in self.registry.handlers.values():
            h.close()
        self.registry.handlers.clear()
        self.registry.store.close()
