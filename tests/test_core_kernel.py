"""The core (SlotManager over a real pinned dispatcher) driven in-process, without a socket."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from harness import (DIRFD_MAGIC, NR_FCHMODAT, counting_handler, fchmodat, kernel_slots, pin_foreign_map,
                     prog_fd_by_id, read_counter)
from tailcalld.commands import ListCache, slot_info
from tailcalld.compiler import Compiler
from tailcalld.config import LiveSettings, Settings
from tailcalld.dialects import Artifact
from tailcalld.dispatcher import NR_SLOTS, Dispatcher
from tailcalld.errors import (AlreadyRunning, CompileError, FunctionAmbiguous, FunctionNotFound, PinConflict,
                              SlotEmpty, SlotOutOfRange, UnknownSyscall, VerifierRejected)
from tailcalld.kernel import BpfKernel
from tailcalld.misses import MissMonitor
from tailcalld.peers import Peer
from tailcalld.protocol import ListResult
from tailcalld.slots import SlotManager
from tailcalld.state import StateStore
from tailcalld.syscalls import SyscallTable


ME = Peer.this_process()


def new_compiler() -> Compiler:
    return Compiler(LiveSettings(Settings(compile_timeout=60.0)))


@asynccontextmanager
async def core(pin_dir: Path, state_dir: Path) -> AsyncIterator[SlotManager]:
    syscalls = SyscallTable.for_this_machine(NR_SLOTS)
    compiler = new_compiler()
    kernel = await BpfKernel.open(pin_dir, compiler, syscalls.compat_table())
    manager = SlotManager(kernel, StateStore(state_dir), syscalls, MissMonitor(kernel.miss_totals, syscalls.label))
    try:
        await manager.restore()
        yield manager
    finally:
        manager.close()
        kernel.close()
        await compiler.aclose()  # its workers started ahead, gone before the loop ends


def run(pin_dir: Path, state_dir: Path, scenario: Callable[[SlotManager], Awaitable[None]]) -> None:
    async def main() -> None:
        async with core(pin_dir, state_dir) as manager:
            await scenario(manager)
    asyncio.run(main())


def attach(slot: int | str, source: str, function: str | None = None) -> tuple[int | str, Artifact, str | None, str]:
    """SlotManager.attach's arguments for bcc C ``source``."""
    return slot, Artifact("bcc", source.encode()), function, "test.c"


