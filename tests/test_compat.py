"""32-bit (ia32) callers on x86_64: sys_enter hands the dispatcher their ia32 number, which
names another syscall in the 64-bit table (i386 268 is statfs64, x86_64 268 is fchmodat).
Real 32-bit programs (gcc -m32) against real handlers: each call reaches the slot of the
syscall of its own name, or none."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, DaemonProcess, JournalEntry, journal, pinned_percpu_u64_sum, read_counter, slot_misses,
                     start_daemon, wait_journal)
from tailcalld.journal import MISS_MESSAGE_ID

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the ia32 ABI exists on x86_64 only")

COMM = "tcd32test"  # the 32-bit program's name: the handler counts only its calls
I386_FCHMODAT, I386_STATFS64, I386_SOCKETCALL, I386_OPENAT = 306, 268, 102, 295
NR_OPENAT = 257

PROGRAM = r"""
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
/* argv: ia32 syscall number, count.  The arguments look like fchmodat's: (7771, path, 0644). */
int main(int argc, char **argv)
{
    long nr = atol(argv[1]);
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++)
        syscall(nr, 7771, "/nonexistent-tailcalld-test", 0644);
    return 0;
}
"""


def comm_counting_handler(counter_pin: Path) -> str:
    """Counts the calls made by COMM, whatever their arguments (a 32-bit caller's are in other registers)."""
    checks = " || ".join(f"comm[{i}] != '{c}'" for i, c in enumerate(COMM))
    return f"""
#include <uapi/linux/ptrace.h>
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter_pin}");

int count_comm(struct bpf_raw_tracepoint_args *ctx)
{{
    char comm[16] = {{}};
    u32 zero = 0;
    bpf_get_current_comm(&comm, sizeof(comm));
    if ({checks} || comm[{len(COMM)}] != 0)
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ia32")
    (folder / "prog.c").write_text(PROGRAM)
    binary = folder / COMM
    r = subprocess.run(["gcc", "-m32", "-O2", "-o", str(binary), str(folder / "prog.c")], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"gcc -m32 (gcc-multilib, installed by make setup) failed:\n{r.stderr}"
    return binary


def call32(program: Path, nr: int, n: int) -> None:
    subprocess.run([str(program), str(nr), str(n)], check=True)


@pytest.fixture
def counting(tmp_path: Path, pin_root: Path) -> tuple[DaemonProcess, Path]:
    counter = pin_root / "maps" / "count"
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=1.0)
    with d.client() as c:
        c.call("attach", slot=NR_FCHMODAT, source=comm_counting_handler(counter), filename="count32.c")
    return d, counter


def test_a_32_bit_call_reaches_the_slot_of_its_own_name(counting: tuple[DaemonProcess, Path],
                                                          program: Path) -> None:
    d, counter = counting
    try:
        call32(program, I386_FCHMODAT, 1000)  # i386 fchmodat is 306: slot 268 (fchmodat) runs
        assert read_counter(counter) == 1000
        compat_misses = d.pin_dir / "compat_misses"
        before = pinned_percpu_u64_sum(compat_misses, I386_STATFS64)
        call32(program, I386_STATFS64, 1000)  # i386 268 is statfs64: never fchmodat's handler
        assert read_counter(counter) == 1000
        # statfs64 has no 64-bit namesake: counted under its ia32 number, dispatched nowhere.
        assert pinned_percpu_u64_sum(compat_misses, I386_STATFS64) - before == 1000
    finally:
        d.stop()


def test_compat_only_and_empty_slots_are_counted_where_they_belong(counting: tuple[DaemonProcess, Path],
                                                                   program: Path) -> None:
    d, _ = counting
    try:
        compat_misses = d.pin_dir / "compat_misses"
        socketcall = pinned_percpu_u64_sum(compat_misses, I386_SOCKETCALL)
        openat = slot_misses(d.pin_dir, NR_OPENAT)
        call32(program, I386_SOCKETCALL, 300)  # socketcall: ia32 only
        call32(program, I386_OPENAT, 300)  # i386 openat (295) -> the empty 64-bit openat slot (257)
        assert pinned_percpu_u64_sum(compat_misses, I386_SOCKETCALL) - socketcall == 300
        assert slot_misses(d.pin_dir, NR_OPENAT) - openat >= 300  # other processes open files too
    finally:
        d.stop()


@pytest.mark.usefixtures("journald")
def test_compat_only_calls_are_logged_under_their_ia32_name(tmp_path: Path, pin_root: Path, program: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=1.0)
    try:
        call32(program, I386_STATFS64, 50)

        def entries() -> list[JournalEntry]:
            return journal(SYSLOG_IDENTIFIER="tailcalld", _PID=str(d.pid), MESSAGE_ID=MISS_MESSAGE_ID,
                           SYSCALL_ABI="ia32", SYSCALL_NAME="statfs64")

        [entry, *_] = wait_journal(entries, 1, 15)
        assert entry["SYSCALL_NR"] == str(I386_STATFS64) and int(entry["MISSES"]) >= 50
        assert "statfs64 (ia32 268)" in entry["MESSAGE"]
    finally:
        d.stop()


def test_syscalls_shows_both_abis_and_where_they_go(counting: tuple[DaemonProcess, Path]) -> None:
    d, _ = counting
    try:
        r = d.ctl("syscalls", "268")
        assert r.returncode == 0, r.stderr
        lines = [line.split() for line in r.stdout.splitlines()]
        assert lines[1][:6] == ["x86_64", "268", "fchmodat", "268", "count_comm", "(program"]
        assert ["ia32", "268", "statfs64", "-", "-"] in lines
        listed = json.loads(d.ctl("syscalls", "fchmodat", "--json").stdout)["syscalls"]
        assert {(e["abi"], e["nr"], e["slot"], e["function"]) for e in listed} == {
            ("x86_64", 268, 268, "count_comm"), ("ia32", I386_FCHMODAT, 268, "count_comm")}
    finally:
        d.stop()


def test_a_32_bit_call_reaches_the_exit_slot_of_its_own_name(tmp_path: Path, pin_root: Path, program: Path) -> None:
    counter = pin_root / "maps" / "count"
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        d.call("attach", slot=NR_FCHMODAT, hook="exit", source=comm_counting_handler(counter), filename="count32.c")
        call32(program, I386_FCHMODAT, 300)  # fchmodat's exit slot, found through the compat table
        call32(program, I386_STATFS64, 200)  # statfs64 is i386 268, fchmodat's x86_64 number: not it
        assert read_counter(counter) == 300
    finally:
        d.stop()
