"""The handlers' event channel on the real kernel: tailcalld.h's TC_PRINTF and TC_EMIT in both
dialects, TC_ARG for 64-bit and 32-bit callers and on exit, `tailcallctl events` (latest and
-f), exact loss accounting with a ring buffer too small and a client too slow, the journal for
--journal slots (rate-limited, the rest counted), and events decoded after a restart."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import (DIRFD_MAGIC, NR_FCHMODAT, DaemonProcess, fchmodat, journal, start_daemon, wait_journal,
                     wait_until)
from tailcalld.client import Client
from tailcalld.events import EVENT_MESSAGE_ID

NR_GETPPID = 110
LIBC = ctypes.CDLL(None, use_errno=True)

LIBBPF_HANDLER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"

enum color { RED = 1, GREEN = 2 };
struct inner { short s; unsigned char flag; };
struct chmod_event {
    u32 pid;
    int dirfd;
    u64 mode;
    char comm[16];
    enum color color;
    struct inner inner;
    u16 small[3];
    long negative;
};

SEC("raw_tp/sys_enter")
int on_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)TC_ARG(ctx, 0) != %(dirfd)d)
        return 0;
    struct chmod_event e = {};
    e.pid = TC_PID();
    e.dirfd = (int)TC_ARG(ctx, 0);
    e.mode = TC_ARG(ctx, 2);
    TC_COMM(e.comm);
    e.color = GREEN;
    e.inner.s = -7;
    e.inner.flag = 1;
    e.small[0] = 1; e.small[1] = 2; e.small[2] = 65535;
    e.negative = -123456789;
    TC_EMIT(ctx, &e);
    TC_PRINTF(ctx, "mode %%lx dirfd %%d nr %%u compat %%u", TC_ARG(ctx, 2), (int)TC_ARG(ctx, 0), TC_NR(ctx),
              TC_COMPAT(ctx));
    return 0;
}
char _license[] SEC("license") = "GPL";
"""

BCC_HANDLER = r"""
#include "tailcalld.h"
int on_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)TC_ARG(ctx, 0) != %(dirfd)d)
        return 0;
    char comm[16] = {};
    TC_COMM(comm);
    TC_PRINTF(ctx, "bcc mode %%lx by %%s", TC_ARG(ctx, 2), comm);
    TC_PRINTF(ctx, "second format: uid %%u", TC_UID());
    u64 marker = 0x1122334455667788ULL;
    TC_EMIT(ctx, &marker);
    return 0;
}
"""

# One event per call, from this test's own process only: the loss accounting counts exactly.
FLOOD_HANDLER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"
struct tick { u64 seq; char pad[%(pad)d]; };
SEC("raw_tp/sys_enter")
int flood(struct bpf_raw_tracepoint_args *ctx)
{
    if (TC_PID() != %(pid)d)
        return 0;
    struct tick t = {};
    t.seq = TC_ARG(ctx, 2);
    TC_EMIT(ctx, &t);
    return 0;
}
char _license[] SEC("license") = "GPL";
"""

EXIT_HANDLER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tailcalld.h"
SEC("raw_tp/sys_exit")
int on_exit(struct bpf_raw_tracepoint_args *ctx)
{
    if (TC_PID() != %(pid)d)
        return 0;
    TC_PRINTF(ctx, "ret %%ld nr %%u", TC_RET(ctx), TC_NR(ctx));
    return 0;
}
char _license[] SEC("license") = "GPL";
"""

PROGRAM_32 = r"""
#include <unistd.h>
#include <sys/syscall.h>
int main(void)
{
    syscall(306, %(dirfd)d, "/nonexistent-tailcalld-test", 0751);  /* i386 fchmodat */
    return 0;
}
"""


def events(d: DaemonProcess, **fields: Any) -> list[dict[str, Any]]:
    return d.call("events", **fields)["events"]


def wait_events(d: DaemonProcess, n: int, **fields: Any) -> list[dict[str, Any]]:
    """The latest events once there are at least ``n`` (the daemon reads the ring when it wakes)."""
    wait_until(lambda: len(events(d, **fields)) >= n)
    return events(d, **fields)


def slot_entry(d: DaemonProcess, nr: int, hook: str = "enter") -> dict[str, Any]:
    [entry] = [s for s in d.call("list")["slots"] if s["slot"] == nr and s["hook"] == hook]
    return entry


