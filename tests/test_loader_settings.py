"""Loader settings on the real kernel: `--set NAME=VALUE` writes a libbpf handler's globals
(.rodata, .data, .bss) before the load, `-D NAME=VALUE` defines a macro for a compile; both
are part of the handler (no reuse across settings), persisted with the slot and reapplied
after a restart or a reboot.  A handler's .bss/.data maps carry its file's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import DIRFD_MAGIC, NR_FCHMODAT, DaemonProcess, fchmodat, read_counter, remove_pin_tree, start_daemon
from test_libbpf import ProgMap, build_object

# Counts the fchmodat(DIRFD_MAGIC, ...) calls of one process, chosen at load time: with
# target_pid left at 0 it counts nothing.  hits (a map) += step (.data) per call; calls_seen
# (.bss) += 1 per call.
PID_COUNTER = f"""#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

const volatile int target_pid = 0;
int step = 1;
u64 calls_seen = 0;

struct {{
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
}} hits SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int count_pid(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u32 zero = 0;
    if ((bpf_get_current_pid_tgid() >> 32) != target_pid || (int)PT_REGS_PARM1_CORE(regs) != {DIRFD_MAGIC})
        return 0;
    u64 *n = bpf_map_lookup_elem(&hits, &zero);
    if (n)
        __sync_fetch_and_add(n, step);
    __sync_fetch_and_add(&calls_seen, 1);
    return 0;
}}

char _license[] SEC("license") = "GPL";
"""

WITH_STRUCT = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct limits_t { int a; int b; };
const volatile struct limits_t limits = {};
const volatile char prefix[8] = "";
SEC("raw_tracepoint/sys_enter")
int h(struct bpf_raw_tracepoint_args *ctx) { return limits.a + prefix[0]; }
char _license[] SEC("license") = "GPL";
"""


