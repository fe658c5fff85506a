"""Fixtures only; the helpers behind them live in ``harness`` (shared with the benchmark).

``machine`` (root, bpffs mounted, leftovers of dead runs swept) is not autouse: every
fixture that touches the kernel depends on it, so pure unit tests run without root.
Every test that pins does so under its own /sys/fs/bpf/tailcalld-test-<pid>-<random>,
removed in teardown, failures included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, ensure_bpffs, new_pin_root, remove_pin_tree, start_daemon, sweep_leftovers
from tailcalld.journal import journald_listening


@pytest.fixture(scope="session")
def machine() -> Iterator[None]:
    """Root, bpffs, and no pins left by earlier runs; at the end, none left by this one."""
    if os.geteuid() != 0:
        pytest.exit("the tests load BPF programs: run them as root (make test)", returncode=2)
    ensure_bpffs()
    sweep_leftovers()
    yield
    sweep_leftovers()


@pytest.fixture(scope="session")
def journald(machine: None) -> Iterator[None]:
    """The tests read the real journal; start a journald when none runs (PID 1 is not systemd here)."""
    proc = None
    if not journald_listening():
        proc = subprocess.Popen(["/lib/systemd/systemd-journald"])
        for _ in range(100):
            if journald_listening():
                break
            time.sleep(0.05)
        assert journald_listening(), "systemd-journald did not come up"
    yield
    if proc is not None:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder every user can traverse (pytest's tmp_path is root-only), for sockets that
    other uids must be able to reach."""
    path = Path(tempfile.mkdtemp(prefix="tailcalld-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pin_root(machine: None) -> Iterator[Path]:
    root = new_pin_root()
    try:
        yield root
    finally:
        remove_pin_tree(root)


@pytest.fixture
def daemon(tmp_path: Path, pin_root: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        yield d
    finally:
        d.stop()
