"""Part 5: cold attach of the article's handlers (issue 14, item 2), and where its time goes.

Through a real tailcalld (the tests' harness), each attach of a handler the daemon never saw
(its source made new by a comment) into an empty slot, then a detach: the libbpf file
(examples/fchmodat_libbpf.bpf.c, --function enter_fchmodat) and the bcc one
(examples/fchmodat.c), over the socket (the daemon's part) and as `tailcallctl attach` (what a
person waits: the CLI's own start-up included).  Attaches are a second apart, as a person's
are: the daemon starts the next compile worker when one ends (tailcalld/spares.py).

The floor of a libbpf load is `bpftool prog loadall` of the same object (clang's output for
the same source, compiled here once), timed as a process as the attach is; the ratios say
how far the attach is from it.  Then the steps: tailcalld's Compiler in this process, with and
without the precompiled vmlinux.h and the worker started ahead, split by the marks the worker
and the Compiler take (Program.steps), and clang alone with and without the PCH.

Run against an older tailcalld (PYTHONPATH=<its checkout>), the part measures what that one
offers: no PCH, no steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailcalld.compiler import Compiler, bpf_include_dir
from tailcalld.config import LiveSettings, Settings
from tailcalld import dialects
from tailcalld.dialects import clang_command, vmlinux_header
from tests.harness import DaemonProcess, remove_pin_tree

from .control_plane import TIMED_SLOT, running_daemon
from .util import PinDirs, format_table, percentile

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HANDLERS = {"libbpf": EXAMPLES / "fchmodat_libbpf.bpf.c", "bcc": EXAMPLES / "fchmodat.c"}
FUNCTION = "enter_fchmodat"
PAUSE = 1.0  # seconds between cold attaches, as a person's
PCH_WAIT = 120.0  # seconds a new daemon may take to precompile vmlinux.h (~2 s on an idle machine)


@dataclass
class ColdResults:
    rows: list[tuple[str, int, float, float, str]] = field(default_factory=list)  # what, n, p50 ms, p99 ms, note
    steps: list[tuple[str, dict[str, float], int]] = field(default_factory=list)  # config, step -> p50 ms, n
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, ms: list[float], note: str = "") -> float:
        self.rows.append((what, len(ms), percentile(ms, 50), percentile(ms, 99), note))
        return percentile(ms, 50)


def fresh(path: Path, tag: str) -> str:
    """The handler's source, made new: nothing compiled before can be reused for it."""
    return path.read_text() + f"\n// cold attach {tag} {secrets.token_hex(8)}\n"


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def has_pch() -> bool:
    """Whether the tailcalld measured has a precompiled vmlinux.h at all (an older one has not;
    not asked of the import system: an editable install's finder serves tailcalld.pch from its
    own checkout when PYTHONPATH's tailcalld has none)."""
    return hasattr(dialects, "pch_command")


def wait_for_pch(d: DaemonProcess, state_dir: Path, log: Callable[[str], None]) -> bool:
    """A daemon makes the PCH in the background at its first libbpf compile on a kernel: one
    attach (untimed) has it made, and cold attaches are timed once it is there, as on every
    later one."""
    d.call("attach", slot=TIMED_SLOT, source=fresh(HANDLERS["libbpf"], "first"), function=FUNCTION)
    d.call("detach", slot=TIMED_SLOT)
    deadline = time.monotonic() + PCH_WAIT
    while time.monotonic() < deadline:
        if list(state_dir.glob("cache/vmlinux-*/vmlinux.h.*.pch.json")):
            return True
        time.sleep(0.1)
    log(f"cold attach: no precompiled vmlinux.h after {PCH_WAIT:g} s")
    return False


