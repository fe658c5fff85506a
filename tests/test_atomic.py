"""All-or-nothing changes across slots (issue 15, item 2: apply --atomic): every slot of the
apply switches at one instant as the kernel sees it.

The proof runs on the real kernel: a child calls fchmodat then faccessat, over and over.  The
fchmodat handler of generation N notes N in a pinned map; the faccessat handler of generation
M compares: same generation, or the first call older (the one pair that straddles a switch),
or the first call *newer* than the second, which is a mix that only slots switched one by one
can show.  Ten atomic applies switch both while the child runs: no mix, at most one straddling
pair per switch, every pair counted.  The same check on two attaches made one after the other
sees mixes, so it can fail."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, DaemonProcess, bpftool_fill, counting_handler, fchmodat, journal, kernel_slots,
                     read_counter, start_daemon, wait_journal)
from test_core_kernel import ME, core
from tailcalld.client import RemoteError
from tailcalld.dialects import Artifact
from tailcalld.registry import Handler
from tailcalld.scope import cgroup2_mounts
from tailcalld.state import SlotRecord
from tailcalld.syscalls import SyscallTable

TABLE = SyscallTable.for_this_machine(1024)
X, Y = TABLE.resolve("fchmodat"), TABLE.resolve("faccessat")
SAME, STRADDLE, MIX = 0, 1, 2  # keys of the pairs map


def _handler(name: str, maps: str, body: str) -> str:
    """bcc C run for fchmodat or faccessat calls whose first argument is TC_MAGIC (-D) only."""
    return f"""
#include <uapi/linux/ptrace.h>
{maps}
int {name}(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if ((int)dirfd != TC_MAGIC)
        return 0;
    u64 *s = seen.lookup(&zero);
{body}
    return 0;
}}
"""


def _table(pins: Path, name: str, entries: int) -> str:
    return f'BPF_TABLE_PINNED("array", u32, u64, {name}, {entries}, "{pins / name}");'


def first_handler(pins: Path) -> str:
    """fchmodat: note this handler's generation (-DTC_GEN) for the next faccessat."""
    return _handler("x_gen", _table(pins, "seen", 1), "    if (s)\n        *s = TC_GEN;")


def second_handler(pins: Path) -> str:
    """faccessat: compare this handler's generation with the one the fchmodat before it ran."""
    return _handler("y_gen", _table(pins, "seen", 1) + "\n" + _table(pins, "pairs", 3), f"""    if (!s)
        return 0;
    u32 k = *s == TC_GEN ? {SAME} : *s < TC_GEN ? {STRADDLE} : {MIX};
    u64 *n = pairs.lookup(&k);
    if (n)
        __sync_fetch_and_add(n, 1);""")


def pairs(pins: Path) -> list[int]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pins / "pairs")], capture_output=True,
                         text=True, check=True).stdout
    found = [0, 0, 0]
    for e in json.loads(out):
        found[int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little")] = int.from_bytes(
            bytes(int(b, 16) for b in e["value"]), "little")
    return found


class Generations:
    """The two handlers as apply files, one per generation."""

    def __init__(self, folder: Path, pins: Path, magic: int) -> None:
        self.folder, self.magic = folder, magic
        (folder / "x.c").write_text(first_handler(pins))
        (folder / "y.c").write_text(second_handler(pins))

    def file(self, gen: int, broken_second: bool = False) -> Path:
        y = "broken.c" if broken_second else "y.c"
        if broken_second:
            (self.folder / y).write_text("int y_gen(struct bpf_raw_tracepoint_args *ctx) { return nope; }\n")
        path = self.folder / f"gen{gen}.toml"
        path.write_text(f'[[slot]]\nslot = {X}\nfile = "x.c"\ndefine = {{ TC_GEN = "{gen}", TC_MAGIC = "{self.magic}" }}\n'
                        f'[[slot]]\nslot = {Y}\nfile = "{y}"\ndefine = {{ TC_GEN = "{gen}", TC_MAGIC = "{self.magic}" }}\n')
        return path


