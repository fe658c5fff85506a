"""Several handlers per syscall, in order (issue 15, item 4: attach --priority).  On the real
kernel: each handler counts into pinned maps read with bpftool, and marks a shared value, so the
later handler can tell whether the earlier one ran before it in the same call."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness import (DIRFD_MAGIC, NR_FCHMODAT, CallingChild, DaemonProcess, pinned_entries, fchmodat, journal, kernel_slots, read_counter, remove_pin_tree,
                     start_daemon, wait_journal)
from test_core_kernel import ME, run
from test_libbpf import ProgMap, build_object, libbpf_counter
from tailcalld import bpfsys
from tailcalld.chain import Change, Chains
from tailcalld.dialects import Artifact
from tailcalld.dispatcher import NR_SLOTS
from tailcalld.errors import BadRequest, PriorityClash, SlotEmpty
from tailcalld.metrics_http import fetch
from tailcalld.slots import SlotManager


def ordered_handler(runs: Path, seq: Path, function: str, dirfd: int, after: int, mark: int, ret: int = 0,
                    any_process: bool = False) -> str:
    """bcc C: for this process's fchmodat(dirfd, ...) (``any_process``: anyone's), count the run
    in ``runs`` entry 0, and in entry 1 when the shared ``seq`` holds ``after`` (the mark of the
    handler meant to run just before it, in this very call); then mark ``seq`` and return ``ret``."""
    who = "" if any_process else f" || (bpf_get_current_pid_tgid() >> 32) != {os.getpid()}"
    return f"""
#include <uapi/linux/ptrace.h>
#include "tailcalld.h"
BPF_TABLE_PINNED("array", u32, u64, runs, 2, "{runs}");
BPF_TABLE_PINNED("array", u32, u64, seq, 1, "{seq}");

int {function}(struct bpf_raw_tracepoint_args *ctx)
{{
    if ((int)TC_ARG(ctx, 0) != {dirfd}{who})
        return TC_CONTINUE;
    u32 zero = 0, one = 1;
    u64 *n = runs.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    u64 *s = seq.lookup(&zero);
    if (s) {{
        if (*s == {after}) {{
            u64 *m = runs.lookup(&one);
            if (m)
                __sync_fetch_and_add(m, 1);
        }}
        *s = {mark};
    }}
    return {ret};
}}
"""


def pair(pin_root: Path, dirfd: int) -> tuple[Path, Path, Artifact, Artifact]:
    """Two handlers of this process's fchmodat(dirfd, ...): the first marks each call, the second
    counts the calls in which it ran after the first (``counts``).  Their counts' pins, then they."""
    first_runs, second_runs, seq = pin_root / "first", pin_root / "second", pin_root / "seq"
    first = Artifact("bcc", ordered_handler(first_runs, seq, "first", dirfd, after=-1, mark=1).encode())
    second = Artifact("bcc", ordered_handler(second_runs, seq, "second", dirfd, after=1, mark=2).encode())
    return first_runs, second_runs, first, second


def counts(runs: Path) -> tuple[int, int]:
    """(runs, runs right after the handler before it) of a handler's pinned counts."""
    entries = pinned_entries(runs)
    return entries.get(0, 0), entries.get(1, 0)



