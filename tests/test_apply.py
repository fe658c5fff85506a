"""Declarative state on the real kernel: `tailcallctl apply` and `save` against a real daemon,
the daemon's own desired_slots (at start, on SIGHUP, when the file changes), and the re-attach
of the very same handler (unchanged, not audited).  Counts are read back from the handlers'
pinned maps, slots from the kernel's prog arrays (bpftool), audits from the real journal."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (DaemonProcess, JournalEntry, journal, kernel_slots, read_counter, saved_slots, start_daemon,
                     wait_journal, wait_until, write_config)

FCHMODAT, FCHMOD, FCHOWN = 268, 91, 93
_libc = ctypes.CDLL(None, use_errno=True)


def call(nr: int, fd: int, n: int) -> None:
    """n calls of syscall ``nr`` with ``fd`` as first argument (a bad fd: EBADF, nothing changes)."""
    for _ in range(n):
        _libc.syscall(nr, fd, b"/nonexistent-tailcalld-test", 0o644) if nr == FCHMODAT else _libc.syscall(nr, fd, 0)


def counting(counter: Path, fd: int, step: str = "1", header: bool = False) -> str:
    """bcc C that adds ``step`` to a pinned counter for each call of this process with first
    argument ``fd`` (whatever the slot); with ``header``, the fd comes from a local header."""
    return f"""
#include <uapi/linux/ptrace.h>
{'#include "magic.h"' if header else f'#define MAGIC_FD {fd}'}
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter}");

int count_calls(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long fd = 0;
    u32 zero = 0;
    bpf_probe_read_kernel(&fd, sizeof(fd), &PT_REGS_PARM1(regs));
    if ((int)fd != MAGIC_FD || (bpf_get_current_pid_tgid() >> 32) != {os.getpid()})
        return 0;
    u64 *n = counter.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, {step});
    return 0;
}}
"""


LIBBPF_EXIT = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
const volatile int step = 1;

SEC("raw_tp/sys_exit")
int on_exit(struct bpf_raw_tracepoint_args *ctx) { return step; }
char _license[] SEC("license") = "GPL";
"""
BROKEN = "int h(struct bpf_raw_tracepoint_args *ctx) {\n    return undefined_thing;\n}\n"
DEREF = "int h(struct bpf_raw_tracepoint_args *ctx) {\n    u64 a = ctx->args[0];\n    return *(int *)a;\n}\n"


def slot_toml(*entries: str) -> str:
    return "# written by tests/test_apply.py\n" + "".join(f"[[slot]]\n{e}\n" for e in entries)


def enter_slots(d: DaemonProcess) -> dict[int, int]:
    return kernel_slots(d.pin_dir / "prog_array")


def state(d: DaemonProcess) -> dict[int, int]:
    return saved_slots(d.config.parent / "state")


def apply(d: DaemonProcess, path: Path, *options: str, ok: bool = True, status: int | None = None) -> str:
    r = d.ctl("apply", str(path), *options)
    assert (r.returncode == 0) == ok, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert status is None or r.returncode == status, f"exit {r.returncode}, not {status}\n{r.stderr}"
    return r.stdout if ok else r.stderr


def audits(d: DaemonProcess, minimum: int = 1) -> list[JournalEntry]:
    """This daemon's audit entries (attach, replace, detach...), once ``minimum`` are in."""
    return wait_journal(lambda: [e for e in journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid))
                                 if "TAILCALLD_ACTION" in e and e["TAILCALLD_ACTION"] != "apply"], minimum, 30)


@pytest.fixture
def handlers(tmp_path: Path, pin_root: Path) -> Path:
    """A folder with a.c (counts fchmodat's fd 7781 into maps/a), a2.c (the same by 2), b.c
    (fchmod's fd 7782 into maps/b)."""
    folder = tmp_path / "handlers"
    folder.mkdir()
    maps = pin_root / "maps"
    (folder / "a.c").write_text(counting(maps / "a", 7781))
    (folder / "a2.c").write_text(counting(maps / "a", 7781, step="2"))
    (folder / "b.c").write_text(counting(maps / "b", 7782))
    return folder