def through_daemon(d: DaemonProcess, dialect: str, n: int,
                   workdir: Path) -> tuple[list[float], list[float], list[float]]:
    """n cold attaches over the socket, then n as `tailcallctl attach`, each followed by a detach
    (timed too as `tailcallctl detach`: the CLI's own cost, next to the attach's)."""
    sock, ctl, ctl_detach = [], [], []
    args = {"function": FUNCTION, "filename": HANDLERS[dialect].name}
    with d.client() as c:
        for i in range(n):
            time.sleep(PAUSE)
            source = fresh(HANDLERS[dialect], f"socket {i}")
            start = time.perf_counter()
            c.call("attach", slot=TIMED_SLOT, source=source, **args)
            sock.append((time.perf_counter() - start) * 1e3)
            c.call("detach", slot=TIMED_SLOT)
        for i in range(n):
            time.sleep(PAUSE)
            path = workdir / f"cold-{i}-{HANDLERS[dialect].name}"
            path.write_text(fresh(HANDLERS[dialect], f"ctl {i}"))
            start = time.perf_counter()
            done = d.ctl("attach", TIMED_SLOT, str(path), "--function", FUNCTION)
            ctl.append((time.perf_counter() - start) * 1e3)
            if done.returncode != 0:
                raise RuntimeError(f"tailcallctl attach {path.name} failed: {done.stderr.strip()}")
            start = time.perf_counter()
            d.ctl("detach", TIMED_SLOT)
            ctl_detach.append((time.perf_counter() - start) * 1e3)
    return sock, ctl, ctl_detach