def test_handlers_run_in_order_of_priority(tmp_path: Path, pin_root: Path) -> None:
    pin_dir = pin_root / "d"
    dirfd = 7000 + secrets.randbelow(1000)
    # The first (priority 10) marks 1; the second (50) counts the calls in which it saw that mark.
    first_runs, second_runs, first, second = pair(pin_root, dirfd)
    stopping = Artifact("bcc", ordered_handler(first_runs, pin_root / "seq", "first", dirfd, after=-1, mark=1,
                                               ret=1).encode())

    async def scenario(m: SlotManager) -> None:
        b = await m.attach(NR_FCHMODAT, second, None, "second.c", ME, priority=50)
        # Alone in its slot it sits there itself: the one-handler case costs what it always did.
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == b.prog_id
        a = await m.attach(NR_FCHMODAT, first, None, "first.c", ME, priority=10)
        runner = kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT]
        assert runner not in (a.prog_id, b.prog_id)  # the slot holds the chain's runner now
        fchmodat(300, dirfd)
        assert counts(first_runs)[0] == 300
        assert counts(second_runs) == (300, 300)  # every call: after the first, in the same call

        views = m.list_slots()
        assert [(v.record.priority, v.record.prog_id, v.state) for v in views] == [
            (10, a.prog_id, "in-sync"), (50, b.prog_id, "in-sync")]
        assert all(v.hits >= 300 for v in views)
        assert m.status().chained == 1 and m.status().slots_used == 2

        # The first one replaced by one that stops the chain: the second no longer runs.
        c = await m.attach(NR_FCHMODAT, stopping, None, "first.c", ME, priority=10)
        assert c.replaced_prog_id == a.prog_id
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == runner  # one entry changed, not the runner
        fchmodat(200, dirfd)
        assert counts(first_runs)[0] == 500 and counts(second_runs) == (300, 300)

        # Detaching one leaves the other, which sits in the slot itself again.
        with pytest.raises(PriorityClash, match="priorities 10, 50"):
            await m.detach(NR_FCHMODAT, ME)
        d = await m.detach(NR_FCHMODAT, ME, priority=10)
        assert d.prog_id == c.prog_id
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == b.prog_id
        fchmodat(100, dirfd)
        assert counts(first_runs)[0] == 500 and counts(second_runs)[0] == 400
        assert not list((pin_dir / "chain" / "runners").iterdir())
        assert m.status().chained == 1  # one handler with a priority still
        await m.detach(NR_FCHMODAT, ME, priority=50)
        assert NR_FCHMODAT not in kernel_slots(pin_dir / "prog_array")
        assert kernel_slots(pin_dir / "chain" / "links") == {}
        with pytest.raises(SlotEmpty):
            await m.detach(NR_FCHMODAT, ME, priority=50)

    run(pin_dir, tmp_path / "state", scenario)


def test_priority_misuse_is_refused_and_changes_nothing(tmp_path: Path, pin_root: Path) -> None:
    pin_dir = pin_root / "d"
    dirfd = 7000 + secrets.randbelow(1000)
    runs, other_runs, seq = pin_root / "runs", pin_root / "other", pin_root / "seq"
    one = Artifact("bcc", ordered_handler(runs, seq, "one", dirfd, after=-1, mark=1).encode())
    other = Artifact("bcc", ordered_handler(other_runs, seq, "other", dirfd, after=-1, mark=2).encode())

    async def scenario(m: SlotManager) -> None:
        a = await m.attach(NR_FCHMODAT, one, None, "one.c", ME, priority=10)
        with pytest.raises(PriorityClash, match=r"priority 10 of slot fchmodat \(268\) is taken by one from one.c"):
            await m.attach(NR_FCHMODAT, other, None, "other.c", ME, priority=10)
        with pytest.raises(PriorityClash, match="attach with --priority"):
            await m.attach(NR_FCHMODAT, other, None, "other.c", ME)
        with pytest.raises(BadRequest, match="out of range"):
            await m.attach(NR_FCHMODAT, other, None, "other.c", ME, priority=1000)
        with pytest.raises(BadRequest, match="--priority or --cgroup"):
            await m.attach(NR_FCHMODAT, other, None, "other.c", ME, priority=20, cgroup="/sys/fs/cgroup")
        assert [(v.record.priority, v.record.prog_id) for v in m.list_slots()] == [(10, a.prog_id)]
        # --expect names what it replaces: then another file may take the priority.
        b = await m.attach(NR_FCHMODAT, other, None, "other.c", ME, priority=10, expect=a.prog_id)
        assert b.replaced_prog_id == a.prog_id
        await m.detach(NR_FCHMODAT, ME, priority=10)
        # A handler without priority refuses handlers with one beside it.
        await m.attach(NR_FCHMODAT, one, None, "one.c", ME)
        with pytest.raises(PriorityClash, match="attached without --priority"):
            await m.attach(NR_FCHMODAT, other, None, "other.c", ME, priority=20)
        fchmodat(10, dirfd)
        assert read_counter(other_runs) == 0 and read_counter(runs) == 10
        await m.detach(NR_FCHMODAT, ME)

    run(pin_dir, tmp_path / "state", scenario)


