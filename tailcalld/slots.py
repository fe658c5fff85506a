"""The core: which handler sits in which syscall slot, and the operations that change it.

No sockets here and no bcc: the server and tests call these methods directly.  Every
change to a slot holds that slot's lock, so two attaches to one slot are serialised
while attaches to different slots compile in parallel.

Persistence: the desired state is written (atomically) *before* the kernel is changed.
A crash in between leaves a state that says what was asked for; the next start's
reconcile makes the kernel match it (see ``restore``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import __version__, bpfsys
from .compiler import Compiler, LoadedProgram
from .dialects import Artifact
from .dispatcher import Dispatcher
from .errors import SlotEmpty, TailcalldError, Unloading
from .misses import MissMonitor
from .peers import Peer
from .protocol import AttachResult, CheckResult, DetachResult, ListResult, SlotInfo, StatusResult
from .state import SlotRecord, StateFile, StateStore
from .syscalls import SyscallTable

logger = logging.getLogger("tailcalld")
MAX_CORRECTIONS = 100


@dataclass
class Handler:
    """A program in a slot.  ``prog`` is None for a program we did not load in this process
    (adopted from the pinned prog array): the map keeps it alive, we only know its id."""

    record: SlotRecord
    prog: LoadedProgram | None = None
    requested_function: str | None = None  # as asked (None: the only raw_tp one), to match reuse exactly
    list_head: bytes | None = None  # this slot's list entry as JSON, up to its miss count (see list_json)

    def close(self) -> None:
        if self.prog is not None:
            os.close(self.prog.fd)
            self.prog = None


class SlotManager:
    def __init__(self, dispatcher: Dispatcher, compiler: Compiler, syscalls: SyscallTable,
                 misses: MissMonitor, store: StateStore, socket_path: str, miss_log_interval: float,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.dispatcher = dispatcher
        self.compiler = compiler
        self.syscalls = syscalls
        self.misses = misses
        self.store = store
        self.socket_path = socket_path
        self.miss_log_interval = miss_log_interval
        self.started_at = datetime.now(UTC)
        self.corrections: deque[str] = deque(maxlen=MAX_CORRECTIONS)
        self._on_change = on_change  # e.g. to refresh systemd's STATUS=
        self._handlers: dict[int, Handler] = {}
        # Recorded slots whose handler could not be rebuilt at start (a compile failing after a
        # reboot, say): kept in the state file so the next start tries again, until an attach
        # or detach on the slot says otherwise.
        self._unrestored: dict[int, SlotRecord] = {}
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._unloading = False

    # -- start: make the kernel and the desired state agree -----------------------------------

    async def restore(self) -> None:
        """Rebuild the slot table at start.  The rule, per slot:

        * state file readable: it is the desired state. A slot whose kernel program is the
          recorded one is adopted as is; a recorded slot that is empty or holds another program
          (reboot, crash mid-change, bpftool) is recompiled from the recorded source and
          swapped in; a filled slot with no record is emptied.
        * no state file, or an unreadable one (moved aside): the kernel wins; what runs is
          adopted and recorded with its source unknown.

        Every correction is logged and kept for ``tailcallctl status``.
        """
        self.store.prepare()
        loaded = self.store.load()
        if loaded.problem:
            self._correct(loaded.problem, error=True)
        kernel = self.dispatcher.occupied()
        if not loaded.found:
            for slot, prog_id in sorted(kernel.items()):
                self._handlers[slot] = Handler(self._unknown_record(slot, prog_id))
                if loaded.problem:
                    self._correct(f"slot {self._label(slot)}: kept program {prog_id} found in the kernel "
                                  "(source unknown: it cannot be rebuilt after a reboot)")
        else:
            for slot in sorted(set(kernel) | set(loaded.state.slots)):
                await self._reconcile(slot, kernel.get(slot), loaded.state.slots.get(slot))
        for slot in self._handlers:
            self.misses.held_handler(slot)
        self._save()

    async def _reconcile(self, slot: int, running: int | None, record: SlotRecord | None) -> None:
        if record is None:
            assert running is not None
            self.dispatcher.clear_slot(slot)
            self._correct(f"slot {self._label(slot)}: removed program {running}, which is not in the desired state")
            return
        if running == record.prog_id:
            self._handlers[slot] = Handler(record)
            return
        if record.source_sha256 is None:
            if running is None:
                self._correct(f"slot {self._label(slot)}: program {record.prog_id} is gone and its source "
                              "is unknown; the slot stays empty", error=True)
            else:
                self._handlers[slot] = Handler(self._unknown_record(slot, running))
                self._correct(f"slot {self._label(slot)}: kept program {running} found in the kernel")
            return
        try:
            prog = await self.compiler.load_artifact(self.store.artifact(record.source_sha256, record.dialect),
                                                     record.function)
        except (TailcalldError, OSError, ValueError) as err:
            if running is None:  # nothing runs there: keep the record, the next start tries again
                self._unrestored[slot] = record
                outcome = "the slot stays empty until a start can rebuild it"
            else:  # something runs there: keep it rather than trace nothing
                self._handlers[slot] = Handler(self._unknown_record(slot, running))
                outcome = f"program {running}, found in the slot, is kept"
            self._correct(f"slot {self._label(slot)}: could not rebuild {record.function} from "
                          f"{record.filename} ({err}); {outcome}", error=True)
            return
        self.dispatcher.set_slot(slot, prog.fd)
        self._handlers[slot] = Handler(record.model_copy(update={"prog_id": prog.id}), prog,
                                       requested_function=record.function)
        what = "was empty" if running is None else f"held program {running}, not the recorded {record.prog_id}"
        self._correct(f"slot {self._label(slot)} {what}: rebuilt {record.function} from {record.filename} "
                      f"as program {prog.id}")

    def repair_drift(self) -> None:
        """While running, apply the same rule as at start to changes made behind our back (bpftool):
        a slot of ours that was emptied or refilled gets our program back (we hold its fd: no
        compile), a slot filled by someone else is emptied.  Slots being changed right now are
        left to their change."""
        kernel = self.dispatcher.occupied()
        for slot in sorted(set(kernel) | set(self._handlers)):
            lock = self._locks.get(slot)
            if (lock is not None and lock.locked()) or self._unloading:
                continue
            running, h = kernel.get(slot), self._handlers.get(slot)
            if h is None:
                self.dispatcher.clear_slot(slot)
                self._correct(f"slot {self._label(slot)}: removed program {running}, put there outside tailcalld")
            elif running != h.record.prog_id:
                what = "was emptied" if running is None else f"held program {running}"
                if h.prog is not None:
                    self.dispatcher.set_slot(slot, h.prog.fd)
                    self._correct(f"slot {self._label(slot)} {what} outside tailcalld: put program "
                                  f"{h.prog.id} ({h.record.function}) back")
                elif running is None:  # adopted, source unknown: nothing to put back
                    self._handlers.pop(slot)
                    self._save()
                    self._correct(f"slot {self._label(slot)} {what} outside tailcalld; its program "
                                  f"{h.record.prog_id} cannot be put back (source unknown)", error=True)
                else:
                    self._handlers[slot] = Handler(self._unknown_record(slot, running))
                    self._save()
                    self._correct(f"slot {self._label(slot)} {what} outside tailcalld; kept it (the "
                                  f"program it replaced, {h.record.prog_id}, has an unknown source)")

    def _unknown_record(self, slot: int, prog_id: int) -> SlotRecord:
        return SlotRecord(slot=slot, function=_prog_name(prog_id), prog_id=prog_id, source_sha256=None,
                          filename=None, attached_by_uid=None, attached_at=None)

    def _correct(self, message: str, error: bool = False) -> None:
        self.corrections.append(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {message}")
        logger.log(logging.ERROR if error else logging.WARNING, "reconcile: %s", message,
                   extra={"TAILCALLD_RECONCILE": 1})

    # -- changes --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._unloading:
            raise Unloading("tailcalld is unloading everything; no more changes")

    def _label(self, slot: int) -> str:
        return f"{self.syscalls.label(slot)} ({slot})"

    def _save(self) -> None:
        self.store.save(StateFile(slots={**self._unrestored, **{s: h.record for s, h in self._handlers.items()}}))

    async def attach(self, slot_spec: int | str, artifact: Artifact, function: str | None, filename: str,
                     peer: Peer, fresh: bool = False) -> AttachResult:
        """Put the handler in the slot.  Unless ``fresh``, a program already loaded from the same
        artifact and function is reused (no compile): it then shares its maps with its other slots."""
        slot = self.syscalls.resolve(slot_spec)
        async with self._locks[slot]:
            self._check_open()
            prog = (None if fresh else self._already_loaded(artifact, function)) \
                or await self.compiler.load_artifact(artifact, function)
            # From here to the map update nothing awaits: no other change interleaves.
            try:
                replaced = self.dispatcher.slot_prog_id(slot)
                old = self._handlers.get(slot)
                record = SlotRecord(slot=slot, function=prog.function, prog_id=prog.id, dialect=artifact.dialect,
                                    source_sha256=self.store.put_artifact(artifact), filename=filename,
                                    attached_by_uid=peer.uid, attached_at=datetime.now(UTC))
                self._handlers[slot] = Handler(record, prog, requested_function=function)
                unrestored = self._unrestored.pop(slot, None)
                try:
                    self._save()  # desired state first: a crash after this is repaired at start
                    # One map update: the dispatcher sees either the old handler or the new one.
                    self.dispatcher.set_slot(slot, prog.fd)
                except BaseException:
                    if unrestored is not None:
                        self._unrestored[slot] = unrestored
                    self._restore_entry(slot, old)
                    raise
            except BaseException:
                os.close(prog.fd)
                raise
            if old is not None:
                old.close()
            self.misses.held_handler(slot)
        self._on_change()
        self._audit("replace" if replaced is not None else "attach", peer, slot, prog.id, record.source_sha256,
                    f"{prog.function} ({artifact.dialect}) in slot {self._label(slot)}: program {prog.id}"
                    + (f", was {replaced}" if replaced is not None else ""))
        return AttachResult(slot=slot, syscall=self.syscalls.label(slot), function=prog.function,
                            prog_id=prog.id, insns=prog.insns, replaced_prog_id=replaced)

    def _already_loaded(self, artifact: Artifact, function: str | None) -> LoadedProgram | None:
        """The program another slot (or this one) already runs for the same handler, with an fd
        of its own: a warm attach needs no compile and no load."""
        for h in self._handlers.values():
            r = h.record
            if (h.prog is not None and r.source_sha256 == artifact.sha256 and r.dialect == artifact.dialect
                    and h.requested_function == function):
                return dataclasses.replace(h.prog, fd=os.dup(h.prog.fd))
        return None

    async def check(self, artifact: Artifact, function: str | None) -> CheckResult:
        """Compile and load for the verifier's verdict only; the program is dropped at once."""
        prog = await self.compiler.load_artifact(artifact, function)
        os.close(prog.fd)
        return CheckResult(function=prog.function, dialect=artifact.dialect, prog_type="raw_tracepoint",
                           insns=prog.insns, log=prog.log)

    def _restore_entry(self, slot: int, old: Handler | None) -> None:
        """Undo an in-memory change whose persisting or applying failed (best effort on disk)."""
        if old is None:
            self._handlers.pop(slot, None)
        else:
            self._handlers[slot] = old
        try:
            self._save()
        except OSError:
            logger.exception("could not roll the state file back")

    async def detach(self, slot_spec: int | str, peer: Peer) -> DetachResult:
        slot = self.syscalls.resolve(slot_spec)
        async with self._locks[slot]:
            self._check_open()
            prog_id = self.dispatcher.slot_prog_id(slot)
            old = self._handlers.pop(slot, None)
            if self._unrestored.pop(slot, None) is not None:
                self._save()  # detaching a handler that could not be rebuilt: forget it
            if prog_id is None:
                if old is not None:
                    self._restore_entry(slot, None)
                    old.close()
                raise SlotEmpty(f"slot {self._label(slot)} holds no handler", {"slot": slot})
            try:
                self._save()
                self.dispatcher.clear_slot(slot)
            except BaseException:
                self._restore_entry(slot, old)
                raise
            sha = old.record.source_sha256 if old else None
            if old is not None:
                old.close()
        self._on_change()
        self._audit("detach", peer, slot, prog_id, sha, f"program {prog_id} from slot {self._label(slot)}")
        return DetachResult(slot=slot, syscall=self.syscalls.label(slot), prog_id=prog_id)

    async def unload_all(self, peer: Peer) -> list[int]:
        """Empty every slot and forget the desired state; the caller then removes the pins."""
        self._unloading = True  # refuse new changes; wait for those under way
        for lock in list(self._locks.values()):
            await lock.acquire()  # never released: the daemon exits after an unload
        slots = sorted(self._handlers)
        self._unrestored.clear()
        self.store.save(StateFile())
        for slot in slots:
            self.dispatcher.clear_slot(slot)
            self._handlers.pop(slot).close()
        self._on_change()
        self._audit("unload", peer, None, self.dispatcher.prog_id, None,
                    f"everything: {len(slots)} slots emptied, dispatcher and pins removed")
        return slots

    def _audit(self, action: str, peer: Peer, slot: int | None, prog_id: int, sha: str | None, what: str) -> None:
        fields: dict[str, object] = {"TAILCALLD_ACTION": action, "PROG_ID": prog_id, **peer.journal_fields()}
        if slot is not None:
            fields |= {"SLOT": slot, "SYSCALL_NAME": self.syscalls.label(slot)}
        if sha is not None:
            fields["SOURCE_SHA256"] = sha
        logger.info("%s %s (by uid %d, pid %d, %s)", action, what, peer.uid, peer.pid, peer.comm, extra=fields)

    # -- views ----------------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        return len(self._handlers)

    def list_slots(self) -> ListResult:
        totals = self.misses.recent_totals()
        return ListResult.model_construct(slots=[self._slot_info(h.record, totals)
                                                 for _, h in sorted(self._handlers.items())])

    def list_json(self) -> bytes:
        """``list()`` already serialised, for the socket: list is the hottest request, and a
        slot's entry only changes when its handler does, so each entry is serialised once (by
        the SlotInfo model) and only its miss count, the last field, is written per request."""
        totals = self.misses.recent_totals()
        entries = [self._list_head(h) + b"%d}" % self.misses.since_start(slot, totals)
                   for slot, h in sorted(self._handlers.items())]
        return b'{"slots":[' + b",".join(entries) + b"]}"

    def _list_head(self, h: Handler) -> bytes:
        if h.list_head is None:
            text = self._slot_info(h.record, None).model_dump_json()
            tail = ',"misses":0}'
            assert text.endswith(tail), "misses must stay SlotInfo's last field"
            h.list_head = text[:-2].encode()  # everything up to the count and the closing brace
        return h.list_head

    def _slot_info(self, r: SlotRecord, totals: list[int] | None) -> SlotInfo:
        # model_construct: these values come from our own validated records; list is the
        # hottest request and validation would double its cost.
        return SlotInfo.model_construct(
            slot=r.slot, syscall=self.syscalls.label(r.slot), function=r.function,
            dialect=r.dialect if r.source_sha256 else None, prog_id=r.prog_id, filename=r.filename,
            source_sha256=r.source_sha256, attached_at=r.attached_at, attached_by_uid=r.attached_by_uid,
            misses=0 if totals is None else self.misses.since_start(r.slot, totals))

    def status(self) -> StatusResult:
        totals = self.misses.recent_totals()
        return StatusResult(
            version=__version__, pid=os.getpid(), started_at=self.started_at,
            pin_dir=str(self.dispatcher.pin_dir), socket=self.socket_path,
            dispatcher_prog_id=self.dispatcher.prog_id, dispatcher_link_id=self.dispatcher.link.id,
            adopted=self.dispatcher.adopted, upgraded_from=self.dispatcher.upgraded_from,
            slots_used=self.slots_in_use, nr_slots=self.dispatcher.nr_slots,
            misses_total=sum(totals) - sum(self.misses.baseline),
            miss_log_interval=self.miss_log_interval, corrections=list(self.corrections))

    def close(self) -> None:
        """Drop our program fds; the pinned prog array keeps every handler running."""
        for h in self._handlers.values():
            h.close()
        self._handlers.clear()


def _prog_name(prog_id: int) -> str | None:
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return bpfsys.prog_info(fd).name
    finally:
        os.close(fd)
