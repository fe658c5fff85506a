"""Once a handler is in a slot it keeps running until someone takes it out: through
restarts, crashes (kill -9), reboots (pins gone), upgrades of the dispatcher, and a corrupt
state file.  Only unload-all / --purge take everything out."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, OLD_DISPATCHERS, DaemonProcess, Workload, bpftool_empty, bpftool_fill,
                     counting_handler, fchmodat, kernel_slots, pin_old_dispatcher, pinned_link_prog, pinned_prog,
                     prog_name_by_id, read_counter, remove_pin_tree, saved_slots, slot_calls, start_counting,
                     start_daemon)
from tailcalld.client import Client, RemoteError
from tailcalld.dispatcher import LEGACY_PINS, dispatcher_function

CHURN_SLOTS = [300, 301, 302]  # fanotify_init.., rarely called: handlers there just return 0


def trivial_handler(tag: int) -> str:
    return f"int churn_{tag}(struct bpf_raw_tracepoint_args *ctx) {{ return {tag % 2}; }}\n"


def listed(d: DaemonProcess) -> dict[int, int]:
    with d.client() as c:
        return {s["slot"]: s["prog_id"] for s in c.call("list")["slots"]}


def assert_agree(d: DaemonProcess, state_dir: Path) -> None:
    kernel = kernel_slots(d.pin_dir / "prog_array")
    assert listed(d) == kernel == saved_slots(state_dir)


def test_kill_9_at_random_moments_loses_nothing(tmp_path: Path, pin_root: Path) -> None:
    rng = random.Random(1234)
    state = tmp_path / "state"
    counter = pin_root / "maps" / "steady"
    d, _ = start_counting(tmp_path, pin_root, counter)
    calls = 0
    try:
        for round_ in range(20):
            slot = rng.choice(CHURN_SLOTS)
            request = ({"command": "detach", "slot": slot} if rng.random() < 0.3 else
                       {"command": "attach", "slot": slot, "source": trivial_handler(round_)})
            sender = threading.Thread(target=_send_and_forget, args=(d.socket, request))
            sender.start()
            time.sleep(rng.uniform(0, 0.8))  # mid-compile, mid-swap, or after
            d.kill()
            sender.join()
            fchmodat(50)  # the daemon is dead: the pinned handler still counts
            calls += 50
            d = start_daemon(tmp_path, pin_root / "daemon")
            assert_agree(d, state)
            assert listed(d)[NR_FCHMODAT] == saved_slots(state)[NR_FCHMODAT]
            assert read_counter(counter) == calls, f"round {round_}"
    finally:
        d.stop()


def _send_and_forget(path: Path, request: dict) -> None:
    try:
        with Client(path, timeout=10) as c:
            c.call(**request)
    except (OSError, ConnectionError, RemoteError):
        pass  # killed under our feet: that is the point


def test_sigterm_and_restart_miss_no_call_under_load(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    with Workload() as work:
        time.sleep(0.2)
        assert d.stop() == 0
        time.sleep(0.3)  # no daemon at all
        d = start_daemon(tmp_path, pin_root / "daemon")
        time.sleep(0.2)
    try:
        assert work.made > 0 and read_counter(counter) == work.made
        with d.client() as c:
            status = c.call("status")
        assert status["adopted"] and status["corrections"] == []
    finally:
        d.stop()


def test_reboot_refills_every_slot_from_the_state(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    with d.client() as c:
        c.call("attach", slot="getppid", source=trivial_handler(7), filename="churn.c")
    assert d.stop() == 0
    # A reboot: bpffs is empty again.
    remove_pin_tree(pin_root / "daemon")
    remove_pin_tree(pin_root / "maps")
    (pin_root / "maps").mkdir()
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert_agree(d, tmp_path / "state")
        with d.client() as c:
            slots = {s["slot"]: s for s in c.call("list")["slots"]}
            status = c.call("status")
        assert set(slots) == {NR_FCHMODAT, 110}
        assert (slots[NR_FCHMODAT]["function"], slots[NR_FCHMODAT]["filename"]) == ("count_calls", "count.c")
        assert not status["adopted"] and len(status["corrections"]) == 2
        assert all("rebuilt" in line for line in status["corrections"])
        fchmodat(33)
        assert read_counter(counter) == 33
    finally:
        d.stop()


SHARED_MAP_HANDLER = """
BPF_ARRAY(hits, u64, 1);
int shared_hits(struct bpf_raw_tracepoint_args *ctx)
{
    int zero = 0;
    u64 *n = hits.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


def _map_ids(prog_id: int) -> list[int]:
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)["map_ids"]


