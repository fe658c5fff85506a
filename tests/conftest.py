"""Shared fixtures: real kernel, real pins, real journal.

Every test that touches BPF pins under its own /sys/fs/bpf/tailcalld-test-<random> and
removes it in teardown, failures included; the session also sweeps leftovers of earlier
runs with that prefix (a pinned link would keep a program on every syscall).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tailcalld import bpfsys
from tailcalld.client import Client
from tailcalld.dispatcher import remove_pin_tree
from tailcalld.journal import journald_listening

BPFFS = Path("/sys/fs/bpf")
TEST_PREFIX = "tailcalld-test-"
DIRFD_MAGIC = 7771  # fchmodat(7771, ...) is never made by anything but these tests
NR_FCHMODAT = 268
VENV_BIN = Path(sys.executable).parent

_libc = ctypes.CDLL(None, use_errno=True)


def new_pin_root() -> Path:
    """A fresh test pin folder, named after this test run's pid so that a concurrent run
    (another developer's, a benchmark) never sweeps it away."""
    root = BPFFS / f"{TEST_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    (root / "maps").mkdir(parents=True)
    return root


def _owner_alive(folder: Path) -> bool:
    match = re.match(re.escape(TEST_PREFIX) + r"(\d+)-", folder.name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> None:
    for leftover in BPFFS.glob(TEST_PREFIX + "*"):
        if not _owner_alive(leftover):
            remove_pin_tree(leftover)


@pytest.fixture(scope="session", autouse=True)
def machine() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.exit("the tests load BPF programs: run them as root (make test)", returncode=2)
    if not os.path.ismount(BPFFS):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    sweep_leftovers()
    yield
    sweep_leftovers()


@pytest.fixture(scope="session")
def journald() -> Iterator[None]:
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
def pin_root() -> Iterator[Path]:
    root = new_pin_root()
    try:
        yield root
    finally:
        remove_pin_tree(root)


def fchmodat(n: int, dirfd: int = DIRFD_MAGIC) -> None:
    """n raw fchmodat(2) calls that fail with EBADF but pass through sys_enter."""
    path = b"/nonexistent-tailcalld-test"
    for _ in range(n):
        _libc.syscall(NR_FCHMODAT, dirfd, path, 0o644)


class Workload:
    """fchmodat(7771, ...) in a loop on a thread; ``made`` counts every call issued."""

    def __init__(self) -> None:
        self.made = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._done.is_set():
            fchmodat(100)
            self.made += 100

    def __enter__(self) -> Workload:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def counting_handler(counter_pin: Path, function: str = "count_calls", dirfd: int = DIRFD_MAGIC,
                     step: int = 1) -> str:
    """bcc C for a handler that counts this test process's fchmodat(dirfd, ...) calls into a
    pinned u64 (the process filter keeps a concurrent test run from adding to the count)."""
    return f"""
#include <uapi/linux/ptrace.h>
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter_pin}");

int {function}(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if ((int)dirfd != {dirfd} || (bpf_get_current_pid_tgid() >> 32) != {os.getpid()})
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, {step});
    return 0;
}}
"""


def read_counter(pin: Path) -> int:
    """Read a pinned u64 array entry 0 with bpftool, independently of tailcalld's own code."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)],
                         capture_output=True, text=True, check=True).stdout
    entry = json.loads(out)[0]
    return int.from_bytes(bytes(int(b, 16) for b in entry["value"]), "little")


def kernel_slots(prog_array: Path) -> dict[int, int]:
    """slot -> program id of a pinned prog array, as bpftool sees it."""
    r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(prog_array)], capture_output=True, text=True)
    assert r.returncode == 0, f"bpftool map dump {prog_array}: {r.stdout} {r.stderr}"
    out = r.stdout
    return {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"):
            int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little") for e in json.loads(out)}


def saved_slots(state_dir: Path) -> dict[int, int]:
    """slot -> program id recorded in tailcalld's state file."""
    state = json.loads((state_dir / "state.json").read_text())
    return {int(slot): record["prog_id"] for slot, record in state["slots"].items()}


def run_tailcalld(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """tailcalld run to completion (a start that must fail, --purge)."""
    return subprocess.run([str(VENV_BIN / "tailcalld"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60)


def pin_foreign_map(path: Path) -> None:
    """Pin a map tailcalld did not make at ``path``: an object it must refuse to touch."""
    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, "notours", 4, 4, 16)
    try:
        bpfsys.obj_pin(fd, str(path))
    finally:
        os.close(fd)


def write_config(path: Path, **settings: object) -> Path:
    lines = []
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value if not isinstance(value, Path) else str(value))}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    socket: Path
    pin_dir: Path
    config: Path
    log: Path

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(self.socket), *args],
                              capture_output=True, text=True, input=input, timeout=120)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text()


def start_daemon(tmp: Path, pin_dir: Path, **settings: object) -> DaemonProcess:
    settings.setdefault("socket", tmp / "tailcalld.sock")
    config = write_config(tmp / "tailcalld.toml", pin_dir=pin_dir, state_dir=tmp / "state", **settings)
    sock = Path(str(settings["socket"]))
    log = tmp / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "tailcalld"), "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    d = DaemonProcess(proc, sock, pin_dir, config, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tailcalld exited with {proc.returncode}:\n{d.output()}")
        with contextlib.suppress(OSError), d.client(timeout=5) as c:
            c.call("ping")
            return d
        time.sleep(0.05)
    d.stop()
    raise AssertionError(f"tailcalld did not answer within 60 s:\n{d.output()}")


def start_counting(tmp: Path, pin_root: Path, counter: Path, **settings: object) -> tuple[DaemonProcess, int]:
    """A daemon on ``pin_root/daemon`` with a counting handler in slot 268 (fchmodat), named
    count.c; returns the daemon and the handler's program id."""
    d = start_daemon(tmp, pin_root / "daemon", **settings)
    with d.client() as c:
        prog_id = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter), filename="count.c")["prog_id"]
    return d, prog_id


@pytest.fixture
def daemon(tmp_path: Path, pin_root: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        yield d
    finally:
        d.stop()
