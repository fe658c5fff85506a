"""Issue 13's fleet, simulated on this kernel: three daemons, each with its own pin folder,
socket, state and metrics address, as three nodes would have.  One apply file is rolled out to
all of them with `tailcallctl apply`, one real Prometheus scrapes all three, a new version is
rolled out and then rolled back, and at the end every node is unloaded and nothing of theirs
is left in the kernel or on bpffs.

Every dispatcher sees every syscall of the machine, so a syscall made once here counts once on
each node: the three nodes' counters must agree, which is what a fleet's dashboard shows."""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, start_daemon, wait_until
from prometheus import Prometheus, free_port, running_prometheus

# Past every syscall table (ENOSYS) and past those other tests use: every count is this test's.
TRACED, ADDED = 1017, 1018
NODES = 3
V1 = "int on_call(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
V2 = "int on_call_v2(struct bpf_raw_tracepoint_args *ctx) { return 1; }\n"


def raw_syscall(nr: int, n: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(n):
        libc.syscall(nr)


def release(folder: Path, *slots: tuple[int, str, str]) -> Path:
    """An apply file in its own folder, with its handler sources beside it."""
    folder.mkdir()
    tables = []
    for slot, name, source in slots:
        (folder / f"{name}.c").write_text(source)
        tables.append(f'[[slot]]\nslot = {slot}\nfile = "{name}.c"\n')
    (folder / "slots.toml").write_text("\n".join(tables))
    return folder / "slots.toml"


def apply(node: DaemonProcess, file: Path) -> dict[int, str]:
    """slot -> action, as `tailcallctl --json apply` reports it."""
    r = node.ctl("apply", "--json", str(file))
    assert r.returncode == 0, r.stdout + r.stderr
    return {c["slot"]: c["action"] for c in json.loads(r.stdout)["changes"]}


def rollout(nodes: list[DaemonProcess], file: Path) -> list[dict[int, str]]:
    return [apply(node, file) for node in nodes]


def slot_info(prom: Prometheus, slot: int) -> dict[str, tuple[str, str]]:
    """instance -> (function, sha256) of the slot's handler, as Prometheus last scraped it."""
    return {r["metric"]["instance"]: (r["metric"]["function"], r["metric"]["sha256"])
            for r in prom.query(f'tailcalld_slot_info{{job="tailcalld",slot="{slot}"}}')}


@pytest.fixture
def fleet(tmp_path: Path, pin_root: Path) -> Iterator[list[DaemonProcess]]:
    nodes: list[DaemonProcess] = []
    try:
        for i in range(NODES):
            home = tmp_path / f"node{i}"
            home.mkdir()
            nodes.append(start_daemon(home, pin_root / f"node{i}", metrics_listen=f"127.0.0.1:{free_port()}"))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_one_apply_file_rolled_out_scraped_and_rolled_back(tmp_path: Path, fleet: list[DaemonProcess]) -> None:
    targets = [f"127.0.0.1:{_listen_port(node)}" for node in fleet]
    v1 = release(tmp_path / "v1", (TRACED, "traced", V1))
    v2 = release(tmp_path / "v2", (TRACED, "traced", V2), (ADDED, "added", V1))

    assert rollout(fleet, v1) == [{TRACED: "add"}] * NODES
    assert rollout(fleet, v1) == [{TRACED: "unchanged"}] * NODES  # idempotent, on every node
    raw_syscall(TRACED, 250)

    with running_prometheus(tmp_path, targets) as prom:
        hits = f'tailcalld_slot_hits_total{{job="tailcalld",slot="{TRACED}",hook="enter"}}'
        wait_until(lambda: sorted(prom.values(hits, "instance").values()) == ["250"] * NODES, timeout=90, period=0.5)
        wait_until(lambda: len(slot_info(prom, TRACED)) == NODES, timeout=60, period=0.5)
        [first] = set(slot_info(prom, TRACED).values())
        assert first[0] == "on_call"

        assert rollout(fleet, v2) == [{TRACED: "replace", ADDED: "add"}] * NODES
        wait_until(lambda: {f for f, _ in slot_info(prom, TRACED).values()} == {"on_call_v2"}, timeout=60, period=0.5)
        [second] = set(slot_info(prom, TRACED).values())
        assert second[1] != first[1]
        raw_syscall(ADDED, 40)
        added = f'tailcalld_slot_hits_total{{job="tailcalld",slot="{ADDED}",hook="enter"}}'
        wait_until(lambda: sorted(prom.values(added, "instance").values()) == ["40"] * NODES, timeout=60, period=0.5)

        # The rollback: the previous file again, on every node.
        assert rollout(fleet, v1) == [{TRACED: "replace", ADDED: "remove"}] * NODES
        wait_until(lambda: set(slot_info(prom, TRACED).values()) == {first}, timeout=60, period=0.5)
        wait_until(lambda: slot_info(prom, ADDED) == {}, timeout=60, period=0.5)
        assert set(prom.values('up{job="tailcalld"}', "instance").values()) == {"1"}
        # Each node filled 4 slots in all (v1's add, v2's replace and add, the rollback's replace).
        ok = 'tailcalld_attaches_total{job="tailcalld",result="ok"}'
        wait_until(lambda: sorted(prom.values(ok, "instance").values()) == ["4"] * NODES, timeout=60, period=0.5)

    # Each node runs v1's program again, and counts on, all alike.
    before = [_hits(node, TRACED) for node in fleet]
    raw_syscall(TRACED, 30)
    # (list serves a read of the counters for 0.1 s: wait for the one after the calls)
    wait_until(lambda: [_hits(node, TRACED) - b for node, b in zip(fleet, before, strict=True)] == [30] * NODES)

    # Nothing left behind: every node unloaded, its pins and programs gone from the kernel.
    programs = [_prog_ids(node) for node in fleet]
    for node in fleet:
        r = node.ctl("unload-all")
        assert r.returncode == 0, r.stdout + r.stderr
        node.proc.wait(60)
        assert not node.pin_dir.exists()
    # The kernel frees a program once its last reference goes, after an RCU grace period.
    wait_until(lambda: not [p for ids in programs for p in ids if _exists(p)], timeout=30)


def _exists(prog_id: int) -> bool:
    shown = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, timeout=60)
    return shown.returncode == 0


def _listen_port(node: DaemonProcess) -> int:
    text = node.config.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("metrics_listen")]
    return int(line.split(":")[-1].strip().strip('"'))


def _hits(node: DaemonProcess, slot: int) -> int:
    [row] = [r for r in node.call("list")["slots"] if r["slot"] == slot and r.get("hook", "enter") == "enter"]
    return int(row["hits"])


def _prog_ids(node: DaemonProcess) -> list[int]:
    """The node's programs: its handlers and its dispatcher."""
    handlers = [int(r["prog_id"]) for r in node.call("list")["slots"]]
    return [*handlers, int(node.call("status")["dispatcher_prog_id"])]