def test_a_libbpf_handler_emits_structs_decoded_from_its_btf_and_lines(daemon: DaemonProcess) -> None:
    d = daemon
    dirfd = DIRFD_MAGIC + 1
    r = d.ctl("attach", "fchmodat", "-", input=LIBBPF_HANDLER % {"dirfd": dirfd})
    assert r.returncode == 0, r.stderr
    fchmodat(3, dirfd)
    got = wait_events(d, 6)
    structs = [e for e in got if e["fields"] is not None]
    lines = [e for e in got if e["message"] is not None]
    assert len(structs) == len(lines) == 3
    for e in got:
        assert (e["slot"], e["hook"], e["syscall"], e["pid"], e["tid"], e["uid"]) == (
            NR_FCHMODAT, "enter", "fchmodat", os.getpid(), os.getpid(), os.getuid())
        assert abs(e["time_ns"] / 1e9 - time.time()) < 60
    assert structs[0]["fields"] == {
        "pid": os.getpid(), "dirfd": dirfd, "mode": 0o644, "comm": structs[0]["comm"], "color": "GREEN",
        "inner": {"s": -7, "flag": 1}, "small": [1, 2, 65535], "negative": -123456789}
    assert lines[0]["message"] == f"mode 1a4 dirfd {dirfd} nr {NR_FCHMODAT} compat 0"
    entry = slot_entry(d, NR_FCHMODAT)
    assert (entry["events_emitted"], entry["events_lost"], entry["events_delivered"]) == (6, 0, 6)
    status = d.call("status")
    assert (status["events_emitted"], status["events_lost"], status["events_delivered"]) == (6, 0, 6)
    # People read one line per event.
    shown = d.ctl("events", "--slot", "fchmodat").stdout.splitlines()
    assert len(shown) == 6
    assert f"fchmodat {structs[0]['comm']}[{os.getpid()}] uid {os.getuid()}: pid={os.getpid()} dirfd={dirfd}" \
        in shown[0]
    assert shown[1].endswith(f"mode 1a4 dirfd {dirfd} nr {NR_FCHMODAT} compat 0")
    assert d.ctl("events", "--slot", "getppid").stdout == ""  # another slot's: none


def test_a_bcc_handler_prints_in_the_kernel_and_emits_bytes(daemon: DaemonProcess) -> None:
    d = daemon
    dirfd = DIRFD_MAGIC + 2
    r = d.ctl("attach", "fchmodat", "-", input=BCC_HANDLER % {"dirfd": dirfd})
    assert r.returncode == 0, r.stderr
    fchmodat(1, dirfd)
    got = wait_events(d, 3)
    comm = got[0]["comm"]
    assert [e["message"] for e in got] == [f"bcc mode 1a4 by {comm}", f"second format: uid {os.getuid()}", None]
    # bcc keeps no BTF of the struct: its bytes, as the handler sent them
    assert got[2]["fields"] == {"bytes": (0x1122334455667788).to_bytes(8, "little").hex()}