def libbpf_object(folder: Path, out: Path) -> Path:
    done = subprocess.run(clang_command([str(folder), bpf_include_dir()], str(out)),
                          input=HANDLERS["libbpf"].read_text(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"clang: {done.stderr}")
    return out


def bpftool_loadall(obj: Path, pins: PinDirs, n: int) -> list[float]:
    """The floor: bpftool loads every program and map of the object and pins the programs."""
    times = []
    root = pins.new("loadall")
    root.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(n):
            start = time.perf_counter()
            subprocess.run(["bpftool", "prog", "loadall", str(obj), str(root / str(i))], check=True,
                           capture_output=True)
            times.append((time.perf_counter() - start) * 1e3)
            remove_pin_tree(root / str(i))
    finally:
        remove_pin_tree(root)
    return times


def clang_alone(folder: Path, pch: Path | None, n: int, workdir: Path) -> list[float]:
    cmd = clang_command([str(folder), bpf_include_dir()], str(workdir / "alone.o"))
    if pch is not None:
        cmd = clang_command([str(folder), bpf_include_dir()], str(workdir / "alone.o"), (), str(pch))
    source = HANDLERS["libbpf"].read_text()
    return [_ms(lambda: subprocess.run(cmd, input=source, check=True, capture_output=True, text=True))
            for _ in range(n)]


@contextlib.contextmanager
def compiler_on(loop: asyncio.AbstractEventLoop, cache: Path, pch: bool, ahead: bool) -> Iterator[Compiler]:
    """tailcalld's Compiler, as the daemon has it, with the PCH and the workers started ahead
    switched as asked."""
    compiler = Compiler(LiveSettings(Settings(compile_timeout=120.0)), cache_dir=cache)
    if not pch and hasattr(compiler, "precompiled"):  # an older tailcalld has neither
        async def none(folder: Path, make: bool = True) -> None:
            return None
        compiler.precompiled.ready = none  # type: ignore[method-assign, assignment]
    if not ahead and hasattr(compiler, "_spares"):
        compiler._spares.replenish = lambda kind: None  # type: ignore[method-assign]  # noqa: SLF001
    try:
        yield compiler
    finally:
        getattr(compiler, "close", lambda: None)()
        # What close cancelled (a worker being started ahead) ends while the loop runs.
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def step_times(loop: asyncio.AbstractEventLoop, cache: Path, dialect: str, pch: bool, ahead: bool,
               n: int) -> tuple[dict[str, float], list[float]]:
    """Median ms of each step of n loads, and the loads' totals."""
    per_step: dict[str, list[float]] = {}
    totals = []
    with compiler_on(loop, cache, pch, ahead) as compiler:
        if ahead:  # the first load starts the worker for the next: not timed
            loop.run_until_complete(compiler.load(fresh(HANDLERS[dialect], "warm-up"), FUNCTION,
                                                  dialect=dialect)).close()  # type: ignore[arg-type]
        for i in range(n):
            if ahead:
                loop.run_until_complete(asyncio.sleep(PAUSE))
            start = time.perf_counter()
            program = loop.run_until_complete(compiler.load(fresh(HANDLERS[dialect], f"steps {i}"), FUNCTION,
                                                            dialect=dialect))  # type: ignore[arg-type]
            totals.append((time.perf_counter() - start) * 1e3)
            for step, seconds in getattr(program, "steps", {}).items():
                per_step.setdefault(step, []).append(seconds * 1e3)
            program.close()
    return {step: percentile(ms, 50) for step, ms in per_step.items()}, totals


def measure(pins: PinDirs, workdir: Path, loop: asyncio.AbstractEventLoop, n: int,
            log: Callable[[str], None]) -> ColdResults:
    res = ColdResults()
    with running_daemon(pins, workdir) as d:
        if has_pch() and not wait_for_pch(d, workdir / "state", log):
            res.notes.append("the daemon had made no precompiled vmlinux.h: libbpf attaches compiled the header")
        p50: dict[str, float] = {}
        detaches: list[float] = []
        for dialect in HANDLERS:
            log(f"cold attach: {n} + {n} {dialect} attaches through the daemon")
            sock, ctl, ctl_detach = through_daemon(d, dialect, n, workdir)
            p50[dialect] = res.add(f"cold attach, {dialect}, over the socket", sock, "compile + load + swap")
            p50[f"{dialect} ctl"] = res.add(f"cold attach, {dialect}, `tailcallctl attach` wall", ctl,
                                            "what a person waits: the CLI's start-up included")
            detaches.extend(ctl_detach)
        res.add("`tailcallctl detach` wall (between them)", detaches, "the CLI's own start-up and one request")
    with tempfile.TemporaryDirectory(prefix="tailcalld-bench-cold-") as tmp:
        cache = workdir / "state" / "cache"  # the daemon's, stopped now: its vmlinux.h and PCH serve
        folder = loop.run_until_complete(vmlinux_header(cache, 120.0))
        obj = libbpf_object(folder, Path(tmp) / "fchmodat_libbpf.bpf.o")
        log(f"cold attach: {n} x bpftool prog loadall")
        floor = res.add("floor: `bpftool prog loadall` of the same object", bpftool_loadall(obj, pins, n),
                        "both programs, its maps, pinned")
        res.notes.append(f"libbpf attach over the socket / floor: {p50['libbpf'] / floor:.2f}x; "
                         f"as `tailcallctl attach`: {p50['libbpf ctl'] / floor:.2f}x")
        _steps(res, loop, cache, folder, n, Path(tmp), log)
    return res


def _steps(res: ColdResults, loop: asyncio.AbstractEventLoop, cache: Path, folder: Path, n: int, tmp: Path,
           log: Callable[[str], None]) -> None:
    pch = None
    if has_pch():
        from tailcalld.pch import Precompiled  # noqa: PLC0415 - not in an older tailcalld

        pch = loop.run_until_complete(Precompiled(lambda: 120.0).build(folder))
    log(f"cold attach: {n} x clang alone, with and without the PCH")
    res.add("clang alone, the libbpf handler, reading vmlinux.h", clang_alone(folder, None, n, tmp))
    if pch is not None:
        res.add("clang alone, the libbpf handler, with the PCH", clang_alone(folder, pch, n, tmp))
    configs: list[tuple[str, str, bool, bool]] = [("libbpf", "libbpf: vmlinux.h, worker started at the request",
                                                   False, False)]
    if pch is not None:
        configs += [("libbpf", "libbpf: PCH, worker started ahead", True, True)]
    configs += [("bcc", "bcc: worker started at the request", False, False),
                ("bcc", "bcc: worker started ahead (bcc imported)", False, True)]
    for dialect, label, with_pch, ahead in configs:
        log(f"cold attach: {n} loads, {label}")
        steps, totals = step_times(loop, cache, dialect, with_pch, ahead, n)
        res.steps.append((label, steps | {"total (in the benchmark)": percentile(totals, 50)}, n))


def tables(res: ColdResults) -> str:
    rows = format_table(("operation", "n", "p50", "p99", "note"),
                        [(w, n, p50, p99, note) for w, n, p50, p99, note in res.rows])
    names: list[str] = []
    for _label, steps, _n in res.steps:
        names += [s for s in steps if s not in names]
    by_step = format_table(("step (p50 ms)", *(f"{label} (n={n})" for label, _s, n in res.steps)),
                           [(name, *(_cell(s.get(name)) for _l, s, _n in res.steps)) for name in names])
    return "\n".join([rows, "", *res.notes, "", "Where a compile and load's time goes (tailcalld's Compiler "
                      "in the benchmark; prepare: vmlinux.h and the PCH found, a turn; finished: the result "
                      "read, the worker's group killed):", by_step])


def _cell(v: float | None) -> Any:
    return "-" if v is None else v
