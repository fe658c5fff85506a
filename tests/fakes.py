"""In-memory stand-ins for the kernel and the disk, for the core's failure paths.

The real-kernel tests prove that attach, swap and detach work; these prove what happens when
one step of a change fails at exactly the wrong moment, which a real kernel or disk will not
do on demand.  Programs are real fds (of /dev/null), so a leaked or doubly closed program
shows up as an fd count that does not return to where it was.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from tailcalld.compiler import Program
from tailcalld.dialects import Artifact
from tailcalld.errors import KernelError, StateUnwritable, TailcalldError
from tailcalld.kernel import DispatcherInfo
from tailcalld.misses import MissMonitor
from tailcalld.slots import SlotManager
from tailcalld.state import StateFile, StateStore
from tailcalld.syscalls import SyscallTable

NR_SLOTS = 1024


class FakeKernel:
    """A prog array as a dict.  Set ``fail_load``/``fail_set``/``fail_clear`` to make the next
    such call fail; ``loads`` counts programs loaded."""

    def __init__(self, pin_dir: Path = Path("/sys/fs/bpf/fake")) -> None:
        self.info = DispatcherInfo(pin_dir, prog_id=1, link_id=1, nr_slots=NR_SLOTS, adopted=False,
                                   upgraded_from=None)
        self.slots: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.misses = [0] * (2 * NR_SLOTS)  # enter slots, then exit slots (SyscallTable.key)
        self.calls = [0] * (2 * NR_SLOTS)
        self.scope_misses = [0] * (2 * NR_SLOTS)
        self.scopes: dict[int, str | None] = {}  # slot -> the cgroup it was filled for
        self.exit_attached = False  # the exit dispatcher: attached only while an exit slot is filled
        self.exit_watched = False
        self.loads = 0
        self.pins: list[str] = [str(pin_dir / "link"), str(pin_dir / "prog_array"), str(pin_dir / "counts")]
        self.fail_load: TailcalldError | None = None
        self.fail_set = False
        self.fail_clear = False
        self.released: list[str] = []  # sha256 of handlers whose pinned maps were released
        self.pinned: set[int] = set()  # programs pinned by keep_programs
        self._next_id = 100

    def slot(self, slot: int) -> int | None:
        return self.slots.get(slot)

    def occupied(self) -> dict[int, int]:
        return dict(self.slots)

    def set_slot(self, slot: int, prog: Program, cgroup: str | None = None) -> None:
        fd = prog.fd  # raises if the core hands over a program it already closed
        os.fstat(fd)
        if slot >= NR_SLOTS and not self.exit_attached:
            raise KernelError(f"exit slot {slot - NR_SLOTS}: the exit dispatcher is not attached (prepare first)")
        if self.fail_set:
            self.fail_set = False
            raise KernelError(f"could not put the program in slot {slot}: Argument list too long")
        self.slots[slot] = prog.id
        self.scopes[slot] = cgroup

    def clear_slot(self, slot: int) -> bool:
        if self.fail_clear:
            self.fail_clear = False
            raise KernelError(f"could not empty slot {slot}: Operation not permitted")
        return self.slots.pop(slot, None) is not None

    def set_slots(self, changes: Mapping[int, tuple[Program, str | None] | None], holding: Mapping[int, Program]) -> None:
        if self.fail_set:
            self.fail_set = False
            raise KernelError("could not stage slot 1: Argument list too long")
        for slot, change in changes.items():
            if change is None:
                self.slots.pop(slot, None)
            else:
                os.fstat(change[0].fd)
                self.slots[slot], self.scopes[slot] = change[0].id, change[1]

    def follow_cgroups(self, wanted: Mapping[int, str]) -> list[tuple[int, str]]:
        return []

    def scope_miss_totals(self) -> list[int]:
        return list(self.scope_misses)

    async def prepare(self, slot: int) -> None:
        self.exit_attached |= slot >= NR_SLOTS

    def release_idle(self) -> None:
        if not self.exit_watched and not any(slot >= NR_SLOTS for slot in self.slots):
            self.exit_attached = False

    async def watch_exit(self, on: bool) -> None:
        self.exit_watched = on
        if on:
            await self.prepare(NR_SLOTS)
        else:
            self.release_idle()

    async def load(self, artifact: Artifact, function: str | None) -> Program:
        self.loads += 1
        if self.fail_load is not None:
            err, self.fail_load = self.fail_load, None
            raise err
        prog_id = self._next_id
        self._next_id += 1
        name = function or "handler"
        self.names[prog_id] = name
        return Program(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), prog_id, name, insns=10)

    def load_foreign(self) -> int:
        """A program someone else loaded (bpftool): only its id is known."""
        prog_id = self._next_id
        self._next_id += 1
        self.names[prog_id] = "foreign"
        return prog_id

    def prog_name(self, prog_id: int) -> str | None:
        return self.names.get(prog_id)

    def program(self, prog_id: int, function: str | None = None) -> Program | None:
        if prog_id not in self.pinned:
            return None
        return Program(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), prog_id, function or self.names[prog_id], 10)

    def keep_programs(self, progs: Mapping[int, Program | None]) -> None:
        self.pinned = {prog_id for prog_id, prog in progs.items() if prog is not None or prog_id in self.pinned}

    def miss_totals(self) -> list[int]:
        return list(self.misses)

    def call_totals(self) -> list[int]:
        return list(self.calls)

    def compat_miss_totals(self) -> list[int]:
        return []

    def remove_pins(self) -> list[str]:
        removed, self.pins = self.pins, []
        return removed

    def restore_pins(self) -> list[str]:
        return []

    def release_handler_pins(self, sha256: str) -> None:
        self.released.append(sha256)


class FlakyStore(StateStore):
    """A real state folder whose next writes can be made to fail, as on a full disk."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.fail_saves: list[bool] = []  # one entry per coming save(): True makes it fail
        self.fail_artifacts = False

    def save(self, state: StateFile) -> None:
        if self.fail_saves and self.fail_saves.pop(0):
            raise StateUnwritable(f"cannot write {self.path}: No space left on device; nothing was changed")
        super().save(state)

    def put_artifact(self, artifact: Artifact) -> str:
        if self.fail_artifacts:
            raise StateUnwritable("cannot write a source: No space left on device; nothing was changed")
        return super().put_artifact(artifact)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_on_fake(tmp_path: Path, names: Mapping[str, int],
                scenario: Callable[[FakeKernel, FlakyStore, SlotManager], Awaitable[None]],
                kernel: FakeKernel | None = None) -> None:
    """One scenario on a SlotManager over the fake kernel, restored from ``tmp_path/state`` as a
    start would, and closed after whatever the scenario did."""
    async def main() -> None:
        k = kernel or FakeKernel()
        syscalls = SyscallTable(NR_SLOTS, dict(names))
        store = FlakyStore(tmp_path / "state")
        manager = SlotManager(k, store, syscalls, MissMonitor(k.miss_totals, syscalls.label))
        await manager.restore()
        try:
            await scenario(k, store, manager)
        finally:
            manager.close()
    asyncio.run(main())