def test_a_chain_survives_a_restart(tmp_path: Path, pin_root: Path) -> None:
    pin_dir, state = pin_root / "d", tmp_path / "state"
    dirfd = 7000 + secrets.randbelow(1000)
    first_runs, second_runs, first, second = pair(pin_root, dirfd)
    ids: dict[int, int] = {}

    async def attach(m: SlotManager) -> None:
        ids[50] = (await m.attach(NR_FCHMODAT, second, None, "second.c", ME, priority=50)).prog_id
        ids[10] = (await m.attach(NR_FCHMODAT, first, None, "first.c", ME, priority=10)).prog_id

    async def adopted(m: SlotManager) -> None:
        assert [(v.record.priority, v.record.prog_id, v.state) for v in m.list_slots()] == [
            (10, ids[10], "in-sync"), (50, ids[50], "in-sync")]
        fchmodat(100, dirfd)
        assert counts(second_runs) == (110, 110)
        # Changes after the restart: the runner and the handlers are found again.
        await m.detach(NR_FCHMODAT, ME, priority=10)
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == ids[50]
        fchmodat(50, dirfd)
        assert counts(second_runs)[0] == 160 and counts(first_runs)[0] == 110

    run(pin_dir, state, attach)
    fchmodat(10, dirfd)  # no daemon: the pins keep the chain running
    assert counts(second_runs) == (10, 10)
    run(pin_dir, state, adopted)


def test_changes_around_a_handler_lose_none_of_its_calls(tmp_path: Path, pin_root: Path) -> None:
    """A child calls without pause while handlers come and go around one that stays (priority 50):
    alone in the slot, behind a runner when one joins, a runner swapped for another at each
    change, alone again.  It runs for every call the child made, exactly."""
    pin_dir = pin_root / "d"
    dirfd = 7000 + secrets.randbelow(1000)
    steady_runs, other_runs, seq = pin_root / "steady", pin_root / "other", pin_root / "seq"
    steady = Artifact("bcc", ordered_handler(steady_runs, seq, "steady", dirfd, -1, 2, any_process=True).encode())

    def other(n: int) -> Artifact:  # another program each time
        return Artifact("bcc", ordered_handler(other_runs, seq, f"other{n}", dirfd, -1, 1, any_process=True).encode())


    async def scenario(m: SlotManager) -> None:
        await m.attach(NR_FCHMODAT, steady, None, "steady.c", ME, priority=50)
        with CallingChild(tmp_path, dirfd) as child:
            for priority, n in ((10, 0), (10, 1), (90, 2), (10, 3)):  # join, replace, join after, replace
                await m.attach(NR_FCHMODAT, other(n), None, f"other{priority}.c", ME, priority=priority)
                await asyncio.sleep(0.05)
            for priority in (10, 90):  # leave: a runner of one fewer, then the steady one alone
                await m.detach(NR_FCHMODAT, ME, priority=priority)
                await asyncio.sleep(0.05)
        assert counts(steady_runs)[0] == child.made
        assert counts(other_runs)[0] > 0  # the others ran too (two at a time, for a while)
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == m.list_slots()[0].record.prog_id

    run(pin_dir, tmp_path / "state", scenario)


