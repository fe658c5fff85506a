"""Making the kernel and the desired state agree: once at start, then against drift.

The rule, per slot, when the state file is readable (it is the desired state):

* the slot runs the recorded program: adopted as is;
* the slot is empty or runs another program (reboot, crash mid-change, bpftool): the
  recorded handler is rebuilt from its saved source and put back;
* the slot is filled but nothing is recorded for it: it is emptied.

The start is split in two (``begin_restore``, ``finish_restore``) so that the socket answers
while handlers are rebuilt: everything that needs no compile is done before anything is
served, and the slots to rebuild are left *restoring*, each behind its slot's lock (a change
asked for meanwhile waits for that slot alone).  The rebuilds then run side by side, as many at
once as the compiler allows (one per core), and load from the compile cache what was compiled
before (program_cache.py).

With no state file, or an unreadable one (moved aside), the kernel wins: what runs is adopted
and recorded with its source unknown.  Every correction is logged and kept for status.

A program found running is adopted by id.  tailcalld pins each program it puts in a slot
(pin_dir/handlers/progs/<id>), so an adopted one is held by fd again (a slot emptied behind
our back gets it back without a compile, a warm attach reuses it) and named; a program without
that pin (put there by an older tailcalld or by someone else) is adopted by id alone, since
opening a program by id needs CAP_SYS_ADMIN: its name is unknown and an emptied slot cannot
get it back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from .compiler import Program
from .errors import StateUnwritable, TailcalldError
from .loader_settings import settings
from .registry import Handler, Registry
from .state import SlotRecord, StateFile, map_records
from .wire_limits import MAX_PRIORITY

# What makes two records one program: the same handler (source, dialect, function) that ran
# as the same program before.  Slots attached with --fresh ran separate programs: they stay apart.
ShareKey = tuple[str | None, str | None, str | None, int]


def unknown_record(registry: Registry, slot: int, prog_id: int) -> SlotRecord:
    """The record of a program found in the kernel with no source we know."""
    return SlotRecord(slot=registry.syscalls.base(slot), function=registry.kernel.prog_name(prog_id), prog_id=prog_id,
                      source_sha256=None, filename=None, attached_by_uid=None, attached_at=None,
                      priority=registry.syscalls.priority(slot))


def adopted(registry: Registry, record: SlotRecord) -> Handler:
    """The handler of a program found running as ``record`` says, held by fd when it is pinned."""
    prog = registry.kernel.program(record.prog_id, record.function)
    return Handler(record, prog, requested_function=record.function)


def adopted_unknown(registry: Registry, slot: int, prog_id: int) -> Handler:
    return adopted(registry, unknown_record(registry, slot, prog_id))


@dataclass
class Restore:
    """The slots a start rebuilds (slot -> what runs there, its record), and how it went."""

    pending: dict[int, tuple[int | None, SlotRecord]]
    started: float = field(default_factory=time.monotonic)
    rebuilt: int = 0
    from_cache: int = 0
    failed: int = 0
    adopted: int = 0  # found running as recorded: nothing to do
    seconds: float = 0.0  # from the start of begin_restore to the last slot rebuilt

    @property
    def summary(self) -> str:
        cached = f", {self.from_cache} loaded from the compile cache and {self.rebuilt - self.from_cache} compiled"
        return (f"restore: {self.rebuilt} of {len(self.pending)} slots rebuilt in {self.seconds:.2f} s"
                + (cached if self.rebuilt else "") + (f", {self.failed} could not be" if self.failed else "")
                + f"; {self.adopted} found running as recorded")

    @property
    def fields(self) -> dict[str, object]:
        """The journal entry's fields (journalctl TAILCALLD_RESTORE=1 -o json)."""
        return {"TAILCALLD_RESTORE": 1, "TAILCALLD_RESTORE_SECONDS": f"{self.seconds:.3f}",
                "TAILCALLD_RESTORE_SLOTS": len(self.pending), "TAILCALLD_RESTORE_REBUILT": self.rebuilt,
                "TAILCALLD_RESTORE_CACHE_HITS": self.from_cache, "TAILCALLD_RESTORE_FAILED": self.failed,
                "TAILCALLD_RESTORE_ADOPTED": self.adopted}


