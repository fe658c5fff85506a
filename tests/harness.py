"""What the tests and the benchmark need to drive tailcalld on the real kernel: pin folders,
a daemon process, a traced workload, independent readers of kernel objects, the journal.

Plain functions and classes, no pytest: ``tests/conftest.py`` wraps them in fixtures, and the
benchmark imports this module as ``tests.harness`` (``python -m bench.run`` runs from the repo
root).  Kernel objects are read here with bpftool or libbpf directly rather than through
tailcalld's own code, so that a test checks the daemon against something it did not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tailcalld import bpfsys
from tailcalld.client import Client
from tailcalld.compiler import Compiler, Program
from tailcalld.config import LiveSettings, Settings
from tailcalld.dispatcher import COUNTS, EXIT, LEGACY_PINS, NR_SLOTS, PROG_ARRAY, TIMING

BPFFS = Path("/sys/fs/bpf")
# Every pin folder of a test or benchmark run is named tailcalld-test-<pid>-...: a sweep spares
# a folder while that pid lives (another run in progress) and removes what a dead run left.
TEST_PREFIX = "tailcalld-test-"
DIRFD_MAGIC = 7771  # fchmodat(7771, ...) is never made by anything but these tests
NR_FCHMODAT = 268
VENV_BIN = Path(sys.executable).parent
BPF_MAP_TYPE_ARRAY = 2

_libc = ctypes.CDLL(None, use_errno=True)


# -- pin folders -----------------------------------------------------------------------------

def pin_path(*purpose: str) -> Path:
    """A fresh pin folder name (not created) that carries this process's pid, so that a
    concurrent run (another developer's tests, a benchmark) never sweeps it away."""
    return BPFFS / "-".join([f"{TEST_PREFIX}{os.getpid()}", *purpose, secrets.token_hex(4)])


def new_pin_root() -> Path:
    """A test's pin folder, with ``maps/`` for the pinned maps of its handlers."""
    root = pin_path()
    (root / "maps").mkdir(parents=True)
    return root


def remove_pin_tree(folder: Path) -> None:
    """Remove a whole folder of pins, links first: unpinning a link is what detaches its
    program, and nothing must stay on sys_enter once the folder is gone."""
    if not folder.exists():
        return
    for link in sorted(folder.rglob("link*")):
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    shutil.rmtree(folder, ignore_errors=True)


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
    """Remove pin folders of runs that are gone (and this run's own): a pinned link left by a
    killed run would keep its program on every syscall of the machine."""
    for leftover in BPFFS.glob(TEST_PREFIX + "*"):
        if not _owner_alive(leftover):
            remove_pin_tree(leftover)


def ensure_bpffs() -> None:
    """bpffs is not mounted at boot on these machines."""
    if not os.path.ismount(BPFFS):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


# -- the daemon process ----------------------------------------------------------------------

def write_config(path: Path, **settings: object) -> Path:
    lines = []
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value if not isinstance(value, Path) else str(value))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_tailcalld(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """tailcalld run to completion (a start that must fail, --purge)."""
    return subprocess.run([str(VENV_BIN / "tailcalld"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60)


class DaemonStuck(AssertionError):
    """tailcalld outlived SIGTERM's grace period; it has been killed, so no run leaves it behind."""


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    socket: Path
    pin_dir: Path
    config: Path
    log: Path
    started: float = 0.0  # time.time() at its start: pids come round again (pid_max 32768), entries stay

    @property
    def pid(self) -> int:
        return self.proc.pid  # the console script is python itself: no wrapper process in between

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, command: str, **fields: Any) -> dict[str, Any]:
        """One request on a connection of its own."""
        with self.client() as c:
            return c.call(command, **fields)

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(self.socket), *args],
                              capture_output=True, text=True, input=input, timeout=120)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; returns the exit status.  Raises DaemonStuck (after killing it) if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonStuck(f"tailcalld did not exit within {timeout:g} s of SIGTERM:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text()


def start_daemon(tmp: Path, pin_dir: Path, prefix: Sequence[str] = (), args: Sequence[str] = (),
                 restored: bool = True, **settings: object) -> DaemonProcess:
    """A tailcalld with its config, socket, state and log in ``tmp``, once it answers a ping
    and (``restored``) has rebuilt every recorded slot it rebuilds (the socket answers before).
    ``prefix`` runs it through another command that execs it (nsenter), so its pid stays ours;
    ``args`` go after its --config."""
    settings.setdefault("socket", tmp / "tailcalld.sock")
    config = write_config(tmp / "tailcalld.toml", pin_dir=pin_dir, state_dir=tmp / "state", **settings)
    sock = Path(str(settings["socket"]))
    log = tmp / "daemon.log"
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen([*prefix, str(VENV_BIN / "tailcalld"), "--config", str(config), *args],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    d = DaemonProcess(proc, sock, pin_dir, config, log, started)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tailcalld exited with {proc.returncode}:\n{d.output()}")
        with contextlib.suppress(OSError), d.client(timeout=5) as c:
            c.call("ping")
            if not restored:
                return d
            while time.monotonic() < deadline and c.call("status").get("restoring"):
                time.sleep(0.05)
            return d
        time.sleep(0.05)
    d.stop()
    raise AssertionError(f"tailcalld did not answer within 60 s:\n{d.output()}")


@contextlib.contextmanager
def own_daemon(tmp: Path, **settings: object) -> Iterator[DaemonProcess]:
    """A daemon on a pin folder of its own (for a module-scoped fixture): stopped, and its pins
    removed, whatever happens."""
    pin_root = new_pin_root()
    try:
        d = start_daemon(tmp, pin_root / "daemon", **settings)
        try:
            yield d
        finally:
            d.stop()
    finally:
        remove_pin_tree(pin_root)


def start_counting(tmp: Path, pin_root: Path, counter: Path, **settings: object) -> tuple[DaemonProcess, int]:
    """A daemon on ``pin_root/daemon`` with a counting handler in slot 268 (fchmodat), named
    count.c; returns the daemon and the handler's program id."""
    d = start_daemon(tmp, pin_root / "daemon", **settings)
    with d.client() as c:
        prog_id = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter), filename="count.c")["prog_id"]
    return d, prog_id


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes, from every thread's ``children`` list: cheap enough to
    poll every few milliseconds, and needs no procps."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if _process_state(k) not in (None, "Z")]


