"""The core's one door to the kernel: slots, programs, counters and pins.

The slot manager and the reconcile only ever talk to a ``Kernel``.  ``BpfKernel`` is the real
one (the pinned dispatcher, plus compile workers that load programs); the tests have an
in-memory one (tests/fakes.py) that can fail on demand, which is how every rollback branch
of the core is exercised without a kernel that misbehaves exactly then.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import bpfsys
from .compiler import Compiler, Program
from .dialects import Artifact
from .dispatcher import COUNT_FIELDS, COUNTS, EXIT, LINK_PIN, Dispatcher, remove_pins
from .pins import PinDirLock, handler_pin_dir, keep_program_pins, open_program_pin, remove_handler_pins
from .errors import KernelError
from .chain import CHAIN_DIR, Chains
from .scope import SCOPE_DIR, Guard, Scopes, synchronize_rcu
from .syscalls import link_key, split_link_key
from .timing import TimingTarget, target_of

logger = logging.getLogger("tailcalld")


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

    def set_slot(self, slot: int, prog: Program, cgroup: str | None = None) -> None:
        """Put ``prog`` in ``slot``, replacing any occupant in one update.  ``cgroup``: it runs
        only for tasks in that cgroup v2 subtree (a path; one that names no cgroup yet makes
        it run for nobody until it does, see ``follow_cgroups``).  Raises KernelError."""

    def follow_cgroups(self, wanted: Mapping[int, str]) -> list[tuple[int, str]]:
        """Point each scoped slot (key -> its cgroup's path) at the cgroup its path names now (a
        cgroup made again is a new one); returns what changed: (slot key, in words)."""

    def scope_miss_totals(self) -> list[int]:
        """Calls per slot key of tasks outside a scoped slot's cgroup (the handler did not run)."""

    def clear_slot(self, slot: int) -> bool:
        """Empty ``slot``; False if it was empty already.  Raises KernelError."""

    def set_slots(self, changes: Mapping[int, tuple[Program, str | None] | None], holding: Mapping[int, Program]) -> None:
        """Make every change of ``changes`` (slot -> (program, cgroup); None: empty it) at one
        instant for every call.  ``holding``: our program of each other filled slot.  Raises
        KernelError, with nothing changed."""

    async def prepare(self, slot: int) -> None:
        """Make ``slot`` ready to be filled: the exit dispatcher is attached before the first
        exit slot (a compile).  A no-op for enter slots."""

    def release_idle(self) -> None:
        """Detach the exit dispatcher once no exit slot is filled or watched: no exit handler,
        no cost on the exit path."""

    async def watch_exit(self, on: bool) -> None:
        """Keep the exit dispatcher attached (``watch_misses`` names an exit slot), or no
        longer.  Raises what attaching it raises."""

    async def load(self, artifact: Artifact, function: str | None) -> Program:
        """Compile (if need be) and load ``function`` of ``artifact`` as a raw_tp program."""

    def prog_name(self, prog_id: int) -> str | None:
        """The kernel's name of a program a slot runs (15 characters at most), from the pin
        ``keep_programs`` made; None without one (gone, or pinned by nobody: see ``program``)."""

    def program(self, prog_id: int, function: str | None = None) -> Program | None:
        """A handle of our own on a program a slot runs (found at a restart), from its pin; None
        when there is none (a program attached by an older tailcalld or by someone else):
        then only its id is known, since opening a program by id needs CAP_SYS_ADMIN.
        ``function``: the name to give it (else the kernel's, cut at 15 characters)."""

    def keep_programs(self, progs: Mapping[int, Program | None]) -> None:
        """Pin each program of ``progs`` (id -> our handle, None if we have none) that is not
        pinned yet, and unpin every other: a pin keeps its program loaded.  Raises OSError."""

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
    """The real kernel: the pinned dispatchers' prog arrays and counters, and the compiler.

    Slots are keys (``SyscallTable.key``): below ``nr_slots`` the enter dispatcher's, above it
    the exit dispatcher's.  The exit dispatcher is attached only while an exit slot is filled:
    ``prepare`` attaches it before the first, ``release_idle`` detaches it after the last."""

    def __init__(self, dispatcher: Dispatcher, compiler: Compiler, compat: dict[int, int] | None = None,
                 exit_dispatcher: Dispatcher | None = None) -> None:
        self._dispatcher = dispatcher
        # Made at the first scoped attach (scope.py): a start that finds them adopts them.
        scope_dir = dispatcher.pin_dir / SCOPE_DIR
        self._scopes = Scopes(scope_dir, 2 * dispatcher.nr_slots) if scope_dir.exists() else None
        # Made at the first attach with a priority (chain.py), as the scope's.
        chain_dir = dispatcher.pin_dir / CHAIN_DIR
        self._exit = exit_dispatcher
        self._nr = dispatcher.nr_slots
        self._chains: Chains | None = None
        try:
            self._chains = Chains(chain_dir, 2 * dispatcher.nr_slots) if chain_dir.exists() else None
            self._renew_runners()
        except BaseException:
            if self._scopes is not None:
                self._scopes.close()
            if self._chains is not None:
                self._chains.close()
            raise
        self._compiler = compiler
        self._compat = compat
        self._exit_loading = asyncio.Lock()  # two first exit attaches at once load it once
        self._exit_watched = False  # watch_misses names an exit slot: keep it attached
        # The exit counters while no exit dispatcher is attached (they stay pinned, and go on
        # from these values when it is attached again).
        self._exit_totals = _pinned_counts(dispatcher.pin_dir / EXIT.subdir, self._nr)
        d = dispatcher
        self.info = DispatcherInfo(d.pin_dir, d.prog_id, d.link.id, d.nr_slots, d.adopted, d.upgraded_from)

    @classmethod
    async def open(cls, pin_dir: Path, compiler: Compiler, compat: dict[int, int] | None,
                   lock: PinDirLock | None = None) -> BpfKernel:
        """``compat``: ia32 number -> 64-bit slot on x86_64 (SyscallTable.compat_slots), None elsewhere.
        ``lock``: the pin_dir's, if the caller took it already.  An exit dispatcher still pinned
        (exit slots filled before this start) is adopted too."""
        enter = await Dispatcher.open_or_load(pin_dir, compiler, compat, lock)
        exit_dispatcher = None
        if (pin_dir / EXIT.subdir / LINK_PIN).exists():
            try:
                exit_dispatcher = await Dispatcher.open_or_load(pin_dir, compiler, compat, hook=EXIT)
            except BaseException:
                enter.close()
                raise
        try:
            return cls(enter, compiler, compat, exit_dispatcher)
        except BaseException:  # the scope's pins refused
            enter.close()
            if exit_dispatcher is not None:
                exit_dispatcher.close()
            raise

    def _renew_runners(self) -> None:
        """Each chained slot that runs its runner gets one made anew from its order (Chains.renew):
        a crash between writing a change's order and updating the slot leaves none behind."""
        if self._chains is None:
            return
        for key in self._chains.slots():
            dispatcher, index = self._where(key)
            runner = self._chains.runner(key)
            if dispatcher is None or runner is None or dispatcher.slot_prog_id(index) != runner.id:
                continue
            change = self._chains.renew(key)
            if change is None or change.slot_fd is None:
                continue
            try:
                dispatcher.set_slot(index, change.slot_fd)
            except KernelError:
                self._chains.undo(change)
                raise
            self._chains.installed(change)

    def _link(self, key: int) -> tuple[int, int | None]:
        """(slot key, priority) of a key: a handler's key in a chained slot has a priority."""
        return split_link_key(2 * self._nr, key)

    def _where(self, key: int) -> tuple[Dispatcher | None, int]:
        if key < self._nr:
            return self._dispatcher, key
        return self._exit, key - self._nr

    def slot(self, slot: int) -> int | None:
        base, priority = self._link(slot)
        if priority is not None:
            if self._chains is None:
                return None
            dispatcher, index = self._where(base)
            running = dispatcher.slot_prog_id(index) if dispatcher is not None else None
            return self._chains.link(base, priority) if self._runs_chain(base, running) else None
        dispatcher, index = self._where(slot)
        if dispatcher is None:
            return None
        return self._behind_guard(slot, dispatcher.slot_prog_id(index))

    def _behind_guard(self, key: int, prog_id: int | None) -> int | None:
        """A scoped slot holds its guard: what it stands for is the handler behind it."""
        if prog_id is None or self._scopes is None or not self._scopes.scoped(key):
            return prog_id
        return self._scopes.handler_id(key, prog_id) or prog_id

    def occupied(self) -> dict[int, int]:
        found = {key: self._behind_guard(key, prog_id) or prog_id for key, prog_id in self._occupied_raw().items()}
        if self._chains is None:
            return found
        nr_keys = 2 * self._nr
        for key, links in self._chains.chained().items():
            if not self._runs_chain(key, found.get(key), links):
                continue  # emptied or refilled behind our back: none of its handlers runs
            del found[key]  # the slot runs its chain: its handlers are what it holds
            for priority, prog_id in links.items():
                if prog_id is not None:
                    found[link_key(nr_keys, key, priority)] = prog_id
        return found

    def _runs_chain(self, key: int, running: int | None, links: Mapping[int, int | None] | None = None) -> bool:
        """Whether slot ``key``, which holds program ``running``, runs its chain: its runner, or
        its only handler (held straight in the slot)."""
        if running is None or self._chains is None:
            return False
        runner = self._chains.runner(key)
        if runner is not None and runner.id == running:
            return True
        if links is None:
            links = {p: self._chains.link(key, p) for p in self._chains.priorities(key)}
        return len(links) == 1 and running in links.values()
    def set_slot(self, slot: int, prog: Program, cgroup: str | None = None) -> None:
        base, priority = self._link(slot)
        dispatcher, index = self._where(base)
        if dispatcher is None:
            raise KernelError(f"exit slot {index}: the exit dispatcher is not attached (prepare first)")
        if priority is not None:
            if cgroup is not None:
                raise KernelError(f"slot {base}: a handler in a chain cannot be scoped to a cgroup")
            self._set_link(dispatcher, index, base, priority, prog)
            return
        if cgroup is None:
            dispatcher.set_slot(index, prog.fd)
            if self._scopes is not None and self._scopes.scoped(slot):
                self._scopes.removed(slot, wait=True)  # a guard may still be running the old handler
            self._forget_chain(slot)
            return
        scopes = self._open_scopes()
        guard = scopes.make_guard(slot, prog.fd, cgroup)
        try:
            dispatcher.set_slot(index, guard.fd)  # the one update that switches handler and cgroup
        except BaseException:
            scopes.discard(slot, guard)
            raise
        scopes.installed(slot, guard)
        self._forget_chain(slot)

    def _set_link(self, dispatcher: Dispatcher, index: int, key: int, priority: int, prog: Program) -> None:
        """The handler at ``priority`` of slot ``key``'s chain (chain.py): its entry filled, and the
        slot given the runner of the new order in one update (or the handler, when it is alone)."""
        chains = self._open_chains()
        runner = chains.runner(key)
        intact = runner is not None and dispatcher.slot_prog_id(index) == runner.id
        change = chains.put(key, priority, prog.fd)
        if change.keep_slot and not intact:  # the slot lost its runner behind our back: put it back
            assert runner is not None
            change.keep_slot, change.runner, change.slot_fd = False, runner, runner.fd
        if not change.keep_slot:
            try:
                assert change.slot_fd is not None
                dispatcher.set_slot(index, change.slot_fd)
            except BaseException:
                chains.undo(change)
                raise
        chains.installed(change)
        if self._scopes is not None and self._scopes.scoped(key):
            self._scopes.removed(key, wait=True)

    def _clear_link(self, dispatcher: Dispatcher | None, index: int, key: int, priority: int) -> bool:
        """Take the handler at ``priority`` out of slot ``key``'s chain; False if it had none there."""
        if self._chains is None:
            return False
        others = [p for p in self._chains.priorities(key) if p != priority]
        lone = None
        if len(others) == 1:  # the one left runs straight from the slot, if we hold it
            lone_id = self._chains.link(key, others[0])
            lone = self.program(lone_id) if lone_id is not None else None
        try:
            had = self._chains.link(key, priority) is not None
            change = self._chains.remove(key, priority, lone.fd if lone is not None else None)
            if change is None:
                return False
            if dispatcher is not None:
                try:
                    if change.slot_fd is None:
                        dispatcher.clear_slot(index)
                    else:
                        dispatcher.set_slot(index, change.slot_fd)
                except BaseException:
                    self._chains.undo(change)
                    raise
            self._chains.installed(change)
            return had
        finally:
            if lone is not None:
                lone.close()

    def _forget_chain(self, key: int) -> None:
        """A handler without priority took slot ``key`` (or it was emptied): its chain goes."""
        if self._chains is not None and self._chains.priorities(key):
            self._chains.forget(key)

    def set_slots(self, changes: Mapping[int, tuple[Program, str | None] | None], holding: Mapping[int, Program]) -> None:
        """Stage every filled slot as the change leaves it, switch both dispatchers to the staged
        slots (one u32: the instant of the change), bring prog_array to the same state behind
        the switch, switch back, and empty the staged slots once no call reads them."""
        for key in changes:
            if self._link(key)[1] is not None:
                raise KernelError("an atomic change cannot include handlers with a priority (a chained slot's); "
                                  "nothing was changed: apply that file without --atomic",
                                  {"slot_key": self._link(key)[0]})

            if self._where(key)[0] is None:
                raise KernelError(f"exit slot {key - self._nr}: the exit dispatcher is not attached (prepare first)")
        staged: dict[int, int] = {}  # slot key -> the fd staged there
        guards: dict[int, Guard] = {}  # the new guards of scoped slots
        try:
            for key, prog_id in self._occupied_raw().items():
                if key not in changes:
                    staged[key] = self._fd_of(key, prog_id, holding)
            for key, change in changes.items():
                if change is not None:
                    prog, cgroup = change
                    if cgroup is not None:
                        guards[key] = self._open_scopes().make_guard(key, prog.fd, cgroup)
                    staged[key] = guards[key].fd if key in guards else prog.fd
            for key, fd in staged.items():
                dispatcher, index = self._where(key)
                assert dispatcher is not None
                dispatcher.stage(index, fd)
            self._dispatcher.switch(True)
        except BaseException:
            self._unstage(staged)
            for key, guard in guards.items():
                self._open_scopes().discard(key, guard)
            raise
        try:
            for key, change in changes.items():  # behind the switch: no call reads prog_array now
                dispatcher, index = self._where(key)
                assert dispatcher is not None
                if change is None:
                    dispatcher.clear_slot(index)
                else:
                    dispatcher.set_slot(index, staged[key])
        except KernelError as err:  # the change is made, as the staged slots show it: they stay on
            logger.error("an atomic change is in effect through the staged slots, but prog_array could not follow "
                         "(%s); dispatching stays switched to %s", err.message, self.info.pin_dir / "staged_array")
            return
        self._dispatcher.switch(False)
        synchronize_rcu()  # no call runs through the staged slots or an old guard any more
        for key in changes:
            if key in guards:
                self._open_scopes().installed(key, guards[key], wait=False)
            elif self._scopes is not None and self._scopes.scoped(key):
                self._scopes.removed(key, wait=False)
        self._unstage(staged)

    def _occupied_raw(self) -> dict[int, int]:
        """slot key -> the program in the kernel's slot (a scoped slot's guard, not its handler)."""
        found = self._dispatcher.occupied()
        if self._exit is not None:
            found |= {self._nr + nr: prog_id for nr, prog_id in self._exit.occupied().items()}
        return found

    def _fd_of(self, key: int, prog_id: int, holding: Mapping[int, Program]) -> int:
        """An fd of the program slot ``key`` holds, to stage it unchanged."""
        guard = self._scopes.guard(key) if self._scopes is not None else None
        if guard is not None and guard.id == prog_id:
            return guard.fd
        runner = self._chains.runner(key) if self._chains is not None else None
        if runner is not None and runner.id == prog_id:
            return runner.fd
        prog = holding.get(key)
        if prog is not None and prog.id == prog_id:
            return prog.fd
        lone = next((p for k, p in holding.items() if self._link(k)[0] == key and p.id == prog_id), None)
        if lone is not None:  # the one handler of a chain, held straight in the slot
            return lone.fd
        where = f"slot {key}" if key < self._nr else f"exit slot {key - self._nr}"
        raise KernelError(f"{where} holds program {prog_id}, of which tailcalld has no handle (adopted by its id "
                          "alone, or put there by someone else); an atomic change stages every filled slot, so none "
                          "was made: detach or attach that slot anew first", {"slot_key": key, "prog_id": prog_id})

    def _unstage(self, staged: Mapping[int, int]) -> None:
        for dispatcher, base in ((self._dispatcher, 0), (self._exit, self._nr)):
            if dispatcher is not None:
                dispatcher.unstage([key - base for key in staged if base <= key < base + self._nr])

    def _open_chains(self) -> Chains:
        if self._chains is None:
            try:
                self._chains = Chains(self.info.pin_dir / CHAIN_DIR, 2 * self._nr)
            except OSError as exc:
                raise KernelError(f"the chain's maps could not be made: {exc}") from None
        return self._chains

    def _open_scopes(self) -> Scopes:
        if self._scopes is None:
            try:
                self._scopes = Scopes(self.info.pin_dir / SCOPE_DIR, 2 * self._nr)
            except OSError as exc:
                raise KernelError(f"the cgroup scope's maps could not be made: {exc}") from None
        return self._scopes

    def clear_slot(self, slot: int) -> bool:
        base, priority = self._link(slot)
        if priority is not None:
            return self._clear_link(*self._where(base), base, priority)
        dispatcher, index = self._where(slot)
        cleared = False if dispatcher is None else dispatcher.clear_slot(index)
        self._forget_chain(slot)
        if self._scopes is not None and self._scopes.scoped(slot):
            self._scopes.removed(slot, wait=False)
        return cleared

    def follow_cgroups(self, wanted: Mapping[int, str]) -> list[tuple[int, str]]:
        return self._scopes.follow(wanted) if self._scopes is not None else []

    def scope_miss_totals(self) -> list[int]:
        return self._scopes.miss_totals() if self._scopes is not None else [0] * (2 * self._nr)

    async def prepare(self, slot: int) -> None:
        slot = self._link(slot)[0]  # a chained slot's handler: its slot's dispatcher
        if slot < self._nr or self._exit is not None:
            return
        async with self._exit_loading:
            if self._exit is not None:
                return
            self._exit = await Dispatcher.open_or_load(self._dispatcher.pin_dir, self._compiler, self._compat,
                                                       hook=EXIT)
            logger.info("exit dispatcher attached to raw_tracepoint/sys_exit (program %d) for the first exit slot",
                        self._exit.prog_id)

    def release_idle(self) -> None:
        if self._exit is None or self._exit_watched or self._exit.occupied():
            return
        self._exit_totals = (self._exit.call_totals(), self._exit.miss_totals())
        prog_id = self._exit.prog_id
        self._exit.unpin_link()
        self._exit = None
        logger.info("exit dispatcher (program %d) detached: no exit slot is filled", prog_id)

    async def watch_exit(self, on: bool) -> None:
        self._exit_watched = on
        if on:
            await self.prepare(self._nr)
        else:
            self.release_idle()

    async def load(self, artifact: Artifact, function: str | None) -> Program:
        return await self._compiler.load_artifact(artifact, function, handler_pin_dir(self.info.pin_dir, artifact.sha256))

    def release_handler_pins(self, sha256: str) -> None:
        remove_handler_pins(handler_pin_dir(self.info.pin_dir, sha256))

    def prog_name(self, prog_id: int) -> str | None:
        prog = self.program(prog_id)
        if prog is None:
            return None
        prog.close()
        return prog.function

    def program(self, prog_id: int, function: str | None = None) -> Program | None:
        fd = open_program_pin(self.info.pin_dir, prog_id)
        if fd is None:
            return None
        try:
            info = bpfsys.prog_info(fd)
        except OSError:
            os.close(fd)
            return None
        return Program(fd, prog_id, function or info.name, info.xlated_insns)

    def keep_programs(self, progs: Mapping[int, Program | None]) -> None:
        keep_program_pins(self.info.pin_dir, {prog_id: p.fd if p is not None else None for prog_id, p in progs.items()})

    def miss_totals(self) -> list[int]:
        return self._dispatcher.miss_totals() + (self._exit.miss_totals() if self._exit else self._exit_totals[1])

    def call_totals(self) -> list[int]:
        return self._dispatcher.call_totals() + (self._exit.call_totals() if self._exit else self._exit_totals[0])

    def compat_miss_totals(self) -> list[int]:
        return self._dispatcher.compat_miss_totals()

    def remove_pins(self) -> list[str]:
        return remove_pins(self._dispatcher.pin_dir)

    def restore_pins(self) -> list[str]:
        return (self._dispatcher.restore_pins() + (self._exit.restore_pins() if self._exit else [])
                + (self._scopes.restore_pins() if self._scopes is not None else [])
                + (self._chains.restore_pins() if self._chains is not None else []))

    def timing_target(self) -> TimingTarget:
        return target_of(self._dispatcher)

    def close(self) -> None:
        """Drop our handles; the pins keep the dispatchers attached and the slots filled."""
        if self._scopes is not None:
            self._scopes.close()
        if self._chains is not None:
            self._chains.close()
        if self._exit is not None:
            self._exit.close()
        self._dispatcher.close()


def _pinned_counts(folder: Path, nr_slots: int) -> tuple[list[int], list[int]]:
    """(calls, misses) of a dispatcher's pinned counts map, zeros when there is none."""
    try:
        fd = bpfsys.obj_get(str(folder / COUNTS.pin))
    except OSError:
        return [0] * nr_slots, [0] * nr_slots
    try:
        calls, misses = bpfsys.percpu_u64_columns(fd, nr_slots, len(COUNT_FIELDS))
        return calls, misses
    finally:
        os.close(fd)
