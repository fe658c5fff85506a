"""Exit slots on the real kernel: a handler on sys_exit sees the syscall's return value, the
exit dispatcher is attached only while an exit slot is filled, and exit slots persist,
survive restart, kill -9 and reboot, and are repaired like enter slots."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import (DaemonProcess, kernel_slots, pin_old_dispatcher, pinned_link_prog, pinned_prog, prog_name_by_id,
                     remove_pin_tree, start_daemon, journal, wait_journal)
from tailcalld.dispatcher import EXIT, NR_SLOTS, dispatcher_function
from tailcalld.journal import MISS_MESSAGE_ID
from tailcalld.syscalls import SyscallTable

NR_GETPPID = 110


def exit_handler(pin: Path, function: str = "on_exit") -> str:
    """bcc C for an exit handler that stores this process's last getppid() return value in
    entry 0 of a pinned array and counts its calls in entry 1."""
    return f"""
BPF_TABLE_PINNED("array", u32, u64, seen, 2, "{pin}");

int {function}(struct bpf_raw_tracepoint_args *ctx)
{{
    if ((bpf_get_current_pid_tgid() >> 32) != {os.getpid()})
        return 0;
    u32 ret = 0, count = 1;
    u64 value = ctx->args[1];  // sys_exit: the return value
    seen.update(&ret, &value);
    u64 *n = seen.lookup(&count);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}}
"""


def read_seen(pin: Path) -> tuple[int, int]:
    """(last return value, calls) from the handler's pinned array, read with bpftool."""
    entries = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)], capture_output=True,
                                        text=True, check=True).stdout)
    values = {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"):
              int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little") for e in entries}
    return values[0], values[1]


def sys_exit_links() -> list[int]:
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    return [link["prog_id"] for link in links if link.get("tp_name") == "sys_exit"]


def exit_link_prog(d: DaemonProcess) -> int | None:
    return pinned_link_prog(EXIT.folder(d.pin_dir))


def test_an_exit_handler_sees_the_return_value(tmp_path: Path, pin_root: Path) -> None:
    seen = pin_root / "maps" / "seen"
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert exit_link_prog(d) is None  # no exit slot: nothing on the exit path
        r = d.ctl("attach", "--exit", "getppid", "-", input=exit_handler(seen))
        assert r.returncode == 0, r.stderr
        assert "getppid exit (110)" in r.stdout
        prog = exit_link_prog(d)
        assert prog is not None and prog in sys_exit_links()
        for _ in range(500):
            os.getppid()
        assert read_seen(seen) == (os.getppid(), 500)
        [entry] = d.call("list")["slots"]
        assert (entry["slot"], entry["hook"], entry["state"]) == (NR_GETPPID, "exit", "in-sync")
        assert entry["hits"] >= 500
        shown = d.ctl("list").stdout
        assert "HOOK" in shown and "exit" in shown
        # The enter slot of the same syscall is another slot, and it is empty.
        r = d.ctl("detach", "getppid")
        assert r.returncode == 1 and "holds no handler" in r.stderr
        r = d.ctl("detach", "--exit", "getppid")
        assert r.returncode == 0, r.stderr
        # The last exit slot gone: the exit dispatcher is detached, its maps stay for next time.
        assert exit_link_prog(d) is None and prog not in sys_exit_links()
        assert (d.pin_dir / EXIT.subdir / "counts").exists()
    finally:
        d.stop()


def test_exit_slots_survive_restart_kill_and_reboot(tmp_path: Path, pin_root: Path) -> None:
    seen = pin_root / "maps" / "seen"
    d = start_daemon(tmp_path, pin_root / "daemon")
    d.call("attach", slot="getppid", hook="exit", source=exit_handler(seen))
    d.call("attach", slot="getppid", source="int on_enter(struct bpf_raw_tracepoint_args *c) { return 0; }")
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert set(state["slots"]) == {str(NR_GETPPID)} and set(state["exit_slots"]) == {str(NR_GETPPID)}
    exit_prog = exit_link_prog(d)
    assert d.stop() == 0
    assert exit_link_prog(d) == exit_prog  # pinned: still tracing with no daemon
    before = read_seen(seen)[1]
    os.getppid()
    assert read_seen(seen)[1] == before + 1

    d = start_daemon(tmp_path, pin_root / "daemon")  # adopts both dispatchers
    try:
        assert exit_link_prog(d) == exit_prog
        assert {(s["slot"], s["hook"], s["state"]) for s in d.call("list")["slots"]} == {
            (NR_GETPPID, "enter", "in-sync"), (NR_GETPPID, "exit", "in-sync")}
        d.kill()
        remove_pin_tree(pin_root / "daemon")  # a reboot after a crash: no pins at all
        d = start_daemon(tmp_path, pin_root / "daemon")
        rebuilt = exit_link_prog(d)
        assert rebuilt is not None and rebuilt != exit_prog
        assert kernel_slots(d.pin_dir / EXIT.subdir / "prog_array").keys() == {NR_GETPPID}
        before = read_seen(seen)[1]
        for _ in range(10):
            os.getppid()
        assert read_seen(seen)[1] == before + 10
        assert {s["state"] for s in d.call("list")["slots"]} == {"in-sync"}
    finally:
        d.stop()


def test_an_exit_slot_emptied_behind_our_back_is_repaired(tmp_path: Path, pin_root: Path) -> None:
    seen = pin_root / "maps" / "seen"
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=0.25)
    try:
        d.call("attach", slot=NR_GETPPID, hook="exit", source=exit_handler(seen))
        prog_array = d.pin_dir / EXIT.subdir / "prog_array"
        key = [str(b) for b in NR_GETPPID.to_bytes(4, "little")]
        subprocess.run(["bpftool", "map", "delete", "pinned", str(prog_array), "key", *key], check=True)
        [entry] = d.call("list")["slots"]
        assert entry["state"] in ("kernel-empty", "in-sync")  # the repair may already have run
        deadline = time.monotonic() + 10
        while kernel_slots(prog_array).get(NR_GETPPID) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kernel_slots(prog_array).get(NR_GETPPID) == entry["prog_id"]
        assert any("exit (110)" in c for c in d.call("status")["corrections"])
    finally:
        d.stop()


