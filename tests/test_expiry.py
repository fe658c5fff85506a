"""Attaches that end (issue 15, item 3): attach --for/--until puts a handler in a slot for a
while; then the slot goes back to what it held before, also when the deadline passed while the
daemon was stopped.  On the real kernel, with the real journal."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness import DaemonProcess, journal, kernel_slots, prog_name_by_id, remove_pin_tree, saved_slots, start_daemon, \
    wait_journal, wait_until
from tailcalld.client import RemoteError
from tailcalld.metrics_http import fetch

SLOT = 306  # fsconfig: no test process calls it


def handler(tag: str) -> str:
    return f"int h_{tag}(struct bpf_raw_tracepoint_args *ctx) {{ return 0; }}\n"


def slot_of(d: DaemonProcess) -> dict[str, object] | None:
    found = [s for s in d.call("list")["slots"] if s["slot"] == SLOT]
    return found[0] if found else None


def running(d: DaemonProcess) -> str | None:
    """The function the kernel's slot runs (by the program's kernel name), None when empty."""
    prog = kernel_slots(d.pin_dir / "prog_array").get(SLOT)
    return prog_name_by_id(prog) if prog is not None else None


def test_the_slot_goes_back_to_what_it_held(journald: None, daemon: DaemonProcess) -> None:
    base = daemon.call("attach", slot=SLOT, source=handler("base"), filename="base.c")["prog_id"]
    temp = daemon.call("attach", slot=SLOT, source=handler("temp"), filename="temp.c", for_seconds=2.0)
    assert temp["replaced_prog_id"] == base
    listed = slot_of(daemon)
    assert listed is not None and listed["function"] == "h_temp"
    left = datetime.fromisoformat(str(listed["expires_at"])) - datetime.now(UTC)
    assert timedelta(0) < left <= timedelta(seconds=2)
    table = daemon.ctl("list").stdout
    assert "LEFT" in table and "h_temp" in table
    assert daemon.call("status")["next_expiry"] == listed["expires_at"]
    assert "Next end" in daemon.ctl("status").stdout
    assert "the slot goes back to what it held before" in daemon.ctl("show", str(SLOT), "--no-source").stdout
    metrics = fetch(daemon.socket.parent / "metrics.sock").decode()
    assert f'tailcalld_slot_expiry_timestamp_seconds{{hook="enter",priority="",slot="{SLOT}",syscall=' in metrics
    wait_until(lambda: (slot_of(daemon) or {}).get("function") == "h_base", timeout=30, period=0.2)
    back = slot_of(daemon)
    assert back is not None and back["expires_at"] is None and back["state"] == "in-sync"
    assert running(daemon) == "h_base"  # rebuilt from its saved source (the compile cache)
    [entry] = wait_journal(lambda: journal(_PID=str(daemon.pid), TAILCALLD_ACTION="expire"))
    assert entry["SLOT"] == str(SLOT) and "back to h_base" in entry["MESSAGE"]
    assert "LEFT" not in daemon.ctl("list").stdout  # the column only while an attach ends
    assert daemon.call("status")["next_expiry"] is None


def test_an_empty_slot_is_empty_again_and_a_later_change_keeps_its_place(daemon: DaemonProcess) -> None:
    daemon.call("attach", slot=SLOT, source=handler("brief"), filename="brief.c", for_seconds=1.0)
    wait_until(lambda: slot_of(daemon) is None, timeout=30, period=0.2)
    assert running(daemon) is None
    daemon.call("attach", slot=SLOT, source=handler("temp"), filename="temp.c", for_seconds=1.0)
    daemon.call("attach", slot=SLOT, source=handler("kept"), filename="kept.c")  # replaces it, deadline and all
    time.sleep(2.5)  # past the first one's deadline: nothing may happen
    kept = slot_of(daemon)
    assert kept is not None and kept["function"] == "h_kept" and kept["expires_at"] is None
    assert running(daemon) == "h_kept"


@pytest.mark.parametrize("reboot", [False, True], ids=["restart", "reboot"])
def test_a_deadline_passed_while_stopped_is_honoured_at_start(tmp_path: Path, pin_root: Path, reboot: bool) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        d.call("attach", slot=SLOT, source=handler("base"), filename="base.c")
        d.call("attach", slot=SLOT, source=handler("temp"), filename="temp.c", for_seconds=2.0)
    finally:
        assert d.stop() == 0
    time.sleep(3)  # the deadline passes with no daemon: the pinned handler runs on
    if reboot:  # then the start rebuilds the ended handler first (its record), and ends it
        remove_pin_tree(pin_root / "daemon")
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        wait_until(lambda: (slot_of(d) or {}).get("function") == "h_base", timeout=30, period=0.2)
        assert running(d) == "h_base"
        assert saved_slots(tmp_path / "state") == kernel_slots(pin_root / "daemon" / "prog_array")
    finally:
        d.stop()


def test_misuse_changes_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    with pytest.raises(RemoteError) as err:
        daemon.call("attach", slot=SLOT, source=handler("x"), until=past)
    assert err.value.code == "deadline_passed"
    for bad in ({"for_seconds": 0}, {"for_seconds": -5}, {"for_seconds": 1, "until": past},
                {"until": "2030-01-01T00:00:00"}):  # no offset: whose time would it be?
        with pytest.raises(RemoteError) as err:
            daemon.call("attach", slot=SLOT, source=handler("x"), **bad)
        assert err.value.code == "bad_request", bad
    assert daemon.call("list")["slots"] == []
    source = tmp_path / "h.c"
    source.write_text(handler("ctl"))
    for bad in (["--for", "soon"], ["--for", "0"], ["--until", "tomorrow"], ["--for", "5", "--until", past]):
        r = daemon.ctl("attach", str(SLOT), str(source), *bad)
        assert r.returncode == 2, (bad, r.stderr)
    r = daemon.ctl("attach", str(SLOT), str(source), "--until", past)
    assert r.returncode == 1 and "deadline_passed" in r.stderr
    r = daemon.ctl("attach", str(SLOT), str(source), "--for", "10m")
    assert r.returncode == 0, r.stderr
    listed = slot_of(daemon)
    assert listed is not None
    left = datetime.fromisoformat(str(listed["expires_at"])) - datetime.now(UTC)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)
