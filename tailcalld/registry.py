"""The slot registry: which handler sits in which slot, and the one path that changes it.

Every change of a slot goes through ``Registry.commit``, in this order:

1. the registry in memory,
2. the state file (the desired state, written atomically),
3. the kernel (one prog-array update).

A crash between 2 and 3 leaves a state that says what was asked for, and the next start's
reconcile makes the kernel match it.  When step 2 or 3 fails, commit undoes exactly the
steps that were done, in reverse, and re-raises.  If even the undo of step 2 cannot be
written (a disk that just filled up), the state file is marked stale and rewritten at the
next chance (``flush``), so a refused change is not applied at the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import UTC, datetime

from .compiler import Program
from .dialects import Artifact, tag_of
from .errors import StateUnwritable
from .kernel import Kernel
from .loader_settings import settings
from .state import SlotRecord, StateFile, StateStore, record_build_key
from .syscalls import SyscallTable

logger = logging.getLogger("tailcalld")
MAX_CORRECTIONS = 100


@dataclass
class Handler:
    """A program in a slot.  ``prog`` is None for a program this process did not load (adopted
    from the pinned prog array): the map keeps it alive, and we only know its id."""

    record: SlotRecord
    prog: Program | None = None
    requested_function: str | None = None  # as asked (None: the only raw_tp one), to match reuse exactly

    def close(self) -> None:
        if self.prog is not None:
            self.prog.close()


def differences(record: SlotRecord, artifact: Artifact, function: str | None, journal: bool,
                cgroup: str | None = None) -> list[str]:
    """What sets the handler ``record`` names apart from ``artifact`` made with ``function``
    (None: the only raw_tp one, which the same file and settings always resolve alike),
    ``journal`` and ``cgroup``; empty when it is the very same handler.  The source's (or object's) hash
    covers its local headers; the file's name is not part of what a handler is."""
    why = []
    if record.source_sha256 != artifact.sha256:
        why.append("source")
    elif record.dialect != artifact.dialect:
        why.append("dialect")
    if function is not None and function != record.function:
        why.append("function")
    if settings(record.variables) != artifact.variables:
        why.append("variables")
    if settings(record.defines) != artifact.defines:
        why.append("defines")
    if record.journal != journal:
        why.append("journal")
    if record.cgroup != cgroup:
        why.append("cgroup")
    return why


