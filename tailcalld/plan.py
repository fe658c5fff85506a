"""Declarative state, in the core: make the slots match a list of wanted handlers (an apply).

Given every slot the node should have (``Wanted``), each slot is compared with what it holds
(registry.differences): the same handler is left alone (``unchanged``: not compiled, not
touched in the kernel, not audited), a new one is added or replaces the old, and every slot
tailcalld fills that is not wanted is emptied.

Order, so that a failure changes as little as it can:

1. every new handler is built (compiled and loaded, or reused) before any slot changes; one that
   fails stops the apply with nothing changed, its error naming the entry and its file;
2. the slots are switched one at a time, each as attach does it (Registry.commit: memory, state
   file, one prog-array update), adds and replaces in slot order, removals last.  Exit slots
   are filled before enter slots and emptied after them: an exit handler often takes what its
   syscall's enter handler noted (openat_latency.bpf.c), so it is there first and goes last.

A kernel or disk failure during step 2 stops there: the slots switched so far stay switched
(each is whole, no slot is ever half-changed) and the error (ApplyIncomplete) lists them.

No socket and no file reading here: commands.py turns an apply request into ``Wanted``, the
daemon's desired_slots does the same for its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from . import audit
from .compiler import Program
from .dialects import Artifact
from .errors import ApplyIncomplete, BadRequest, KernelError, PriorityClash, TailcalldError
from .peers import Peer
from .registry import Handler, differences
from .slots import SlotManager
from .state import SlotRecord, map_records
from .syscalls import SyscallTable

logger = logging.getLogger("tailcalld")

Action = Literal["add", "replace", "remove", "unchanged"]


@dataclass(frozen=True)
class Wanted:
    """One slot as the apply file lists it."""

    index: int  # its [[slot]] table, from 0
    key: int  # the slot key (SyscallTable.key)
    artifact: Artifact
    function: str | None  # None: the only raw_tp one
    journal: bool
    filename: str
    cgroup: str | None = None  # attach --cgroup


@dataclass
class Step:
    """What one slot needs, and (once built) the program it gets."""

    action: Action
    key: int
    wanted: Wanted | None  # None: a removal
    current: SlotRecord | None  # what tailcalld records for the slot now
    why: list[str] = field(default_factory=list)  # replace: what differs
    prog: Program | None = None  # built, not yet in the slot

    @property
    def changes(self) -> bool:
        return self.action != "unchanged"


@dataclass(frozen=True)
class Change:
    """One slot after an apply (or, dry, as it would be)."""

    step: Step
    prog_id: int | None  # the program the slot runs now; None: dry run, or emptied
    function: str | None
    log: str = ""
    warnings: tuple[str, ...] = ()


def at_entry(err: TailcalldError, origin: str, index: int, filename: str | None) -> TailcalldError:
    """``err`` again, its message naming the apply file's entry (from 1, as people count) and file."""
    where = f"{origin}, [[slot]] {index + 1}" + (f" ({filename})" if filename else "")
    details = err.details if isinstance(err.details, dict) else ({"details": err.details} if err.details else {})
    return type(err)(f"{where}: {err.message}", {**details, "index": index, "file": filename, "origin": origin})


def check_unique(wanted: list[Wanted], syscalls: SyscallTable, origin: str) -> None:
    """Each slot once, or each priority of a chained slot once; never a slot's handler without
    priority beside handlers with one."""
    seen: dict[int, Wanted] = {}
    kinds: dict[int, Wanted] = {}  # slot key -> an entry with (or without) a priority
    for w in wanted:
        first = seen.setdefault(w.key, w)
        label = syscalls.slot_label(w.key)
        if first is not w and syscalls.priority(w.key) is not None:
            raise PriorityClash(f"{origin}: [[slot]] {first.index + 1} and {w.index + 1} both fill {label}; "
                                "each handler of a slot needs a priority of its own",
                                {"index": w.index, "first": first.index})
        if first is not w:
            raise BadRequest(f"{origin}: [[slot]] {first.index + 1} and {w.index + 1} both fill {label}; "
                             "a slot holds one handler (or several, each with its priority)",
                             {"index": w.index, "first": first.index})
        other = kinds.setdefault(syscalls.base(w.key), w)
        if (syscalls.priority(other.key) is None) != (syscalls.priority(w.key) is None):
            raise PriorityClash(f"{origin}: [[slot]] {other.index + 1} and {w.index + 1} both fill "
                                f"{syscalls.slot_label(syscalls.base(w.key))}, one without a priority: a slot runs "
                                "several handlers only when each has one", {"index": w.index, "first": other.index})


