"""Compiler and verifier output that names the user's file and lines.

clang sees a handler as bcc's ``/virtual/main.c`` or, for libbpf C, as ``<stdin>``: its
diagnostics and the verifier's line info say so.  The line numbers of clang's diagnostics are
the user's already; so are libbpf's verifier lines.  bcc's verifier lines are not: bcc compiles
a rewritten copy of the file with its own lines in front (``main.c:14`` for the user's line 2,
with bcc 0.26), so they are mapped back by the code the verifier quotes with them.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

_CLANG_NAMES = ("/virtual/main.c", "<stdin>")
# "; u64 a = ctx->args[0]; @ main.c:14": the verifier's line info, source text and place.
_VERIFIER_LINE = re.compile(r"^; (?P<code>.*) @ (?P<file>main\.c|<stdin>|/virtual/main\.c):(?P<line>\d+)$",
                            re.MULTILINE)


# LLVM's backend reports an operation it cannot lower (a 128-bit multiply: __multi3) at a line of
# bcc's rewritten copy, which starts with bcc's prologue: 12 lines with bcc 0.26 (the shift
# _bcc_shift finds in verifier logs, and tests/test_failures.py checks).
_BCC_BACKEND_ERROR = re.compile(r"/virtual/main\.c:(?P<line>\d+):(?=\d+: in function )")
BCC_PROLOGUE_LINES = 12


def name_the_file(log: str, filename: str | None, source: str | None) -> str:
    """``log`` with the user's file name for clang's, and bcc's verifier lines mapped back to
    the lines of ``source``.  Unchanged without a name (a handler sent without one)."""
    if not filename or not log:
        return log
    shift = _bcc_shift(log, source.splitlines() if source else [])
    # Line 0 is code of no line (the compiler's own); bcc's prologue lines have none of the user's.
    log = _VERIFIER_LINE.sub(lambda m: f"; {m['code']} @ {filename}:{max(int(m['line']) - shift, 0)}", log)
    log = _BCC_BACKEND_ERROR.sub(lambda m: f"{filename}:{max(int(m['line']) - BCC_PROLOGUE_LINES, 0)}:", log)
    for name in _CLANG_NAMES:
        log = log.replace(f"{name}:", f"{filename}:")
    return log


def _bcc_shift(log: str, lines: Sequence[str]) -> int:
    """How many lines bcc put in front of the user's: the verifier's line minus the user's, for
    each quoted line of code found exactly once in the source; 0 when none is (or for libbpf,
    whose lines are the user's: every shift found is then 0)."""
    where: dict[str, list[int]] = {}
    for number, text in enumerate(lines, start=1):
        where.setdefault(text.strip(), []).append(number)
    shifts = [int(m["line"]) - where[m["code"].strip()][0] for m in _VERIFIER_LINE.finditer(log)
              if len(where.get(m["code"].strip(), [])) == 1]
    return int(statistics.median(shifts)) if shifts else 0


# The verifier's own words for why it stopped, as it prints them (kernel/bpf/verifier.c); what
# a user must read first, and what "Program too large (29 insns)" from bcc never said.
_VERDICTS = re.compile(r"infinite loop detected at insn \d+|back-edge from insn \d+ to \d+"
                       r"|BPF program is too large\. Processed \d+ insn|The sequence of \d+ jumps is too complex"
                       r"|combined stack size of \d+ calls is \d+\. Too large|unreachable insn \d+"
                       r"|loop detected at insn \d+|too many states")
# Lines around the verdict that are not it: the walk (instructions, source, states), the
# statistics at the end, and what libbpf and bcc write around the log.
_NOT_A_VERDICT = re.compile(r"^(?:\d+: |; |\.\.\.|mark_precise|processed \d+ insns|verification time|stack depth"
                            r"|max_states_per_insn|cur state:|old state:|from \d+ to \d+:|R\d+=|libbpf: |bpf: "
                            r"|-- (?:BEGIN|END) PROG LOAD LOG --|Validating |Func#|\s*$)")
MAX_VERDICT = 300


def verifier_verdict(log: str) -> str | None:
    """What the verifier said when it refused a program, from its log: a known verdict (an
    infinite loop, a program too large to verify), else the last line of the log that is
    neither the walk nor the statistics; None when ``log`` has no verifier log."""
    known = list(_VERDICTS.finditer(log))
    if known:
        return known[-1].group(0)
    lines = log.splitlines()
    end = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("processed ")), None)
    if end is None:
        return None
    said = next((line.strip() for line in reversed(lines[:end]) if not _NOT_A_VERDICT.match(line)), None)
    return said[:MAX_VERDICT] if said else None
