"""Limits that keep hostile or unlucky clients from locking others out (issue #10, item 9):
root's reserved place, the per-uid cap, and an open-file limit that fits a full slot table."""

from __future__ import annotations

import configparser
import contextlib
import grp
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, start_daemon
from tailcalld.daemon import NOFILE_NEEDED

NOBODY = 65534
STRANGER = 4242  # a uid with no account, whose primary group is nobody's (the allowed group)
REPO = Path(__file__).resolve().parent.parent
# The helpers below need the standard library only; the venv's python may sit in a folder other
# users cannot enter (a checkout under /root), the interpreter it links to does not.
PYTHON = os.path.realpath(sys.executable)

# Holds N silent connections until its stdin closes; says "held" once they are all connected.
HOLDER_SCRIPT = """
import socket, sys
held = [socket.socket(socket.AF_UNIX) for _ in range(int(sys.argv[2]))]
for s in held:
    s.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""
ASK_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"id": 7, "command": "ping"}\\n')
print(s.makefile().readline().strip())
"""


@contextlib.contextmanager
def silent_connections(d: DaemonProcess, uid: int, count: int) -> Iterator[None]:
    """``count`` connections from ``uid`` that never say a word, held open for the block."""
    proc = subprocess.Popen([PYTHON, "-c", HOLDER_SCRIPT, str(d.socket), str(count)], user=uid,
                            group=NOBODY, extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield
    finally:
        proc.communicate(timeout=30)


def ask_as(d: DaemonProcess, uid: int) -> dict:
    r = subprocess.run([PYTHON, "-c", ASK_SCRIPT, str(d.socket)], user=uid, group=NOBODY, extra_groups=[],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for_connections(d: DaemonProcess, count: int) -> None:
    """Until the daemon has admitted exactly ``count`` connections besides the one asking."""
    seen = None
    for _ in range(200):
        with d.client(timeout=10) as c:
            seen = c.call("status")["connections"] - 1
        if seen == count:
            return
    raise AssertionError(f"the daemon has {seen} other connections, never {count}")


def test_root_gets_in_while_other_users_hold_every_place(tmp_path: Path, pin_root: Path, public_dir: Path) -> None:
    # 3 places, and one uid may take all three
    d = start_daemon(tmp_path, pin_root / "daemon", socket=public_dir / "s.sock", max_connections=3,
                     max_connections_per_uid=3, allowed_group=grp.getgrgid(NOBODY).gr_name)
    try:
        with silent_connections(d, NOBODY, 3):
            wait_for_connections(d, 3)  # this status call is root's, on the reserved place
            assert ask_as(d, STRANGER)["error"]["code"] == "too_many_connections"  # the places are taken
            with d.client() as first:
                assert first.call("list") == {"slots": []}
                # The reserve is root's alone, and ROOT_RESERVE places only: one more root client waits.
                with d.client() as second:
                    second.send_raw(b'{"id": 2, "command": "ping"}\n')
                    assert second.read_reply()["error"]["code"] == "too_many_connections"
        wait_for_connections(d, 0)
        assert ask_as(d, STRANGER)["result"]["version"]
    finally:
        d.stop()


def test_one_user_cannot_take_every_place(tmp_path: Path, pin_root: Path, public_dir: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", socket=public_dir / "s.sock", max_connections=6,
                     max_connections_per_uid=2, allowed_group=grp.getgrgid(NOBODY).gr_name)
    try:
        with silent_connections(d, NOBODY, 2):
            wait_for_connections(d, 2)
            refused = ask_as(d, NOBODY)["error"]
            assert refused["code"] == "too_many_connections"
            assert "max_connections_per_uid" in refused["message"] and refused["details"]["limit"] == 2
            assert ask_as(d, STRANGER)["result"]["version"]  # another user still has room
            with d.client() as c:
                assert c.call("ping")["version"]
        wait_for_connections(d, 0)
        assert ask_as(d, NOBODY)["result"]["version"]
    finally:
        d.stop()


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """Start children under a low soft open-file limit, as a login shell's 1024 would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft_nofile_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def test_a_full_slot_table_fits_the_open_file_limit(tmp_path: Path, pin_root: Path) -> None:
    """Each slot's program holds an fd.  Under a soft limit of 256, 300 slots ran out of fds and
    the attaches past that failed (state_unwritable, internal: too many open files); the daemon
    now raises its soft limit itself."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < NOFILE_NEEDED:
        pytest.skip(f"the hard open-file limit here is below {NOFILE_NEEDED}")
    with soft_nofile(256):
        d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        source = "int nothing(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
        slots = range(600, 900)  # numbers no syscall has on x86_64 or arm64: the handlers never run
        with d.client() as c:
            ids = {c.call("attach", slot=slot, source=source, filename="nothing.c")["prog_id"] for slot in slots}
            assert len(ids) == 1  # one program shared by every slot: one fd each, no compile
            assert len(c.call("list")["slots"]) == len(slots)
        assert _soft_nofile_of(d.pid) >= NOFILE_NEEDED
    finally:
        d.stop()


def test_the_unit_allows_the_open_files_the_daemon_needs() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(REPO / "contrib" / "tailcalld.service")
    assert int(unit["Service"]["LimitNOFILE"]) >= NOFILE_NEEDED

