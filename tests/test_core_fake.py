"""Every rollback branch of the core, on the in-memory kernel (tests/fakes.py).

Each failure is injected at one step of a change (compile, source write, state write, kernel
update, the undo's own state write) and the test checks that memory, the state file, the
kernel's slots and our open program fds are all exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes import NR_SLOTS, FakeKernel, FlakyStore, open_fds, run_on_fake
from tailcalld import reconcile
from tailcalld.dialects import Artifact
from tailcalld.errors import CompileError, KernelError, SlotEmpty, StateUnwritable, Unloading
from tailcalld.peers import Peer
from tailcalld.slots import SlotManager
from tailcalld.state import SlotRecord

ME = Peer(pid=1, uid=0, gid=0, comm="test")
FCHMODAT, GETPPID = 268, 110
V1 = Artifact("bcc", b"int v1(struct bpf_raw_tracepoint_args *ctx) { return 0; }")
V2 = Artifact("bcc", b"int v2(struct bpf_raw_tracepoint_args *ctx) { return 0; }")


@dataclass
class Core:
    kernel: FakeKernel
    store: FlakyStore
    manager: SlotManager

    def snapshot(self) -> tuple[object, ...]:
        reg = self.manager.registry
        saved = self.store.path.read_bytes() if self.store.path.exists() else None
        return (saved, dict(self.kernel.slots), {s: h.record for s, h in reg.handlers.items()},
                dict(reg.unrestored), open_fds())

    def saved_slots(self) -> dict[int, int]:
        return {int(s): r["prog_id"] for s, r in json.loads(self.store.path.read_text())["slots"].items()}


def run(tmp_path: Path, scenario: Callable[[Core], Awaitable[None]], kernel: FakeKernel | None = None) -> None:
    run_on_fake(tmp_path, {"fchmodat": FCHMODAT, "getppid": GETPPID},
                lambda k, store, manager: scenario(Core(k, store, manager)), kernel)


async def attach(c: Core, artifact: Artifact, slot: int = FCHMODAT, fresh: bool = False) -> int:
    return (await c.manager.attach(slot, artifact, None, "h.c", ME, fresh)).prog_id


def test_attach_replace_detach_reach_memory_disk_and_kernel(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        first = await attach(c, V1)
        assert c.kernel.slots == {FCHMODAT: first} == c.saved_slots()
        second = await attach(c, V2)
        assert c.kernel.slots == {FCHMODAT: second} == c.saved_slots()
        await c.manager.detach("fchmodat", ME)
        assert c.kernel.slots == {} == c.saved_slots()

    fds = open_fds()
    run(tmp_path, scenario)
    assert open_fds() == fds  # every program closed once the manager is closed


@pytest.mark.parametrize("step", ["compile", "source write", "state write", "kernel update"])
def test_a_failed_replace_changes_nothing(tmp_path: Path, step: str) -> None:
    async def scenario(c: Core) -> None:
        old = await attach(c, V1)
        before = c.snapshot()
        expected: type[Exception] = StateUnwritable
        if step == "compile":
            c.kernel.fail_load, expected = CompileError("nope"), CompileError
        elif step == "source write":
            c.store.fail_artifacts = True
        elif step == "state write":
            c.store.fail_saves = [True]
        else:
            c.kernel.fail_set, expected = True, KernelError
        with pytest.raises(expected):
            await attach(c, V2)
        assert c.snapshot() == before  # memory, state file, kernel and open fds
        held = c.manager.registry.handlers[FCHMODAT].prog
        assert held is not None and not held.closed and held.id == old  # the old program still owned

    run(tmp_path, scenario)


def test_a_refused_attach_whose_undo_cannot_be_written_is_not_left_on_disk(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        old = await attach(c, V1)
        c.kernel.fail_set = True
        c.store.fail_saves = [False, True]  # the change is written, its undo is not
        with pytest.raises(KernelError):
            await attach(c, V2)
        assert c.kernel.slots == {FCHMODAT: old}
        assert c.saved_slots() != {FCHMODAT: old}  # stale for now: it names the refused program
        await c.manager.repair_drift()  # the daemon's periodic round rewrites it
        assert c.saved_slots() == {FCHMODAT: old}

    run(tmp_path, scenario)


@pytest.mark.parametrize("step", ["state write", "kernel update"])
def test_a_failed_detach_changes_nothing(tmp_path: Path, step: str) -> None:
    async def scenario(c: Core) -> None:
        await attach(c, V1)
        before = c.snapshot()
        if step == "state write":
            c.store.fail_saves = [True]
        else:
            c.kernel.fail_clear = True
        with pytest.raises(StateUnwritable if step == "state write" else KernelError):
            await c.manager.detach(FCHMODAT, ME)
        assert c.snapshot() == before

    run(tmp_path, scenario)


def test_an_unrestored_record_survives_a_failed_attach_and_a_detach_forgets_it(tmp_path: Path) -> None:
    record = SlotRecord(slot=FCHMODAT, function="v1", prog_id=7, source_sha256="0" * 64, filename="h.c",
                        attached_by_uid=0, attached_at=None)

    async def scenario(c: Core) -> None:
        reg = c.manager.registry
        reg.unrestored[FCHMODAT] = record  # as a start that could not rebuild it leaves it
        reg.save()
        c.kernel.fail_load = CompileError("nope")
        with pytest.raises(CompileError):
            await attach(c, V2)
        c.kernel.fail_set = True
        with pytest.raises(KernelError):
            await attach(c, V2)
        assert reg.unrestored == {FCHMODAT: record} and c.saved_slots() == {FCHMODAT: 7}
        [view] = c.manager.list_slots()  # listed, and said to be not restored
        assert (view.record, view.state, view.kernel_prog_id) == (record, "not-restored", None)
        with pytest.raises(SlotEmpty):  # the kernel slot is empty: nothing to detach there...
            await c.manager.detach(FCHMODAT, ME)
        assert reg.unrestored == {} and c.saved_slots() == {}  # ...but the record is forgotten

    run(tmp_path, scenario)


def test_detaching_an_empty_slot_is_an_error_that_changes_nothing(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        before = c.snapshot()
        with pytest.raises(SlotEmpty):
            await c.manager.detach(GETPPID, ME)
        assert c.snapshot() == before

    run(tmp_path, scenario)


def test_warm_attach_loads_nothing_and_fresh_loads_again(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        first = await attach(c, V1)
        assert c.kernel.loads == 1
        assert await attach(c, V1, GETPPID) == first and c.kernel.loads == 1
        assert await attach(c, V1, GETPPID, fresh=True) != first and c.kernel.loads == 2

    run(tmp_path, scenario)


def test_unload_all_empties_everything_then_refuses_changes(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        await attach(c, V1)
        await attach(c, V2, GETPPID)
        fds = open_fds()
        unloaded = await c.manager.unload_all(ME)
        assert unloaded.slots == [GETPPID, FCHMODAT] and len(unloaded.pins) == 3
        assert c.kernel.slots == {} == c.saved_slots() and c.kernel.pins == []
        assert open_fds() == fds - 2  # both programs closed
        with pytest.raises(Unloading):
            await attach(c, V1)

    run(tmp_path, scenario)


def test_drift_is_repaired_with_the_held_program(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        ours = await attach(c, V1)
        c.kernel.slots.pop(FCHMODAT)  # bpftool emptied our slot
        c.kernel.slots[GETPPID] = c.kernel.load_foreign()  # and filled another
        loads = c.kernel.loads
        await c.manager.repair_drift()
        assert c.kernel.slots == {FCHMODAT: ours} and c.kernel.loads == loads  # no compile
        assert len(c.manager.registry.corrections) == 2

    run(tmp_path, scenario)


def test_a_kernel_view_older_than_a_change_is_not_repaired(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        reg = c.manager.registry
        generation, view = reg.generation, c.kernel.occupied()  # read before the attach below
        ours = await attach(c, V1)
        reconcile.repair_drift(reg, view, generation)
        assert c.kernel.slots == {FCHMODAT: ours} and not reg.corrections

    run(tmp_path, scenario)


def test_a_handler_that_cannot_be_rebuilt_at_start_stays_wanted(tmp_path: Path) -> None:
    async def first(c: Core) -> None:
        await attach(c, V1)

    async def after_reboot_broken(c: Core) -> None:
        assert c.kernel.slots == {} and c.manager.registry.unrestored.keys() == {FCHMODAT}
        assert c.saved_slots().keys() == {FCHMODAT}  # still wanted: the next start tries again

    async def after_reboot_fixed(c: Core) -> None:
        assert c.kernel.slots.keys() == {FCHMODAT} and not c.manager.registry.unrestored

    run(tmp_path, first)
    broken = FakeKernel()  # a reboot: empty slots...
    broken.fail_load = CompileError("the headers changed")  # ...and the compile fails once
    run(tmp_path, after_reboot_broken, broken)
    run(tmp_path, after_reboot_fixed, FakeKernel())


def test_exit_slots_are_their_own_slots_and_the_exit_dispatcher_follows_them(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        assert not c.kernel.exit_attached
        enter = await attach(c, V1, GETPPID)
        exit_ = (await c.manager.attach("getppid", V2, None, "r.c", ME, hook="exit")).prog_id
        assert c.kernel.exit_attached and c.kernel.slots == {GETPPID: enter, NR_SLOTS + GETPPID: exit_}
        saved = json.loads(c.store.path.read_text())
        assert ({int(k): r["prog_id"] for k, r in saved["slots"].items()},
                {int(k): (r["slot"], r["prog_id"]) for k, r in saved["exit_slots"].items()}) == (
                    {GETPPID: enter}, {GETPPID: (GETPPID, exit_)})
        views = {(v.nr, v.hook): v.record.prog_id for v in c.manager.list_slots()}
        assert views == {(GETPPID, "enter"): enter, (GETPPID, "exit"): exit_}
        await c.manager.detach("getppid", ME, hook="exit")
        assert not c.kernel.exit_attached and c.kernel.slots == {GETPPID: enter}
        assert json.loads(c.store.path.read_text())["exit_slots"] == {}

    run(tmp_path, scenario)


def test_a_failed_exit_attach_leaves_no_exit_dispatcher(tmp_path: Path) -> None:
    async def scenario(c: Core) -> None:
        before = c.snapshot()
        c.kernel.fail_set = True
        with pytest.raises(KernelError):
            await c.manager.attach("getppid", V1, None, "r.c", ME, hook="exit")
        assert c.snapshot() == before and not c.kernel.exit_attached

    run(tmp_path, scenario)


def test_an_end_that_cannot_be_written_is_retried_and_a_chain_unwinds(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """attach --for over attach --for: the slot unwinds one deadline at a time, back to the
    first handler; a state file that cannot be written when a deadline passes keeps the slot as
    it is (memory, disk and kernel agree) until a later try succeeds."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from tailcalld import slots
    monkeypatch.setattr(slots, "EXPIRY_RETRY", 0.05)
    V3 = Artifact("bcc", b"int v3(struct bpf_raw_tracepoint_args *ctx) { return 0; }")

    async def scenario(c: Core) -> None:
        m = c.manager
        first = await attach(c, V1)
        soon = datetime.now(UTC) + timedelta(seconds=0.3)
        second = (await m.attach(FCHMODAT, V2, None, "v2.c", ME, expires_at=soon)).prog_id
        top = (await m.attach(FCHMODAT, V3, None, "v3.c", ME, expires_at=soon + timedelta(seconds=0.2))).prog_id
        chain = m.registry.handlers[FCHMODAT].record
        assert chain.previous is not None and chain.previous.prog_id == second
        assert chain.previous.previous is not None and chain.previous.previous.prog_id == first
        c.store.fail_saves = [True]  # the disk is full when the first end comes
        runner = asyncio.create_task(m.expire_due(ME))
        try:
            for _ in range(200):
                await asyncio.sleep(0.02)
                handler = m.registry.handlers.get(FCHMODAT)
                if handler is not None and handler.record.source_sha256 == V1.sha256:
                    break
            handler = m.registry.handlers[FCHMODAT]
            assert handler.record.source_sha256 == V1.sha256 and handler.record.expires_at is None
            assert c.kernel.slots == {FCHMODAT: handler.record.prog_id} == c.saved_slots()
            assert top not in c.kernel.slots.values()
        finally:
            runner.cancel()
    run(tmp_path, scenario)
