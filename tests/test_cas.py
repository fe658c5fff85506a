"""Compare-and-swap (issue 15, item 1): attach and detach --expect change a slot only if it still
holds the expected program (or nothing), checked under the slot's lock; every loser is told the
program that won.  On the real kernel, through the daemon's socket and tailcallctl."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from harness import DaemonProcess, journal, kernel_slots, wait_journal
from tailcalld.client import RemoteError

SLOT = 305  # fsopen: no test process calls it
RACERS = 20


def handler(tag: str) -> str:
    return f"int cas_{tag}(struct bpf_raw_tracepoint_args *ctx) {{ return 0; }}\n"


def test_twenty_racing_swaps_one_winner_and_every_loser_told_the_truth(daemon: DaemonProcess) -> None:
    base = daemon.call("attach", slot=SLOT, source=handler("base"), filename="base.c")["prog_id"]
    outcomes: dict[int, dict[str, object] | RemoteError] = {}
    start = threading.Barrier(RACERS)

    def race(i: int) -> None:
        with daemon.client() as c:
            start.wait()  # all of them read the same program before any swaps
            try:
                outcomes[i] = c.call("attach", slot=SLOT, source=handler(f"r{i}"), filename=f"r{i}.c", expect=base)
            except RemoteError as err:
                outcomes[i] = err

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = {i: o for i, o in outcomes.items() if isinstance(o, dict)}
    lost = {i: o for i, o in outcomes.items() if isinstance(o, RemoteError)}
    assert len(outcomes) == RACERS and len(won) == 1, outcomes
    [(winner, result)] = won.items()
    assert result["replaced_prog_id"] == base and result["function"] == f"cas_r{winner}"
    for err in lost.values():  # each was told what the slot holds: the winner's program
        assert err.code == "conflict", err
        assert err.details == {"slot": SLOT, "hook": "enter", "expected": base, "current": result["prog_id"]}
        assert f"holds program {result['prog_id']}, not program {base}" in err.message
    assert kernel_slots(daemon.pin_dir / "prog_array") == {SLOT: result["prog_id"]}
    [slot] = daemon.call("list")["slots"]
    assert (slot["prog_id"], slot["function"]) == (result["prog_id"], f"cas_r{winner}")


def test_expect_empty_and_detach_expect(daemon: DaemonProcess) -> None:
    first = daemon.call("attach", slot=SLOT, source=handler("a"), filename="a.c", expect="empty")["prog_id"]
    with pytest.raises(RemoteError) as err:
        daemon.call("attach", slot=SLOT, source=handler("b"), filename="b.c", expect="empty")
    assert err.value.code == "conflict" and err.value.details["current"] == first
    with pytest.raises(RemoteError) as err:  # a program id that is not the slot's
        daemon.call("detach", slot=SLOT, expect=first + 100000)
    assert err.value.code == "conflict" and err.value.details["current"] == first
    assert kernel_slots(daemon.pin_dir / "prog_array") == {SLOT: first}  # nothing changed
    assert daemon.call("detach", slot=SLOT, expect=first)["prog_id"] == first
    assert kernel_slots(daemon.pin_dir / "prog_array") == {}
    with pytest.raises(RemoteError) as err:
        daemon.call("attach", slot=SLOT, source=handler("c"), filename="c.c", expect=first)
    assert err.value.code == "conflict" and err.value.details["current"] is None
    assert "is empty, not program" in err.value.message


@pytest.mark.parametrize("bad", [0, -1, "full", 1.5, True])
def test_a_bad_expect_is_a_bad_request(daemon: DaemonProcess, bad: object) -> None:
    with pytest.raises(RemoteError) as err:
        daemon.call("attach", slot=SLOT, source=handler("x"), expect=bad)
    assert err.value.code == "bad_request"
    assert daemon.call("list")["slots"] == []


def test_tailcallctl_expect_exit_codes_and_audit(journald: None, daemon: DaemonProcess, tmp_path: Path) -> None:
    source = tmp_path / "h.c"
    source.write_text(handler("ctl"))
    r = daemon.ctl("attach", str(SLOT), str(source), "--expect", "empty")
    assert r.returncode == 0, r.stderr
    [slot] = daemon.call("list")["slots"]
    r = daemon.ctl("attach", str(SLOT), str(source), "--fresh", "--expect", "empty")
    assert r.returncode == 5 and "conflict" in r.stderr and f"holds program {slot['prog_id']}" in r.stderr
    r = daemon.ctl("--json", "detach", str(SLOT), "--expect", str(slot["prog_id"] + 1))
    assert r.returncode == 5 and '"conflict"' in r.stdout
    r = daemon.ctl("detach", str(SLOT), "--expect", "nothing")
    assert r.returncode == 2 and "neither a program id nor 'empty'" in r.stderr
    assert daemon.call("list")["slots"][0]["prog_id"] == slot["prog_id"]
    entries = wait_journal(lambda: journal(_PID=str(daemon.pid), ERROR_CODE="conflict"), minimum=2)
    assert {e["ERROR_CODE"] for e in entries} == {"conflict"} and len(entries) >= 2
    assert all(e.get("PEER_UID") == "0" or "uid 0" in e["MESSAGE"] for e in entries)
