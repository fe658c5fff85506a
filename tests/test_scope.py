"""Handlers scoped to a cgroup (issue 15, item 5: attach --cgroup): the guard in the slot lets
the calls of tasks in the cgroup's subtree through to the handler, and counts every other
task's call as a miss of that scope.  On the real kernel: the handler counts into a pinned map
read with bpftool, children join real cgroup v2 folders, the daemon is stopped, restarted
and "rebooted" (its pins removed)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, CallingChild, DaemonProcess, counting_handler, fchmodat, journal, kernel_slots, read_counter, remove_pin_tree,
                     start_daemon, wait_journal, wait_until)
from test_core_kernel import ME, run
from tailcalld.client import RemoteError
from tailcalld.dialects import Artifact
from tailcalld.errors import BadCgroup
from tailcalld.metrics_http import fetch
from tailcalld.scope import cgroup2_mounts
from tailcalld.slots import SlotManager


def any_pid_handler(counter_pin: Path, dirfd: int) -> str:
    """bcc C that counts every fchmodat(dirfd, ...) of any process: the scope decides whose."""
    return counting_handler(counter_pin, "count_any", dirfd, any_process=True)


def new_cgroup() -> Path:
    """A cgroup v2 folder of our own; the test is skipped where none can be made (no cgroup v2
    hierarchy, or one this process cannot reach: a chroot sees the host's mount table)."""
    mounts = [m for m in cgroup2_mounts() if m.is_dir()]
    if not mounts:
        pytest.skip("no cgroup v2 hierarchy is mounted where this process can reach it")
    path = mounts[0] / f"tailcalld-test-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"no cgroup can be made under {mounts[0]}: {exc.strerror}")
    return path


def remove_cgroup(path: Path) -> None:
    if path.exists():
        path.rmdir()  # its tasks (our children) have exited: an empty cgroup goes at once


@pytest.fixture
def cgroups(machine: None) -> Iterator[list[Path]]:
    """Two cgroup v2 folders of this test's own, removed afterwards."""
    made = [new_cgroup(), new_cgroup()]
    try:
        yield made
    finally:
        for path in made:
            remove_cgroup(path)


def child_code(cgroup: Path, calls: int, dirfd: int) -> str:
    return (f"import ctypes, os, sys\n"
            f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            f"print('in', flush=True)\n"
            f"libc = ctypes.CDLL(None, use_errno=True)\n"
            f"for _ in range({calls}): libc.syscall({NR_FCHMODAT}, {dirfd}, b'/nonexistent-tailcalld-test', 0o644)\n")


def in_cgroup(cgroup: Path, calls: int, dirfd: int) -> None:
    """``calls`` fchmodat(dirfd, ...) made by a child that joined ``cgroup`` first."""
    subprocess.run([sys.executable, "-c", child_code(cgroup, calls, dirfd)], check=True, capture_output=True)



def test_a_scoped_handler_runs_for_its_cgroup_only(tmp_path: Path, pin_root: Path, cgroups: list[Path]) -> None:
    pin_dir, counter = pin_root / "d", pin_root / "counter"
    dirfd = 7000 + secrets.randbelow(1000)
    artifact = Artifact("bcc", any_pid_handler(counter, dirfd).encode())
    one, other = cgroups

    async def scenario(m: SlotManager) -> None:
        a = await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, cgroup=str(one))
        assert m.kernel.slot(NR_FCHMODAT) == a.prog_id  # the guard stands for its handler
        guard = kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT]
        assert guard != a.prog_id  # what the kernel's slot holds is the guard
        in_cgroup(one, 300, dirfd)
        in_cgroup(other, 70, dirfd)  # another cgroup
        fchmodat(200, dirfd)  # and this process, in neither
        assert read_counter(counter) == 300
        view, = m.list_slots()
        assert view.record.cgroup == str(one) and view.state == "in-sync"
        assert view.scope_misses >= 270 and view.hits >= 300
        assert m.status().scoped == 1

        # The same handler for the same cgroup: nothing to do.  For another cgroup: a change.
        same = await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, cgroup=str(one))
        assert same.unchanged
        b = await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, cgroup=str(other))
        assert not b.unchanged and b.replaced_prog_id == a.prog_id
        in_cgroup(one, 40, dirfd)
        in_cgroup(other, 60, dirfd)
        assert read_counter(counter) == 360

        # Unscoped again: the guard goes, the handler sits in the slot itself.
        c = await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME)
        assert kernel_slots(pin_dir / "prog_array")[NR_FCHMODAT] == c.prog_id
        fchmodat(50, dirfd)
        assert read_counter(counter) == 410
        assert not list((pin_dir / "scope" / "guards").iterdir())
        assert kernel_slots(pin_dir / "scope" / "progs") == {}  # no handler kept loaded behind a guard
        assert m.status().scoped == 0

    run(pin_dir, tmp_path / "state", scenario)