async def restore(registry: Registry) -> Restore:
    """The whole restore at once (tests, and tools that serve nothing meanwhile)."""
    plan = await begin_restore(registry)
    await finish_restore(registry, plan)
    return plan


async def begin_restore(registry: Registry) -> Restore:
    """At start, before anything is served (no lock is needed: nothing else runs): everything
    that needs no compile.  The slots left to rebuild are in ``registry.restoring``, each with
    its lock held, until ``finish_restore``."""
    started = time.monotonic()
    registry.store.prepare()
    loaded = registry.store.load()
    if loaded.problem:
        registry.correct(loaded.problem, error=True)
    records = _usable_records(registry, loaded.state) if loaded.found else {}
    kernel = registry.kernel.occupied()
    plan = Restore({}, started)
    if not loaded.found:
        for slot, prog_id in sorted(kernel.items()):
            registry.handlers[slot] = adopted_unknown(registry, slot, prog_id)
            if loaded.problem:
                registry.correct(f"slot {registry.label(slot)}: kept program {prog_id} found in the kernel "
                                 "(source unknown: it cannot be rebuilt after a reboot)")
    else:
        for slot in sorted(set(kernel) | set(records)):
            _restore_at_once(registry, slot, kernel.get(slot), records.get(slot), plan)
    registry.keep_programs()
    for slot, (_, record) in plan.pending.items():
        registry.restoring[slot] = record
        await registry.locks[slot].acquire()  # nobody else holds it yet: at once
    if not (loaded.found and registry.desired() == loaded.state):  # a read-only state_dir is no reason not to start
        _save(registry)
    return plan


def _save(registry: Registry) -> None:
    try:
        registry.save()
    except StateUnwritable as err:
        # The kernel is as desired already; only the record of it is behind.  Refusing to start
        # would not undo anything, so run on and write it at the next chance.
        registry.save_later()
        registry.correct(f"{err.message}; tailcalld runs on and writes the state at the next chance", error=True)


def _usable_records(registry: Registry, state: StateFile) -> dict[int, SlotRecord]:
    """The records that name a slot the dispatchers have, by slot key (``SyscallTable.key``).
    Any other (slot 5000, or a key that disagrees with its record) is set aside: logged, kept in
    a copy of the state file, and left out, so one bad entry does not stop the start or the
    other slots."""
    nr_slots = registry.kernel.info.nr_slots
    usable: dict[int, SlotRecord] = {}
    bad: list[tuple[str, int, SlotRecord]] = []
    for hook, slots in (("enter", state.slots), ("exit", state.exit_slots)):
        for nr, r in sorted(slots.items()):
            if not 0 <= nr < nr_slots or r.slot != nr:
                bad.append((hook, nr, r))
                continue
            key = registry.syscalls.key(nr, "enter" if hook == "enter" else "exit")
            usable[key] = r.model_copy(update={"slot": key}) if key != nr else r
    for hook, links in (("enter", state.links), ("exit", state.exit_links)):
        for r in links:
            base = registry.syscalls.key(r.slot, "enter" if hook == "enter" else "exit") \
                if 0 <= r.slot < nr_slots else None
            link = registry.syscalls.link_key(base, r.priority) if base is not None and r.priority is not None \
                and 0 <= r.priority <= MAX_PRIORITY else None
            if base is None or link is None or link in usable or base in usable:
                bad.append((hook, r.slot, r))  # no such slot or priority, twice, or beside a handler without one
                continue
            usable[link] = r.model_copy(update={"slot": base}) if base != r.slot else r
    if bad:
        try:
            kept = f"a copy of the file is kept as {registry.store.keep_aside('set-aside')}"
        except (StateUnwritable, OSError) as exc:
            kept = f"no copy of the file could be kept ({exc})"
        for hook, nr, r in bad:
            where = "exit " if hook == "exit" else ""
            if r.priority is not None:
                registry.correct(f"state file {where}link (slot {r.slot}, priority {r.priority}, {r.function} from "
                                 f"{r.filename}) names no slot of 0..{nr_slots - 1} or priority of 0..{MAX_PRIORITY}, "
                                 f"or one taken; it is set aside ({kept})", error=True)
                continue
            registry.correct(f"state file {where}entry {nr} (slot {r.slot}, {r.function} from {r.filename}) names "
                             f"no slot of 0..{nr_slots - 1}; it is set aside ({kept})", error=True)
    return usable