def test_reboot_keeps_a_shared_handler_shared(tmp_path: Path, pin_root: Path) -> None:
    """Two slots running one program (a warm attach) run one program again after a reboot, with
    one set of maps; a --fresh copy stays a copy of its own.  Slots 600-602: no syscall has them."""
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        with d.client() as c:
            first = c.call("attach", slot=600, source=SHARED_MAP_HANDLER, filename="hits.c")["prog_id"]
            assert c.call("attach", slot=601, source=SHARED_MAP_HANDLER, filename="hits.c")["prog_id"] == first
            fresh = c.call("attach", slot=602, source=SHARED_MAP_HANDLER, filename="hits.c", fresh=True)["prog_id"]
            assert fresh != first
    finally:
        assert d.stop() == 0
    remove_pin_tree(pin_root / "daemon")  # a reboot: bpffs is empty again
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert_agree(d, tmp_path / "state")
        slots = kernel_slots(pin_root / "daemon" / "prog_array")
        assert set(slots) == {600, 601, 602} and first not in slots.values()
        assert slots[600] == slots[601] != slots[602]
        assert len(_map_ids(slots[600])) == 1 and _map_ids(slots[600]) != _map_ids(slots[602])
    finally:
        d.stop()


def test_corrupt_state_is_moved_aside_and_the_pins_are_kept(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, prog_id = start_counting(tmp_path, pin_root, counter)
    assert d.stop() == 0
    state_file = tmp_path / "state" / "state.json"
    state_file.write_text('{"version": 1, "slots": {"268": {"slot": "oops"')
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        aside = list((tmp_path / "state").glob("state.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_text().startswith('{"version": 1, "slots": {"268"')
        with d.client() as c:
            [slot] = c.call("list")["slots"]
            status = c.call("status")
        assert (slot["slot"], slot["prog_id"], slot["source_sha256"]) == (NR_FCHMODAT, prog_id, None)
        assert slot["function"] == "count_calls"  # read through the program's pin, not by id
        assert any("unreadable" in line for line in status["corrections"])
        assert saved_slots(tmp_path / "state") == {NR_FCHMODAT: prog_id}
        fchmodat(5)
        assert read_counter(counter) == 5
    finally:
        d.stop()


def test_hand_made_changes_are_corrected_at_start(tmp_path: Path, pin_root: Path) -> None:
    """The state file is the desired state: what bpftool changed behind tailcalld's back is undone."""
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    with d.client() as c:
        extra = c.call("attach", slot="getppid", source=trivial_handler(1))["prog_id"]
        c.call("detach", slot="getppid")
    assert d.stop() == 0
    prog_array = str(pin_root / "daemon" / "prog_array")
    bpftool_empty(prog_array, NR_FCHMODAT)
    assert kernel_slots(pin_root / "daemon" / "prog_array") == {}
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert_agree(d, tmp_path / "state")
        with d.client() as c:
            corrections = c.call("status")["corrections"]
        assert len(corrections) == 1 and "was empty: rebuilt count_calls" in corrections[0]
        fchmodat(4)
        assert read_counter(counter) == 4
        assert extra not in kernel_slots(pin_root / "daemon" / "prog_array").values()
    finally:
        d.stop()


@pytest.mark.parametrize("release", sorted(OLD_DISPATCHERS))
def test_an_older_dispatcher_is_upgraded_without_losing_calls(tmp_path: Path, pin_root: Path, release: str) -> None:
    pin_dir = pin_root / "daemon"
    counter = pin_root / "maps" / "count"
    d = start_daemon(tmp_path, pin_dir)
    with d.client() as c:
        c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter))
    assert d.stop() == 0
    # As if an older tailcalld had left its dispatcher here.  The bcc releases pinned no program
    # beside its link; with the calls/misses release, this one's program pin is left, stale (a
    # start that died before it renamed its program pin looks the same).
    (pin_dir / "link").unlink()
    if release == "bcc":
        (pin_dir / "prog").unlink()
    old_id = pin_old_dispatcher(pin_dir, release)
    with Workload() as work:
        time.sleep(0.1)
        d = start_daemon(tmp_path, pin_dir)
        time.sleep(0.1)
    try:
        with d.client() as c:
            status = c.call("status")
        assert status["upgraded_from"] == old_id and status["dispatcher_prog_id"] != old_id
        assert prog_name_by_id(pinned_link_prog(pin_dir) or 0) == dispatcher_function()
        assert pinned_prog(pin_dir / "prog") == status["dispatcher_prog_id"]
        # Nothing lost; a few calls may be counted twice while both dispatchers ran.
        counted = read_counter(counter)
        assert work.made <= counted, (work.made, counted)
        assert kernel_slots(pin_dir / "prog_array") == saved_slots(tmp_path / "state")
        # The older layout's counter maps went with it; the new counters count the slot's calls.
        assert not any((pin_dir / name).exists() for name in LEGACY_PINS)
        before = slot_calls(pin_dir, NR_FCHMODAT)
        fchmodat(50)
        assert slot_calls(pin_dir, NR_FCHMODAT) - before >= 50
    finally:
        d.stop()


def test_a_handler_that_cannot_be_rebuilt_is_retried_at_the_next_start(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    assert d.stop() == 0
    remove_pin_tree(pin_root / "daemon")  # a reboot...
    [source] = (tmp_path / "state" / "sources").glob("*.c")
    good = source.read_bytes()
    source.write_bytes(good + b"\n/* changed on disk */\n")  # ...after which the saved source is not the one recorded
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        with d.client() as c:
            [entry] = c.call("list")["slots"]  # still wanted, not in the kernel
            assert (entry["slot"], entry["state"], entry["kernel_prog_id"]) == (NR_FCHMODAT, "not-restored", None)
            [correction] = c.call("status")["corrections"]
        assert "could not rebuild count_calls from count.c" in correction
        assert set(saved_slots(tmp_path / "state")) == {NR_FCHMODAT}  # still wanted
    finally:
        assert d.stop() == 0
    source.write_bytes(good)
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert_agree(d, tmp_path / "state")
        fchmodat(8)
        assert read_counter(counter) == 8
    finally:
        d.stop()


def test_hand_made_changes_are_repaired_while_running(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    prog_array = pin_root / "daemon" / "prog_array"
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=0.3)
    try:
        with d.client() as c:
            ours = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter))["prog_id"]
            stray = c.call("attach", slot="getppid", source=trivial_handler(3))["prog_id"]
        # By hand: empty our slot, and move the getppid program into a slot tailcalld never used.
        bpftool_empty(prog_array, NR_FCHMODAT)
        bpftool_fill(prog_array, 301, stray)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and kernel_slots(prog_array) != {NR_FCHMODAT: ours, 110: stray}:
            time.sleep(0.1)
        assert kernel_slots(prog_array) == {NR_FCHMODAT: ours, 110: stray}
        with d.client() as c:
            corrections = c.call("status")["corrections"]
        assert any("was emptied outside tailcalld: put program" in line for line in corrections)
        assert any("removed program" in line and "(301)" in line for line in corrections)
        assert_agree(d, tmp_path / "state")
        fchmodat(6)
        assert read_counter(counter) == 6
    finally:
        d.stop()