@pytest.mark.usefixtures("journald")
def test_apply_adds_replaces_and_removes_each_slot_and_a_second_apply_changes_nothing(
        daemon: DaemonProcess, handlers: Path, pin_root: Path) -> None:
    slots = handlers / "slots.toml"
    slots.write_text(slot_toml('slot = "fchmodat"\nfile = "a.c"', 'slot = 91\nfile = "b.c"'))
    dry = apply(daemon, slots, "--dry-run")
    assert [line.split()[:3] for line in dry.splitlines()[:2]] == [["+", "fchmod", "(91)"],
                                                                   ["+", "fchmodat", "(268)"]], dry
    assert dry.splitlines()[-1] == "dry run: would add 2; 0 unchanged; nothing was changed."
    assert enter_slots(daemon) == {} and state(daemon) == {}

    out = apply(daemon, slots)
    assert out.splitlines()[-1] == "2 added.", out
    first = enter_slots(daemon)
    assert set(first) == {FCHMOD, FCHMODAT} and state(daemon) == first
    call(FCHMODAT, 7781, 5)
    call(FCHMOD, 7782, 3)
    assert (read_counter(pin_root / "maps" / "a"), read_counter(pin_root / "maps" / "b")) == (5, 3)
    assert [e["TAILCALLD_ACTION"] for e in audits(daemon, 2)] == ["attach", "attach"]

    again = apply(daemon, slots)
    assert again == "nothing to change (2 slots as listed).\n"
    assert enter_slots(daemon) == first

    # fchmodat gets another handler, fchmod is no longer listed: dry first, then for real.
    slots.write_text(slot_toml('slot = "fchmodat"\nfile = "a2.c"'))
    dry = apply(daemon, slots, "--dry-run")
    assert [line.split()[:3] for line in dry.splitlines()[:2]] == [["~", "fchmodat", "(268)"],
                                                                   ["-", "fchmod", "(91)"]], dry
    assert f"(was program {first[FCHMODAT]}: source)" in dry.splitlines()[0]
    assert enter_slots(daemon) == first
    out = apply(daemon, slots)
    assert out.splitlines()[-1] == "1 replaced, 1 emptied.", out
    now = enter_slots(daemon)
    assert set(now) == {FCHMODAT} and now[FCHMODAT] != first[FCHMODAT] and state(daemon) == now
    call(FCHMODAT, 7781, 5)
    call(FCHMOD, 7782, 3)
    assert (read_counter(pin_root / "maps" / "a"), read_counter(pin_root / "maps" / "b")) == (5 + 10, 3)
    assert apply(daemon, slots) == "nothing to change (1 slot as listed).\n"
    # The journal: the two attaches, then one replace and one detach; the no-op applies wrote nothing.
    entries = audits(daemon, 4)
    assert [(e["TAILCALLD_ACTION"], e["SLOT"]) for e in entries] == [
        ("attach", str(FCHMOD)), ("attach", str(FCHMODAT)), ("replace", str(FCHMODAT)), ("detach", str(FCHMOD))]


