"""tailcalld without CAP_SYS_ADMIN: the daemon run with the unit's capability bounding set only
(contrib/tailcalld.service; setpriv here, systemd in test_systemd.py) starts, attaches and
detaches handlers of both dialects in enter and exit slots, times them, adopts its pins after
a kill -9, upgrades an older dispatcher, and unloads everything.  Nothing of it may open a BPF object by id
(BPF_*_GET_FD_BY_ID needs CAP_SYS_ADMIN).  The one thing that still needs it, a bcc handler
reusing a map that is pinned already, fails with an error that says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, NR_FCHMODAT, REPO, DaemonProcess, bpftool_empty,
                     counting_handler, effective_capabilities, fchmodat, kernel_slots, libbpf_pinned_handler,
                     pin_old_dispatcher, read_counter, start_daemon, unit_capabilities, wait_until,
                     with_unit_capabilities)
from tailcalld.client import RemoteError

EXAMPLES = REPO / "examples"
LIBBPF_SLOT, PINNED_SLOT = 300, 301  # fanotify_init, fanotify_mark: rarely called
NR_GETPPID = 110
RETURN_0 = "int return_0(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


def start_confined(tmp: Path, pin_dir: Path, **settings: object) -> DaemonProcess:
    """The daemon with the unit's capabilities, logging to its output file (to be read whole)."""
    d = start_daemon(tmp, pin_dir, prefix=with_unit_capabilities(), args=("--log-stderr",), **settings)
    caps = effective_capabilities(d.pid)
    assert CAP_SYS_ADMIN not in caps and {CAP_BPF, CAP_PERFMON} <= caps, caps
    return d


def test_the_unit_bounds_the_daemon_to_the_measured_set() -> None:
    """What README's "Privileges" says was measured: each of these is needed (test_systemd.py
    drops each in turn), and nothing else."""
    assert unit_capabilities() == ["CAP_BPF", "CAP_PERFMON", "CAP_CHOWN"]


def test_a_daemon_without_cap_sys_admin_runs_the_whole_cycle(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d = start_confined(tmp_path, pin_root / "daemon", miss_log_interval=0.3)
    try:
        with d.client() as c:
            ours = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter), filename="count.c")["prog_id"]
            c.call("attach", slot=LIBBPF_SLOT, source=(EXAMPLES / "fchmodat_libbpf.bpf.c").read_text(),
                   function="enter_fchmodat", dialect="libbpf")
            pinned = c.call("attach", slot=PINNED_SLOT, source=libbpf_pinned_handler("byname_hits"),
                            dialect="libbpf")["prog_id"]
            exiting = c.call("attach", slot=NR_GETPPID, hook="exit", source=RETURN_0)["prog_id"]
            assert c.call("timing", seconds=5)["seconds_left"] > 0
            c.call("detach", slot=LIBBPF_SLOT)
            # bcc reopens a map that is pinned already by id: the one thing left that needs CAP_SYS_ADMIN.
            with pytest.raises(RemoteError) as refused:
                c.call("attach", slot=LIBBPF_SLOT, source=counting_handler(counter), fresh=True)
        assert refused.value.code == "map_error" and "CAP_SYS_ADMIN" in refused.value.message
        fchmodat(10)
        assert read_counter(counter) == 10
        assert list((d.pin_dir / "handlers").glob("*/byname_hits"))
        d.kill()  # no cleanup at all
        log = d.output()

        d = start_confined(tmp_path, pin_root / "daemon", miss_log_interval=0.3)
        with d.client() as c:
            status = c.call("status")
            listed = {(s["slot"], s["hook"]): (s["prog_id"], s["function"]) for s in c.call("list")["slots"]}
        assert status["adopted"] and status["corrections"] == []
        assert listed == {(NR_FCHMODAT, "enter"): (ours, "count_calls"), (PINNED_SLOT, "enter"): (pinned, "h"),
                          (NR_GETPPID, "exit"): (exiting, "return_0")}
        # Adopted through the programs' pins, not by id: a slot emptied behind its back gets its
        # program back, with no compile.
        bpftool_empty(d.pin_dir / "prog_array", NR_FCHMODAT)
        wait_until(lambda: kernel_slots(d.pin_dir / "prog_array").get(NR_FCHMODAT) == ours)
        fchmodat(5)
        assert read_counter(counter) == 15
        with d.client() as c:
            c.call("detach", slot=PINNED_SLOT)
            c.call("detach", slot=NR_GETPPID, hook="exit")  # the last exit slot: its dispatcher goes
        assert not (d.pin_dir / "exit" / "link").exists() and not (d.pin_dir / "exit" / "prog").exists()
        with d.client() as c:
            c.call("attach", slot=LIBBPF_SLOT, source=(EXAMPLES / "fchmodat_v2.c").read_text())
            assert c.call("unload-all")["slots_emptied"] == [NR_FCHMODAT, LIBBPF_SLOT]
        assert d.proc.wait(30) == 0
        assert not d.pin_dir.exists()
    finally:
        d.stop()
    # Nothing went wrong on the way that only the log would tell (a pin not restored, a
    # program not pinned), but the refusal and the repair above.
    assert _unexpected(log + d.output()) == []


def test_a_daemon_without_cap_sys_admin_upgrades_an_older_dispatcher(tmp_path: Path, pin_root: Path) -> None:
    """The last bcc release pinned no program beside its link: its name cannot be read without
    opening it by id, so a link with no program pin is an older dispatcher, and upgraded."""
    pin_dir = pin_root / "daemon"
    counter = pin_root / "maps" / "count"
    d = start_confined(tmp_path, pin_dir)
    with d.client() as c:
        ours = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter))["prog_id"]
    assert d.stop() == 0
    (pin_dir / "link").unlink()
    (pin_dir / "prog").unlink()
    old_id = pin_old_dispatcher(pin_dir, "bcc")  # built by this (root) process: bcc needs more to build it
    d = start_confined(tmp_path, pin_dir)
    try:
        with d.client() as c:
            status = c.call("status")
        assert status["upgraded_from"] == old_id and status["dispatcher_prog_id"] != old_id
        assert kernel_slots(pin_dir / "prog_array") == {NR_FCHMODAT: ours}
        fchmodat(7)
        assert read_counter(counter) >= 7  # a call in the window both dispatchers ran counts twice
    finally:
        d.stop()


def _unexpected(log: str) -> list[str]:
    """The log's errors and warnings, but the refused map and the repairs of the slots."""
    said = re.findall(r"(?:ERROR|WARNING): .*", log)
    return [line for line in said if not re.search(r"could not open bpf map: counter|refused to create a map|"
                                                     r"reconcile: slot .* put program \d+ \(\w+\) back", line)]