def test_a_restart_holds_the_programs_it_finds_through_their_pins(tmp_path: Path, pin_root: Path) -> None:
    """Each program a slot runs is pinned (handlers/progs/<id>), so a restart holds it by fd
    without opening it by id (that needs CAP_SYS_ADMIN): a slot emptied behind its back gets
    it back with no compile.  A program with no such pin (left by an older tailcalld) is
    adopted by id alone, and an emptied slot of it cannot be refilled."""
    counter = pin_root / "maps" / "count"
    d, ours = start_counting(tmp_path, pin_root, counter)
    with d.client() as c:
        other = c.call("attach", slot="getppid", source=trivial_handler(9))["prog_id"]
        c.call("attach", slot=301, source=trivial_handler(4))
        c.call("detach", slot=301)
    assert d.stop() == 0
    progs = pin_root / "daemon" / "handlers" / "progs"
    assert sorted(int(p.name) for p in progs.iterdir()) == sorted([ours, other])  # none for the detached one
    (progs / str(other)).unlink()  # as an older tailcalld left it
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=0.3)
    prog_array = d.pin_dir / "prog_array"
    try:
        assert listed(d) == {NR_FCHMODAT: ours, 110: other}
        bpftool_empty(prog_array, NR_FCHMODAT)
        bpftool_empty(prog_array, 110)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (kernel_slots(prog_array), listed(d)) != ({NR_FCHMODAT: ours},) * 2:
            time.sleep(0.1)
        assert kernel_slots(prog_array) == listed(d) == {NR_FCHMODAT: ours}
        with d.client() as c:
            corrections = c.call("status")["corrections"]
        assert any(f"put program {ours} (count_calls) back" in line for line in corrections), corrections
        assert any(f"its program {other} cannot be put back (adopted by id alone" in line for line in corrections)
        fchmodat(3)
        assert read_counter(counter) == 3
        assert [p.name for p in progs.iterdir()] == [str(ours)]
    finally:
        d.stop()