def plan(manager: SlotManager, wanted: list[Wanted]) -> list[Step]:
    """What each slot needs, adds and replaces by slot (exit slots first), then removals by slot
    (exit slots last)."""
    reg = manager.registry
    current = reg.wanted()
    steps: list[Step] = []

    def exit_first(key: int) -> tuple[bool, int]:
        nr, hook = manager.syscalls.split(key)
        return hook == "enter", nr

    for w in sorted(wanted, key=lambda w: exit_first(w.key)):
        record = current.get(w.key)
        if record is None:
            steps.append(Step("add", w.key, w, None))
            continue
        why = differences(record, w.artifact, w.function, w.journal, w.cgroup)
        if w.key in reg.unrestored:
            why.append("not restored")
        elif not why and manager.kernel.slot(w.key) != record.prog_id:
            why.append("kernel")  # emptied or refilled behind our back: put it right now
        steps.append(Step("replace" if why else "unchanged", w.key, w, record, why))
    listed = {w.key for w in wanted}
    # Enter keys sort before exit keys: exit slots are emptied last.
    steps += [Step("remove", key, None, record) for key, record in sorted(current.items()) if key not in listed]
    return steps


class Applier:
    """Runs applies one at a time (a client's and the daemon's desired_slots never interleave)."""

    def __init__(self, manager: SlotManager) -> None:
        self.manager = manager
        self._one_at_a_time = asyncio.Lock()

    async def apply(self, wanted: list[Wanted], peer: Peer, origin: str, dry_run: bool = False,
                    atomic: bool = False) -> list[Change]:
        """Make the slots match ``wanted``; ``atomic``: every slot switches at one instant, as the
        kernel sees it, and nothing changes if any step fails (``_switch_atomically``)."""
        m = self.manager
        check_unique(wanted, m.syscalls, origin)
        m.check_open()  # before the locks: unload-all holds every lock for good
        async with self._one_at_a_time, contextlib.AsyncExitStack() as held:
            # Every slot the apply may change, locked in one order (attach and detach take one lock).
            keys = {w.key for w in wanted} | set(m.registry.wanted())
            # A chained slot's key before its handlers', as attach locks them (SlotManager._locked).
            for key in sorted(keys | {m.syscalls.base(key) for key in keys}):
                await held.enter_async_context(m.registry.locks[key])
            m.check_open()
            steps = plan(m, wanted)
            if dry_run:
                return [Change(s, None, _planned_function(s)) for s in steps]
            try:
                with m.filling_exit_slots():
                    await self._build(steps, peer, origin)
                    if atomic:
                        return self._switch_atomically(steps, peer, origin)
                    return self._switch(steps, peer, origin)
            finally:
                for s in steps:  # what was built and not put in a slot (a failure)
                    if s.prog is not None:
                        s.prog.close()
                        m.registry.release_unused_pins(s.wanted.artifact.sha256 if s.wanted else None)
                m.after_change([s.key for s in steps if s.wanted is not None and s.key in m.registry.handlers])

    async def _build(self, steps: list[Step], peer: Peer, origin: str) -> None:
        """Every new handler's program, before any slot changes: reused when a slot runs it (or
        an earlier entry of this apply built it), compiled and loaded otherwise."""
        m = self.manager
        for s in steps:
            if s.action not in ("add", "replace"):
                continue
            assert s.wanted is not None
            w = s.wanted
            try:
                s.prog = m.reusable_program(w.artifact, w.function) or _sibling(steps, w) \
                    or await m.kernel.load(w.artifact, w.function)
                await m.kernel.prepare(s.key)  # the exit dispatcher, before the first exit slot
            except TailcalldError as err:
                told = at_entry(err, origin, w.index, w.filename)
                self._audit_failed(s, peer, told, origin)
                raise told from None

    def _switch(self, steps: list[Step], peer: Peer, origin: str) -> list[Change]:
        """Each slot in turn, as attach and detach change one."""
        done: list[Change] = []
        base = self.manager.syscalls.base
        filled = {base(s.key) for s in steps if s.action in ("add", "replace")}
        # A handler leaving a slot that others fill (a chain where a handler without priority was,
        # or the reverse) goes first: the two kinds are never in one slot together.
        first = [s for s in steps if s.action == "remove" and base(s.key) in filled]
        for s in first + [s for s in steps if s.action in ("add", "replace")] \
                + [s for s in steps if s.action == "remove" and s not in first]:
            try:
                done.append(self._remove(s, peer, origin) if s.action == "remove" else self._put(s, peer, origin))
            except TailcalldError as err:
                self._incomplete(steps, done, s, err, peer, origin)
            except OSError as exc:  # a prog-array update the kernel refused
                self._incomplete(steps, done, s, KernelError(f"the kernel refused the change: {exc}"), peer, origin)
        changes = {c.step.key: c for c in done}
        result = [changes.get(s.key) or Change(s, s.current.prog_id if s.current else None,
                                               s.current.function if s.current else None) for s in steps]
        _log_summary(result, origin)
        return result

    def _switch_atomically(self, steps: list[Step], peer: Peer, origin: str) -> list[Change]:
        """Every slot at one instant (Registry.commit_many): all of it, or, on a failure, none."""
        m, reg = self.manager, self.manager.registry
        changing = [s for s in steps if s.changes]
        replaced = {s.key: m.kernel.slot(s.key) for s in changing}
        handlers = {s.key: self._handler(s, peer) if s.action != "remove" else None for s in changing}
        try:
            olds = reg.commit_many(handlers) if handlers else {}
        except (TailcalldError, OSError) as err:
            told = err if isinstance(err, TailcalldError) else KernelError(f"the kernel refused the change: {err}")
            for s in changing:
                self._audit_failed(s, peer, told, origin)
            raise type(told)(f"atomic apply {origin}: nothing was changed: {told.message}", told.details) from None
        for s in changing:
            s.prog = None  # the slots own them now
        for old in olds.values():
            if old is not None:
                old.close()
                reg.release_unused_pins(old.record.source_sha256)
        if handlers:
            m.transaction_done()
        result = []
        for s in steps:
            new = handlers.get(s.key)
            if new is not None:
                self._audit_put(s, new.record, replaced[s.key], peer, f"{origin}, atomic")
                result.append(Change(s, new.record.prog_id, new.record.function, new.prog.log if new.prog else "",
                                     new.prog.warnings if new.prog else ()))
            elif s.action == "remove":
                self._audit_removed(s, replaced[s.key], peer, f"{origin}, atomic")
                result.append(Change(s, None, s.current.function if s.current else None))
            else:
                result.append(Change(s, s.current.prog_id if s.current else None,
                                     s.current.function if s.current else None))
        _log_summary(result, origin)
        return result

    def _handler(self, s: Step, peer: Peer) -> Handler:
        """What ``s`` puts in its slot, with the record the state file keeps."""
        reg = self.manager.registry
        assert s.wanted is not None and s.prog is not None
        w, prog = s.wanted, s.prog
        record = SlotRecord(slot=self.manager.syscalls.base(s.key), priority=self.manager.syscalls.priority(s.key),
                            function=prog.function, prog_id=prog.id, dialect=w.artifact.dialect,
                            source_sha256=reg.store.put_artifact(w.artifact), filename=w.filename,
                            headers=w.artifact.header_sha256s, attached_by_uid=peer.uid,
                            attached_at=datetime.now(UTC), journal=w.journal,
                            variables=dict(w.artifact.variables), defines=dict(w.artifact.defines),
                            maps=map_records(prog.maps), cgroup=w.cgroup)
        return Handler(record, prog, requested_function=w.function)

    def _audit_put(self, s: Step, record: SlotRecord, replaced: int | None, peer: Peer, origin: str) -> None:
        assert s.wanted is not None
        self.manager.audit("replace" if replaced is not None else "attach", peer, s.key, record.prog_id,
                           record.source_sha256,
                           f"{record.function} ({s.wanted.artifact.dialect}) in slot "
                           f"{self.manager.registry.label(s.key)}: program {record.prog_id}"
                           + (f", was {replaced}" if replaced is not None else "") + f" (apply {origin})")

    def _audit_removed(self, s: Step, prog_id: int | None, peer: Peer, origin: str) -> None:
        gone = prog_id if prog_id is not None else (s.current.prog_id if s.current else 0)
        self.manager.audit("detach", peer, s.key, gone, s.current.source_sha256 if s.current else None,
                           f"program {gone} from slot {self.manager.registry.label(s.key)} (apply {origin})")

    def _put(self, s: Step, peer: Peer, origin: str) -> Change:
        m, reg = self.manager, self.manager.registry
        new = self._handler(s, peer)
        prog = s.prog
        assert prog is not None
        replaced = m.kernel.slot(s.key)
        old = reg.commit(s.key, new)
        s.prog = None  # the slot owns it now
        if old is not None:
            old.close()
            reg.release_unused_pins(old.record.source_sha256)
        self._audit_put(s, new.record, replaced, peer, origin)
        return Change(s, prog.id, prog.function, prog.log, prog.warnings)

    def _remove(self, s: Step, peer: Peer, origin: str) -> Change:
        m, reg = self.manager, self.manager.registry
        prog_id = m.kernel.slot(s.key)
        old = reg.commit(s.key, None)
        if old is not None:
            old.close()
            reg.release_unused_pins(old.record.source_sha256)
        self._audit_removed(s, prog_id, peer, origin)
        return Change(s, None, s.current.function if s.current else None)

    def _audit_failed(self, s: Step, peer: Peer, err: TailcalldError, origin: str) -> None:
        """A slot the apply could not change, in the audit as the attach or detach that failed
        (TAILCALLD_APPLY: which apply)."""
        w = s.wanted
        fields = audit.attach_fields(w.filename, w.function, w.artifact) if w is not None else {}
        self.manager.audit_failure_in("detach" if s.action == "remove" else "attach", peer, s.key, err,
                                      fields | {"TAILCALLD_APPLY": origin})

    def _incomplete(self, steps: list[Step], done: list[Change], failed: Step, err: TailcalldError, peer: Peer,
                    origin: str) -> None:
        self._audit_failed(failed, peer, err, origin)
        label = self.manager.registry.label
        applied = [f"{c.step.action} {label(c.step.key)}" for c in done]
        left = [f"{s.action} {label(s.key)}" for s in steps
                if s.changes and s is not failed and all(c.step is not s for c in done)]
        logger.error("apply %s stopped at %s: %s; applied: %s; not applied: %s", origin, label(failed.key),
                     err.message, ", ".join(applied) or "nothing", ", ".join(left) or "nothing")
        raise ApplyIncomplete(
            f"{failed.action} {label(failed.key)} failed: {err.message}; {len(applied)} change(s) made before it "
            f"stay made ({', '.join(applied) or 'none'}), {len(left)} more not made; apply again to finish",
            {"applied": applied, "failed": f"{failed.action} {label(failed.key)}", "not_applied": left,
             "code": err.code, "cause": err.details}) from None


def _sibling(steps: list[Step], wanted: Wanted) -> Program | None:
    """A program an earlier entry of this apply built for the same handler: shared (maps too),
    as a warm attach shares one."""
    a = wanted.artifact
    for s in steps:
        if s.prog is not None and s.wanted is not None and s.wanted.function == wanted.function:
            b = s.wanted.artifact
            if (b.sha256, b.dialect, b.variables, b.defines) == (a.sha256, a.dialect, a.variables, a.defines):
                return s.prog.dup()
    return None


def _planned_function(s: Step) -> str | None:
    if s.wanted is None or s.action == "unchanged":
        return s.current.function if s.current else None
    return s.wanted.function


def _log_summary(changes: list[Change], origin: str) -> None:
    counts: Counter[str] = Counter(c.step.action for c in changes)
    if not any(c.step.changes for c in changes):
        logger.info("apply %s: nothing to change (%d slots as listed)", origin, counts["unchanged"])
        return
    logger.info("apply %s: %s", origin, ", ".join(f"{counts[a]} {word}" for a, word in
                                                   (("add", "added"), ("replace", "replaced"), ("remove", "removed"),
                                                    ("unchanged", "unchanged")) if counts[a]),
                extra={"TAILCALLD_ACTION": "apply"})