def test_a_scoped_swap_loses_no_call(tmp_path: Path, pin_root: Path, cgroups: list[Path]) -> None:
    """The zero-loss swap holds for scoped slots: a child in the cgroup calls without pause while
    the slot's handler is replaced, and moved between two cgroups it is in, five times; the
    handlers share one counter, which ends at exactly the child's number of calls."""
    pin_dir, counter = pin_root / "d", pin_root / "counter"
    dirfd = 7000 + secrets.randbelow(1000)
    artifact = Artifact("bcc", any_pid_handler(counter, dirfd).encode())
    outer = cgroups[0]
    inner = outer / "inner"

    async def scenario(m: SlotManager) -> None:
        inner.mkdir()
        try:
            await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, cgroup=str(inner))
            with CallingChild(tmp_path, dirfd, inner) as child:
                for n in range(5):  # a new program each time, for the subtree or for the folder itself
                    await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, fresh=True,
                                   cgroup=str(outer if n % 2 == 0 else inner))
                    await asyncio.sleep(0.05)
            assert read_counter(counter) == child.made
        finally:
            remove_cgroup(inner)

    run(pin_dir, tmp_path / "state", scenario)


def test_a_cgroup_made_again_is_followed(tmp_path: Path, pin_root: Path, cgroups: list[Path]) -> None:
    """A restarted service runs in a cgroup made anew under the same path: the scope follows the
    path (at the next maintenance round), and says so."""
    pin_dir, counter = pin_root / "d", pin_root / "counter"
    dirfd = 7000 + secrets.randbelow(1000)
    artifact = Artifact("bcc", any_pid_handler(counter, dirfd).encode())
    path = cgroups[0]

    async def scenario(m: SlotManager) -> None:
        await m.attach(NR_FCHMODAT, artifact, None, "any.c", ME, cgroup=str(path))
        in_cgroup(path, 10, dirfd)
        path.rmdir()
        await m.repair_drift()
        assert any("does not exist" in c for c in m.registry.corrections)
        path.mkdir()
        in_cgroup(path, 20, dirfd)  # the guard still holds the old cgroup: nobody's
        assert read_counter(counter) == 10
        await m.repair_drift()
        assert any("made again" in c for c in m.registry.corrections)
        in_cgroup(path, 30, dirfd)
        assert read_counter(counter) == 40

    run(pin_dir, tmp_path / "state", scenario)


def slot_of(d: DaemonProcess) -> dict[str, object]:
    [found] = [s for s in d.call("list")["slots"] if s["slot"] == NR_FCHMODAT]
    return found


