"""The core: which handler sits in which syscall slot, and the operations that change it.

No sockets here and no bcc: the server and tests call these methods directly.  Every
change to a slot holds that slot's lock, so two attaches to one slot are serialised
while attaches to different slots compile in parallel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import __version__, bpfsys
from .compiler import Compiler, LoadedProgram
from .dispatcher import Dispatcher
from .errors import SlotEmpty
from .misses import MissMonitor
from .protocol import AttachRequest, AttachResult, DetachResult, ListResult, SlotInfo, StatusResult
from .syscalls import SyscallTable

logger = logging.getLogger("tailcalld")


@dataclass
class Handler:
    """A program in a slot.  ``prog`` is None for a program found in the pinned map at start
    (put there by an earlier daemon): the map keeps it alive, we only know its id."""

    slot: int
    prog_id: int
    function: str | None
    prog: LoadedProgram | None = None
    filename: str | None = None
    source_sha256: str | None = None
    attached_at: datetime | None = None


class SlotManager:
    def __init__(self, dispatcher: Dispatcher, compiler: Compiler, syscalls: SyscallTable,
                 misses: MissMonitor, socket_path: str, miss_log_interval: float,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.dispatcher = dispatcher
        self.compiler = compiler
        self.syscalls = syscalls
        self.misses = misses
        self.socket_path = socket_path
        self.miss_log_interval = miss_log_interval
        self._on_change = on_change  # e.g. to refresh systemd's STATUS=
        self.started_at = datetime.now(UTC)
        self._handlers: dict[int, Handler] = {}
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._adopt_from_kernel()

    def _adopt_from_kernel(self) -> None:
        for slot, prog_id in self.dispatcher.occupied().items():
            self._handlers[slot] = Handler(slot, prog_id, function=_prog_name(prog_id))
            self.misses.held_handler(slot)
            logger.info("slot %s already holds program %d (kept from the pinned prog array)",
                        self._label(slot), prog_id, extra={"SLOT": slot, "PROG_ID": prog_id})

    def _label(self, slot: int) -> str:
        return f"{self.syscalls.label(slot)} ({slot})"

    async def attach(self, req: AttachRequest) -> AttachResult:
        slot = self.syscalls.resolve(req.slot)
        async with self._locks[slot]:
            prog = await self.compiler.load(req.source, req.function)
            try:
                replaced = self.dispatcher.slot_prog_id(slot)
                # One map update: the dispatcher sees either the old handler or the new one.
                self.dispatcher.set_slot(slot, prog.fd)
            except BaseException:
                os.close(prog.fd)
                raise
            old = self._handlers.get(slot)
            sha = hashlib.sha256(req.source.encode()).hexdigest()
            self._handlers[slot] = Handler(slot, prog.id, prog.function, prog, req.filename, sha,
                                           datetime.now(UTC))
            self.misses.held_handler(slot)
            if old is not None and old.prog is not None:
                os.close(old.prog.fd)
        self._on_change()
        verb = "replaced" if replaced is not None else "attached"
        logger.info("%s %s in slot %s (program %d%s)", verb, prog.function, self._label(slot), prog.id,
                    f", was {replaced}" if replaced is not None else "",
                    extra={"SLOT": slot, "SYSCALL_NAME": self.syscalls.label(slot), "PROG_ID": prog.id,
                           "SOURCE_SHA256": sha})
        return AttachResult(slot=slot, syscall=self.syscalls.label(slot), function=prog.function,
                            prog_id=prog.id, insns=prog.insns, replaced_prog_id=replaced)

    async def detach(self, slot_spec: int | str) -> DetachResult:
        slot = self.syscalls.resolve(slot_spec)
        async with self._locks[slot]:
            prog_id = self.dispatcher.slot_prog_id(slot)
            if prog_id is None or not self.dispatcher.clear_slot(slot):
                self._forget(slot)
                raise SlotEmpty(f"slot {self._label(slot)} holds no handler", {"slot": slot})
            self._forget(slot)
        self._on_change()
        logger.info("detached program %d from slot %s", prog_id, self._label(slot),
                    extra={"SLOT": slot, "SYSCALL_NAME": self.syscalls.label(slot), "PROG_ID": prog_id})
        return DetachResult(slot=slot, syscall=self.syscalls.label(slot), prog_id=prog_id)

    def _forget(self, slot: int) -> None:
        old = self._handlers.pop(slot, None)
        if old is not None and old.prog is not None:
            os.close(old.prog.fd)

    @property
    def slots_in_use(self) -> int:
        return len(self._handlers)

    def list(self) -> ListResult:
        return ListResult(slots=[self._slot_info(h) for _, h in sorted(self._handlers.items())])

    def _slot_info(self, h: Handler) -> SlotInfo:
        misses = self.misses.since_start(h.slot, self.dispatcher.miss_total(h.slot))
        return SlotInfo(slot=h.slot, syscall=self.syscalls.label(h.slot), function=h.function,
                        prog_id=h.prog_id, filename=h.filename, source_sha256=h.source_sha256,
                        attached_at=h.attached_at, misses=misses)

    def status(self) -> StatusResult:
        totals = self.dispatcher.miss_totals()
        return StatusResult(
            version=__version__, pid=os.getpid(), started_at=self.started_at,
            pin_dir=str(self.dispatcher.pin_dir), socket=self.socket_path,
            dispatcher_prog_id=self.dispatcher.prog_id, dispatcher_link_id=self.dispatcher.link.id,
            adopted=self.dispatcher.adopted, slots_used=self.slots_in_use,
            nr_slots=self.dispatcher.nr_slots,
            misses_total=sum(totals) - sum(self.misses.baseline),
            miss_log_interval=self.miss_log_interval)

    def close(self) -> None:
        """Drop our program fds; the pinned prog array keeps every handler running."""
        for h in self._handlers.values():
            if h.prog is not None:
                os.close(h.prog.fd)
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