def test_a_chain_changed_behind_our_back_is_put_right(tmp_path: Path, pin_root: Path) -> None:
    """bpftool empties the slot of a chain, then a handler's entry: the drift repair puts the
    runner and the handler back; a program put in the slot by someone else is removed."""
    pin_dir = pin_root / "d"
    dirfd = 7000 + secrets.randbelow(1000)
    first_runs, second_runs, first, second = pair(pin_root, dirfd)

    async def scenario(m: SlotManager) -> None:
        await m.attach(NR_FCHMODAT, first, None, "first.c", ME, priority=10)
        await m.attach(NR_FCHMODAT, second, None, "second.c", ME, priority=50)
        key = str(NR_FCHMODAT)
        subprocess.run(["bpftool", "map", "delete", "pinned", str(pin_dir / "prog_array"), "key",
                        *key_bytes(NR_FCHMODAT)], check=True)
        assert {v.state for v in m.list_slots()} == {"kernel-empty"}
        await m.repair_drift()
        assert {v.state for v in m.list_slots()} == {"in-sync"}
        assert any(f"fchmodat ({key}) priority 10 was emptied" in c for c in m.registry.corrections)
        fchmodat(20, dirfd)
        assert counts(second_runs) == (20, 20)
        entry = 16 * NR_FCHMODAT + 0  # the first handler's entry (chain.py: MAX_LINKS per slot)
        subprocess.run(["bpftool", "map", "delete", "pinned", str(pin_dir / "chain" / "links"), "key",
                        *key_bytes(entry)], check=True)
        await m.repair_drift()
        assert {v.state for v in m.list_slots()} == {"in-sync"}
        fchmodat(10, dirfd)
        assert counts(first_runs)[0] == 30 and counts(second_runs) == (30, 30)
        # rm -rf pin_dir while we run: the chain's maps and runner are pinned again with the rest.
        subprocess.run(["rm", "-rf", str(pin_dir)], check=True)
        m.restore_pins()
        assert (pin_dir / "chain" / "runners" / key).exists() and (pin_dir / "chain" / "order").exists()
        assert set(kernel_slots(pin_dir / "chain" / "links").values()) == {v.record.prog_id for v in m.list_slots()}

    run(pin_dir, tmp_path / "state", scenario)


def key_bytes(key: int) -> list[str]:
    return [str(b) for b in key.to_bytes(4, "little")]


def listed(d: DaemonProcess) -> dict[int | None, dict[str, object]]:
    """The daemon's list entries by priority."""
    return {s["priority"]: s for s in d.call("list")["slots"]}


