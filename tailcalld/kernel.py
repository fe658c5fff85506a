"""The core's one door to the kernel: slots, programs, counters and pins.

The slot manager and the reconcile only ever talk to a ``Kernel``.  ``BpfKernel`` is the real
one (the pinned dispatcher, plus compile workers that load programs); the tests have an
in-memory one (tests/fakes.py) that can fail on demand, which is how every rollback branch
of the core is exercised without a kernel that misbehaves exactly then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import bpfsys
from .compiler import Compiler, Program
from .dialects import Artifact
from .dispatcher import Dispatcher, PinDirLock, handler_pin_dir, remove_handler_pins, remove_pins
from .timing import TimingTarget, target_of


@dataclass(frozen=True)
class DispatcherInfo:
    """What status shows about the dispatcher this daemon found or loaded."""

    pin_dir: Path
    prog_id: int
    link_id: int
    nr_slots: int
    adopted: bool  # it was already pinned and was adopted, not loaded
    upgraded_from: int | None  # program id of the older dispatcher this start replaced


class Kernel(Protocol):
    @property
    def info(self) -> DispatcherInfo: ...

    def slot(self, slot: int) -> int | None:
        """The id of the program in ``slot``, or None when it is empty."""

    def occupied(self) -> dict[int, int]:
        """slot -> program id, for every filled slot."""

    def set_slot(self, slot: int, prog: Program) -> None:
        """Put ``prog`` in ``slot``, replacing any occupant in one update.  Raises KernelError."""

    def clear_slot(self, slot: int) -> bool:
        """Empty ``slot``; False if it was empty already.  Raises KernelError."""

    async def load(self, artifact: Artifact, function: str | None) -> Program:
        """Compile (if need be) and load ``function`` of ``artifact`` as a raw_tp program."""

    def prog_name(self, prog_id: int) -> str | None:
        """The kernel's name of a program (15 characters at most), None if it is gone."""

    def miss_totals(self) -> list[int]:
        """Tail-call misses per slot since the counters were created."""

    def call_totals(self) -> list[int]:
        """Calls per slot, dispatched or missed (a slot's handler ran calls - misses times)."""

    def compat_miss_totals(self) -> list[int]:
        """Calls of ia32-only syscalls (never dispatched) by ia32 number; empty off x86_64."""

    def remove_pins(self) -> list[str]:
        """Unpin the dispatcher and its maps: tailcalld leaves nothing in the kernel."""

    def restore_pins(self) -> list[str]:
        """Pin again what someone unpinned while we run; returns the pins made.  Raises
        PinConflict when a pin path holds another object, KernelError when pinning fails."""

    def release_handler_pins(self, sha256: str) -> None:
        """Unpin the maps a handler pinned by name: it left its last slot."""


class BpfKernel:
    """The real kernel: the pinned dispatcher's prog array and counters, and the compiler."""

    def __init__(self, dispatcher: Dispatcher, compiler: Compiler) -> None:
        self._dispatcher = dispatcher
        self._compiler = compiler
        d = dispatcher
        self.info = DispatcherInfo(d.pin_dir, d.prog_id, d.link.id, d.nr_slots, d.adopted, d.upgraded_from)

    @classmethod
    async def open(cls, pin_dir: Path, compiler: Compiler, compat: dict[int, int] | None,
                   lock: PinDirLock | None = None) -> BpfKernel:
        """``compat``: ia32 number -> 64-bit slot on x86_64 (SyscallTable.compat_slots), None elsewhere.
        ``lock``: the pin_dir's, if the caller took it already."""
        return cls(await Dispatcher.open_or_load(pin_dir, compiler, compat, lock), compiler)

    def slot(self, slot: int) -> int | None:
        return self._dispatcher.slot_prog_id(slot)

    def occupied(self) -> dict[int, int]:
        return self._dispatcher.occupied()

    def set_slot(self, slot: int, prog: Program) -> None:
        self._dispatcher.set_slot(slot, prog.fd)

    def clear_slot(self, slot: int) -> bool:
        return self._dispatcher.clear_slot(slot)

    async def load(self, artifact: Artifact, function: str | None) -> Program:
        return await self._compiler.load_artifact(artifact, function, handler_pin_dir(self.info.pin_dir, artifact.sha256))

    def release_handler_pins(self, sha256: str) -> None:
        remove_handler_pins(handler_pin_dir(self.info.pin_dir, sha256))

    def prog_name(self, prog_id: int) -> str | None:
        try:
            fd = bpfsys.prog_get_fd_by_id(prog_id)
        except OSError:
            return None
        try:
            return bpfsys.prog_info(fd).name
        finally:
            os.close(fd)

    def miss_totals(self) -> list[int]:
        return self._dispatcher.miss_totals()

    def call_totals(self) -> list[int]:
        return self._dispatcher.call_totals()

    def compat_miss_totals(self) -> list[int]:
        return self._dispatcher.compat_miss_totals()

    def remove_pins(self) -> list[str]:
        return remove_pins(self._dispatcher.pin_dir)

    def restore_pins(self) -> list[str]:
        return self._dispatcher.restore_pins()

    def timing_target(self) -> TimingTarget:
        return target_of(self._dispatcher)

    def close(self) -> None:
        """Drop our handles; the pins keep the dispatcher attached and the slots filled."""
        self._dispatcher.close()