class Caller:
    """Another process that makes ``n`` fchmodat(DIRFD_MAGIC, ...) calls each time it is told."""

    def __init__(self) -> None:
        code = ("import ctypes, sys\nlibc = ctypes.CDLL(None)\nfor line in sys.stdin:\n"
                f"    for _ in range(int(line)): libc.syscall({NR_FCHMODAT}, {DIRFD_MAGIC}, b'/nonexistent', 0o644)\n"
                "    print('done', flush=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid

    def calls(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextmanager
def caller() -> Iterator[Caller]:
    c = Caller()
    try:
        yield c
    finally:
        c.close()


def _slots(d: DaemonProcess) -> dict[int, dict[str, object]]:
    return {s["slot"]: s for s in json.loads(d.ctl("list", "--json").stdout)["slots"]}


def _counts(prog_id: int, bss: str = "pidcount.bss") -> tuple[int, int]:
    """(hits, calls_seen) of a running PID_COUNTER: its map, and its .bss read by the name libbpf
    gave that map from the file's name."""
    hits, seen = ProgMap(prog_id, "hits"), ProgMap(prog_id, bss)
    try:
        return hits.value(), seen.value()
    finally:
        hits.close()
        seen.close()


def test_set_rodata_counts_only_that_pid(daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = tmp_path / "pidcount.bpf.c"
    handler.write_text(PID_COUNTER)
    with caller() as other:
        r = daemon.ctl("attach", "fchmodat", str(handler), "--set", f"target_pid={other.pid}")
        assert r.returncode == 0, r.stderr
        [slot] = _slots(daemon).values()
        assert slot["variables"] == {"target_pid": str(other.pid)} and slot["defines"] == {}
        other.calls(25)
        fchmodat(40)  # this process's calls are not the target's
        assert _counts(slot["prog_id"]) == (25, 25)
        table = daemon.ctl("list").stdout
        assert "SETTINGS" in table and f"target_pid={other.pid}" in table


def test_unset_rodata_is_inert(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Without --set the handler keeps its compiled-in 0 and counts nothing (pid 0 makes no syscalls)."""
    handler = tmp_path / "pidcount.bpf.c"
    handler.write_text(PID_COUNTER)
    assert daemon.ctl("attach", "fchmodat", str(handler)).returncode == 0
    [slot] = _slots(daemon).values()
    with caller() as other:
        other.calls(10)
    assert _counts(slot["prog_id"]) == (0, 0)


def test_set_data_and_bss(daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = tmp_path / "pidcount.bpf.c"
    handler.write_text(PID_COUNTER)
    with caller() as other:
        r = daemon.ctl("attach", "fchmodat", str(handler), "--set", f"target_pid=0x{other.pid:x}",
                       "--set", "step=3", "--set", "calls_seen=1000")
        assert r.returncode == 0, r.stderr
        [slot] = _slots(daemon).values()
        other.calls(7)
        assert _counts(slot["prog_id"]) == (21, 1007)


def test_object_and_map_names_from_the_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A prebuilt .o takes --set too, and its maps are named after its file, cut to what the
    kernel's 15-character map name keeps: fchmodat_counter.bpf.o -> fchmodat.bss."""
    assert daemon.ctl("check", "-", input=PID_COUNTER).returncode == 0  # fills the vmlinux.h cache
    obj = build_object(PID_COUNTER, tmp_path, daemon).rename(tmp_path / "fchmodat_counter.bpf.o")
    with caller() as other:
        r = daemon.ctl("attach", "fchmodat", str(obj), "--set", f"target_pid={other.pid}")
        assert r.returncode == 0, r.stderr
        [slot] = _slots(daemon).values()
        assert (slot["dialect"], slot["variables"]) == ("object", {"target_pid": str(other.pid)})
        other.calls(5)
        assert _counts(slot["prog_id"], bss="fchmodat.bss") == (5, 5)


def test_settings_are_part_of_the_handler(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The same file with the same settings reuses the program; with others it is another one."""
    source = PID_COUNTER
    with daemon.client() as c:
        first = c.call("attach", slot="fchmodat", source=source, filename="pidcount.bpf.c",
                       variables={"target_pid": 4242})
        same = c.call("attach", slot="getppid", source=source, filename="pidcount.bpf.c",
                      variables={"target_pid": "4242"})
        other = c.call("attach", slot="getppid", source=source, filename="pidcount.bpf.c",
                       variables={"target_pid": "4243"})
        plain = c.call("attach", slot="getpid", source=source, filename="pidcount.bpf.c")
    assert same["prog_id"] == first["prog_id"]
    assert len({first["prog_id"], other["prog_id"], plain["prog_id"]}) == 3
    slots = _slots(daemon)
    assert slots[110]["variables"] == {"target_pid": "4243"} and slots[39]["variables"] == {}


def test_set_errors(daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = tmp_path / "pidcount.bpf.c"
    handler.write_text(PID_COUNTER)
    for setting, words in (("nope=1", "no global variable 'nope'"),
                           ("target_pid=0x1ffffffff", "out of range for int (4 bytes, signed)"),
                           ("target_pid=twelve", "takes an integer"),
                           ("calls_seen=-1", "out of range for u64 (8 bytes, unsigned): 0..18446744073709551615")):
        r = daemon.ctl("attach", "fchmodat", str(handler), "--set", setting)
        assert r.returncode == 1 and "[invalid_setting]" in r.stderr and words in r.stderr, r.stderr
    r = daemon.ctl("check", str(handler), "--set", "nope=1")
    assert "settable: calls_seen (u64 (8 bytes, unsigned), .bss)" in r.stderr, r.stderr
    assert "candidates: calls_seen, step, target_pid" in r.stderr

    structured = tmp_path / "structured.bpf.c"
    structured.write_text(WITH_STRUCT)
    r = daemon.ctl("check", str(structured), "--set", "limits=1")
    assert "limits is a struct limits_t (.rodata); --set writes integers, bool, enums and char arrays" in r.stderr
    r = daemon.ctl("check", str(structured), "--set", "prefix=12345678")
    assert "8 bytes do not fit char[8] with its terminating NUL (at most 7)" in r.stderr
    assert daemon.ctl("check", str(structured), "--set", "prefix=1234567").returncode == 0

    bcc = tmp_path / "plain.c"
    bcc.write_text("int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n")
    r = daemon.ctl("check", str(bcc), "--set", "x=1")
    assert "[bad_request]" in r.stderr and "-D NAME=VALUE" in r.stderr
    assert daemon.ctl("check", str(handler), "--set", "target_pid").returncode == 2  # no =VALUE: usage
    assert _slots(daemon) == {}


def test_define_checks(daemon: DaemonProcess, tmp_path: Path) -> None:
    with daemon.client() as c:
        for bad in ({"1X": "1"}, {"X": "1\n#include </etc/shadow>"}, {"X": "a\\"}, {"X": "y" * 300}):
            c.send_raw(json.dumps({"id": 1, "command": "check", "source": "int h(void *ctx) { return 0; }",
                                   "defines": bad}).encode() + b"\n")
            error = c.read_reply()["error"]
            assert error["code"] == "bad_request" and "defines" in error["message"], error
    assert daemon.ctl("check", "-", "-D", "A=1", input=PID_COUNTER).returncode == 0  # libbpf C takes -D too
    assert daemon.ctl("check", "-", "-D", "A=1", "-D", "A=2", input=PID_COUNTER).returncode == 2


BCC_STEP = f"""#include <uapi/linux/ptrace.h>
#ifndef STEP
#define STEP 1
#endif
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "COUNTER");

int count_step(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if ((int)dirfd != {DIRFD_MAGIC} || (bpf_get_current_pid_tgid() >> 32) != PID)
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, STEP);
    return 0;
}}
"""


def test_bcc_define_changes_behaviour(daemon: DaemonProcess, pin_root: Path, tmp_path: Path) -> None:
    counter = pin_root / "maps" / "step"
    handler = tmp_path / "step.c"
    handler.write_text(BCC_STEP.replace("COUNTER", str(counter)))
    r = daemon.ctl("attach", "fchmodat", str(handler), "-D", "STEP=7", "-D", f"PID={os.getpid()}")
    assert r.returncode == 0, r.stderr
    fchmodat(10)
    assert read_counter(counter) == 70
    [slot] = _slots(daemon).values()
    assert slot["defines"] == {"PID": str(os.getpid()), "STEP": "7"} and slot["variables"] == {}
    r = daemon.ctl("attach", "fchmodat", str(handler), "-D", "STEP=2", "-D", f"PID={os.getpid()}")
    assert r.returncode == 0, r.stderr
    [again] = _slots(daemon).values()
    assert again["prog_id"] != slot["prog_id"]  # other defines: another program, not a reuse
    fchmodat(10)
    assert read_counter(counter) == 90


def test_settings_survive_restart_and_reboot(tmp_path: Path, pin_root: Path) -> None:
    handler = tmp_path / "pidcount.bpf.c"
    handler.write_text(PID_COUNTER)
    with caller() as other:
        d = start_daemon(tmp_path, pin_root / "daemon")
        try:
            r = d.ctl("attach", "fchmodat", str(handler), "--set", f"target_pid={other.pid}", "--set", "step=2")
            assert r.returncode == 0, r.stderr
        finally:
            assert d.stop() == 0
        wanted = {"target_pid": str(other.pid), "step": "2"}
        for reboot in (False, True):
            if reboot:
                remove_pin_tree(pin_root / "daemon")
            d = start_daemon(tmp_path, pin_root / "daemon")
            try:
                [slot] = _slots(d).values()
                assert slot["variables"] == wanted and slot["state"] == "in-sync"
                before = _counts(slot["prog_id"])
                other.calls(4)
                fchmodat(4)
                after = _counts(slot["prog_id"])
                assert (after[0] - before[0], after[1] - before[1]) == (8, 4)
                if reboot:
                    assert before == (0, 0)  # a program rebuilt with its settings, not the old one
            finally:
                d.stop()