def test_a_32_bit_caller_s_arguments_come_from_its_own_registers(daemon: DaemonProcess,
                                                                 tmp_path: Path) -> None:
    d = daemon
    dirfd = DIRFD_MAGIC + 3
    (tmp_path / "p.c").write_text(PROGRAM_32 % {"dirfd": dirfd})
    built = subprocess.run(["gcc", "-m32", "-O2", "-o", str(tmp_path / "p32"), str(tmp_path / "p.c")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    r = d.ctl("attach", "fchmodat", "-", input=LIBBPF_HANDLER % {"dirfd": dirfd})
    assert r.returncode == 0, r.stderr
    subprocess.run([str(tmp_path / "p32")], check=True)
    got = wait_events(d, 2)
    assert all(e["compat"] for e in got)
    [struct_event] = [e for e in got if e["fields"] is not None]
    assert (struct_event["fields"]["dirfd"], struct_event["fields"]["mode"]) == (dirfd, 0o751)
    [line] = [e["message"] for e in got if e["message"] is not None]
    assert line == f"mode 1e9 dirfd {dirfd} nr {NR_FCHMODAT} compat 1"


def test_an_exit_handler_sees_the_return_value(daemon: DaemonProcess) -> None:
    d = daemon
    r = d.ctl("attach", "--exit", "getppid", "-", input=EXIT_HANDLER % {"pid": os.getpid()})
    assert r.returncode == 0, r.stderr
    os.getppid()
    [e] = wait_events(d, 1, slot="getppid", hook="exit")
    assert (e["hook"], e["message"]) == ("exit", f"ret {os.getppid()} nr {NR_GETPPID}")
    assert "getppid:exit" in d.ctl("events", "--slot", "getppid", "--exit").stdout


def read_stream(c: Client, until: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(events, notices) a follower read until ``until`` (monotonic time)."""
    got: list[dict[str, Any]] = []
    notices: list[dict[str, Any]] = []
    c.settimeout(until - time.monotonic())
    with pytest.raises((TimeoutError, socket.timeout)):  # the stream never ends by itself
        for message in c.stream():  # one event, or one notice, per line
            (got if "time_ns" in message else notices).append(message)
            c.settimeout(max(0.01, until - time.monotonic()))
    return got, notices


def numbered_calls(n: int) -> None:
    """n fchmodat calls whose mode argument counts up from 0: the flood handler's seq."""
    path = b"/nonexistent-tailcalld-test"
    for i in range(n):
        LIBC.syscall(NR_FCHMODAT, DIRFD_MAGIC, path, i)


def flood(d: DaemonProcess, followers: int, n: int) -> tuple[list[Client], int, int]:
    """Attach the flood handler, subscribe ``followers`` clients, make ``n`` calls; returns the
    clients and the slot's (emitted, lost) of the burst, once the daemon has read all it will."""
    r = d.ctl("attach", "fchmodat", "-", input=FLOOD_HANDLER % {"pid": os.getpid(), "pad": 56})
    assert r.returncode == 0, r.stderr
    clients = [d.client(timeout=10) for _ in range(followers)]
    for c in clients:
        assert c.call("events", follow=True, last=0)["following"]
    before = slot_entry(d, NR_FCHMODAT)

    def done() -> bool:
        now = slot_entry(d, NR_FCHMODAT)
        return now["events_delivered"] + now["events_lost"] - before["events_delivered"] - before["events_lost"] == n

    numbered_calls(n)
    wait_until(done)
    after = slot_entry(d, NR_FCHMODAT)
    return (clients, after["events_emitted"] - before["events_emitted"],
            after["events_lost"] - before["events_lost"])


def accounted(c: Client, seconds: float = 3) -> tuple[list[dict[str, Any]], int, int]:
    """What one follower got in the next seconds: (events, dropped for it, lost as the kernel
    told it); notices come within ~1 s of the loss."""
    got, notices = read_stream(c, time.monotonic() + seconds)
    return (got, sum(n.get("dropped", 0) for n in notices), sum(n["lost"] for n in notices if "lost" in n))


def test_events_the_kernel_could_not_keep_are_counted_and_told(tmp_path: Path, pin_root: Path) -> None:
    """A ring buffer of 64 KiB and a burst of 20 000 events of 128 bytes: the kernel loses some
    (the ring is full), counted per slot and told to the follower, which gets all the rest, in
    order.  received + dropped + lost = emitted, exactly."""
    d = start_daemon(tmp_path, pin_root / "daemon", events_buffer_bytes=64 << 10)
    try:
        [reader], emitted, lost = flood(d, 1, 20_000)
        assert emitted == 20_000
        assert lost > 0, "64 KiB cannot hold 20 000 events: some must be lost in the kernel"
        got, dropped, told_lost = accounted(reader)
        assert (len(got) + dropped + told_lost, told_lost) == (emitted, lost), (len(got), dropped, told_lost)
        seqs = [e["fields"]["seq"] for e in got]
        assert seqs == sorted(set(seqs))  # in order, none twice
        assert d.call("ping")["pid"] == d.pid  # the daemon kept serving through the flood
        reader.close()
        wait_until(lambda: d.call("status")["events_subscribers"] == 0)
    finally:
        d.stop()


def test_a_client_that_does_not_read_loses_its_events_not_the_others(tmp_path: Path, pin_root: Path) -> None:
    """A ring buffer large enough for the burst (16 MiB): nothing is lost in the kernel.  One
    follower reads all along, one never does: the daemon drops the latter's events past
    events_client_bytes (and tells it when it has room again), and never waits for it.  For
    each: received + dropped + lost = emitted, exactly."""
    d = start_daemon(tmp_path, pin_root / "daemon", events_buffer_bytes=16 << 20, events_client_bytes=256 << 10)
    try:
        r = d.ctl("attach", "fchmodat", "-", input=FLOOD_HANDLER % {"pid": os.getpid(), "pad": 56})
        assert r.returncode == 0, r.stderr
        stalled, reading = d.client(timeout=10), d.client(timeout=10)
        for c in (stalled, reading):
            assert c.call("events", follow=True, last=0)["following"]
        read: list[tuple[list[dict[str, Any]], int, int]] = []
        reader = threading.Thread(target=lambda: read.append(accounted(reading, 10)))
        reader.start()
        before = slot_entry(d, NR_FCHMODAT)
        numbered_calls(50_000)
        wait_until(lambda: slot_entry(d, NR_FCHMODAT)["events_delivered"] - before["events_delivered"] == 50_000)
        assert d.call("ping")["pid"] == d.pid  # the daemon answers while a client stalls
        after = slot_entry(d, NR_FCHMODAT)
        emitted, lost = (after["events_emitted"] - before["events_emitted"], after["events_lost"] - before["events_lost"])
        assert (emitted, lost) == (50_000, 0)
        reader.join()
        [(got, dropped, told_lost)] = read
        assert len(got) + dropped + told_lost == emitted
        seqs = [e["fields"]["seq"] for e in got]
        assert got and seqs == sorted(set(seqs))  # in order, none twice
        stalled_got, stalled_dropped, stalled_lost = accounted(stalled)
        assert stalled_dropped > 0
        assert len(stalled_got) + stalled_dropped + stalled_lost == emitted
        stalled.close()
        reading.close()
    finally:
        d.stop()


def test_journal_slots_write_their_events_rate_limited(tmp_path: Path, pin_root: Path, journald: None) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", events_journal_rate=5.0)
    try:
        dirfd = DIRFD_MAGIC + 4
        r = d.ctl("attach", "--journal", "fchmodat", "-", input=BCC_HANDLER % {"dirfd": dirfd})
        assert r.returncode == 0, r.stderr
        assert slot_entry(d, NR_FCHMODAT)["journal"] is True
        fchmodat(100, dirfd)  # 300 events, at most 5 a second to the journal

        def entries() -> list[dict[str, Any]]:
            return [e for e in journal(f"_PID={d.pid}", MESSAGE_ID=EVENT_MESSAGE_ID)
                    if int(e["__REALTIME_TIMESTAMP"]) >= d.started * 1e6]

        got = wait_journal(entries, 5)
        assert 5 <= len(got) <= 15
        first = got[0]
        assert (first["SYSCALL_NR"], first["SYSCALL_NAME"], first["SLOT"], first["PID"]) == (
            str(NR_FCHMODAT), "fchmodat", "fchmodat", str(os.getpid()))
        assert first["MESSAGE"].endswith(f"fchmodat: bcc mode 1a4 by {first['COMM']}")
        struct_entries = [e for e in got if "EVENT_BYTES" in e]
        assert all(e["EVENT_BYTES"] == (0x1122334455667788).to_bytes(8, "little").hex() for e in struct_entries)
        suppressed = wait_journal(lambda: [e for e in journal(f"_PID={d.pid}") if "SUPPRESSED" in e
                                           and int(e["__REALTIME_TIMESTAMP"]) >= d.started * 1e6], 1, timeout=5)
        assert suppressed and suppressed[0]["SLOT"] == "fchmodat"
        assert len(got) + sum(int(e["SUPPRESSED"]) for e in suppressed) >= 300 - 10  # a few may still be in the bucket
    finally:
        d.stop()


def test_structs_are_still_decoded_after_a_restart(tmp_path: Path, pin_root: Path) -> None:
    """The program is adopted from its pin (no compile): its BTF comes from the state folder."""
    dirfd = DIRFD_MAGIC + 5
    d = start_daemon(tmp_path, pin_root / "daemon")
    r = d.ctl("attach", "fchmodat", "-", input=LIBBPF_HANDLER % {"dirfd": dirfd})
    assert r.returncode == 0, r.stderr
    assert d.stop() == 0
    fchmodat(1, dirfd)  # while no daemon runs: kept in the ring
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        got = wait_events(d, 2)
        [struct_event] = [e for e in got if e["fields"] is not None]
        assert struct_event["fields"]["dirfd"] == dirfd and struct_event["fields"]["color"] == "GREEN"
    finally:
        d.stop()


def test_unload_all_removes_the_channel(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    for name in ("events", "event_counts", "call"):
        assert (d.pin_dir / name).exists()
    r = d.ctl("unload-all")
    assert r.returncode == 0, r.stderr
    d.proc.wait(30)
    assert not d.pin_dir.exists()


def test_tc_macros_outside_tailcalld_fail_with_a_clear_message(tmp_path: Path) -> None:
    """Compiled elsewhere (no channel fds), TC_PRINTF says what it needs instead of a bad fd."""
    from tailcalld.compiler import bpf_include_dir
    source = tmp_path / "h.c"
    source.write_text('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n#include "tailcalld.h"\n'
                      'SEC("raw_tp") int h(void *ctx) { TC_PRINTF(ctx, "x"); return 0; }\n')
    vmlinux = tmp_path / "vmlinux.h"
    vmlinux.write_bytes(subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                                       capture_output=True, check=True).stdout)
    r = subprocess.run(["clang", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", f"-I{tmp_path}",
                        f"-I{bpf_include_dir()}", "-c", str(source), "-o", str(tmp_path / "h.o")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "TC_PRINTF needs tailcalld's event channel" in r.stderr


def test_events_on_a_daemon_streams_json_lines_to_tailcallctl(daemon: DaemonProcess) -> None:
    d = daemon
    dirfd = DIRFD_MAGIC + 6
    assert d.ctl("attach", "fchmodat", "-", input=BCC_HANDLER % {"dirfd": dirfd}).returncode == 0
    follower = subprocess.Popen([str(Path(sys.executable).parent / "tailcallctl"), "--socket", str(d.socket),
                                 "events", "-f", "--json", "-n", "0"], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: d.call("status")["events_subscribers"] == 1)
        fchmodat(2, dirfd)
        assert follower.stdout is not None
        lines = [json.loads(follower.stdout.readline()) for _ in range(6)]
        assert [e["message"] for e in lines[:2]] == [lines[0]["message"], f"second format: uid {os.getuid()}"]
        assert all(e["pid"] == os.getpid() for e in lines)
    finally:
        follower.terminate()
        follower.wait(10)


def test_a_lone_follower_that_stalls_leaves_the_events_in_the_ring(tmp_path: Path, pin_root: Path) -> None:
    """With one follower and no --journal slot, a full follower pauses the reading: the events
    wait in the ring (what it cannot hold is lost in the kernel, counted and told) rather than
    being read only to be dropped.  The daemon keeps answering; the reading resumes when the
    follower reads again, and all is accounted for."""
    d = start_daemon(tmp_path, pin_root / "daemon", events_buffer_bytes=1 << 20, events_client_bytes=64 << 10)
    try:
        r = d.ctl("attach", "fchmodat", "-", input=FLOOD_HANDLER % {"pid": os.getpid(), "pad": 56})
        assert r.returncode == 0, r.stderr
        follower = d.client(timeout=10)
        assert follower.call("events", follow=True, last=0)["following"]
        before = slot_entry(d, NR_FCHMODAT)
        numbered_calls(40_000)  # 5 MiB of records: more than the ring and the follower's socket hold
        assert d.call("ping")["pid"] == d.pid
        got, dropped, told_lost = accounted(follower, 8)  # reading now: the daemon resumes
        after = slot_entry(d, NR_FCHMODAT)
        emitted, lost = after["events_emitted"] - before["events_emitted"], after["events_lost"] - before["events_lost"]
        assert emitted == 40_000
        assert dropped == 0, "a lone follower is never dropped for: the ring waits for it"
        assert lost > 0 and told_lost == lost
        assert len(got) + told_lost == emitted
        assert [e["fields"]["seq"] for e in got] == sorted(e["fields"]["seq"] for e in got)
        follower.close()
    finally:
        d.stop()
