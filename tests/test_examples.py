"""The handlers in examples/, loaded from their files through a real daemon with tailcallctl,
as the README and their header comments tell a user to, and the content of their events
checked against syscalls this test makes with known arguments.

The examples trace every process of the machine (as a user's would), so each test follows the
slot's events from before its syscall and picks its own event by its pid or a path of its own:
other activity on the host (another test run opening files) only adds events to skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import DIRFD_MAGIC, NR_FCHMODAT, REPO, DaemonProcess
from tailcalld.client import Client

EXAMPLES = REPO / "examples"
LIBC = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
NR_OPENAT = 257
ENOENT = 2

Event = dict[str, Any]


def attach(d: DaemonProcess, *args: str) -> None:
    """tailcallctl attach, as the example's header says (args name the file in examples/)."""
    r = d.ctl("attach", *args)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def following(d: DaemonProcess, slot: str, hook: str = "enter") -> Iterator[Client]:
    """A follower of one slot's events, subscribed before the test makes its syscall (the
    backlog could lose the test's event among a busy host's)."""
    with d.client(timeout=10) as c:
        assert c.call("events", slot=slot, hook=hook, follow=True, last=0)["following"]
        yield c


def wait_event(c: Client, match: Callable[[Event], bool], timeout: float = 30) -> tuple[Event, list[Event]]:
    """The first followed event ``match`` accepts, and every event before it.  The timeout only
    ends a test whose event never comes; nothing here measures time."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError):
        c.settimeout(timeout)
        for message in c.stream():  # one event (or a notice of missed ones) per line
            if "time_ns" in message:
                if match(message):
                    return message, seen
                seen.append(message)
            c.settimeout(max(0.01, deadline - time.monotonic()))
    raise AssertionError(f"no matching event within {timeout:g} s; {len(seen)} others: {seen[-5:]}")


def fields(e: Event) -> dict[str, Any]:
    """The decoded struct of a TC_EMIT event ({} for a TC_PRINTF line)."""
    return e["fields"] if isinstance(e["fields"], dict) else {}


def test_fchmodat_emits_the_path_mode_and_dirfd(daemon: DaemonProcess, tmp_path: Path) -> None:
    d = daemon
    attach(d, "fchmodat", str(EXAMPLES / "fchmodat_events.bpf.c"))
    target = tmp_path / f"chmod-me-{secrets.token_hex(4)}"
    target.write_text("")
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with following(d, "fchmodat") as c:
            os.chmod(target.name, 0o640, dir_fd=dirfd)  # fchmodat(dirfd, name, 0640)
            e, _ = wait_event(c, lambda e: e["pid"] == os.getpid() and fields(e).get("path") == target.name)
    finally:
        os.close(dirfd)
    assert e["fields"] == {"path": target.name, "mode": 0o640, "dirfd": dirfd}
    assert (e["syscall"], e["slot"], e["hook"], e["compat"]) == ("fchmodat", NR_FCHMODAT, "enter", False)
    # As the header says a person sees it (fchmodat is rare: the backlog holds it).
    shown = d.ctl("events", "--slot", "fchmodat").stdout
    assert f'path="{target.name}" mode={0o640} dirfd={dirfd}' in shown
    assert target.stat().st_mode & 0o777 == 0o640


def test_fchmodat_of_coreutils_chmod(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The README session's `chmod`: a path relative to AT_FDCWD, or to a directory it opened."""
    d = daemon
    attach(d, "fchmodat", str(EXAMPLES / "fchmodat_events.bpf.c"))
    target = tmp_path / f"chmod-me-{secrets.token_hex(4)}"
    target.write_text("")
    with following(d, "fchmodat") as c:
        chmod = subprocess.Popen(["chmod", "751", str(target)])
        assert chmod.wait(30) == 0
        e, _ = wait_event(c, lambda e: e["pid"] == chmod.pid and target.name in fields(e).get("path", ""))
    assert (e["comm"], e["fields"]["mode"]) == ("chmod", 0o751)
    assert e["fields"]["path"] in (str(target), target.name)


