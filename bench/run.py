"""tailcalld benchmark driver: ``make bench``, ``.venv/bin/python -m bench.run [--quick]``.

Prints its tables on stdout (per-syscall cost, control plane, memory, event throughput, tailcallctl's
start-up) and progress on
stderr; ``--json PATH`` also writes every number.  Needs root, bpffs and the venv's python
(it imports bcc and tailcalld).  Whatever happens, every pin it made is removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `tailcalld` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli_startup, cold_attach, control_plane, events_throughput, restore, scale, syscall_cost  # noqa: E402
from bench.control_plane import ControlResults, ControlSize  # noqa: E402
from bench.syscall_cost import LoopSize, Row, Sample  # noqa: E402
from bench.util import PinDirs, format_table  # noqa: E402
from tests.harness import BPFFS  # noqa: E402


@dataclass(frozen=True)
class Plan:
    rounds: int
    loop: LoopSize
    control: ControlSize
    events_calls: int = 1_000_000  # getppid calls of the event-throughput loop, one event each
    cli_rounds: int = 60  # interleaved rounds of tailcallctl's start-up rows
    cold_attaches: int = 15  # cold attaches of each handler, each way (part 6)
    restore_handlers: int = 50  # recorded bcc handlers a reboot brings back (part 7)
    restore_rounds: int = 3
    scale_slots: int = 300  # slots filled, bcc and libbpf alternating (part 8)
    scale_rounds: int = 20


FULL = Plan(7, LoopSize(calls=300_000, runs=10),
            ControlSize(attaches=30, lists=2000, clients=50, lists_per_client=100, seconds=2.0,
                        handlers=50, swaps=2000), 1_000_000)
QUICK = Plan(1, LoopSize(calls=20_000, runs=2),
             ControlSize(attaches=2, lists=20, clients=50, lists_per_client=2, seconds=0.2,
                         handlers=3, swaps=20), 20_000, 2, 2, 3, 1, 6, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round: proves it works, measures little")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds of the per-syscall part (default {FULL.rounds})")
    p.add_argument("--calls", type=int, help=f"getppid calls per run (default {FULL.loop.calls})")
    p.add_argument("--runs", type=int, help=f"runs per configuration per round (default {FULL.loop.runs})")
    p.add_argument("--only", choices=("syscall", "control", "events", "cli", "cold", "restore", "scale"),
                   help="run one part only")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    loop = LoopSize(args.calls or base.loop.calls, args.runs or base.loop.runs)
    return Plan(args.rounds or base.rounds, loop, base.control, base.events_calls, base.cli_rounds,
                base.cold_attaches, base.restore_handlers, base.restore_rounds, base.scale_slots, base.scale_rounds)


def source_version() -> str:
    """Which tailcalld was measured: the commit, and whether the work tree differed from it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "tailcalld"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in tailcalld/" if dirty else "")


def machine() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpus": str(os.cpu_count()), "model": model, "kernel": platform.release(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "tailcalld": source_version()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that every `finally` runs and the pins go


# -- tables ----------------------------------------------------------------------------------

SYSCALL_HEADERS = ("configuration", "ns/call median", "min", "max", "over floor ns", "x raw_tp",
                   "over floor ns (best)", "x raw_tp (best)", "runs discarded", "rounds disturbed")


def syscall_table(rows: list[Row], rounds: int) -> str:
    lines = []
    for r in rows:
        if r.skipped or not r.per_round:
            lines.append((r.label, f"skipped: {r.skipped or 'not measured'}", "", "", "", "", "", "", "", ""))
            continue
        lines.append((r.label, r.median, r.low, r.high, _num(r.over_median), _num(r.ratio_median),
                      _num(r.over_best), _num(r.ratio_best), r.discarded, f"{r.disturbed}/{rounds}"))
    return format_table(SYSCALL_HEADERS, lines)


def _num(x: float) -> object:
    return "-" if math.isnan(x) else x


def control_tables(res: ControlResults) -> str:
    lat = format_table(("operation", "n", "p50", "p99", "unit", "note"),
                       [(x.operation, x.n, x.p50, _num(x.p99), x.unit, x.note) for x in res.latencies])
    rate = format_table(("throughput", "per second"),
                        [(what, f"{v:.1f}" if v < 100 else f"{v:.0f}") for what, v in res.throughput])
    mem = format_table(("memory", "value"), res.memory)
    load = f"load average (1, 5, 15 min) before / after this part: {' / '.join(res.load)} on {os.cpu_count()} CPUs"
    return f"{load}\n{lat}\n\n{rate}\n\n{mem}"


# -- the parts -------------------------------------------------------------------------------

def run_syscall_part(plan: Plan, pins: PinDirs, loop: asyncio.AbstractEventLoop,
                     workdir: Path) -> tuple[list[Row], list[Sample]]:
    binary = syscall_cost.build_loop(workdir)
    configs = syscall_cost.configurations()
    env = syscall_cost.Env.create(loop, pins)
    try:
        samples = syscall_cost.measure_all(configs, env, binary, plan.loop, plan.rounds, log)
    finally:
        env.close()
    return syscall_cost.summarize(configs, samples), samples