def test_the_exit_dispatcher_is_named_for_its_version() -> None:
    assert dispatcher_function(EXIT).startswith("tcx_") and dispatcher_function(EXIT) != dispatcher_function()
    assert len(dispatcher_function(EXIT)) == 15


def test_an_older_exit_dispatcher_is_upgraded(tmp_path: Path, pin_root: Path) -> None:
    seen = pin_root / "maps" / "seen"
    d = start_daemon(tmp_path, pin_root / "daemon")
    d.call("attach", slot=NR_GETPPID, hook="exit", source=exit_handler(seen))
    assert d.stop() == 0
    # As the last bcc release left its exit dispatcher: a link and no program pin beside it.
    (d.pin_dir / EXIT.subdir / "link").unlink()
    (d.pin_dir / EXIT.subdir / "prog").unlink()
    old = pin_old_dispatcher(d.pin_dir, "bcc", exit=True)
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        new = exit_link_prog(d)
        assert new is not None and new != old
        assert prog_name_by_id(new) == dispatcher_function(EXIT)
        assert pinned_prog(d.pin_dir / EXIT.subdir / "prog") == new
        before = read_seen(seen)[1]
        for _ in range(20):
            os.getppid()
        assert read_seen(seen)[1] - before >= 20  # a few more while both ran: nothing lost
        assert {s["state"] for s in d.call("list")["slots"]} == {"in-sync"}
    finally:
        d.stop()


@pytest.mark.usefixtures("journald")
def test_a_watched_exit_slot_keeps_the_exit_dispatcher_and_logs_its_misses(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", watch_misses=["getppid:exit"], miss_log_interval=0.5)
    try:
        watching = exit_link_prog(d)
        assert watching is not None  # no exit slot filled, but one watched
        for _ in range(100):
            os.getppid()
        entries = wait_journal(lambda: journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid),
                                               MESSAGE_ID=MISS_MESSAGE_ID, SLOT_HOOK="exit"))
        assert entries and entries[0]["SYSCALL_NR"] == str(NR_GETPPID) and int(entries[0]["MISSES"]) >= 100
        assert "getppid exit (110)" in entries[0]["MESSAGE"]
        # A filled exit slot emptied again: still watched, so the exit dispatcher stays.
        d.call("attach", slot=NR_GETPPID, hook="exit", source=exit_handler(pin_root / "maps" / "seen"))
        d.call("detach", slot=NR_GETPPID, hook="exit")
        assert exit_link_prog(d) == watching
    finally:
        d.stop()


def test_a_config_names_exit_slots_with_a_suffix() -> None:
    table = SyscallTable(NR_SLOTS, {"getppid": NR_GETPPID})
    assert [table.resolve_key(s) for s in ("getppid", NR_GETPPID, "getppid:exit", "110:exit", "GETPPID:Enter")] == [
        NR_GETPPID, NR_GETPPID, NR_SLOTS + NR_GETPPID, NR_SLOTS + NR_GETPPID, NR_GETPPID]