def test_openat_emits_the_path_and_flags(daemon: DaemonProcess, tmp_path: Path) -> None:
    d = daemon
    attach(d, "openat", str(EXAMPLES / "openat.bpf.c"))
    path = tmp_path / f"opened-{secrets.token_hex(4)}"
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL | os.O_APPEND
    with following(d, "openat") as c:
        # libc's open(), not os.open (which adds O_CLOEXEC): the flags as given reach openat.
        fd = LIBC.open(bytes(path), flags, 0o604)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        os.close(fd)
        e, _ = wait_event(c, lambda e: e["pid"] == os.getpid() and fields(e).get("path") == str(path))
        fd = os.open(path, os.O_RDONLY)  # again, read-only this time (O_CLOEXEC from Python)
        os.close(fd)
        again, _ = wait_event(c, lambda e: e["pid"] == os.getpid() and fields(e).get("path") == str(path))
    assert e["fields"] == {"dirfd": AT_FDCWD, "path": str(path), "flags": flags, "mode": 0o604}
    assert (again["fields"]["flags"], again["fields"]["dirfd"]) == (os.O_RDONLY | os.O_CLOEXEC, AT_FDCWD)
    assert (e["syscall"], e["slot"], e["tid"]) == ("openat", NR_OPENAT, e["pid"])
    assert path.stat().st_mode & 0o777 == 0o604


def test_execve_emits_the_filename_and_the_parent_read_with_co_re(daemon: DaemonProcess, tmp_path: Path) -> None:
    d = daemon
    attach(d, "execve", str(EXAMPLES / "execve.bpf.c"))
    binary = tmp_path / f"tcd-true-{secrets.token_hex(4)}"  # a file name of this test's own
    shutil.copy("/bin/true", binary)
    with following(d, "execve") as c:
        child = subprocess.Popen([str(binary)])  # the test process is its parent
        assert child.wait(30) == 0
        e, _ = wait_event(c, lambda e: fields(e).get("filename") == str(binary))
        # From a shell: it forks, and the child execs the binary (the shell is its parent).
        shell = subprocess.run(["/bin/sh", "-c", f"{binary}; echo $$"], capture_output=True, text=True, check=True)
        nested, _ = wait_event(c, lambda e: fields(e).get("filename") == str(binary))
    assert e["fields"] == {"filename": str(binary), "ppid": os.getpid()}
    assert (e["pid"], e["syscall"]) == (child.pid, "execve")
    shell_pid = int(shell.stdout)
    assert nested["fields"] == {"filename": str(binary), "ppid": shell_pid}
    assert nested["pid"] != shell_pid


def test_kill_emits_who_signals_whom(daemon: DaemonProcess) -> None:
    d = daemon
    attach(d, "kill", str(EXAMPLES / "kill.bpf.c"))
    comm = Path("/proc/self/comm").read_text().strip()
    child = subprocess.Popen(["sleep", "600"])
    try:
        with following(d, "kill") as c:
            os.kill(child.pid, signal.SIGTERM)
            e, _ = wait_event(c, lambda e: fields(e).get("target_pid") == child.pid)
            assert child.wait(30) == -signal.SIGTERM
            # The kill command, from a process of its own, to a second child.
            other = subprocess.Popen(["sleep", "600"])
            try:
                sender = subprocess.Popen(["kill", "-USR1", str(other.pid)])
                assert sender.wait(30) == 0
                by_kill, _ = wait_event(c, lambda e: fields(e).get("target_pid") == other.pid)
                assert other.wait(30) == -signal.SIGUSR1
            finally:
                other.kill()
                other.wait(30)
    finally:
        child.kill()
        child.wait(30)
    assert e["fields"] == {"sender_pid": os.getpid(), "sender_comm": comm, "target_pid": child.pid,
                           "sig": signal.SIGTERM}
    assert (e["pid"], e["comm"], e["syscall"]) == (os.getpid(), comm, "kill")
    assert by_kill["fields"] == {"sender_pid": sender.pid, "sender_comm": "kill", "target_pid": other.pid,
                                 "sig": signal.SIGUSR1}
    shown = d.ctl("events", "--slot", "kill").stdout
    assert f'sender_pid={os.getpid()} sender_comm="{comm}" target_pid={child.pid} sig=15' in shown