def idle_worker(pid: int) -> bool:
    """A compile worker the daemon started ahead (tailcalld/spares.py), still waiting for its
    request: it waits in the compile root, and one at work has moved into its compile's folder."""
    try:
        if b"tailcalld.compile_worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return "tailcalld-compile-" not in cwd and not cwd.endswith(" (deleted)")


def busy_children_of(pid: int) -> list[int]:
    """children_of, without the idle compile workers (nor one being started: forked, its exec
    to come, it still has the daemon's command line; or in its execve: see ``settled``): the
    processes of compiles under way or past."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        own = None
    return [k for k in children_of(pid)
            if settled(k) and not idle_worker(k) and not _same_cmdline(k, own)]


def settled(pid: int, timeout: float = 1.0) -> bool:
    """Whether ``pid`` is still a live process once it has a command line again.  A process in
    the middle of an execve (a worker the daemon starts ahead, between its old memory and its
    new) or of its exit shows an empty one for a moment: it is told apart only after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes():
                break
        except OSError:
            return False
        time.sleep(0.005)
    return _process_state(pid) not in (None, "Z")


def _same_cmdline(pid: int, cmdline: bytes | None) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
    except OSError:
        return False


def _process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


# -- privileges ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "tailcalld.service"
CAP_CHOWN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 0, 21, 38, 39


def unit_capabilities() -> list[str]:
    """The unit's CapabilityBoundingSet=, as written: ["CAP_BPF", ...]."""
    [line] = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("CapabilityBoundingSet=")]
    return line.split("=", 1)[1].split()


def with_unit_capabilities() -> list[str]:
    """A command prefix that runs what follows (exec'd: the pid stays) with the unit's bounding
    set only, as systemd would: root keeps no capability outside it."""
    allowed = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in unit_capabilities())
    return ["setpriv", f"--bounding-set=-all,{allowed}", "--"]