@pytest.mark.usefixtures("journald")
def test_save_then_apply_round_trips(daemon: DaemonProcess, tmp_path: Path, pin_root: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "magic.h").write_text("#define MAGIC_FD 7783\n")
    (src / "count.c").write_text(counting(pin_root / "maps" / "c", 0, step="STEP", header=True))
    (src / "ret.bpf.c").write_text(LIBBPF_EXIT)
    r = daemon.ctl("attach", "fchmodat", str(src / "count.c"), "-D", "STEP=3")
    assert r.returncode == 0, r.stderr
    r = daemon.ctl("attach", "--exit", "--journal", "fchmod", str(src / "ret.bpf.c"), "--function", "on_exit",
                   "--set", "step=2")
    assert r.returncode == 0, r.stderr
    running = (enter_slots(daemon), kernel_slots(daemon.pin_dir / "exit" / "prog_array"))

    saved = tmp_path / "saved"
    r = daemon.ctl("save", "-o", str(saved / "slots.toml"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in saved.iterdir()) == ["count.c", "magic.h", "ret.bpf.c", "slots.toml"]
    assert (saved / "magic.h").read_text() == "#define MAGIC_FD 7783\n"
    text = (saved / "slots.toml").read_text()
    assert 'define = { STEP = "3" }' in text and 'set = { step = "2" }' in text and "journal = true" in text
    assert apply(daemon, saved / "slots.toml") == "nothing to change (2 slots as listed).\n"
    assert (enter_slots(daemon), kernel_slots(daemon.pin_dir / "exit" / "prog_array")) == running

    # Empty the node, then bring it back from the saved file alone.
    empty = tmp_path / "empty.toml"
    empty.write_text("# no slot\n")
    assert apply(daemon, empty).splitlines()[-1] == "2 emptied."
    assert enter_slots(daemon) == {} and not (daemon.pin_dir / "exit" / "link").exists()
    out = apply(daemon, saved / "slots.toml")
    assert out.splitlines()[-1] == "2 added.", out
    listed = {(s["slot"], s["hook"]): s for s in daemon.call("list")["slots"]}
    enter, leave = listed[(FCHMODAT, "enter")], listed[(FCHMOD, "exit")]
    assert (enter["function"], enter["defines"], enter["filename"]) == ("count_calls", {"STEP": "3"}, "count.c")
    assert (leave["function"], leave["variables"], leave["journal"]) == ("on_exit", {"step": "2"}, True)
    call(FCHMODAT, 7783, 4)
    assert read_counter(pin_root / "maps" / "c") == 3 * 4
    assert apply(daemon, saved / "slots.toml") == "nothing to change (2 slots as listed).\n"


@pytest.mark.usefixtures("journald")
def test_a_bad_file_changes_nothing_and_says_where(daemon: DaemonProcess, handlers: Path) -> None:
    (handlers / "broken.c").write_text(BROKEN)
    (handlers / "deref.c").write_text(DEREF)
    good = handlers / "slots.toml"
    good.write_text(slot_toml('slot = "fchmodat"\nfile = "a.c"'))
    apply(daemon, good)
    before = (enter_slots(daemon), state(daemon))
    bad = handlers / "bad.toml"
    # An add that is ready (fchmod, the same handler as fchmodat: no compile) comes before the
    # bad entry in slot order: it must not be made either.
    ready = ['slot = "fchmodat"\nfile = "a.c"', 'slot = "fchmod"\nfile = "a.c"']
    # (the file, where the error says it is, what it says, whether a dry run (which builds
    # nothing) finds it too, the exit code: 3 does not compile, 4 the kernel refuses it, as attach)
    cases = [
        (slot_toml(*ready, 'slot = "no_such_call"\nfile = "b.c"'), "[[slot]] 3 (b.c): ", "no_such_call", True, 1),
        (slot_toml(*ready, 'slot = "fchown"\nfile = "gone.c"'), "[[slot]] 3: ", "gone.c does not exist", True, 2),
        (slot_toml(*ready, 'slot = "fchown"\nfile = "broken.c"'), "[[slot]] 3 (broken.c): ",
         "broken.c:2:12: error: use of undeclared identifier 'undefined_thing'", False, 3),
        (slot_toml(*ready, 'slot = "fchown"\nfile = "deref.c"'), "[[slot]] 3 (deref.c): ",
         "invalid mem access 'scalar'", False, 4),
        (slot_toml(*ready) + 'slot = "a\n', " is not valid TOML: ", "(at line 8, column 10)", True, 2),
        (slot_toml(*ready, 'slot = "fchown"\nfile = "b.c"\nfunc = "x"'), ": [[slot]] 3: func: unknown field", "",
         True, 2),
        (slot_toml(*ready, 'slot = "fchmodat"\nfile = "b.c"'), "[[slot]] 1 and 3 both fill fchmodat (268)", "",
         True, 1),  # found by the daemon, which resolves names: a bad_request
    ]
    for text, where, what, dry_too, status in cases:
        bad.write_text(text)
        for options in ((), ("--dry-run",)) if dry_too else ((),):
            err = apply(daemon, bad, *options, ok=False, status=status)
            assert str(bad) in err and where in err and what in err, (text, err)
            assert (enter_slots(daemon), state(daemon)) == before, text
    assert daemon.call("ping")["pid"] == daemon.pid


@pytest.mark.usefixtures("journald")
def test_reattaching_the_very_same_handler_is_unchanged_and_not_audited(daemon: DaemonProcess,
                                                                        handlers: Path) -> None:
    first = daemon.ctl("attach", "fchmodat", str(handlers / "a.c"))
    assert first.returncode == 0 and first.stdout.startswith("attached count_calls to fchmodat (268)"), first
    prog = enter_slots(daemon)[FCHMODAT]
    again = daemon.ctl("attach", "268", str(handlers / "a.c"))
    assert again.returncode == 0
    assert again.stdout == f"unchanged: fchmodat (268) already runs count_calls (program {prog})\n"
    assert enter_slots(daemon) == {FCHMODAT: prog}
    assert daemon.ctl("detach", "fchmodat").returncode == 0
    # The detach is audited after the second attach: once it is in, nothing between is missing.
    assert [e["TAILCALLD_ACTION"] for e in audits(daemon, 2)] == ["attach", "detach"]


# desired_slots: the daemon's own apply file -----------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET for the daemon started next, as systemd gives one."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(120)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield s


def wait_notify(s: socket.socket, state: str) -> str:
    """The next sd_notify message with ``state`` (READY=1...), whole."""
    while True:
        message = s.recv(4096).decode()
        if state in message.splitlines():
            return message


@pytest.mark.usefixtures("journald")
def test_desired_slots_at_start_on_reload_and_when_the_file_changes(
        tmp_path: Path, pin_root: Path, handlers: Path, notify_socket: socket.socket) -> None:
    os.chmod(handlers, 0o755)  # root's alone, as the daemon requires
    desired = handlers / "slots.toml"
    desired.write_text(slot_toml('slot = "fchmodat"\nfile = "a.c"', 'slot = "fchmod"\nfile = "b.c"'))
    d = start_daemon(tmp_path, pin_root / "daemon", desired_slots=desired, miss_log_interval=0.5)
    try:
        # At start, before READY=1: its STATUS= counts the slots the file fills.
        assert "STATUS=2 slots in use, 0 misses/min" in wait_notify(notify_socket, "READY=1").splitlines()
        start = enter_slots(d)
        assert set(start) == {FCHMODAT, FCHMOD} and state(d) == start
        call(FCHMODAT, 7781, 2)
        call(FCHMOD, 7782, 2)
        assert (read_counter(pin_root / "maps" / "a"), read_counter(pin_root / "maps" / "b")) == (2, 2)

        # On reload: a slot emptied by hand (tailcallctl) is filled again, the other left alone.
        assert d.ctl("detach", "fchmod").returncode == 0
        assert set(enter_slots(d)) == {FCHMODAT}
        d.proc.send_signal(signal.SIGHUP)
        wait_notify(notify_socket, "READY=1")
        after_reload = enter_slots(d)
        assert set(after_reload) == {FCHMODAT, FCHMOD} and after_reload[FCHMODAT] == start[FCHMODAT]

        # When the file changes: a2.c replaces a.c, fchmod is dropped.
        desired.write_text(slot_toml('slot = "fchmodat"\nfile = "a2.c"'))
        wait_until(lambda: set(enter_slots(d)) == {FCHMODAT} and enter_slots(d)[FCHMODAT] != start[FCHMODAT], 120)
        call(FCHMODAT, 7781, 2)
        assert read_counter(pin_root / "maps" / "a") == 2 + 4

        # A handler file it names that changes counts too; one that does not compile changes nothing.
        now = enter_slots(d)
        (handlers / "a2.c").write_text(BROKEN)
        logged = wait_journal(lambda: journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid),
                                              TAILCALLD_DESIRED=str(desired), PRIORITY="3"), 1, 120)
        assert "[[slot]] 1 (a2.c)" in logged[-1]["MESSAGE"] and "undefined_thing" in logged[-1]["MESSAGE"]
        assert enter_slots(d) == now and state(d) == now and d.call("ping")["pid"] == d.pid

        # desired_slots = "" on reload: the daemon no longer applies it; the slots stay as they are.
        write_config(d.config, pin_dir=d.pin_dir, state_dir=tmp_path / "state", socket=d.socket,
                     miss_log_interval=0.5, desired_slots="")
        d.proc.send_signal(signal.SIGHUP)
        wait_notify(notify_socket, "READY=1")
        assert enter_slots(d) == now
    finally:
        d.stop()