@pytest.mark.parametrize("reboot", [False, True], ids=["restart", "reboot"])
def test_a_chain_over_the_socket_through_a_restart(journald: None, tmp_path: Path, pin_root: Path,
                                                   reboot: bool) -> None:
    """tailcallctl attach --priority, list, show, status, metrics, the audit, save; a restart (or
    a reboot: pins gone, rebuilt from the state file); detach --priority, then apply of what
    save wrote brings the chain back."""
    dirfd = 7000 + secrets.randbelow(1000)
    first_runs, second_runs, seq = pin_root / "first", pin_root / "second", pin_root / "seq"
    first, second = tmp_path / "audit.c", tmp_path / "debug.c"
    first.write_text(ordered_handler(first_runs, seq, "audit", dirfd, after=-1, mark=1))
    second.write_text(ordered_handler(second_runs, seq, "debug", dirfd, after=1, mark=2))
    saved = tmp_path / "saved" / "apply.toml"
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        for path, priority in ((second, "50"), (first, "10")):
            r = d.ctl("attach", str(NR_FCHMODAT), str(path), "--priority", priority)
            assert r.returncode == 0, r.stderr
        fchmodat(30, dirfd)
        assert counts(first_runs)[0] == 30 and counts(second_runs) == (30, 30)
        slots = listed(d)
        assert [(p, s["function"], s["state"]) for p, s in sorted(slots.items())] == [
            (10, "audit", "in-sync"), (50, "debug", "in-sync")]
        table = d.ctl("list").stdout
        assert "PRIO" in table and "audit" in table and "debug" in table
        assert d.call("status")["chained"] == 1 and "with handlers in order" in d.ctl("status").stdout
        shown = d.ctl("show", str(NR_FCHMODAT), "--priority", "50", "--no-source").stdout
        assert "debug" in shown and "Priority  50 of 10, 50" in shown
        assert "audit" in d.ctl("show", str(NR_FCHMODAT), "--no-source").stdout  # the first, by default
        metrics = fetch(d.socket.parent / "metrics.sock").decode()
        for priority, function in ((10, "audit"), (50, "debug")):
            assert f'function="{function}",hook="enter",priority="{priority}",' in metrics
        assert "tailcalld_slots_chained 1.0" in metrics
        entries = wait_journal(lambda: journal(_PID=str(d.pid), TAILCALLD_ACTION="attach"), minimum=2)
        assert sorted(e["SLOT_PRIORITY"] for e in entries) == ["10", "50"]
        assert any("fchmodat (268) priority 10" in e["MESSAGE"] for e in entries)
        r = d.ctl("detach", str(NR_FCHMODAT))
        assert r.returncode == 1 and "priority_clash" in r.stderr and "--priority" in r.stderr
        saved.parent.mkdir()
        r = d.ctl("save", "-o", str(saved))
        assert r.returncode == 0, r.stderr
        assert "priority = 10" in saved.read_text() and "priority = 50" in saved.read_text()
    finally:
        assert d.stop() == 0
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert [(r["slot"], r["priority"]) for r in state["links"]] == [(NR_FCHMODAT, 10), (NR_FCHMODAT, 50)]
    assert state["slots"] == {}
    if reboot:
        remove_pin_tree(pin_root / "daemon")
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert sorted((p, s["state"]) for p, s in listed(d).items()) == [(10, "in-sync"), (50, "in-sync")]
        fchmodat(20, dirfd)
        assert counts(first_runs)[0] == 50 and counts(second_runs) == (50, 50)
        r = d.ctl("detach", str(NR_FCHMODAT), "--priority", "10")
        assert r.returncode == 0, r.stderr
        assert list(listed(d)) == [50]
        fchmodat(10, dirfd)
        assert counts(first_runs)[0] == 50 and counts(second_runs)[0] == 60
        r = d.ctl("apply", str(saved))
        assert r.returncode == 0, r.stderr
        assert "priority 10" in r.stdout
        fchmodat(10, dirfd)
        assert counts(first_runs)[0] == 60 and counts(second_runs) == (70, 60)  # the 10 calls it ran alone were after nothing
    finally:
        assert d.stop() == 0


def test_a_libbpf_object_from_elsewhere_runs_in_a_chain(daemon: DaemonProcess, tmp_path: Path, pin_root: Path) -> None:
    """A prebuilt .bpf.o that knows nothing of tailcalld (no tailcalld.h) takes its place in a
    chain as it is: it returns 0, so the handler after it runs too."""
    source = libbpf_counter("from_object", "object_hits")
    assert daemon.ctl("check", "-", input=source).returncode == 0  # fills the vmlinux.h cache
    obj = build_object(source, tmp_path, daemon)
    after_runs, seq = pin_root / "after", pin_root / "seq"
    after = tmp_path / "after.c"
    after.write_text(ordered_handler(after_runs, seq, "after", DIRFD_MAGIC, after=-1, mark=1))
    for path, priority in ((obj, "10"), (after, "20")):
        r = daemon.ctl("attach", "fchmodat", str(path), "--priority", priority)
        assert r.returncode == 0, r.stderr
    first = listed(daemon)[10]
    assert first["dialect"] == "object"
    hits = ProgMap(int(str(first["prog_id"])), "object_hits")
    try:
        fchmodat(21)
        assert hits.value() == 21 and counts(after_runs)[0] == 21
    finally:
        hits.close()