def effective_capabilities(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    [mask] = [ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")]
    return {bit for bit in range(64) if int(mask, 16) >> bit & 1}


# -- the workload ----------------------------------------------------------------------------

def fchmodat(n: int, dirfd: int = DIRFD_MAGIC) -> None:
    """n raw fchmodat(2) calls that fail with EBADF but pass through sys_enter."""
    path = b"/nonexistent-tailcalld-test"
    for _ in range(n):
        _libc.syscall(NR_FCHMODAT, dirfd, path, 0o644)


class CallingChild:
    """A child that calls fchmodat(dirfd, ...) without pause (in ``cgroup``, when one is given)
    from the ``with`` until its end; ``made`` is then how many calls it made."""

    def __init__(self, tmp: Path, dirfd: int, cgroup: Path | None = None) -> None:
        self._stop = tmp / f"stop-{secrets.token_hex(4)}"
        join = f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n" if cgroup else ""
        self._code = (f"import ctypes, os\n"
                      f"{join}"
                      f"print('in', flush=True)\n"
                      f"libc = ctypes.CDLL(None, use_errno=True)\n"
                      f"n = 0\n"
                      f"while not os.path.exists({str(self._stop)!r}):\n"
                      f"    for _ in range(10000): libc.syscall({NR_FCHMODAT}, {dirfd}, "
                      f"b'/nonexistent-tailcalld-test', 0o644)\n"
                      f"    n += 10000\n"
                      f"print(n, flush=True)\n")
        self.made = 0

    def __enter__(self) -> CallingChild:
        self._child = subprocess.Popen([sys.executable, "-c", self._code], stdout=subprocess.PIPE, text=True)
        assert self._child.stdout is not None and self._child.stdout.readline() == "in\n"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.touch()
        out, _ = self._child.communicate(timeout=60)
        if exc[0] is None:
            self.made = int(out)
            assert self.made >= 10000


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
                     step: int = 1, any_process: bool = False) -> str:
    """bcc C for a handler that counts this test process's fchmodat(dirfd, ...) calls into a
    pinned u64 (the process filter keeps a concurrent test run from adding to the count);
    ``any_process``: every process's (a random ``dirfd`` keeps others out)."""
    who = "" if any_process else f" || (bpf_get_current_pid_tgid() >> 32) != {os.getpid()}"
    return f"""
#include <uapi/linux/ptrace.h>
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter_pin}");

int {function}(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if ((int)dirfd != {dirfd}{who})
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, {step});
    return 0;
}}
"""


# -- kernel objects, read with bpftool -------------------------------------------------------

def _bpftool_map_dump(pin: Path) -> list[dict[str, Any]]:
    r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)], capture_output=True, text=True)
    assert r.returncode == 0, f"bpftool map dump {pin}: {r.stdout} {r.stderr}"
    entries: list[dict[str, Any]] = json.loads(r.stdout)
    return entries


def _le(hex_bytes: list[str]) -> int:
    """bpftool prints keys and values as lists of hex bytes, little-endian here."""
    return int.from_bytes(bytes(int(b, 16) for b in hex_bytes), "little")


def libbpf_pinned_handler(map_name: str) -> str:
    """libbpf C for a handler whose map libbpf pins by name (LIBBPF_PIN_BY_NAME)."""
    return f"""#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {{
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 16);
    __type(key, u32);
    __type(value, u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
}} {map_name} SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int h(struct bpf_raw_tracepoint_args *ctx) {{ u32 k = 0; u32 *v = bpf_map_lookup_elem(&{map_name}, &k); return v ? 0 : 1; }}
char _license[] SEC("license") = "GPL";
"""


def read_counter(pin: Path) -> int:
    """Read a pinned u64 array entry 0 with bpftool, independently of tailcalld's own code."""
    return _le(_bpftool_map_dump(pin)[0]["value"])


def pinned_entries(pin: Path) -> dict[int, int]:
    """key -> value of every entry of a pinned map of ints, as bpftool sees it."""
    return {_le(e["key"]): _le(e["value"]) for e in _bpftool_map_dump(pin)}


def kernel_slots(prog_array: Path) -> dict[int, int]:
    """slot -> program id of a pinned prog array, as bpftool sees it."""
    return pinned_entries(prog_array)


def _key(slot: int) -> list[str]:
    return [str(b) for b in slot.to_bytes(4, "little")]