def report(plan: Plan, info: dict[str, str], rows: list[Row] | None, samples: list[Sample] | None,
           control: ControlResults | None, events: list[events_throughput.ThroughputRow] | None = None,
           cli: list[cli_startup.StartupRow] | None = None, cold: cold_attach.ColdResults | None = None,
           restored: restore.RestoreResults | None = None, scaled: scale.ScaleResults | None = None) -> str:
    out = [f"tailcalld benchmark, {info['date']}: {info['model']}, {info['cpus']} CPUs, kernel {info['kernel']}",
           f"tailcalld: {info['tailcalld']}", f"command: {' '.join(sys.argv)}", ""]
    if rows is not None:
        out += [f"Per-syscall cost of getppid(2): {plan.rounds} interleaved rounds; each round's value is the "
                f"fastest of {plan.loop.runs} runs x {plan.loop.calls} calls. 'best' = fastest round.",
                "Runs during which another user's program sat on sys_enter are discarded and redone; "
                "'rounds disturbed' counts rounds that had to keep such runs.",
                syscall_table(rows, plan.rounds), ""]
        out += [f"CHECK {r.label}: {p}" for r in rows for p in r.problems]
    if control is not None:
        out += ["Control plane (a real tailcalld over its socket) and memory", control_tables(control), ""]
    if events is not None:
        out += [f"Event throughput: one event per getppid(2) of a {plan.events_calls}-call loop (plus its warm-up "
                "tenth), each tracer reading in user space; delivered/s = delivered / (loop start -> reader done); "
                "'slowest list ms': tailcalld's `list` from another connection while events flowed.",
                events_throughput.table(events), ""]
    if cli is not None:
        out += [f"tailcallctl start-up: wall time of each whole process against a real tailcalld, {plan.cli_rounds} "
                "interleaved rounds; x bare = over the bare start of the same interpreter (the venv's python3).",
                cli_startup.table(cli), ""]
    if cold is not None:
        out += [f"Cold attach of the article's handlers (examples/), {plan.cold_attaches} of each way, "
                f"{cold_attach.PAUSE:g} s apart; the floor of a libbpf load: bpftool prog loadall of the same object",
                cold_attach.tables(cold), ""]
    if restored is not None:
        out += [f"Reboot to traced: a tailcalld with {restored.handlers} recorded bcc handlers started on an empty pin "
                f"folder (a reboot), {restored.rounds} interleaved rounds; 'socket answers' counts from the process's "
                "start (polled every 50 ms), 'all slots back' until status says no slot is restoring.",
                restore.table(restored), ""]
    if scaled is not None:
        out += [f"Many slots: one tailcalld empty, then with {scaled.slots} slots filled (bcc and libbpf alternating, "
                f"{scaled.fill_s:.1f} s to fill); CLI rows are whole processes, {scaled.rounds} interleaved rounds, "
                "x = over the bare python start of the same round set; restart/reboot as in part 7.",
                scale.table(scaled), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("bench.run loads BPF programs: run it as root")
        return 2
    if not os.path.ismount(BPFFS):
        log(f"{BPFFS} is not a bpffs mount: run `make setup` (or mount -t bpf bpf {BPFFS})")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    plan, info = plan_from(args), machine()
    pins = PinDirs()
    loop = asyncio.new_event_loop()
    rows = samples = control = None
    events: list[events_throughput.ThroughputRow] | None = None
    cli: list[cli_startup.StartupRow] | None = None
    cold: cold_attach.ColdResults | None = None
    restored: restore.RestoreResults | None = None
    scaled: scale.ScaleResults | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="tailcalld-bench-") as tmp:
            if args.only in (None, "syscall"):
                rows, samples = run_syscall_part(plan, pins, loop, Path(tmp))
            if args.only in (None, "control"):
                control = control_plane.measure(pins, Path(tmp), loop, plan.control, log)
            if args.only in (None, "events"):
                events = events_throughput.measure(pins, plan.events_calls, log, Path(tmp))
            if args.only in (None, "cli"):
                cli = cli_startup.measure(pins, Path(tmp) / "cli", plan.cli_rounds, log)
            if args.only in (None, "cold"):
                cold = cold_attach.measure(pins, Path(tmp), loop, plan.cold_attaches, log)
            if args.only in (None, "restore"):
                (Path(tmp) / "restore").mkdir()
                restored = restore.measure(pins, Path(tmp) / "restore", plan.restore_handlers, plan.restore_rounds, log)
            if args.only in (None, "scale"):
                (Path(tmp) / "scale").mkdir()
                scaled = scale.measure(pins, Path(tmp) / "scale", plan.scale_slots, plan.scale_rounds, log)
    finally:
        left = pins.sweep()
        loop.close()
        if left:
            log(f"removed pins left by an interrupted step: {', '.join(left)}")
    print(report(plan, info, rows, samples, control, events, cli, cold, restored, scaled), flush=True)
    if args.json:
        args.json.write_text(json.dumps(_as_json(plan, info, rows, samples, control, pins, events, cli, cold, restored,
                                                 scaled), indent=1, default=str))
    return 0


def _as_json(plan: Plan, info: dict[str, str], rows: list[Row] | None, samples: list[Sample] | None,
             control: ControlResults | None, pins: PinDirs,
             events: list[events_throughput.ThroughputRow] | None = None,
             cli: list[cli_startup.StartupRow] | None = None,
             cold: cold_attach.ColdResults | None = None,
             restored: restore.RestoreResults | None = None,
             scaled: scale.ScaleResults | None = None) -> dict[str, Any]:
    return {"machine": info, "command": sys.argv, "plan": asdict(plan), "scale": asdict(scaled) if scaled else None,
            "restore": asdict(restored) if restored else None,
            "cold_attach": asdict(cold) if cold else None,
            "events_rows": [asdict(r) for r in events or []], "cli_rows": [asdict(r) for r in cli or []],
            "syscall_rows": [asdict(r) for r in rows or []], "samples": [asdict(s) for s in samples or []],
            "control": asdict(control) if control else None,
            "pin_dirs": [str(p) for p in pins.made],
            "pins_left": [str(p) for p in pins.made if p.exists()]}


if __name__ == "__main__":
    sys.exit(main())