def _restore_at_once(registry: Registry, slot: int, running: int | None, record: SlotRecord | None,
                     plan: Restore) -> None:
    """What a slot needs that takes no compile; a slot to rebuild goes to ``plan.pending``."""
    label = registry.label(slot)
    if record is None:
        assert running is not None
        registry.kernel.clear_slot(slot)
        registry.correct(f"slot {label}: removed program {running}, which is not in the desired state")
        return
    if running == record.prog_id:
        registry.handlers[slot] = adopted(registry, record)
        plan.adopted += 1
        return
    if record.source_sha256 is None:
        if running is None:
            registry.correct(f"slot {label}: program {record.prog_id} is gone and its source "
                             "is unknown; the slot stays empty", error=True)
        else:
            registry.handlers[slot] = adopted_unknown(registry, slot, running)
            registry.correct(f"slot {label}: kept program {running} found in the kernel")
        return
    plan.pending[slot] = (running, record)


async def finish_restore(registry: Registry, plan: Restore) -> None:
    """Rebuild the slots ``begin_restore`` left restoring, side by side; each slot's lock is
    released as soon as its slot is done.  Slots that shared one program before (a warm attach)
    share one again, maps included, instead of getting a copy each.  Cancelled (a stop during
    the restore), the slots not rebuilt keep their records for the next start."""
    groups: dict[ShareKey, list[int]] = {}
    for slot, (_, record) in sorted(plan.pending.items()):
        key: ShareKey = (record.source_sha256, record.dialect, record.function, record.prog_id)
        groups.setdefault(key, []).append(slot)
    try:
        await asyncio.gather(*(_rebuild_group(registry, slots, plan) for slots in groups.values()))
    finally:
        for slot in list(registry.restoring):  # cancelled: recorded, not rebuilt
            registry.unrestored[slot] = registry.restoring.pop(slot)
            _release(registry, slot)
        if plan.pending:  # also when cancelled: the slots rebuilt so far are not rebuilt again
            registry.keep_programs()
            _save(registry)  # the rebuilt slots' new program ids
    plan.seconds = time.monotonic() - plan.started


def _release(registry: Registry, slot: int) -> None:
    lock = registry.locks[slot]
    if lock.locked():
        lock.release()


async def _rebuild_group(registry: Registry, slots: list[int], plan: Restore) -> None:
    """Rebuild the first slot's handler and give every slot of ``slots`` (one program before)
    that program."""
    prog: Program | None = None
    try:
        for slot in slots:
            running, record = plan.pending[slot]
            try:
                await registry.kernel.prepare(slot)  # an exit slot's dispatcher, gone with a reboot
                if prog is None:
                    prog = await load_recorded(registry, record)
                    plan.from_cache += prog.from_cache
                    _put_back(registry, slot, running, record, prog, shared=False)
                else:
                    _put_back(registry, slot, running, record, prog.dup(), shared=True)
                plan.rebuilt += 1
            except (TailcalldError, OSError, ValueError) as err:
                _not_rebuilt(registry, slot, running, record, err)
                plan.failed += 1
            # Done with either way.  Cancelled (a stop), the slot stays restoring for
            # finish_restore to keep its record.
            registry.restoring.pop(slot, None)
            _release(registry, slot)
    finally:
        if prog is not None and all(h.prog is not prog for h in registry.handlers.values()):
            prog.close()  # its slot could not take it