def bpftool_empty(prog_array: Path | str, slot: int) -> None:
    """Empty a slot by hand, behind tailcalld's back, as an operator with bpftool would."""
    subprocess.run(["bpftool", "map", "delete", "pinned", str(prog_array), "key", *_key(slot)], check=True)


def bpftool_fill(prog_array: Path | str, slot: int, prog_id: int) -> None:
    """Put program ``prog_id`` in a slot by hand, behind tailcalld's back."""
    subprocess.run(["bpftool", "map", "update", "pinned", str(prog_array), "key", *_key(slot),
                    "value", "id", str(prog_id)], check=True)


def saved_slots(state_dir: Path) -> dict[int, int]:
    """slot -> program id recorded in tailcalld's state file."""
    state = json.loads((state_dir / "state.json").read_text())
    return {int(slot): record["prog_id"] for slot, record in state["slots"].items()}


def pin_foreign_map(path: Path) -> None:
    """Pin a map tailcalld did not make at ``path``: an object it must refuse to touch."""
    fd = bpfsys.map_create(BPF_MAP_TYPE_ARRAY, "notours", 4, 4, 16)
    try:
        bpfsys.obj_pin(fd, str(path))
    finally:
        os.close(fd)


# -- kernel objects, read with libbpf --------------------------------------------------------
# For what bpftool cannot reach: a map only our fd still holds (its program is gone), or a
# counter read too often for a process per read.  The tests run as root with CAP_SYS_ADMIN,
# so they may open objects by id; tailcalld itself never does (see tailcalld/bpfsys.py).

@cache
def libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_link_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_link_get_fd_by_id.argtypes = [ctypes.c_uint32]
    return lib


def _checked(ret: int, what: str) -> int:
    """libbpf returns -errno (and sets errno) on failure."""
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def map_fd_by_id(map_id: int) -> int:
    return _checked(libbpf().bpf_map_get_fd_by_id(map_id), f"open map {map_id}")


def prog_fd_by_id(prog_id: int) -> int:
    return _checked(libbpf().bpf_prog_get_fd_by_id(prog_id), f"open program {prog_id}")


def prog_name_by_id(prog_id: int) -> str:
    fd = prog_fd_by_id(prog_id)
    try:
        return bpfsys.prog_info(fd).name
    finally:
        os.close(fd)


def pinned_fd(pin: Path) -> int:
    return _checked(libbpf().bpf_obj_get(str(pin).encode()), f"open {pin}")


def _read_pin(pin: Path, read: Callable[[int], int]) -> int | None:
    """``read`` of the object pinned at ``pin``; None without a pin."""
    try:
        fd = bpfsys.obj_get(str(pin))
    except OSError:
        return None
    try:
        return read(fd)
    finally:
        os.close(fd)


def pinned_link_prog(pin_dir: Path) -> int | None:
    """The id of the program behind the pinned dispatcher link of ``pin_dir``; None without one."""
    return _read_pin(pin_dir / "link", lambda fd: bpfsys.link_info(fd).prog_id)


# The dispatchers of earlier releases (tests/data), by what an upgrade from each must handle.
OLD_DISPATCHERS = {
    "calls_misses": "dispatcher_calls_misses.bpf.c",  # two counter maps, now LEGACY_PINS
    "bcc": "dispatcher_bcc.bpf.c",  # the last one bcc built (counts, timing, exit); no program pin beside its link
}