class Registry:
    def __init__(self, kernel: Kernel, store: StateStore, syscalls: SyscallTable) -> None:
        self.kernel = kernel
        self.store = store
        self.syscalls = syscalls
        self.handlers: dict[int, Handler] = {}
        # Recorded slots whose handler could not be rebuilt at start (a compile failing after a
        # reboot, say): kept in the state file so the next start tries again, until an attach
        # or detach on the slot says otherwise.
        self.unrestored: dict[int, SlotRecord] = {}
        # Recorded slots the start is rebuilding right now, behind their locks (reconcile.py).
        self.restoring: dict[int, SlotRecord] = {}
        # One lock per slot: two changes of one slot are serialised, changes of different
        # slots (and their compiles) run side by side.
        self.locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.corrections: deque[str] = deque(maxlen=MAX_CORRECTIONS)
        self.corrections_total = 0  # since the start (metrics); the deque keeps only the latest
        # Bumped by every commit: a view of the kernel read before it is stale.
        self.generation = 0
        self._stale_state = False

    def label(self, slot: int) -> str:
        return self.syscalls.slot_label(slot)

    def busy(self, slot: int) -> bool:
        lock = self.locks.get(slot)
        return lock is not None and lock.locked()

    def correct(self, message: str, error: bool = False) -> None:
        """Log a correction the registry made to make kernel and desired state agree."""
        self.corrections.append(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {message}")
        self.corrections_total += 1
        logger.log(logging.ERROR if error else logging.WARNING, "reconcile: %s", message,
                   extra={"TAILCALLD_RECONCILE": 1})

    def release_unused_pins(self, sha256: str | None) -> None:
        """Unpin the maps a handler pinned by name once no slot runs it any more.  A failure is
        logged, not raised: the change it follows is done, and the pins are only names."""
        if sha256 is None or any(h.record.source_sha256 == sha256 for h in self.handlers.values()):
            return
        try:
            self.kernel.release_handler_pins(sha256)
        except OSError as exc:
            logger.warning("the pinned maps of handler %s could not be removed: %s", sha256[:16], exc)

    def keep_programs(self) -> None:
        """Pin the programs the slots run, unpin those none runs any more (Kernel.keep_programs),
        so that a restart can name them and hold them by fd.  A failure is logged, not raised:
        it costs a later start only the name and handle of a program, never a slot."""
        progs: dict[int, Program | None] = {}
        for h in self.handlers.values():
            if progs.get(h.record.prog_id) is None:
                progs[h.record.prog_id] = h.prog
        try:
            self.kernel.keep_programs(progs)
        except OSError as exc:
            logger.warning("the handler programs could not be pinned under the pin folder: %s", exc)

    def btf_of(self, tag: int) -> bytes | None:
        """The BTF of the handler whose events carry ``tag`` (events.py): the program's own, or
        the one kept with its source (a program adopted from its pin)."""
        for h in self.handlers.values():
            key = record_build_key(h.record)
            if key and tag_of(key) == tag:
                if h.prog is not None and h.prog.btf:
                    return h.prog.btf
                return self.store.btf(key)
        return None

    def journaled(self) -> set[int]:
        """Slot keys whose events go to the journal (attach --journal)."""
        return {self.syscalls.base(slot) for slot, h in self.handlers.items() if h.record.journal}

    # -- persistence ----------------------------------------------------------------------------

    def wanted(self) -> dict[int, SlotRecord]:
        """Every slot tailcalld wants filled: those it runs, those it is rebuilding, and those it
        could not rebuild yet."""
        return {**self.unrestored, **self.restoring, **{s: h.record for s, h in self.handlers.items()}}

    def desired(self) -> StateFile:
        """The state file's form: enter and exit slots apart, each under its syscall number."""
        enter: dict[int, SlotRecord] = {}
        exit_: dict[int, SlotRecord] = {}
        links: list[SlotRecord] = []
        exit_links: list[SlotRecord] = []
        for key, record in sorted(self.wanted().items()):  # in slot order: an undo writes the same bytes
            nr, hook = self.syscalls.split(key)
            record = record.model_copy(update={"slot": nr}) if record.slot != nr else record
            if self.syscalls.priority(key) is not None:
                (links if hook == "enter" else exit_links).append(record)
            elif hook == "enter":
                enter[nr] = record
            else:
                exit_[nr] = record
        return StateFile(slots=enter, exit_slots=exit_, links=links, exit_links=exit_links)

    def save(self) -> None:
        """Write the desired state.  Raises StateUnwritable (the file on disk is then the previous one)."""
        self.store.save(self.desired())
        self._stale_state = False

    def save_later(self) -> None:
        """The state file could not be written: ``flush`` retries at the next chance."""
        self._stale_state = True

    def flush(self) -> None:
        """Rewrite a state file a failed undo left stale; a no-op when it is current."""
        if self._stale_state:
            self.save()
            logger.info("the state file %s is current again", self.store.path)

    # -- the one way to change a slot -----------------------------------------------------------

    def commit(self, slot: int, new: Handler | None, *, already_in_kernel: bool = False) -> Handler | None:
        """Make ``new`` the slot's handler (None: empty it): memory, state file, kernel.
        ``already_in_kernel``: the kernel already holds it (adopting what runs); record only.
        Returns the handler it replaced, which the caller closes once it is done with it."""
        assert new is None or already_in_kernel or new.prog is not None, "a handler to apply needs its program"
        self._keep_btf(new)
        old = self.handlers.get(slot)
        unrestored = self.unrestored.pop(slot, None)
        self._put(slot, new)
        self.generation += 1
        try:
            self.save()
        except BaseException:
            self._undo(slot, old, unrestored)
            raise
        if already_in_kernel:
            return old
        try:
            if new is not None:
                assert new.prog is not None
                self.kernel.set_slot(slot, new.prog, new.record.cgroup)
            else:
                self.kernel.clear_slot(slot)
        except BaseException:
            self._undo(slot, old, unrestored)
            self._save_undo(slot)
            raise
        self.keep_programs()
        return old

    def _keep_btf(self, new: Handler | None) -> None:
        """The BTF of a handler about to be recorded, saved before the state that needs it (its
        events are decoded with it after a restart)."""
        key = record_build_key(new.record) if new is not None else None
        if new is not None and new.prog is not None and new.prog.btf and key:
            self.store.put_btf(key, new.prog.btf)

    def commit_many(self, changes: dict[int, Handler | None]) -> dict[int, Handler | None]:
        """As ``commit``, for several slots at once: memory, one state file write, then the kernel
        switches every slot at the same instant (Kernel.set_slots).  Nothing is changed when any
        step fails.  Returns the handlers replaced (by slot), which the caller closes."""
        assert all(new is None or new.prog is not None for new in changes.values()), "each needs its program"
        for new in changes.values():
            self._keep_btf(new)
        old = {slot: self.handlers.get(slot) for slot in changes}
        unrestored = {slot: self.unrestored.pop(slot) for slot in changes if slot in self.unrestored}
        for slot, new in changes.items():
            self._put(slot, new)
        self.generation += 1

        def undo() -> None:
            for slot in changes:
                self._undo(slot, old[slot], unrestored.get(slot))

        try:
            self.save()
        except BaseException:
            undo()
            raise
        holding = {slot: h.prog for slot, h in self.handlers.items() if slot not in changes and h.prog is not None}
        try:
            self.kernel.set_slots({slot: (new.prog, new.record.cgroup) if new is not None and new.prog is not None
                                   else None for slot, new in changes.items()}, holding)
        except BaseException:
            undo()
            self._save_undo(min(changes))
            raise
        self.keep_programs()
        return old

    def _put(self, slot: int, handler: Handler | None) -> None:
        if handler is None:
            self.handlers.pop(slot, None)
        else:
            self.handlers[slot] = handler

    def _undo(self, slot: int, old: Handler | None, unrestored: SlotRecord | None) -> None:
        self._put(slot, old)
        if unrestored is not None:
            self.unrestored[slot] = unrestored

    def _save_undo(self, slot: int) -> None:
        """The kernel refused a change already written to the state file: write the old state
        back.  If that fails too, say so and retry later rather than hide it."""
        try:
            self.save()
        except StateUnwritable as err:
            self.save_later()
            logger.error("slot %s: the change was undone in the kernel, but the state file could not be "
                         "rolled back (%s); it is rewritten at the next chance", self.label(slot), err.message)
