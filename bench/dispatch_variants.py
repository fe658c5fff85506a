"""Dispatcher designs side by side: ``.venv/bin/python -m bench.dispatch_variants [ROUNDS]``.

``--mixed`` times 16 cheap syscalls in random order instead of getppid alone (one call in 16
is then a hit): what a compare tree costs when branch prediction sees a mix.

An experiment, not part of ``make bench``: it loads stand-alone variants of the dispatcher with
bcc (own maps, nothing pinned), attaches each alone to sys_enter, and times getppid(2) with the
slot empty (miss) and with an empty handler in it (hit), interleaved in rounds, minimum of
short runs, median over rounds.  It answers "what does each piece of the dispatcher cost", and
whether a variable-key tail call (an indirect jump, retpolined on hosts with that mitigation)
can meet a hit target at all: ``bare_tail`` is a tail call and nothing else, ``direct`` the
same with a constant key per syscall (a switch the JIT turns into direct jumps).
"""

from __future__ import annotations

import atexit
import ctypes
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.syscall_cost import LOOP_SOURCE
from bench.util import LinkWatch, prog_id_of_fd

GETPPID = 110  # x86_64
MIXED_SOURCE = Path(__file__).with_name("mixed_loop.c")
MAX_TRIES = 30
CASES = 464  # x86_64 syscall numbers: the switch of the direct variant covers them all

HEADER = """
struct cm { u64 calls; u64 misses; };
BPF_PROG_ARRAY(handlers, 1024);
BPF_PERCPU_ARRAY(misses, u64, 1024);
BPF_PERCPU_ARRAY(calls, u64, 1024);
BPF_PERCPU_ARRAY(cm, struct cm, 1024);
BPF_PROG_ARRAY(staged, 1024);
BPF_ARRAY(staging, u32, 1);
BPF_ARRAY(compat_slots, u32, 512);
BPF_PERCPU_ARRAY(compat_misses, u64, 512);
static __always_inline u32 ia32(void) {
    void *task = (void *)bpf_get_current_task_btf();
    return *(volatile u32 *)(task + TI_STATUS) & 2;
}
int handler(struct bpf_raw_tracepoint_args *ctx) { return 0; }
"""
# bcc rewrites map calls before the preprocessor runs, so this is pasted in, not a macro.
COMPAT = ("if (ia32()) { u32 *slot = compat_slots.lookup(&nr); if (!slot || *slot == 0) { "
          "u64 *c = compat_misses.lookup(&nr); if (c) *c += 1; return 0; } nr = *slot - 1; }")
# asm with an immediate after each call keeps clang from merging the calls into one with a
# variable key (which would make them indirect again).
DIRECT_CASES = "".join(f'case {k}: handlers.call(ctx, {k}); asm volatile("" :: "i"({k})); break;\n'
                       for k in range(CASES))

VARIANTS = {
    "empty": "int d(struct bpf_raw_tracepoint_args *ctx) { return 0; }",
    "two_maps": """int d(struct bpf_raw_tracepoint_args *ctx) { u32 nr = ctx->args[1]; COMPAT
        u64 *c = calls.lookup(&nr); if (c) *c += 1; handlers.call(ctx, nr);
        u64 *m = misses.lookup(&nr); if (m) *m += 1; return 0; }""",
    "one_map": """int d(struct bpf_raw_tracepoint_args *ctx) { u32 nr = ctx->args[1]; COMPAT
        struct cm *c = cm.lookup(&nr); if (!c) return 0; c->calls += 1; handlers.call(ctx, nr);
        c->misses += 1; return 0; }""",
    # one_map and the switch of atomic changes (issue 15): which array to tail-call through.
    "staged": """int d(struct bpf_raw_tracepoint_args *ctx) { u32 nr = ctx->args[1]; COMPAT
        struct cm *c = cm.lookup(&nr); if (!c) return 0; c->calls += 1; u32 z = 0; u32 *s = staging.lookup(&z);
        if (s && *s) staged.call(ctx, nr); else handlers.call(ctx, nr);
        c->misses += 1; return 0; }""",
    "bare_tail": """int d(struct bpf_raw_tracepoint_args *ctx) { u32 nr = ctx->args[1];
        handlers.call(ctx, nr); return 0; }""",
    "direct": "int d(struct bpf_raw_tracepoint_args *ctx) { u32 nr = ctx->args[1]; switch (nr) {\n"
              + DIRECT_CASES + "} return 0; }",
}