def test_an_apply_file_that_says_atomic_is_applied_atomically(tmp_path: Path, pin_root: Path, handlers: Path) -> None:
    """`atomic = true` in the file: the daemon's own desired_slots applies it all at one instant,
    as `tailcallctl apply` does."""
    os.chmod(handlers, 0o755)
    desired = handlers / "slots.toml"
    desired.write_text("atomic = true\n" + slot_toml('slot = "fchmodat"\nfile = "a.c"', 'slot = "fchmod"\nfile = "b.c"'))
    d = start_daemon(tmp_path, pin_root / "daemon", desired_slots=desired)
    try:
        wait_until(lambda: d.call("status")["atomic_applies"] == 1, timeout=60)  # behind the socket, before READY=1
        assert set(enter_slots(d)) == {FCHMODAT, FCHMOD}
        desired.write_text("atomic = true\n" + slot_toml('slot = "fchmodat"\nfile = "b.c"'))
        r = d.ctl("apply", str(desired))  # tailcallctl too, without --atomic: the file says so
        assert r.returncode == 0, r.stderr
        assert set(enter_slots(d)) == {FCHMODAT} and d.call("status")["atomic_applies"] == 2
    finally:
        d.stop()


@pytest.mark.usefixtures("journald")
def test_desired_slots_in_a_folder_others_can_change_is_not_read(tmp_path: Path, pin_root: Path,
                                                                 handlers: Path) -> None:
    os.chmod(handlers, 0o777)
    desired = handlers / "slots.toml"
    desired.write_text(slot_toml('slot = "fchmodat"\nfile = "a.c"'))
    d = start_daemon(tmp_path, pin_root / "daemon", desired_slots=desired)
    try:
        assert d.call("list")["slots"] == [] and enter_slots(d) == {}
        [logged] = wait_journal(lambda: journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid),
                                                TAILCALLD_DESIRED=str(desired)), 1, 30)
        assert "nothing was changed" in logged["MESSAGE"] and "writable by group and others" in logged["MESSAGE"]
    finally:
        d.stop()


