"""After a reboot: the socket answers before the recorded handlers are back (list shows them
restoring), they come back side by side and from the compile cache, and a stop in the middle
loses no record.  On the real kernel, with the real journal."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import (DIRFD_MAGIC, NR_FCHMODAT, DaemonProcess, busy_children_of, fchmodat, journal, kernel_slots,
                     remove_pin_tree, saved_slots, start_daemon, wait_journal, wait_until)

pytestmark = pytest.mark.usefixtures("journald")

NR_GETPPID = 110
SLOW_SLOT = 305  # fsopen..: no test process calls them
OTHER_SLOT = 306
LIBC = ctypes.CDLL(None, use_errno=True)

BCC_HANDLER = r"""
#include "tailcalld.h"
BPF_ARRAY(runs, u64, 1);
int on_getppid(struct bpf_raw_tracepoint_args *ctx)
{
    if (TC_PID() != %(pid)d)
        return 0;
    int zero = 0;
    u64 *n = runs.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    TC_PRINTF(ctx, "getppid by %%u", TC_PID());
    return 0;
}
"""

LIBBPF_HANDLER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"
struct seen { int dirfd; u64 mode; };
SEC("raw_tp/sys_enter")
int on_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)TC_ARG(ctx, 0) != %(dirfd)d)
        return 0;
    struct seen e = { .dirfd = (int)TC_ARG(ctx, 0), .mode = TC_ARG(ctx, 2) };
    TC_EMIT(ctx, &e);
    return 0;
}
char _license[] SEC("license") = "GPL";
"""


def slow_handler(depth: int = 16) -> str:
    """A handler whose compile takes seconds (2^depth additions of a volatile: each one an
    instruction), so that its restore is still under way when a test looks."""
    macros = "#define A0 (x + 1)\n" + "".join(f"#define A{i} (A{i - 1} + A{i - 1})\n" for i in range(1, depth + 1))
    return macros + ("int slow_restore(struct bpf_raw_tracepoint_args *ctx)\n"
                     f"{{ volatile int x = 1; return A{depth} & 0; }}\n")


def prog_tag(prog_id: int) -> str:
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                       check=True)
    return str(json.loads(r.stdout)["tag"])


def slots(d: DaemonProcess) -> dict[int, dict[str, object]]:
    return {int(s["slot"]): s for s in d.call("list")["slots"]}


def forget_compile(state_dir: Path, function: str) -> None:
    """Remove the compile cache's entries of ``function`` (one under the name, one for "the only
    raw_tp function"): its next load compiles."""
    found = [p for p in (state_dir / "cache" / "programs").glob("*.entry")
             if json.loads(json.loads(p.read_text())["body"])["function"] == function]
    assert found
    for path in found:
        path.unlink()


def reboot(pin_dir: Path) -> None:
    remove_pin_tree(pin_dir)  # bpffs is empty again; state_dir (and its cache) stays


def attach_three(d: DaemonProcess) -> dict[int, str]:
    """bcc on getppid, libbpf on fchmodat, the slow one on SLOW_SLOT; their programs' tags."""
    with d.client() as c:
        c.call("attach", slot=NR_GETPPID, source=BCC_HANDLER % {"pid": os.getpid()}, filename="getppid.c")
        c.call("attach", slot=NR_FCHMODAT, source=LIBBPF_HANDLER % {"dirfd": DIRFD_MAGIC + 7}, dialect="libbpf",
               filename="fchmodat.bpf.c")
        c.call("attach", slot=SLOW_SLOT, source=slow_handler(), filename="slow.c")
    return {slot: prog_tag(s["prog_id"]) for slot, s in slots(d).items()}  # type: ignore[arg-type]


