"""The benchmark (bench/run.py) works end to end at its smallest size.

Speed is never pass/fail: nothing here looks at how fast anything was, only that every
configuration and operation was measured and printed, and that no pin was left behind.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGURATIONS = {"floor", "raw_tp", "miss", "hit", "other", "bpftrace", "tracepoint", "exit", "timed", "scoped",
                  "scoped_out", "chained", "chained4"}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _table_line(text: str, label: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(f"| {label} ")]
    assert len(lines) == 1, f"no single table row for {label!r} in:\n{text}"
    return lines[0]


def _run_quick(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench.run failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.usefixtures("machine")  # root and bpffs, which bench.run checks for and does not set up
@pytest.mark.timeout(600)  # ~1 min idle, over 5 min while others' tests load the 2 CPUs
def test_quick_benchmark_prints_every_row_and_leaves_no_pins(tmp_path: Path) -> None:
    table, data = _run_quick(tmp_path)

    rows = {r["key"]: r for r in data["syscall_rows"]}
    assert set(rows) == CONFIGURATIONS
    for key, row in rows.items():
        line = _table_line(table, row["label"])
        if key == "bpftrace" and shutil.which("bpftrace") is None:
            assert "skipped" in line
            continue
        assert row["skipped"] is None and row["per_round"], f"{key} was not measured"
        assert all(math.isfinite(x) and x > 0 for x in row["per_round"])
        assert len(NUMBER.findall(line)) >= 8, f"numbers missing in the {key} row: {line}"
        assert not row["problems"], f"the miss counter contradicts {key}: {row['problems']}"

    control = data["control"]
    operations = " / ".join(x["operation"] for x in control["latencies"])
    for wanted in ("cold attach", "warm attach", "detach", "swap", "list, 1 client", "list, 50 concurrent clients"):
        assert wanted in operations
    for x in control["latencies"]:
        _table_line(table, x["operation"])
        assert math.isfinite(x["p50"]), x
    assert any("one connection" in what and rate > 0 for what, rate in control["throughput"])
    memory = dict(control["memory"])
    assert memory["daemon VmRSS, idle (no handlers)"].endswith("MiB")
    assert any(k.startswith("daemon VmRSS,") and "handlers in" in k for k in memory)

    cli = {r["label"]: r for r in data["cli_rows"]}  # tailcallctl's start-up, against a bare Python start
    assert any(label.startswith("python3 -c pass") for label in cli)
    assert {"tailcallctl --help", "tailcallctl status"} <= set(cli) and any(k.startswith("tailcallctl list") for k in cli)
    for label, row in cli.items():
        assert row["ms"] and all(math.isfinite(x) and x > 0 for x in row["ms"]), label
        assert len(NUMBER.findall(_table_line(table, label))) >= 5, f"numbers missing in the {label} row"
    cold = data["cold_attach"]
    measured = {what: (n, p50) for what, n, p50, _p99, _note in cold["rows"]}
    for wanted in ("cold attach, libbpf, over the socket", "cold attach, bcc, `tailcallctl attach` wall",
                   "floor: `bpftool prog loadall` of the same object", "clang alone, the libbpf handler, with the PCH"):
        assert measured[wanted][0] == 2 and measured[wanted][1] > 0, wanted
        _table_line(table, wanted)
    assert any(note.startswith("libbpf attach over the socket / floor: ") for note in cold["notes"])
    steps = {label: by_step for label, by_step, _n in cold["steps"]}
    assert "compile (clang with PCH)" in steps["libbpf: PCH, worker started ahead"]
    assert "load (verifier)" in steps["bcc: worker started at the request"]

    restore = {r["way"]: r for r in data["restore"]["rows"]}  # part 7: every recorded slot came back
    handlers = data["restore"]["handlers"]
    assert restore["reboot, compile cache warm"]["from_cache"] == [handlers]
    assert restore["reboot, compile cache off (compiles)"]["rebuilt"] == [handlers]
    assert restore["reboot, compile cache off (compiles)"]["from_cache"] == [0]
    for way in restore:
        _table_line(table, way)
    scale = {r["what"]: r for r in data["scale"]["rows"]}  # part 8: measured empty and filled
    for what in ("list (tailcallctl, whole process)", "daemon RSS, running", "reboot (cache warm): all slots back"):
        assert scale[what]["empty"] and scale[what]["filled"], what
        _table_line(table, what)

    assert data["pin_dirs"], "the benchmark made no pin folder"
    assert data["pins_left"] == [] and not any(Path(p).exists() for p in data["pin_dirs"])
