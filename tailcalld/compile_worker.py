"""Child process that compiles one handler and loads one program from it.

Why a process of its own: clang's diagnostics, libbpf's messages and the verifier log are
printed on the process's fd 2, which here is a pipe the daemon reads, so nothing has to
redirect the daemon's own stderr; a compile that spins can be killed; and LLVM's memory
goes away with the process.  The loaded program's fd is sent back over the socket given as
fd argv[1] (SCM_RIGHTS) with a JSON result; the program stays loaded while the daemon
holds it.

Request (JSON on stdin):
    {"dialect": "bcc" | "libbpf" | "object", "source": str | null, "object_b64": str | null,
     "function": str | null, "cflags": [str], "include_dirs": [str]}
Result (one datagram):
    {"ok": true, "function": str} + the fd, or
    {"ok": false, "code": str, "message": str, "candidates": [str]}
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tailcalld.bpf_object import BpfObject
from tailcalld.dialects import clang_command
from tailcalld.errors import (CompileError, FunctionAmbiguous, FunctionNotFound, TailcalldError,
                              VerifierRejected)

PR_SET_PDEATHSIG = 1

# A raw_tracepoint program takes `struct bpf_raw_tracepoint_args *`; bcc's
# RAW_TRACEPOINT_PROBE(tp) macro declares `raw_tracepoint__<tp>` with that signature.
_RAW_TP_SIGNATURE = re.compile(r"\b(\w+)\s*\(\s*struct\s+bpf_raw_tracepoint_args\s*\*")
_RAW_TP_MACRO = re.compile(r"\bRAW_TRACEPOINT_PROBE\s*\(\s*(\w+)\s*\)")


def raw_tp_candidates(source: str, functions: list[str]) -> list[str]:
    declared = set(_RAW_TP_SIGNATURE.findall(source))
    declared |= {f"raw_tracepoint__{tp}" for tp in _RAW_TP_MACRO.findall(source)}
    return [f for f in functions if f in declared]


def _fail(err: TailcalldError) -> dict[str, Any]:
    candidates = err.details.get("candidates", []) if isinstance(err.details, dict) else []
    return {"ok": False, "code": err.code, "message": err.message, "candidates": candidates}


def load_with_bcc(request: dict[str, Any]) -> tuple[dict[str, Any], int | None, object]:
    from bcc import BPF, lib  # noqa: PLC0415 - libbcc/LLVM only in workers that need them

    class NoAutoAttach(BPF):  # type: ignore[misc, valid-type]
        """bcc attaches kprobe__/raw_tracepoint__* functions as soon as BPF() is built; a handler
        must only be loaded, never attached on its own, so that step is skipped."""

        def _trace_autoload(self) -> None:
            return None

    source: str = request["source"]
    wanted: str | None = request.get("function")
    try:
        b = NoAutoAttach(text=source, cflags=list(request.get("cflags", [])))
    except Exception as exc:  # bcc raises bare Exception for a failed compile
        return _fail(CompileError(f"the source does not compile ({exc})")), None, None

    functions = [lib.bpf_function_name(b.module, i).decode()
                 for i in range(lib.bpf_num_functions(b.module))]
    if wanted is not None:
        if wanted not in functions:
            return _fail(FunctionNotFound(f"no function {wanted!r} in the source",
                                          {"candidates": functions})), None, b
        chosen = wanted
    else:
        candidates = raw_tp_candidates(source, functions)
        if len(candidates) != 1:
            what = "no function" if not candidates else "more than one function"
            error = FunctionAmbiguous if candidates else FunctionNotFound
            return _fail(error(f"{what} with the raw-tracepoint signature "
                               "`int NAME(struct bpf_raw_tracepoint_args *ctx)`; choose one with --function",
                               {"candidates": candidates or functions})), None, b
        chosen = candidates[0]

    try:
        fn = b.load_func(chosen, BPF.RAW_TRACEPOINT)
    except Exception as exc:  # bcc raises bare Exception when the verifier refuses
        return _fail(VerifierRejected(f"the kernel refused {chosen!r} ({exc})")), None, b
    return {"ok": True, "function": chosen}, fn.fd, b


def compile_with_clang(request: dict[str, Any]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="tailcalld-clang-") as tmp:
        out = Path(tmp) / "handler.bpf.o"
        r = subprocess.run(clang_command(list(request.get("include_dirs", [])), str(out)),
                           input=request["source"].encode(), stderr=sys.stderr, stdout=sys.stderr)
        if r.returncode != 0:
            raise CompileError(f"clang could not compile the source (exit status {r.returncode})")
        return out.read_bytes()


def load_with_libbpf(request: dict[str, Any]) -> tuple[dict[str, Any], int | None, object]:
    try:
        data = (base64.b64decode(request["object_b64"]) if request["dialect"] == "object"
                else compile_with_clang(request))
        obj = BpfObject(data)
    except TailcalldError as err:
        return _fail(err), None, None
    try:
        chosen = obj.choose(request.get("function"))
        fd = obj.load_only(chosen.name)
    except TailcalldError as err:
        return _fail(err), None, obj
    return {"ok": True, "function": chosen.name}, fd, obj


def compile_and_load(request: dict[str, Any]) -> tuple[dict[str, Any], int | None, object]:
    """(result, program fd, what must stay open until the fd is sent)."""
    if request.get("dialect", "bcc") == "bcc":
        return load_with_bcc(request)
    return load_with_libbpf(request)


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
    result, fd, _keep = compile_and_load(request)
    sys.stdout.flush()
    sys.stderr.flush()
    payload = json.dumps(result).encode()
    socket.send_fds(result_sock, [payload], [fd] if fd is not None else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