def test_a_reboot_serves_at_once_and_restores_from_the_cache_behind_the_socket(tmp_path: Path,
                                                                                pin_root: Path) -> None:
    pin_dir, state = pin_root / "daemon", tmp_path / "state"
    d = start_daemon(tmp_path, pin_dir)
    try:
        tags = attach_three(d)
    finally:
        assert d.stop() == 0
    reboot(pin_dir)
    forget_compile(state, "slow_restore")  # compiled again at the restore: seconds
    d = start_daemon(tmp_path, pin_dir, restored=False)
    try:
        # The socket answers while the slow handler is still being compiled.
        assert d.call("status")["restoring"] >= 1
        listed = d.ctl("list")
        assert listed.returncode == 0, listed.stderr
        [row] = [line for line in listed.stdout.splitlines() if "slow_restore" in line]
        assert "(restoring)" in row
        assert slots(d)[SLOW_SLOT]["state"] == "restoring"
        # A change of another slot is served meanwhile.
        attached = d.call("attach", slot=OTHER_SLOT, source="int other(void *ctx) { return 0; }", filename="o.c")
        assert attached["slot"] == OTHER_SLOT
        wait_until(lambda: d.call("status")["restoring"] == 0, timeout=180, period=0.2)

        now = slots(d)
        assert {s["state"] for s in now.values()} == {"in-sync"}
        assert set(now) == {NR_GETPPID, NR_FCHMODAT, SLOW_SLOT, OTHER_SLOT}
        # The same programs as the compiles loaded (the kernel's tag: their instructions).
        assert {slot: prog_tag(now[slot]["prog_id"]) for slot in tags} == tags  # type: ignore[arg-type]
        assert kernel_slots(pin_dir / "prog_array") == {slot: s["prog_id"] for slot, s in now.items()}
        assert saved_slots(state) == kernel_slots(pin_dir / "prog_array")

        [entry] = wait_journal(lambda: journal(_PID=str(d.pid), TAILCALLD_RESTORE="1"))
        assert (entry["TAILCALLD_RESTORE_SLOTS"], entry["TAILCALLD_RESTORE_REBUILT"],
                entry["TAILCALLD_RESTORE_CACHE_HITS"], entry["TAILCALLD_RESTORE_FAILED"]) == ("3", "3", "2", "0")
        assert float(entry["TAILCALLD_RESTORE_SECONDS"]) > 0
        assert "2 loaded from the compile cache and 1 compiled" in entry["MESSAGE"]
        corrections = d.call("status")["corrections"]
        assert sum("from the compile cache" in line for line in corrections) == 2

        # They run, and reach the event channel this start pinned anew.
        for _ in range(5):
            LIBC.getppid()
        fchmodat(2, DIRFD_MAGIC + 7)
        wait_until(lambda: len(d.call("events", slot=NR_GETPPID)["events"]) >= 5
                   and len(d.call("events", slot=NR_FCHMODAT)["events"]) >= 2)
        lines = [e["message"] for e in d.call("events", slot=NR_GETPPID)["events"]]
        assert lines[:5] == [f"getppid by {os.getpid()}"] * 5
        fields = [e["fields"] for e in d.call("events", slot=NR_FCHMODAT)["events"]]
        assert fields[:2] == [{"dirfd": DIRFD_MAGIC + 7, "mode": 0o644}] * 2  # decoded by the object's BTF
        # The daemon's counters too (read with the miss counters, every miss_log_interval).
        wait_until(lambda: int(slots(d)[NR_GETPPID]["hits"]) >= 5, timeout=30, period=0.5)  # type: ignore[call-overload]
    finally:
        d.stop()


def test_a_stop_during_the_restore_loses_no_record(tmp_path: Path, pin_root: Path) -> None:
    pin_dir, state = pin_root / "daemon", tmp_path / "state"
    d = start_daemon(tmp_path, pin_dir)
    try:
        d.call("attach", slot=SLOW_SLOT, source=slow_handler(), filename="slow.c")
    finally:
        assert d.stop() == 0
    recorded = saved_slots(state)
    reboot(pin_dir)
    forget_compile(state, "slow_restore")
    d = start_daemon(tmp_path, pin_dir, restored=False)
    try:
        assert slots(d)[SLOW_SLOT]["state"] == "restoring"
        wait_until(lambda: busy_children_of(d.pid) != [], timeout=30, period=0.05)  # its compile runs
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 20  # the compile was not waited for
    finally:
        d.stop()
    assert busy_children_of(d.pid) == []
    assert saved_slots(state) == recorded  # still wanted: the next start rebuilds it
    d = start_daemon(tmp_path, pin_dir)
    try:
        assert slots(d)[SLOW_SLOT]["state"] == "in-sync"
    finally:
        d.stop()