def test_pins_removed_while_running_are_pinned_again(tmp_path: Path, pin_root: Path) -> None:
    """rm -rf pin_dir under a running daemon: tracing must not end when the daemon does."""
    counter = pin_root / "maps" / "count"
    d, prog_id = start_counting(tmp_path, pin_root, counter, miss_log_interval=0.3)
    pin_dir = d.pin_dir
    try:
        dispatcher = pinned_link_prog(pin_dir)
        subprocess.run(["rm", "-rf", str(pin_dir)], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (pin_dir / "link").exists():
            time.sleep(0.1)
        assert dispatcher is not None and pinned_link_prog(pin_dir) == dispatcher
        assert kernel_slots(pin_dir / "prog_array") == {NR_FCHMODAT: prog_id}
        while time.monotonic() < deadline and not (pin_dir / "handlers" / "progs" / str(prog_id)).exists():
            time.sleep(0.1)
        assert (pin_dir / "handlers" / "progs" / str(prog_id)).exists()
        with d.client() as c:
            assert any("pinned again" in line for line in c.call("status")["corrections"])
            # The event channel too: a handler compiled now still reaches it, and its events arrive.
            while time.monotonic() < deadline and not all((pin_dir / n).exists() for n in ("events", "event_counts")):
                time.sleep(0.1)
            assert (pin_dir / "call").exists()
            c.call("attach", slot="getppid", source='#include "tailcalld.h"\n'
                   'int h(struct bpf_raw_tracepoint_args *ctx) { TC_PRINTF(ctx, "after rm"); return 0; }\n')
            os.getppid()
            while time.monotonic() < deadline + 10 and not c.call("events", slot="getppid")["events"]:
                time.sleep(0.1)
            assert c.call("events", slot="getppid")["events"][0]["message"] == "after rm"
    finally:
        assert d.stop() == 0
    fchmodat(5)  # no daemon now: only the new pins keep the dispatcher and the handler
    assert read_counter(counter) == 5
    assert "nothing of tailcalld is left" not in d.output()


def test_list_shows_the_kernels_truth_before_any_repair(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, ours = start_counting(tmp_path, pin_root, counter, miss_log_interval=3600)  # no repair during the test
    prog_array = d.pin_dir / "prog_array"
    try:
        with d.client() as c:
            other = c.call("attach", slot="getppid", source=trivial_handler(5))["prog_id"]
            [entry, _] = sorted(c.call("list")["slots"], key=lambda s: s["slot"] != NR_FCHMODAT)
            assert (entry["state"], entry["kernel_prog_id"]) == ("in-sync", ours)
            bpftool_empty(prog_array, NR_FCHMODAT)
            [entry] = [s for s in c.call("list")["slots"] if s["slot"] == NR_FCHMODAT]
            assert (entry["state"], entry["kernel_prog_id"], entry["prog_id"]) == ("kernel-empty", None, ours)
            bpftool_fill(prog_array, NR_FCHMODAT, other)
            [entry] = [s for s in c.call("list")["slots"] if s["slot"] == NR_FCHMODAT]
            assert (entry["state"], entry["kernel_prog_id"]) == ("kernel-other", other)
        shown = d.ctl("list").stdout
        assert f"{ours} (kernel: {other})" in shown, shown
    finally:
        d.stop()