def pin_old_dispatcher(pin_dir: Path, release: str, exit: bool = False) -> int:
    """An earlier release's dispatcher (``OLD_DISPATCHERS``), built by bcc under another
    version's name, attached on the prog array of ``pin_dir`` (its maps made there as that
    release would) and its link pinned at pin_dir/link, which must be free.  ``exit``: the
    last bcc release's exit dispatcher instead, on the maps of pin_dir/exit.  Returns its
    program id."""
    folder = pin_dir / EXIT.subdir if exit else pin_dir
    name = "tcx_00000000000" if exit else "tcd_00000000000"
    cflags = [f"-DTAILCALLD_SLOTS={NR_SLOTS}", f"-DTAILCALLD_DISPATCH={name}",
              f'-DTAILCALLD_PROG_ARRAY="{folder / PROG_ARRAY.pin}"']
    if release == "calls_misses":
        for legacy in LEGACY_PINS:
            fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, f"tailcalld_{legacy}", 4, 8, NR_SLOTS)
            try:
                bpfsys.obj_pin(fd, str(pin_dir / legacy))
            finally:
                os.close(fd)
        cflags += [f'-DTAILCALLD_MISSES="{pin_dir / "misses"}"', f'-DTAILCALLD_CALLS="{pin_dir / "calls"}"']
    elif exit:
        cflags += [f'-DTAILCALLD_COUNTS="{folder / COUNTS.pin}"', "-DTAILCALLD_EXIT"]
    else:
        cflags += [f'-DTAILCALLD_COUNTS="{pin_dir / COUNTS.pin}"', f'-DTAILCALLD_TIMING="{pin_dir / TIMING.pin}"']
    source = (Path(__file__).with_name("data") / OLD_DISPATCHERS[release]).read_text()

    async def build() -> Program:
        compiler = Compiler(LiveSettings(Settings(compile_timeout=60.0)))
        try:
            return await compiler.load(source, name, cflags)
        finally:
            await compiler.aclose()  # its background work, before the loop ends

    prog = asyncio.run(build())
    try:
        link = bpfsys.raw_tracepoint_open(EXIT.tracepoint if exit else "sys_enter", prog.fd)
    finally:
        prog.close()
    try:
        bpfsys.obj_pin(link, str(folder / "link"))
    finally:
        os.close(link)
    return prog.id


def pinned_prog(pin: Path) -> int | None:
    """The id of the program pinned at ``pin``; None without one."""
    return _read_pin(pin, lambda fd: bpfsys.prog_info(fd).id)


def map_lookup_u64(map_fd: int, key: int) -> int:
    """Entry ``key`` of a u32 -> u64 map (not per-CPU)."""
    k, value = ctypes.c_uint32(key), ctypes.c_uint64()
    _checked(libbpf().bpf_map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(value)), f"read key {key}")
    return value.value


@cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU ("0-1", "0,2-3", ...), not per online one."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return sum(int(r.split("-")[-1]) - int(r.split("-")[0]) + 1 for r in text.split(","))


def pinned_percpu_u64_sum(pin: Path, key: int, width: int = 1, field: int = 0) -> int:
    """Field ``field`` of entry ``key`` of a pinned per-CPU array of ``width`` u64s, summed over
    the CPUs (tailcalld's compat_misses: width 1; its counts: see ``slot_misses``)."""
    fd = pinned_fd(pin)
    try:
        k, values = ctypes.c_uint32(key), (ctypes.c_uint64 * (possible_cpus() * width))()
        _checked(libbpf().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(values)), f"read {pin} key {key}")
        return sum(values[field::width])
    finally:
        os.close(fd)


def slot_misses(pin_dir: Path, slot: int) -> int:
    """The dispatcher's miss counter of ``slot`` (pin_dir/counts: {calls, misses} per slot)."""
    return pinned_percpu_u64_sum(pin_dir / "counts", slot, width=2, field=1)


def slot_calls(pin_dir: Path, slot: int) -> int:
    return pinned_percpu_u64_sum(pin_dir / "counts", slot, width=2, field=0)


# -- the journal -----------------------------------------------------------------------------

JournalEntry = dict[str, Any]


def parse_journal(json_lines: str) -> list[JournalEntry]:
    """``journalctl -o json`` output: one object per line."""
    return [json.loads(line) for line in json_lines.splitlines() if line.strip()]


def journal(*args: str, **match: str) -> list[JournalEntry]:
    """This machine's journal entries with every ``FIELD=value`` of ``match``."""
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *args, *[f"{k}={v}" for k, v in match.items()]],
                         capture_output=True, text=True, check=True).stdout
    return parse_journal(out)


def wait_until(condition: Callable[[], bool], timeout: float = 10, period: float = 0.1) -> None:
    """Poll ``condition`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not so after {timeout:g} s"
        time.sleep(period)


def wait_journal(read: Callable[[], list[JournalEntry]], minimum: int = 1, timeout: float = 10,
                 period: float = 0.2) -> list[JournalEntry]:
    """Poll ``read`` until it returns ``minimum`` entries or ``timeout`` passes; returns the last
    read either way (journald stores what a daemon sent a little later)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = read()
        if len(entries) >= minimum or time.monotonic() > deadline:
            return entries
        time.sleep(period)
