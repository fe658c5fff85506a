"""Child process that compiles one BPF C source with BCC and loads one program.

Why a process of its own: clang's diagnostics and the verifier log are printed on the
process's fd 2, which here is a pipe the daemon reads, so nothing has to redirect the
daemon's own stderr; a compile that spins can be killed; and LLVM's memory goes away with
the process.  The loaded program's fd is sent back over the socket given as fd argv[1]
(SCM_RIGHTS) with a JSON result; the program stays loaded as long as the daemon holds it.

Request (JSON on stdin): {"source": str, "function": str | null, "cflags": [str]}
Result (one datagram):   {"ok": true, "function": str} + the fd, or
                         {"ok": false, "code": str, "message": str, "candidates": [str]}
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import sys
from typing import Any

from bcc import BPF, lib  # only this process loads libbcc/LLVM

PR_SET_PDEATHSIG = 1

# A raw_tracepoint program takes `struct bpf_raw_tracepoint_args *`; bcc's
# RAW_TRACEPOINT_PROBE(tp) macro declares `raw_tracepoint__<tp>` with that signature.
_RAW_TP_SIGNATURE = re.compile(r"\b(\w+)\s*\(\s*struct\s+bpf_raw_tracepoint_args\s*\*")
_RAW_TP_MACRO = re.compile(r"\bRAW_TRACEPOINT_PROBE\s*\(\s*(\w+)\s*\)")


class _NoAutoAttach(BPF):
    """bcc attaches kprobe__/raw_tracepoint__* functions as soon as BPF() is built; a handler
    must only be loaded, never attached on its own, so that step is skipped."""

    def _trace_autoload(self) -> None:
        return None


def raw_tp_candidates(source: str, functions: list[str]) -> list[str]:
    declared = set(_RAW_TP_SIGNATURE.findall(source))
    declared |= {f"raw_tracepoint__{tp}" for tp in _RAW_TP_MACRO.findall(source)}
    return [f for f in functions if f in declared]


def _fail(code: str, message: str, candidates: list[str] | None = None) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message, "candidates": candidates or []}


def compile_and_load(request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    source: str = request["source"]
    wanted: str | None = request.get("function")
    try:
        b = _NoAutoAttach(text=source, cflags=list(request.get("cflags", [])))
    except Exception as exc:  # bcc raises bare Exception for a failed compile
        return _fail("compile_error", f"the source does not compile ({exc})"), None

    functions = [lib.bpf_function_name(b.module, i).decode()
                 for i in range(lib.bpf_num_functions(b.module))]
    if wanted is not None:
        if wanted not in functions:
            return _fail("function_not_found", f"no function {wanted!r} in the source",
                         functions), None
        chosen = wanted
    else:
        candidates = raw_tp_candidates(source, functions)
        if len(candidates) != 1:
            what = "no function" if not candidates else "more than one function"
            return _fail("function_ambiguous" if candidates else "function_not_found",
                         f"{what} with the raw-tracepoint signature "
                         "`int NAME(struct bpf_raw_tracepoint_args *ctx)`; choose one with --function",
                         candidates or functions), None
        chosen = candidates[0]

    try:
        fn = b.load_func(chosen, BPF.RAW_TRACEPOINT)
    except Exception as exc:  # bcc raises bare Exception when the verifier refuses
        return _fail("verifier_rejected", f"the kernel refused {chosen!r} ({exc})"), None
    return {"ok": True, "function": chosen}, fn.fd


def _die_with_parent() -> None:
    """A daemon killed with -9 must not leave compiles running behind it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main() -> int:
    _die_with_parent()
    result_sock = socket.socket(fileno=int(sys.argv[1]))
    request = json.loads(sys.stdin.buffer.read())
    result, fd = compile_and_load(request)
    sys.stdout.flush()
    sys.stderr.flush()
    payload = json.dumps(result).encode()
    socket.send_fds(result_sock, [payload], [fd] if fd is not None else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