def test_openat_latency_pairs_enter_and_exit_through_a_pinned_map(daemon: DaemonProcess, tmp_path: Path) -> None:
    d = daemon
    source = str(EXAMPLES / "openat_latency.bpf.c")
    attach(d, "--exit", "openat", source, "--function", "openat_exit")
    attach(d, "openat", source, "--function", "openat_enter")
    # Both loads of the file share one map, pinned by name under the file's own folder.
    [pinned] = list((d.pin_dir / "handlers").glob("*/openat_calls"))
    missing = tmp_path / f"missing-{secrets.token_hex(4)}"
    present = tmp_path / f"present-{secrets.token_hex(4)}"
    present.write_text("")
    with following(d, "openat", hook="exit") as c:
        with pytest.raises(FileNotFoundError):
            os.open(missing, os.O_RDONLY)
        failed, _ = wait_event(c, lambda e: e["pid"] == os.getpid() and fields(e).get("path") == str(missing))
        fd = os.open(present, os.O_RDONLY)
        os.close(fd)
        opened, _ = wait_event(c, lambda e: e["pid"] == os.getpid() and fields(e).get("path") == str(present))
    # The path reached the exit handler only through the enter handler's note: the map is shared.
    assert (failed["hook"], failed["syscall"], failed["slot"]) == ("exit", "openat", NR_OPENAT)
    assert (failed["fields"]["errno"], failed["fields"]["ret"]) == (ENOENT, -ENOENT)
    assert failed["fields"]["latency_ns"] > 0
    assert (opened["fields"]["errno"], opened["fields"]["ret"]) == (0, fd)
    assert opened["fields"]["latency_ns"] > 0
    # The map's pin goes with the file's last slot.
    assert d.ctl("detach", "openat").returncode == 0
    assert pinned.exists()
    assert d.ctl("detach", "--exit", "openat").returncode == 0
    assert not pinned.exists()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the ia32 ABI exists on x86_64 only")
def test_a_32_bit_caller_s_arguments_come_from_the_ia32_registers(daemon: DaemonProcess, tmp_path: Path) -> None:
    d = daemon
    caller = tmp_path / "caller32"
    built = subprocess.run(["gcc", "-m32", "-O2", "-o", str(caller), str(EXAMPLES / "caller32.c")],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"gcc -m32 (gcc-multilib, installed by make setup) failed:\n{built.stderr}"
    attach(d, "fchmodat", str(EXAMPLES / "compat32.bpf.c"))
    path = f"/nonexistent-tailcalld-{secrets.token_hex(4)}"
    with following(d, "fchmodat") as c:
        LIBC.syscall(NR_FCHMODAT, DIRFD_MAGIC, path.encode(), 0o751)  # 64-bit: the handler skips it
        run = subprocess.Popen([str(caller), str(DIRFD_MAGIC), path, "751"], stdout=subprocess.PIPE, text=True)
        out, _ = run.communicate(timeout=30)
        assert run.returncode == 0
        e, before = wait_event(c, lambda e: e["pid"] == run.pid)
    address, ret = (int(line) for line in out.split())
    assert ret == -1  # EBADF: 7771 is no file descriptor
    assert e["compat"] is True and e["comm"] == "caller32"
    assert (e["fields"]["nr"], e["fields"]["compat"]) == (NR_FCHMODAT, 1)
    assert e["fields"]["args"][:3] == [DIRFD_MAGIC, address, 0o751]
    assert 0 < address < 1 << 32
    # The 64-bit call came first, and the ring keeps order: it would be among these.
    assert not [b for b in before if b["pid"] == os.getpid()]