async def load_recorded(registry: Registry, record: SlotRecord) -> Program:
    """The handler ``record`` names, loaded again from its saved source and settings (from the
    compile cache when it was compiled before).  Raises what loading raises, and ValueError for
    a saved source that does not match its hash."""
    assert record.source_sha256 is not None  # only a record with a source is rebuilt
    artifact = replace(registry.store.artifact(record.source_sha256, record.dialect, record.headers),
                       filename=record.filename, variables=settings(record.variables), defines=settings(record.defines))
    return await registry.kernel.load(artifact, record.function)


def _put_back(registry: Registry, slot: int, running: int | None, record: SlotRecord, prog: Program,
              shared: bool) -> None:
    try:
        registry.kernel.set_slot(slot, prog, record.cgroup)
    except BaseException:
        if shared:
            prog.close()
        raise
    rebuilt_record = record.model_copy(update={"prog_id": prog.id, "maps": map_records(prog.maps)})
    registry.handlers[slot] = Handler(rebuilt_record, prog, requested_function=record.function)
    registry.generation += 1  # a view of the kernel read before this is stale (repair_drift)
    what = "was empty" if running is None else f"held program {running}, not the recorded {record.prog_id}"
    how = ", shared as before" if shared else " from the compile cache" if prog.from_cache else ""
    registry.correct(f"slot {registry.label(slot)} {what}: rebuilt {record.function} from {record.filename} "
                     f"as program {prog.id}{how}")


def _not_rebuilt(registry: Registry, slot: int, running: int | None, record: SlotRecord, err: Exception) -> None:
    if running is None:  # nothing runs there: keep the record, the next start tries again
        registry.unrestored[slot] = record
        outcome = "the slot stays empty until a start can rebuild it"
    else:  # something runs there: keep it rather than trace nothing
        registry.handlers[slot] = adopted_unknown(registry, slot, running)
        outcome = f"program {running}, found in the slot, is kept"
    registry.correct(f"slot {registry.label(slot)}: could not rebuild {record.function} from "
                     f"{record.filename} ({err}); {outcome}", error=True)


def repair_drift(registry: Registry, kernel: dict[int, int], generation: int) -> None:
    """While running, apply the same rule to changes made behind our back (bpftool): a slot of
    ours that was emptied or refilled gets our program back (we hold its fd: no compile), a slot
    filled by someone else is emptied.

    ``kernel`` was read (off the event loop) when the registry was at ``generation``; if any
    change was committed since, the view is stale and this round is skipped.  Slots being
    changed right now are left to their change."""
    if generation != registry.generation:
        return
    for slot in sorted(set(kernel) | set(registry.handlers)):
        if registry.busy(slot):
            continue
        running, ours = kernel.get(slot), registry.handlers.get(slot)
        if ours is None:
            registry.kernel.clear_slot(slot)
            registry.correct(f"slot {registry.label(slot)}: removed program {running}, put there outside tailcalld")
        elif running != ours.record.prog_id:
            _repair_slot(registry, slot, running, ours)


def _repair_slot(registry: Registry, slot: int, running: int | None, ours: Handler) -> None:
    what = "was emptied" if running is None else f"held program {running}"
    label = registry.label(slot)
    if ours.prog is not None:
        registry.kernel.set_slot(slot, ours.prog, ours.record.cgroup)
        registry.correct(f"slot {label} {what} outside tailcalld: put program {ours.prog.id} "
                         f"({ours.record.function}) back")
    elif running is None:  # adopted by id alone: no handle to put back
        registry.commit(slot, None, already_in_kernel=True)
        registry.correct(f"slot {label} {what} outside tailcalld; its program {ours.record.prog_id} "
                         "cannot be put back (adopted by id alone: tailcalld holds no handle on it)", error=True)
    else:
        registry.commit(slot, adopted_unknown(registry, slot, running), already_in_kernel=True)
        registry.correct(f"slot {label} {what} outside tailcalld; kept it (the program it replaced, "
                         f"{ours.record.prog_id}, has an unknown source)")
