"""Handler timing on demand, on the real kernel: off until asked, per-slot runs and nanoseconds
while a lease runs, and nothing left attached or stamping once it ends, also after kill -9."""

from __future__ import annotations

import contextlib
import ctypes
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, pinned_percpu_u64_sum, possible_cpus, start_daemon
from tailcalld.timing import PROGRAM

BUSY_NR, EMPTY_NR = 1000, 1001  # past every syscall table: only this test calls them
BUSY = """int busy(struct bpf_raw_tracepoint_args *ctx) {
    u64 x = 0;
    for (int i = 0; i < 100; i++)
        x += bpf_ktime_get_ns();
    return x & 1;
}"""
EMPTY = "int empty(struct bpf_raw_tracepoint_args *ctx) { return 0; }"


def call(nr: int, times: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(times):
        libc.syscall(nr)


def stamping_cpus(d: DaemonProcess) -> int:
    """On how many CPUs the dispatcher stamps calls (the `on` field of its timing map)."""
    return pinned_percpu_u64_sum(d.pin_dir / "timing", 0, width=4, field=0)


def timing_links(pid: int) -> list[int]:
    """Links of the timing program that process ``pid`` holds (from its fds' fdinfo: this
    bpftool shows no owner pids)."""
    progs = {p["id"]: p.get("name") for p in json.loads(subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout)}
    found = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
            if "link_id" in fields and progs.get(int(fields.get("prog_id", "0"))) == PROGRAM:
                found.append(int(fields["link_id"]))
    return found


def link_ids() -> set[int]:
    return {link["id"] for link in json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                                             text=True, check=True).stdout)}


def slots(d: DaemonProcess) -> dict[int, dict[str, object]]:
    return {s["slot"]: s for s in d.call("list")["slots"]}


@pytest.fixture
def daemon(tmp_path: Path, pin_root: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        d.call("attach", slot=BUSY_NR, source=BUSY)
        d.call("attach", slot=EMPTY_NR, source=EMPTY)
        yield d
    finally:
        d.stop()


def test_timing_is_off_until_asked(daemon: DaemonProcess) -> None:
    assert stamping_cpus(daemon) == 0 and timing_links(daemon.pid) == []
    assert {s["timed_runs"] for s in slots(daemon).values()} == {None}
    assert daemon.call("status")["timing_seconds_left"] == 0
    assert daemon.call("timing", seconds=0) == {"on": False, "seconds_left": 0.0, "dispatch_ns": None}


def test_each_slot_gets_its_own_runs_and_time(daemon: DaemonProcess) -> None:
    reply = daemon.call("timing", seconds=30)
    assert reply["on"] and 29 < reply["seconds_left"] <= 30
    assert stamping_cpus(daemon) == possible_cpus() and len(timing_links(daemon.pid)) == 1
    call(BUSY_NR, 2000)
    call(EMPTY_NR, 3000)
    listed = slots(daemon)
    busy, empty = listed[BUSY_NR], listed[EMPTY_NR]
    assert (busy["timed_runs"], empty["timed_runs"]) == (2000, 3000)  # every run, in its own slot
    # Attribution, not speed: 100 clock reads against none cannot come out the other way round.
    assert busy["timed_ns"] / 2000 > 2 * (empty["timed_ns"] / 3000) > 0
    status = daemon.ctl("status")
    assert "Timing" in status.stdout and "on for" in status.stdout
    shown = daemon.ctl("list")
    assert "AVG NS" in shown.stdout, shown.stdout


def test_timing_ends_with_its_lease(daemon: DaemonProcess) -> None:
    daemon.call("timing", seconds=1)
    assert len(timing_links(daemon.pid)) == 1
    time.sleep(1.5)
    assert timing_links(daemon.pid) == [] and stamping_cpus(daemon) == 0
    assert {s["timed_runs"] for s in slots(daemon).values()} == {None}
    assert daemon.call("status")["timing_seconds_left"] == 0 and not daemon.call("timing", seconds=0)["on"]


def test_a_renewal_extends_the_lease(daemon: DaemonProcess) -> None:
    daemon.call("timing", seconds=1)
    time.sleep(0.6)
    daemon.call("timing", seconds=1)
    time.sleep(0.6)  # past the first lease, within the second
    assert len(timing_links(daemon.pid)) == 1 and stamping_cpus(daemon) == possible_cpus()


def test_a_stamp_left_by_a_killed_daemon_is_switched_off_at_start(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    d.call("timing", seconds=60)
    assert stamping_cpus(d) == possible_cpus()
    d.kill()  # its timing link dies with it; the pinned stamp switch stays on
    assert stamping_cpus(d) == possible_cpus()
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert stamping_cpus(d) == 0
    finally:
        d.stop()


def test_stop_and_unload_all_leave_no_timing_behind(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    d.call("timing", seconds=60)
    assert d.stop() == 0
    assert stamping_cpus(d) == 0  # the pins stay, the stamp does not
    d = start_daemon(tmp_path, pin_root / "daemon")
    d.call("timing", seconds=60)
    [link] = timing_links(d.pid)
    d.call("unload-all")
    assert d.proc.wait(30) == 0
    assert link not in link_ids() and not (pin_root / "daemon").exists()


@pytest.mark.parametrize("seconds", [-1, 601, "x"])
def test_a_bad_lease_is_refused(daemon: DaemonProcess, seconds: object) -> None:
    with daemon.client() as c:
        c.send_raw(json.dumps({"id": 7, "command": "timing", "seconds": seconds}).encode() + b"\n")
        reply = c.read_reply()
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert daemon.ctl("timing", str(seconds)).returncode != 0
    assert stamping_cpus(daemon) == 0 and timing_links(daemon.pid) == []