def thread_info_status_offset() -> int:
    """Where current->thread_info.status is in task_struct, from the running kernel's BTF (the
    bcc variants read TS_COMPAT there as the real dispatcher does through CO-RE)."""
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                          capture_output=True, text=True, check=True).stdout

    def member(struct: str, name: str) -> int:
        body = re.search(rf"^\[\d+\] STRUCT '{struct}' size=\d+ vlen=\d+\n((?:\t.*\n)*)", dump, re.MULTILINE)
        assert body is not None, f"no struct {struct} in the kernel's BTF"
        found = re.search(rf"^\t'{name}' type_id=\d+ bits_offset=(\d+)", body.group(1), re.MULTILINE)
        assert found is not None, f"no member {name} in struct {struct}"
        return int(found.group(1)) // 8

    return member("task_struct", "thread_info") + member("thread_info", "status")


def run_loop(binary: Path, ours: set[int] | None = None) -> float:
    """The fastest of 10 runs of 300 000 calls; redone while another user's program sat on a
    syscall tracepoint meanwhile (test suites attach dispatchers of their own)."""
    for _ in range(MAX_TRIES):
        with LinkWatch(ours or set()) as watch:
            out = subprocess.run([str(binary), "300000", "10"], capture_output=True, text=True, check=True).stdout
        if not watch.seen:
            break
        time.sleep(1)
    else:
        raise SystemExit("other programs on syscall tracepoints all along: run this on a quiet machine")
    return min(float(x) for x in out.split())


def measure(bcc: Any, source: str, hit: bool, binary: Path) -> float:
    b = bcc.BPF(text=source)
    try:
        ours = {prog_id_of_fd(b.load_func("d", bcc.BPF.RAW_TRACEPOINT).fd)}
        if hit:
            h = b.load_func("handler", bcc.BPF.RAW_TRACEPOINT)
            b["handlers"][ctypes.c_int(GETPPID)] = ctypes.c_int(h.fd)
        b.attach_raw_tracepoint(tp="sys_enter", fn_name="d")
        return run_loop(binary, ours)
    finally:
        b.cleanup()
        atexit.unregister(b.cleanup)
        time.sleep(0.3)  # detaching is asynchronous: let the kernel free it before the next one


def main() -> int:
    import bcc  # noqa: PLC0415 - libbcc only for this experiment

    args = [a for a in sys.argv[1:] if a != "--mixed"]
    rounds = int(args[0]) if args else 5
    source = MIXED_SOURCE if "--mixed" in sys.argv else LOOP_SOURCE
    header = HEADER.replace("TI_STATUS", str(thread_info_status_offset()))
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "getppid_loop"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
        results: dict[str, list[float]] = {}
        for _ in range(rounds):
            results.setdefault("floor", []).append(run_loop(binary))
            for name, body in VARIANTS.items():
                for hit in (False, True) if name != "empty" else (False,):
                    ns = measure(bcc, header + body.replace("COMPAT", COMPAT), hit, binary)
                    results.setdefault(f"{name} {'hit' if hit else 'miss'}", []).append(ns)
    floor = statistics.median(results["floor"])
    empty = statistics.median(results["empty miss"]) - floor
    for key, values in results.items():
        median = statistics.median(values)
        print(f"{key:16s} {median:7.1f} ns/call  over floor {median - floor:5.1f}  x raw_tp "
              f"{(median - floor) / empty if empty else 0:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