@pytest.mark.parametrize("reboot", [False, True], ids=["restart", "reboot"])
def test_scope_over_the_socket_through_a_restart(journald: None, tmp_path: Path, pin_root: Path,
                                                  cgroups: list[Path], reboot: bool) -> None:
    counter = pin_root / "counter"
    dirfd = 7000 + secrets.randbelow(1000)
    source = tmp_path / "any.c"
    source.write_text(any_pid_handler(counter, dirfd))
    scope = cgroups[0]
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        r = d.ctl("attach", str(NR_FCHMODAT), str(source), "--cgroup", str(scope))
        assert r.returncode == 0, r.stderr
        in_cgroup(scope, 25, dirfd)
        fchmodat(15, dirfd)
        assert read_counter(counter) == 25
        listed = slot_of(d)
        assert listed["cgroup"] == str(scope) and int(str(listed["scope_misses"])) >= 15
        table = d.ctl("list").stdout
        assert "CGROUP" in table and "OUTSIDE" in table and str(scope) in table
        assert d.call("status")["scoped"] == 1 and "scoped to a cgroup" in d.ctl("status").stdout
        assert f"Cgroup    {scope}" in d.ctl("show", str(NR_FCHMODAT), "--no-source").stdout
        metrics = fetch(d.socket.parent / "metrics.sock").decode()
        assert f'tailcalld_slot_scope_misses_total{{cgroup="{scope}",hook="enter",slot="{NR_FCHMODAT}"' in metrics
        [entry] = wait_journal(lambda: journal(_PID=str(d.pid), TAILCALLD_ACTION="attach"))
        assert entry["CGROUP"] == str(scope) and f"for cgroup {scope}" in entry["MESSAGE"]
        (tmp_path / "saved").mkdir()
        r = d.ctl("save", "-o", str(tmp_path / "saved" / "apply.toml"))
        assert r.returncode == 0, r.stderr
        assert f'cgroup = "{scope}"' in (tmp_path / "saved" / "apply.toml").read_text()
    finally:
        assert d.stop() == 0
    if reboot:
        remove_pin_tree(pin_root / "daemon")
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        listed = slot_of(d)
        assert listed["state"] == "in-sync" and listed["cgroup"] == str(scope)
        in_cgroup(scope, 5, dirfd)
        fchmodat(15, dirfd)
        assert read_counter(counter) == 30
        wait_until(lambda: int(str(slot_of(d)["scope_misses"])) >= 15, timeout=10)
        r = d.ctl("detach", str(NR_FCHMODAT))
        assert r.returncode == 0, r.stderr
        assert not list((pin_root / "daemon" / "scope" / "guards").iterdir())
        r = d.ctl("apply", str(tmp_path / "saved" / "apply.toml"))  # what save wrote brings the scope back
        assert r.returncode == 0, r.stderr
        assert slot_of(d)["cgroup"] == str(scope)
        in_cgroup(scope, 5, dirfd)
        fchmodat(15, dirfd)
        assert read_counter(counter) == 35
    finally:
        assert d.stop() == 0


def test_misuse_changes_nothing(daemon: DaemonProcess, tmp_path: Path, cgroups: list[Path]) -> None:
    source = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
    cases = {"relative": "system.slice", "missing": str(cgroups[0] / "nope"),
             "not a folder": str(cgroups[0] / "cgroup.procs"), "not cgroup v2": str(tmp_path)}
    for what, path in cases.items():
        with pytest.raises(RemoteError) as err:
            daemon.call("attach", slot=NR_FCHMODAT, source=source, cgroup=path)
        assert err.value.code == "bad_cgroup", what
    v1 = Path("/sys/fs/cgroup/cpu")
    if v1.is_dir() and v1 not in cgroup2_mounts():
        with pytest.raises(RemoteError, match="cgroup v2 is mounted at") as err:
            daemon.call("attach", slot=NR_FCHMODAT, source=source, cgroup=str(v1))
        assert err.value.code == "bad_cgroup"
    assert daemon.call("list")["slots"] == []
    handler = tmp_path / "h.c"
    handler.write_text(source)
    r = daemon.ctl("attach", str(NR_FCHMODAT), str(handler), "--cgroup", str(cgroups[0] / "nope"))
    assert r.returncode == 1 and "bad_cgroup" in r.stderr and "does not exist" in r.stderr
    assert daemon.call("list")["slots"] == []
    with pytest.raises(BadCgroup):  # the core checks too (a request that skips the protocol's model)
        from tailcalld.scope import check_cgroup_path
        check_cgroup_path("relative/path")


def test_scope_pins_removed_while_running_are_pinned_again(tmp_path: Path, pin_root: Path, cgroups: list[Path]) -> None:
    """rm -rf pin_dir under a daemon with a scoped slot: the guard and the scope's maps are pinned
    again, so the next start still knows the slot's handler behind its guard."""
    counter = pin_root / "counter"
    dirfd = 7000 + secrets.randbelow(1000)
    scope = cgroups[0]
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=0.3)
    try:
        prog = d.call("attach", slot=NR_FCHMODAT, source=any_pid_handler(counter, dirfd), filename="any.c",
                      cgroup=str(scope))["prog_id"]
        subprocess.run(["rm", "-rf", str(d.pin_dir)], check=True)
        guard = d.pin_dir / "scope" / "guards" / str(NR_FCHMODAT)
        wait_until(lambda: guard.exists() and (d.pin_dir / "scope" / "progs").exists(), timeout=10)
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        listed = slot_of(d)
        assert (listed["state"], listed["prog_id"], listed["kernel_prog_id"]) == ("in-sync", prog, prog)
        in_cgroup(scope, 4, dirfd)
        fchmodat(3, dirfd)
        assert read_counter(counter) == 4
    finally:
        assert d.stop() == 0