def test_exit_slots_chain_and_a_handler_with_a_deadline_leaves_its_chain(tmp_path: Path, pin_root: Path) -> None:
    """Handlers in order on an exit slot too; an attach --for at a priority ends by taking that
    handler out again (it replaced nothing), the others stay."""
    pin_dir = pin_root / "d"
    dirfd = 7000 + secrets.randbelow(1000)
    first_runs, second_runs, first, second = pair(pin_root, dirfd)

    async def scenario(m: SlotManager) -> None:
        await m.attach(NR_FCHMODAT, second, None, "second.c", ME, hook="exit", priority=50)
        until = datetime.now(UTC) + timedelta(seconds=1)
        await m.attach(NR_FCHMODAT, first, None, "first.c", ME, hook="exit", priority=10, expires_at=until)
        assert [(v.hook, v.record.priority, v.state) for v in m.list_slots()] == [
            ("exit", 10, "in-sync"), ("exit", 50, "in-sync")]
        fchmodat(40, dirfd)
        assert counts(first_runs)[0] == 40 and counts(second_runs) == (40, 40)
        assert m.status().next_expiry == until
        expiring = asyncio.create_task(m.expire_due(ME))
        try:
            for _ in range(100):
                if len(m.list_slots()) == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            expiring.cancel()
        [left] = m.list_slots()
        assert (left.record.priority, left.state) == (50, "in-sync")
        fchmodat(10, dirfd)
        assert counts(first_runs)[0] == 40 and counts(second_runs)[0] == 50
        exit_slot = kernel_slots(pin_dir / "exit" / "prog_array")[NR_FCHMODAT]
        assert exit_slot == left.record.prog_id  # alone again: in the slot itself
        await m.detach(NR_FCHMODAT, ME, hook="exit", priority=50)

    run(pin_dir, tmp_path / "state", scenario)


def test_unload_all_takes_the_chains_too(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    source = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
    for priority in (10, 20):
        d.call("attach", slot=NR_FCHMODAT, source=source, filename=f"h{priority}.c", priority=priority)
    assert (d.pin_dir / "chain" / "runners" / str(NR_FCHMODAT)).exists()
    with d.client() as c:
        assert c.call("unload-all")["slots_emptied"] == [NR_FCHMODAT]
    d.proc.wait(30)
    assert not d.pin_dir.exists()


def test_a_start_renews_a_runner_a_crash_left_behind_its_order(tmp_path: Path, pin_root: Path) -> None:
    """A change writes the chain's order just before it swaps the new runner into the slot: a
    crash in between leaves the slot running the runner of the order before.  Made by hand here
    (a runner of the first handler alone, pinned as the slot's); the next start makes the runner
    anew from the order, and both handlers run again."""
    pin_dir, state = pin_root / "d", tmp_path / "state"
    dirfd = 7000 + secrets.randbelow(1000)
    first_runs, second_runs, first, second = pair(pin_root, dirfd)

    async def attach(m: SlotManager) -> None:
        await m.attach(NR_FCHMODAT, first, None, "first.c", ME, priority=10)
        await m.attach(NR_FCHMODAT, second, None, "second.c", ME, priority=50)

    run(pin_dir, state, attach)
    chains = Chains(pin_dir / "chain", 2 * NR_SLOTS)
    prog_array = bpfsys.obj_get(str(pin_dir / "prog_array"))
    try:
        order = chains._orders[NR_FCHMODAT]
        stale = chains._load_runner(NR_FCHMODAT, {pos: p for pos, p in order.items() if p == 10})
        bpfsys.prog_array_set(prog_array, NR_FCHMODAT, stale.fd)
        chains.installed(Change(NR_FCHMODAT, dict(order), None, False, stale, stale.fd))
    finally:
        os.close(prog_array)
        chains.close()
    fchmodat(10, dirfd)
    assert counts(first_runs)[0] == 10 and counts(second_runs)[0] == 0  # the stale runner

    async def renewed(m: SlotManager) -> None:
        assert {v.state for v in m.list_slots()} == {"in-sync"}
        fchmodat(10, dirfd)
        assert counts(first_runs)[0] == 20 and counts(second_runs) == (10, 10)
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] != stale.id

    run(pin_dir, state, renewed)
