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


def name_the_file(log: str, filename: str | None, source: str | None) -> str:
    """``log`` with the user's file name for clang's, and bcc's verifier lines mapped back to
    the lines of ``source``.  Unchanged without a name (a handler sent without one)."""
    if not filename or not log:
        return log
    shift = _bcc_shift(log, source.splitlines() if source else [])
    log = _VERIFIER_LINE.sub(lambda m: f"; {m['code']} @ {filename}:{int(m['line']) - shift}", log)
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