@pytest.mark.parametrize("slot", [NR_FCHMODAT, "fchmodat"], ids=["by-number", "by-name"])
def test_attach_counts_every_call(pin_root: Path, tmp_path: Path, slot: int | str) -> None:
    counter = pin_root / "maps" / "count"

    async def scenario(m: SlotManager) -> None:
        result = await m.attach(*attach(slot, counting_handler(counter)), ME)
        assert (result.slot, result.syscall, result.function) == (NR_FCHMODAT, "fchmodat", "count_calls")
        assert result.replaced_prog_id is None
        fchmodat(1000)
        fchmodat(50, dirfd=DIRFD_MAGIC + 1)  # filtered out by the handler
        assert read_counter(counter) == 1000
        # The pinned prog array holds our program at 268, as bpftool sees it.
        assert kernel_slots(pin_root / "daemon" / "prog_array") == {NR_FCHMODAT: result.prog_id}

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_detach_stops_the_handler(pin_root: Path, tmp_path: Path) -> None:
    counter = pin_root / "maps" / "count"

    async def scenario(m: SlotManager) -> None:
        attached = await m.attach(*attach("fchmodat", counting_handler(counter)), ME)
        fchmodat(10)
        detached = await m.detach(NR_FCHMODAT, ME)
        assert detached.prog_id == attached.prog_id
        before_misses = m.kernel.miss_totals()[NR_FCHMODAT]
        fchmodat(10)
        assert read_counter(counter) == 10
        assert m.kernel.miss_totals()[NR_FCHMODAT] - before_misses >= 10  # now a miss
        assert kernel_slots(pin_root / "daemon" / "prog_array") == {}
        assert m.list_slots() == []
        with pytest.raises(SlotEmpty):
            await m.detach(NR_FCHMODAT, ME)

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_replace_is_one_update_and_frees_the_old_program(pin_root: Path, tmp_path: Path) -> None:
    c1, c2 = pin_root / "maps" / "c1", pin_root / "maps" / "c2"

    async def scenario(m: SlotManager) -> None:
        first = await m.attach(*attach(NR_FCHMODAT, counting_handler(c1, "v1")), ME)
        fchmodat(5)
        second = await m.attach(*attach(NR_FCHMODAT, counting_handler(c2, "v2")), ME)
        assert second.replaced_prog_id == first.prog_id
        fchmodat(7)
        assert (read_counter(c1), read_counter(c2)) == (5, 7)
        [info] = m.list_slots()
        assert (info.record.function, info.record.prog_id) == ("v2", second.prog_id)
        # Nothing holds v1 any more: the kernel freed it (freeing is deferred, so wait for it).
        for _ in range(200):
            try:
                os.close(prog_fd_by_id(first.prog_id))
            except OSError:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"program {first.prog_id} is still loaded after being replaced")

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_bad_handlers_change_nothing(pin_root: Path, tmp_path: Path) -> None:
    counter = pin_root / "maps" / "count"

    async def scenario(m: SlotManager) -> None:
        good = await m.attach(*attach(NR_FCHMODAT, counting_handler(counter)), ME)

        with pytest.raises(CompileError) as compile_err:
            await m.attach(*attach(NR_FCHMODAT, "int broken(struct bpf_raw_tracepoint_args *ctx) { return nope; }"), ME)
        assert "use of undeclared identifier 'nope'" in compile_err.value.details["log"]

        rejected = ("int reject(struct bpf_raw_tracepoint_args *ctx)"
                    " { u64 *p = (u64 *)ctx; return p[100]; }")
        with pytest.raises(VerifierRejected) as verifier_err:
            await m.attach(*attach(NR_FCHMODAT, rejected), ME)
        assert "invalid bpf_context access" in verifier_err.value.details["log"]

        two = ("int a(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
               "int b(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n")
        with pytest.raises(FunctionAmbiguous) as ambiguous:
            await m.attach(*attach(NR_FCHMODAT, two), ME)
        assert ambiguous.value.details["candidates"] == ["a", "b"]
        with pytest.raises(FunctionNotFound):
            await m.attach(*attach(NR_FCHMODAT, two, function="c"), ME)
        with pytest.raises(SlotOutOfRange):
            await m.attach(*attach(NR_SLOTS, two, function="a"), ME)
        with pytest.raises(UnknownSyscall):
            await m.attach(*attach("fchmodatt", two, function="a"), ME)

        assert m.kernel.slot(NR_FCHMODAT) == good.prog_id
        fchmodat(3)
        assert read_counter(counter) == 3
        # Picking one of several functions explicitly works.
        chosen = await m.attach(*attach(NR_FCHMODAT, two, function="b"), ME)
        assert chosen.function == "b"

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_concurrent_attaches_to_one_slot_are_serialised(pin_root: Path, tmp_path: Path) -> None:
    async def scenario(m: SlotManager) -> None:
        sources = [counting_handler(pin_root / "maps" / f"c{i}", f"h{i}") for i in range(3)]
        results = await asyncio.gather(*(m.attach(*attach(NR_FCHMODAT, s), ME) for s in sources))
        # The slot lock is FIFO: each attach replaced exactly the one before it.
        assert [r.replaced_prog_id for r in results] == [None, results[0].prog_id, results[1].prog_id]
        assert m.kernel.slot(NR_FCHMODAT) == results[2].prog_id
        assert len(m.list_slots()) == 1

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_warm_attach_reuses_the_loaded_program(pin_root: Path, tmp_path: Path) -> None:
    counter = pin_root / "maps" / "shared"
    source = counting_handler(counter)

    async def scenario(m: SlotManager) -> None:
        first = await m.attach(*attach(NR_FCHMODAT, source), ME)
        second = await m.attach(*attach("getppid", source), ME)  # same handler, another slot
        again = await m.attach(*attach(NR_FCHMODAT, source), ME)  # same handler, same slot
        assert first.prog_id == second.prog_id == again.prog_id  # one program: nothing was loaded again
        assert again.unchanged and again.replaced_prog_id is None  # the slot ran it already: nothing done
        fresh = await m.attach(*attach("getppid", source), ME, fresh=True)
        assert fresh.prog_id != first.prog_id
        await m.detach(NR_FCHMODAT, ME)  # the shared program's other user keeps it
        assert {v.record.slot: v.record.prog_id for v in m.list_slots()} == {110: fresh.prog_id}
        fchmodat(4)
        assert read_counter(counter) == 0  # the detached slot's (shared) program no longer runs for it

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_the_list_cache_is_the_list_model_serialised(pin_root: Path, tmp_path: Path) -> None:
    async def scenario(m: SlotManager) -> None:
        cache = ListCache()
        assert json.loads(cache.reply(m.list_slots())) == {"slots": []}
        await m.attach(*attach(NR_FCHMODAT, counting_handler(pin_root / "maps" / "c")), ME)
        for _ in range(50):
            os.getppid()  # misses while the getppid slot is still empty
        await m.attach(*attach("getppid", "int g(struct bpf_raw_tracepoint_args *c) { return 0; }"), ME)
        await asyncio.sleep(0.2)  # past the counters' snapshot age, so both read the same values
        views = m.list_slots()
        fast = ListResult.model_validate_json(cache.reply(views))  # valid on the wire
        model = ListResult(slots=[slot_info(v) for v in views])
        assert json.loads(cache.reply(views)) == json.loads(model.model_dump_json())  # cached entries too
        assert [s.slot for s in fast.slots] == [110, NR_FCHMODAT] and fast.slots[0].misses >= 50

    run(pin_root / "daemon", tmp_path / "state", scenario)


