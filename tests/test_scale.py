"""Many slots at once (issue 14, item 4): 300 handlers, bcc and libbpf alternating, through a
reboot; list, status, save and the metrics see every one.  Correctness only: how fast is
`make bench` part 8."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import VENV_BIN, DaemonProcess, journal, kernel_slots, remove_pin_tree, saved_slots, start_daemon, \
    wait_journal
from tailcalld.dispatcher import NR_SLOTS
from tailcalld.metrics_http import fetch
from tailcalld.syscalls import SyscallTable

COUNT = 300


def bcc_source(i: int) -> str:
    return f"// {i}\nint scale_{i}(struct bpf_raw_tracepoint_args *ctx) {{ return 0; }}\n"


def libbpf_source(i: int) -> str:
    return (f'// {i}\n#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
            f'SEC("raw_tp/sys_enter") int scale_{i}(void *ctx) {{ return 0; }}\n'
            'char _license[] SEC("license") = "GPL";\n')


def fill(d: DaemonProcess) -> dict[int, str]:
    """COUNT handlers into the COUNT highest syscall slots; their functions by slot."""
    slots = sorted(SyscallTable.for_this_machine(NR_SLOTS).by_nr, reverse=True)[:COUNT]
    assert len(slots) == COUNT

    def attach(i_slot: tuple[int, int]) -> None:
        i, slot = i_slot
        libbpf = i % 2 == 1
        with d.client() as c:
            c.call("attach", slot=slot, source=libbpf_source(i) if libbpf else bcc_source(i),
                   dialect="libbpf" if libbpf else "bcc", filename=f"scale_{i}.{'bpf.c' if libbpf else 'c'}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(attach, enumerate(slots)))
    return {slot: f"scale_{i}" for i, slot in enumerate(slots)}


def test_300_slots_come_back_after_a_reboot_and_every_view_shows_them(journald: None, tmp_path: Path,
                                                                      pin_root: Path) -> None:
    pin_dir = pin_root / "daemon"
    d = start_daemon(tmp_path, pin_dir)
    try:
        functions = fill(d)
    finally:
        assert d.stop() == 0
    remove_pin_tree(pin_dir)  # a reboot
    d = start_daemon(tmp_path, pin_dir)
    try:
        [entry] = wait_journal(lambda: journal(_PID=str(d.pid), TAILCALLD_RESTORE="1"))
        assert (entry["TAILCALLD_RESTORE_REBUILT"], entry["TAILCALLD_RESTORE_CACHE_HITS"],
                entry["TAILCALLD_RESTORE_FAILED"]) == (str(COUNT), str(COUNT), "0")
        listed = d.call("list")["slots"]
        assert {s["slot"]: s["function"] for s in listed} == functions
        assert {s["state"] for s in listed} == {"in-sync"}
        assert {s["dialect"] for s in listed} == {"bcc", "libbpf"}
        assert kernel_slots(pin_dir / "prog_array") == {s["slot"]: s["prog_id"] for s in listed} == saved_slots(
            tmp_path / "state")
        assert d.call("status")["slots_used"] == COUNT

        table = subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(d.socket), "list", "--no-legend"],
                               capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and len(table.stdout.splitlines()) == COUNT
        text = fetch(tmp_path / "metrics.sock").decode()
        assert sum(line.startswith("tailcalld_slot_info{") for line in text.splitlines()) == COUNT
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        saved = d.call("save")
        assert len(saved["slots"]) == COUNT
    finally:
        d.stop()
