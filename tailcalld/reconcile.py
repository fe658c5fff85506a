"""Making the kernel and the desired state agree: once at start, then against drift.

The rule, per slot, when the state file is readable (it is the desired state):

* the slot runs the recorded program: adopted as is;
* the slot is empty or runs another program (reboot, crash mid-change, bpftool): the
  recorded handler is rebuilt from its saved source and put back;
* the slot is filled but nothing is recorded for it: it is emptied.

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

from dataclasses import replace

from .compiler import Program
from .errors import StateUnwritable, TailcalldError
from .loader_settings import settings
from .registry import Handler, Registry
from .state import SlotRecord, StateFile, map_records

# What makes two records one program: the same handler (source, dialect, function) that ran
# as the same program before.  Slots attached with --fresh ran separate programs: they stay apart.
ShareKey = tuple[str | None, str | None, str | None, int]


def unknown_record(registry: Registry, slot: int, prog_id: int) -> SlotRecord:
    """The record of a program found in the kernel with no source we know."""
    return SlotRecord(slot=slot, function=registry.kernel.prog_name(prog_id), prog_id=prog_id,
                      source_sha256=None, filename=None, attached_by_uid=None, attached_at=None)


def adopted(registry: Registry, record: SlotRecord) -> Handler:
    """The handler of a program found running as ``record`` says, held by fd when it is pinned."""
    prog = registry.kernel.program(record.prog_id, record.function)
    return Handler(record, prog, requested_function=record.function)


def adopted_unknown(registry: Registry, slot: int, prog_id: int) -> Handler:
    return adopted(registry, unknown_record(registry, slot, prog_id))


async def restore(registry: Registry) -> None:
    """At start, before anything is served: no lock is needed, nothing else runs."""
    registry.store.prepare()
    loaded = registry.store.load()
    if loaded.problem:
        registry.correct(loaded.problem, error=True)
    records = _usable_records(registry, loaded.state) if loaded.found else {}
    kernel = registry.kernel.occupied()
    if not loaded.found:
        for slot, prog_id in sorted(kernel.items()):
            registry.handlers[slot] = adopted_unknown(registry, slot, prog_id)
            if loaded.problem:
                registry.correct(f"slot {registry.label(slot)}: kept program {prog_id} found in the kernel "
                                 "(source unknown: it cannot be rebuilt after a reboot)")
    else:
        rebuilt: dict[ShareKey, Program] = {}
        for slot in sorted(set(kernel) | set(records)):
            await _restore_slot(registry, slot, kernel.get(slot), records.get(slot), rebuilt)
    registry.keep_programs()
    if loaded.found and registry.desired() == loaded.state:
        return  # nothing to write: a read-only state_dir is no reason not to start
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
    if bad:
        try:
            kept = f"a copy of the file is kept as {registry.store.keep_aside('set-aside')}"
        except (StateUnwritable, OSError) as exc:
            kept = f"no copy of the file could be kept ({exc})"
        for hook, nr, r in bad:
            where = "exit " if hook == "exit" else ""
            registry.correct(f"state file {where}entry {nr} (slot {r.slot}, {r.function} from {r.filename}) names "
                             f"no slot of 0..{nr_slots - 1}; it is set aside ({kept})", error=True)
    return usable


async def _restore_slot(registry: Registry, slot: int, running: int | None, record: SlotRecord | None,
                        rebuilt: dict[ShareKey, Program]) -> None:
    """``rebuilt``: the programs this start has rebuilt so far, so that slots which shared one
    program before (a warm attach) share one again, maps included, instead of getting a copy each."""
    label = registry.label(slot)
    if record is None:
        assert running is not None
        registry.kernel.clear_slot(slot)
        registry.correct(f"slot {label}: removed program {running}, which is not in the desired state")
        return
    if running == record.prog_id:
        registry.handlers[slot] = adopted(registry, record)
        return
    if record.source_sha256 is None:
        if running is None:
            registry.correct(f"slot {label}: program {record.prog_id} is gone and its source "
                             "is unknown; the slot stays empty", error=True)
        else:
            registry.handlers[slot] = adopted_unknown(registry, slot, running)
            registry.correct(f"slot {label}: kept program {running} found in the kernel")
        return
    key: ShareKey = (record.source_sha256, record.dialect, record.function, record.prog_id)
    shared = rebuilt.get(key)
    try:
        await registry.kernel.prepare(slot)  # an exit slot's dispatcher, gone with a reboot
        if shared is not None:
            prog = shared.dup()
        else:
            artifact = replace(registry.store.artifact(record.source_sha256, record.dialect, record.headers),
                               filename=record.filename, variables=settings(record.variables),
                               defines=settings(record.defines))
            prog = await registry.kernel.load(artifact, record.function)
    except (TailcalldError, OSError, ValueError) as err:
        if running is None:  # nothing runs there: keep the record, the next start tries again
            registry.unrestored[slot] = record
            outcome = "the slot stays empty until a start can rebuild it"
        else:  # something runs there: keep it rather than trace nothing
            registry.handlers[slot] = adopted_unknown(registry, slot, running)
            outcome = f"program {running}, found in the slot, is kept"
        registry.correct(f"slot {label}: could not rebuild {record.function} from "
                         f"{record.filename} ({err}); {outcome}", error=True)
        return
    try:
        registry.kernel.set_slot(slot, prog)
    except BaseException:
        prog.close()
        raise
    rebuilt_record = record.model_copy(update={"prog_id": prog.id, "maps": map_records(prog.maps)})
    registry.handlers[slot] = Handler(rebuilt_record, prog, requested_function=record.function)
    rebuilt.setdefault(key, prog)
    what = "was empty" if running is None else f"held program {running}, not the recorded {record.prog_id}"
    registry.correct(f"slot {label} {what}: rebuilt {record.function} from {record.filename} as program {prog.id}"
                     + (", shared as before" if shared is not None else ""))


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
        registry.kernel.set_slot(slot, ours.prog)
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