def calling_child(magic: int, stop: Path) -> subprocess.Popen[str]:
    code = (f"import ctypes, os\n"
            f"libc = ctypes.CDLL(None, use_errno=True)\n"
            f"print('on', flush=True)\n"
            f"n = 0\n"
            f"while not os.path.exists({str(stop)!r}):\n"
            f"    for _ in range(1000):\n"
            f"        libc.syscall({X}, {magic}, b'/nonexistent-tailcalld-test', 0o644)\n"
            f"        libc.syscall({Y}, {magic}, b'/nonexistent-tailcalld-test', 0)\n"
            f"    n += 1000\n"
            f"print(n, flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "on\n"
    return child


def stop_child(child: subprocess.Popen[str], stop: Path) -> int:
    stop.touch()
    out, _ = child.communicate(timeout=60)
    stop.unlink()
    return int(out)


@pytest.fixture
def gens(tmp_path: Path, pin_root: Path) -> Generations:
    pins = pin_root / "maps"
    pins.mkdir(exist_ok=True)
    (tmp_path / "files").mkdir()
    return Generations(tmp_path / "files", pins, 5000 + secrets.randbelow(1000))


def apply(d: DaemonProcess, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return d.ctl("apply", str(path), *flags)


def test_every_pair_of_calls_sees_one_generation(daemon: DaemonProcess, gens: Generations, pin_root: Path,
                                                 tmp_path: Path) -> None:
    pins, stop = pin_root / "maps", tmp_path / "stop"
    for gen in range(1, 12):  # compiled ahead: each switch below is the kernel's alone
        for name in ("x.c", "y.c"):
            r = daemon.ctl("check", str(gens.folder / name), "-D", f"TC_GEN={gen}", "-D", f"TC_MAGIC={gens.magic}")
            assert r.returncode == 0, r.stderr
    r = apply(daemon, gens.file(1), "--atomic")
    assert r.returncode == 0, r.stderr
    child = calling_child(gens.magic, stop)
    try:
        for gen in range(2, 12):
            r = apply(daemon, gens.file(gen), "--atomic")
            assert r.returncode == 0, r.stderr
            time.sleep(0.05)
    finally:
        made = stop_child(child, stop)
    same, straddle, mix = pairs(pins)
    print(f"pairs: {same} same generation, {straddle} across a switch, {mix} mixed, of {made} made")
    assert mix == 0, f"{mix} pairs ran a newer fchmodat handler than the faccessat one after it"
    assert straddle <= 10  # one pair per switch at most: the one made across the instant
    assert same + straddle == made, (same, straddle, made)
    listed = {s["slot"]: s for s in daemon.call("list")["slots"]}
    assert listed[X]["defines"]["TC_GEN"] == listed[Y]["defines"]["TC_GEN"] == "11"
    assert kernel_slots(daemon.pin_dir / "prog_array") == {X: listed[X]["prog_id"], Y: listed[Y]["prog_id"]}
    assert kernel_slots(daemon.pin_dir / "staged_array") == {}  # nothing kept there at rest
    status = daemon.call("status")
    assert status["atomic_applies"] == 11


def test_the_check_sees_slots_switched_one_by_one(daemon: DaemonProcess, gens: Generations, pin_root: Path,
                                                  tmp_path: Path) -> None:
    """Without --atomic, slots switch one after the other: pairs in between are mixed."""
    pins, stop = pin_root / "maps", tmp_path / "stop"
    r = apply(daemon, gens.file(1))
    assert r.returncode == 0, r.stderr
    child = calling_child(gens.magic, stop)
    try:
        daemon.call("attach", slot=X, source=first_handler(pins), filename="x.c",
                    defines={"TC_GEN": "2", "TC_MAGIC": str(gens.magic)})
        time.sleep(0.2)  # the window between two single changes, made wide
        daemon.call("attach", slot=Y, source=second_handler(pins), filename="y.c",
                    defines={"TC_GEN": "2", "TC_MAGIC": str(gens.magic)})
    finally:
        made = stop_child(child, stop)
    print(f"pairs one by one: {pairs(pins)} (same, across, mixed) of {made}")
    assert pairs(pins)[MIX] > 0


def test_a_failure_changes_nothing(daemon: DaemonProcess, gens: Generations) -> None:
    r = apply(daemon, gens.file(1), "--atomic")
    assert r.returncode == 0, r.stderr
    before = daemon.call("list")["slots"]
    r = apply(daemon, gens.file(2, broken_second=True), "--atomic")
    assert r.returncode != 0 and "compile_error" in r.stderr
    after = daemon.call("list")["slots"]
    assert [(s["slot"], s["prog_id"], s["defines"]) for s in after] == \
        [(s["slot"], s["prog_id"], s["defines"]) for s in before]
    assert kernel_slots(daemon.pin_dir / "prog_array") == {s["slot"]: s["prog_id"] for s in before}
    with pytest.raises(RemoteError):
        daemon.call("apply", files=[], slots=[], atomic="yes")


# -- the core on the real kernel: what a staged change leaves behind ------------------------------

def test_a_change_of_some_slots_keeps_the_others_running(tmp_path: Path, pin_root: Path) -> None:
    """The staged slots hold every filled slot while the switch is on: a plain and a scoped slot
    the change does not name run on, and nothing stays staged afterwards."""
    pin_dir, counter = pin_root / "d", pin_root / "counter"
    mounts = [m for m in cgroup2_mounts() if m.is_dir()]
    if not mounts:
        pytest.skip("no cgroup v2 hierarchy is mounted where this process can reach it")
    empty = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"

    async def scenario() -> None:
        async with core(pin_dir, tmp_path / "state") as m:
            await m.attach(NR_FCHMODAT, Artifact("bcc", counting_handler(counter).encode()), None, "c.c", ME)
            scoped = await m.attach(X + 1 if X + 1 != Y else X + 2, Artifact("bcc", empty.encode()), None, "s.c", ME,
                                    cgroup=str(mounts[0]))
            progs = [await m.kernel.load(Artifact("bcc", empty.replace("h(", f"h{n}(").encode()), None)
                     for n in range(2)]
            keys = [300, 301]
            changes: dict[int, Handler | None] = {
                key: Handler(SlotRecord(slot=key, function=p.function, prog_id=p.id, source_sha256=None,
                                        filename=None, attached_by_uid=0, attached_at=None), p)
                for key, p in zip(keys, progs, strict=True)}
            m.registry.commit_many(changes)
            kernel = kernel_slots(pin_dir / "prog_array")
            assert {kernel[k] for k in keys} == {p.id for p in progs}
            assert m.kernel.slot(scoped.slot) == scoped.prog_id
            assert kernel_slots(pin_dir / "staged_array") == {}
            fchmodat(7)
            assert read_counter(counter) == 7
            again = await m.kernel.load(Artifact("bcc", empty.replace("h(", "h9(").encode()), None)
            record = SlotRecord(slot=300, function=again.function, prog_id=again.id, source_sha256=None,
                                filename=None, attached_by_uid=0, attached_at=None, cgroup=str(mounts[0]))
            m.registry.commit_many({300: Handler(record, again)})  # scoped in the change: a guard staged for it
            assert m.kernel.slot(300) == again.id != kernel_slots(pin_dir / "prog_array")[300]
            assert (pin_dir / "scope" / "guards" / "300").exists()
            m.registry.commit_many({300: None, 301: None})
            assert not (pin_dir / "scope" / "guards" / "300").exists()
            assert 300 not in kernel_slots(pin_dir / "prog_array") and 301 not in kernel_slots(pin_dir / "prog_array")
            assert kernel_slots(pin_dir / "staged_array") == {}

    asyncio.run(scenario())


def test_a_change_a_crash_interrupted_is_ended_at_the_next_start(journald: None, tmp_path: Path,
                                                                 pin_root: Path) -> None:
    """A daemon killed between the switch and its end leaves `staging` set and slots staged: the
    next start dispatches through prog_array again, empties the staged slots and says so."""
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        prog = d.call("attach", slot=X, source="int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n",
                      filename="h.c")["prog_id"]
    finally:
        d.kill()
    folder = pin_root / "daemon"
    bpftool_fill(folder / "staged_array", Y, prog)
    subprocess.run(["bpftool", "map", "update", "pinned", str(folder / "staging"), "key", "0", "0", "0", "0",
                    "value", "1", "0", "0", "0"], check=True)
    d = start_daemon(tmp_path, folder)
    try:
        assert kernel_slots(folder / "staged_array") == {}
        staging = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", str(folder / "staging"), "key", "0", "0",
                                  "0", "0"], capture_output=True, text=True, check=True).stdout
        assert json.loads(staging)["value"] == ["0x00", "0x00", "0x00", "0x00"]
        said = wait_journal(lambda: [e for e in journal(_PID=str(d.pid))
                                     if "an atomic change was interrupted" in str(e.get("MESSAGE"))])
        assert said, d.output()
        assert kernel_slots(folder / "prog_array") == {X: prog}
    finally:
        assert d.stop() == 0