def test_the_example_apply_file_applies(daemon: DaemonProcess) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "slots.toml"
    dry = apply(daemon, example, "--dry-run")
    assert [line.split()[:3] for line in dry.splitlines()[:3]] == [["+", "openat", "exit"], ["+", "kill", "(62)"],
                                                                   ["+", "openat", "(257)"]], dry
    out = apply(daemon, example)
    assert out.splitlines()[-1] == "3 added.", out
    listed = {(s["syscall"], s["hook"]): s["function"] for s in daemon.call("list")["slots"]}
    assert listed == {("openat", "enter"): "openat_enter", ("openat", "exit"): "openat_exit",
                      ("kill", "enter"): "enter_kill"}
    assert set(enter_slots(daemon)) == {257, 62} and set(kernel_slots(daemon.pin_dir / "exit" / "prog_array")) == {257}
    assert apply(daemon, example) == "nothing to change (3 slots as listed).\n"


@pytest.mark.usefixtures("journald")
def test_desired_slots_follows_a_configmap_update(tmp_path: Path, pin_root: Path,
                                                   notify_socket: socket.socket) -> None:
    """A Kubernetes ConfigMap volume: each name is a link through ..data to a timestamped
    folder, and an update swaps ..data at once (kubelet's atomic writer)."""
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o755)
    maps = pin_root / "maps"
    for version, step in (("..v1", "1"), ("..v2", "5")):
        (volume / version).mkdir(mode=0o755)
        (volume / version / "slots.toml").write_text(slot_toml('slot = "fchmodat"\nfile = "count.c"'))
        (volume / version / "count.c").write_text(counting(maps / "a", 7781, step=step))
    (volume / "..data").symlink_to("..v1")
    for name in ("slots.toml", "count.c"):
        (volume / name).symlink_to(f"..data/{name}")
    d = start_daemon(tmp_path, pin_root / "daemon", desired_slots=volume / "slots.toml", miss_log_interval=0.5)
    try:
        wait_notify(notify_socket, "READY=1")
        first = enter_slots(d)
        assert set(first) == {FCHMODAT}
        call(FCHMODAT, 7781, 3)
        assert read_counter(maps / "a") == 3
        (volume / "..tmp").symlink_to("..v2")
        os.replace(volume / "..tmp", volume / "..data")
        wait_until(lambda: enter_slots(d).get(FCHMODAT) not in (None, first[FCHMODAT]), 120)
        call(FCHMODAT, 7781, 3)
        assert read_counter(maps / "a") == 3 + 3 * 5
        assert d.call("list")["slots"][0]["filename"] == "count.c"
    finally:
        d.stop()
