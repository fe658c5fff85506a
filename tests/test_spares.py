"""Compile workers started ahead (tailcalld/spares.py) on a real daemon: after a compile the next
worker of its kind waits idle, the next compile takes it, one killed while idle is replaced
without failing an attach, and none outlives the daemon, stopped or killed with -9."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from harness import DaemonProcess, children_of, idle_worker, new_pin_root, remove_pin_tree, start_daemon

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KINDS = {"bcc": EXAMPLES / "fchmodat.c", "libbpf": EXAMPLES / "fchmodat_libbpf.bpf.c"}


def idle_of(d: DaemonProcess, kind: str) -> int:
    """The daemon's idle worker of ``kind``, once it has been started (pytest's timeout bounds the wait)."""
    while True:
        for pid in children_of(d.pid):
            try:
                if idle_worker(pid) and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2] == kind.encode():
                    return pid
            except (OSError, IndexError):
                continue
        threading.Event().wait(0.02)


def attach(d: DaemonProcess, kind: str, tag: str) -> None:
    source = KINDS[kind].read_text() + f"\n// {tag}\n"  # new each time: a compile
    d.call("attach", slot="getppid", source=source, function="enter_fchmodat")
    d.call("detach", slot="getppid")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_the_next_compile_takes_the_worker_started_ahead(daemon: DaemonProcess) -> None:
    for kind in KINDS:
        attach(daemon, kind, "first")
        waiting = idle_of(daemon, kind)
        attach(daemon, kind, "second")
        assert gone(waiting) or not idle_worker(waiting)  # it compiled, and was killed with its group
        assert idle_of(daemon, kind) != waiting


def test_a_worker_killed_while_idle_is_replaced_and_the_attach_works(daemon: DaemonProcess) -> None:
    attach(daemon, "bcc", "first")
    waiting = idle_of(daemon, "bcc")
    os.kill(waiting, signal.SIGKILL)  # as the OOM killer would
    attach(daemon, "bcc", "after the kill")  # raises if the attach failed
    assert idle_of(daemon, "bcc") != waiting


def test_no_worker_outlives_its_daemon(tmp_path: Path) -> None:
    pin_root = new_pin_root()
    try:
        for how in ("stop", "kill -9"):
            folder = tmp_path / how.replace(" ", "")
            folder.mkdir()
            d = start_daemon(folder, pin_root / folder.name)
            try:
                attach(d, "bcc", how)
                attach(d, "libbpf", how)
                workers = [idle_of(d, "bcc"), idle_of(d, "libbpf")]
            finally:
                if how == "stop":
                    assert d.stop() == 0
                else:
                    d.kill()
            while not all(gone(pid) for pid in workers):  # PR_SET_PDEATHSIG, or the stop's kill
                threading.Event().wait(0.02)
    finally:
        remove_pin_tree(pin_root)