def test_a_slot_filled_behind_its_back_refuses_the_change(tmp_path: Path, pin_root: Path, gens: Generations) -> None:
    """A program tailcalld holds no handle of (put in a slot with bpftool, before the drift
    repair saw it) cannot be staged: the atomic apply is refused, naming it, and changes nothing."""
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=3600)  # no repair during the test
    try:
        r = apply(d, gens.file(1), "--atomic")
        assert r.returncode == 0, r.stderr
        before = kernel_slots(d.pin_dir / "prog_array")
        foreign = TABLE.resolve("getppid")
        bpftool_fill(d.pin_dir / "prog_array", foreign, before[X])  # tailcalld's program, in a slot it did not fill
        r = apply(d, gens.file(2), "--atomic")
        assert r.returncode == 1 and "nothing was changed" in r.stderr and f"slot {foreign} holds program" in r.stderr
        assert kernel_slots(d.pin_dir / "prog_array") == before | {foreign: before[X]}
        assert kernel_slots(d.pin_dir / "staged_array") == {}
        assert {s["defines"]["TC_GEN"] for s in d.call("list")["slots"]} == {"1"}
    finally:
        assert d.stop() == 0


def test_an_atomic_change_fills_enter_and_exit_slots_together(tmp_path: Path, pin_root: Path) -> None:
    """The exit dispatcher reads the same switch: an enter and an exit slot in one change, both
    filled through the staged slots, nothing left staged in either folder."""
    pin_dir, counter = pin_root / "d", pin_root / "counter"
    getppid = TABLE.resolve("getppid")
    exit_counting = f"""
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter}");
int on_exit(struct bpf_raw_tracepoint_args *ctx)
{{
    u32 zero = 0;
    if ((bpf_get_current_pid_tgid() >> 32) != {os.getpid()})
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}}
"""

    async def scenario() -> None:
        async with core(pin_dir, tmp_path / "state") as m:
            exit_key = m.syscalls.key(getppid, "exit")
            await m.kernel.prepare(exit_key)
            enter = await m.kernel.load(Artifact("bcc", b"int h(struct bpf_raw_tracepoint_args *c) { return 0; }\n"),
                                        None)
            leave = await m.kernel.load(Artifact("bcc", exit_counting.encode()), None)
            m.registry.commit_many({
                getppid: Handler(SlotRecord(slot=getppid, function=enter.function, prog_id=enter.id, source_sha256=None,
                                            filename=None, attached_by_uid=0, attached_at=None), enter),
                exit_key: Handler(SlotRecord(slot=exit_key, function=leave.function, prog_id=leave.id,
                                             source_sha256=None, filename=None, attached_by_uid=0, attached_at=None),
                                  leave)})
            assert kernel_slots(pin_dir / "prog_array")[getppid] == enter.id
            assert kernel_slots(pin_dir / "exit" / "prog_array") == {getppid: leave.id}
            assert kernel_slots(pin_dir / "staged_array") == kernel_slots(pin_dir / "exit" / "staged_array") == {}
            for _ in range(5):
                os.getppid()
            assert read_counter(counter) == 5
            m.registry.commit_many({getppid: None, exit_key: None})
            assert kernel_slots(pin_dir / "exit" / "prog_array") == {}

    asyncio.run(scenario())