def test_restart_adopts_the_pinned_dispatcher_and_slots(pin_root: Path, tmp_path: Path) -> None:
    counter = pin_root / "maps" / "count"
    pin_dir = pin_root / "daemon"
    ids: dict[str, int] = {}

    async def first(m: SlotManager) -> None:
        ids["dispatcher"] = m.kernel.info.prog_id
        ids["handler"] = (await m.attach(*attach(NR_FCHMODAT, counting_handler(counter)), ME)).prog_id

    async def second(m: SlotManager) -> None:
        assert m.kernel.info.adopted
        assert m.kernel.info.prog_id == ids["dispatcher"]
        [info] = m.list_slots()
        assert (info.record.slot, info.record.prog_id, info.record.function) == (NR_FCHMODAT, ids["handler"],
                                                                                "count_calls")

    run(pin_dir, tmp_path / "state", first)
    fchmodat(25)  # no daemon holds anything now: the pins keep the handler running
    assert read_counter(counter) == 25
    run(pin_dir, tmp_path / "state", second)


def test_one_owner_per_pin_dir_and_foreign_pins_are_refused(pin_root: Path, tmp_path: Path) -> None:
    async def scenario(m: SlotManager) -> None:
        with pytest.raises(AlreadyRunning):
            await Dispatcher.open_or_load(m.kernel.info.pin_dir, new_compiler())

    run(pin_root / "daemon", tmp_path / "state", scenario)

    foreign = pin_root / "foreign"
    foreign.mkdir()
    pin_foreign_map(foreign / "prog_array")
    with pytest.raises(PinConflict) as conflict:
        run(foreign, tmp_path / "state", lambda m: asyncio.sleep(0))
    assert str(foreign / "prog_array") in conflict.value.message
    assert not (foreign / "link").exists()  # nothing attached

    # The dispatcher's program pin is tailcalld's too: a map there is refused before any load.
    (foreign / "prog_array").unlink()
    pin_foreign_map(foreign / "prog")
    with pytest.raises(PinConflict) as conflict:
        run(foreign, tmp_path / "state", lambda m: asyncio.sleep(0))
    assert str(foreign / "prog") in conflict.value.message
    assert not (foreign / "link").exists()


def test_every_pin_is_found_to_be_the_object_held(pin_root: Path, tmp_path: Path) -> None:
    """The upkeep's check of the pins (restore_pins) accepts its own, freshly loaded or adopted:
    a link fd the kernel just made and one opened from the pin are both links."""
    async def scenario(m: SlotManager) -> None:
        assert m.kernel.restore_pins() == []

    run(pin_root / "daemon", tmp_path / "state", scenario)  # loaded
    run(pin_root / "daemon", tmp_path / "state", scenario)  # adopted


UNUSED_NR = 1000  # past every syscall table (ENOSYS), but sys_enter still fires: nobody else calls it


def raw_syscall(nr: int, n: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(n):
        libc.syscall(nr)


def test_hits_and_misses_are_exact_per_slot(pin_root: Path, tmp_path: Path) -> None:
    async def scenario(m: SlotManager) -> None:
        await m.attach(*attach(UNUSED_NR, "int h(struct bpf_raw_tracepoint_args *c) { return 0; }"), ME)
        raw_syscall(UNUSED_NR, 1000)
        await asyncio.sleep(0.2)  # past the counters' snapshot age
        [view] = m.list_slots()
        assert (view.hits, view.misses, view.state) == (1000, 0, "in-sync")
        m.kernel.clear_slot(UNUSED_NR)  # emptied behind the registry's back: now every call misses
        raw_syscall(UNUSED_NR, 300)
        await asyncio.sleep(0.2)
        [view] = m.list_slots()
        assert (view.hits, view.misses, view.state) == (1000, 300, "kernel-empty")
        status = m.status()
        assert status.hits_total == 1000 and status.misses_total >= 300  # hits: of the slots tailcalld fills

    run(pin_root / "daemon", tmp_path / "state", scenario)
