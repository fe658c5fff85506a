"""Child process that compiles one handler and loads one program from it.

Why a process of its own: clang's diagnostics, libbpf's messages and the verifier log are
printed on the process's fd 2, which here is a pipe the daemon reads, so nothing has to
redirect the daemon's own stderr; a compile that spins can be killed; and LLVM's memory
goes away with the process.  The loaded program's fd is sent back over the socket given as
fd argv[1] (SCM_RIGHTS) with a JSON result; the program stays loaded while the daemon
holds it.

The worker runs confined (tailcalld/confine.py: Landlock, so that no `#include` spelling
reaches a file outside the folders a compile needs), in the compile's own folder, with limits
on address space (compile_memory_max) and CPU time; the daemon kills its whole process group
(clang included) when it is done or out of time, and removes the folder.

Request (JSON on stdin):
    {"dialect": "bcc" | "libbpf" | "object", "source": str | null, "object_b64": str | null,
     "function": str | null, "cflags": [str], "include_dirs": [str], "pin_root": str | null,
     "channel": {"events": str, "counts": str, "call": str} | null, "tag": int,
     "headers": {name: text} | null, "variables": {name: value} (--set), "object_name": str,
     "work_dir": str, "memory_max": int, "cpu_seconds": int, "max_map_bytes": int,
     "want_product": bool, "cached": product | null}
    ``cached``: the object an earlier libbpf compile produced (tailcalld/products.py), loaded
    instead of compiling the source; ``want_product``: a compile's result carries its product.
Result: written to work_dir/result.json (any size), the fd (if any) sent as one datagram:
    {"ok": true, "function": str, "product": product (when asked and possible)}, or
    {"ok": false, "code": str, "message": str, "candidates": [str]}
Usage: python -m tailcalld.compile_worker RESULT_FD PARENT_PID [bcc|libbpf]
    (the kind is a worker started ahead of its request, tailcalld/spares.py: bcc's imports
    bcc while it waits)
"""

from __future__ import annotations

import ast
import base64
import ctypes
import dataclasses
import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tailcalld import bpfsys, confine, mapbudget, products
from tailcalld.bpf_object import BpfObject
from tailcalld.dialects import PCH_REFUSED, clang_command, header_name_problem
from tailcalld.diagnostics import verifier_verdict
from tailcalld.errors import (CompileError, CompileOutOfMemory, CompilerCrashed, FunctionAmbiguous, FunctionNotFound,
                              MapError, TailcalldError, VerifierRejected, WrongProgramType)

RESULT_FILE = "result.json"
HEADERS_DIR = "local-headers"  # the source's local headers, on the include path (see write_headers)
STDERR_COPY = "stderr.log"  # what libbcc/libbpf print while the worker watches (see stderr_copy)
# Made as soon as the request is read: a worker that ends without it never began the compile
# (a worker started ahead and killed while idle, see compiler._run_in).
REQUEST_READ = "request-read"
# What LLVM, libstdc++, Python and libc say when an allocation fails (RLIMIT_AS reached).
OUT_OF_MEMORY = re.compile(r"out of memory|std::bad_alloc|MemoryError|Cannot allocate memory", re.IGNORECASE)
# How bcc and libbpf say that a map could not be created (before any program is verified).
_MAP_FAILED = re.compile(r"could not open bpf map: .*|map '[^']*': failed to create.*")
# bcc's words when it may not reopen a pinned map by id (BPF_MAP_GET_FD_BY_ID: CAP_SYS_ADMIN).
_PINNED_BY_ID = re.compile(r"could not open bpf map: .*Operation not permitted")
PR_SET_PDEATHSIG = 1
# clang's first error, without its place (the log that follows the message has it).
_FIRST_ERROR = re.compile(r"\berror: (.+)$", re.MULTILINE)
# The verifier log a failed load asks for.  A longer log keeps its end (the kernel's log rotates,
# 6.4 and later), which is where the verdict is: a program too large to verify writes hundreds
# of MiB, which neither the pipe to the daemon nor a person needs.
VERIFIER_LOG_BYTES = 1 << 20
# What bcc prints on E2BIG instead of any log: the instructions it counts are the program's, not
# the million the verifier walked, and 4096 is no limit of this kernel (see load_bcc_function).
_BCC_TOO_LARGE = re.compile(rb"^bpf: Argument list too long\. Program .* too large \(\d+ insns\), at most \d+ insns\n\n?",
                            re.MULTILINE)

# A raw_tracepoint program takes `struct bpf_raw_tracepoint_args *`; bcc's
# RAW_TRACEPOINT_PROBE(tp) macro declares `raw_tracepoint__<tp>` with that signature.
# `void *ctx` is accepted too: many handlers never look at the context.
_RAW_TP_SIGNATURE = re.compile(r"\b(\w+)\s*\(\s*(?:struct\s+bpf_raw_tracepoint_args|void)\s*\*\s*\w*\s*\)")
_RAW_TP_MACRO = re.compile(r"\bRAW_TRACEPOINT_PROBE\s*\(\s*(\w+)\s*\)")
# bcc gives these prefixes (its macros write them: TRACEPOINT_PROBE makes tracepoint__cat__event,
# KFUNC_PROBE kfunc__vmlinux__fn) to programs of other types, which it attaches by the name.
# Tail-called from sys_enter they would run with a raw_tp context they do not expect: a
# TRACEPOINT_PROBE's args->uid reads past the two raw_tp arguments.
BCC_TYPE_PREFIXES = {"kprobe__": "kprobe", "kretprobe__": "kretprobe", "tracepoint__": "tracepoint",
                     "kfunc__": "fentry (KFUNC_PROBE)", "kretfunc__": "fexit (KRETFUNC_PROBE)",
                     "kmod_ret__": "fmod_ret", "lsm__": "LSM"}


# The bcc macros that declare such programs: refused before the compile, which for
# TRACEPOINT_PROBE could not even succeed (bcc reads the event's format from tracefs).
_OTHER_TYPE_MACRO = re.compile(r"^[ \t]*(TRACEPOINT_PROBE|KFUNC_PROBE|KRETFUNC_PROBE|KMOD_RET|LSM_PROBE)\s*\(([^)]*)\)",
                               re.MULTILINE)
_MACRO_TYPES = {"TRACEPOINT_PROBE": "tracepoint", "KFUNC_PROBE": "fentry", "KRETFUNC_PROBE": "fexit",
                "KMOD_RET": "fmod_ret", "LSM_PROBE": "LSM"}


def other_type_macro(source: str) -> WrongProgramType | None:
    """The first bcc macro in ``source`` that declares a program of another type, as the error."""
    found = _OTHER_TYPE_MACRO.search(source)
    if found is None:
        return None
    line = source.count("\n", 0, found.start()) + 1
    return WrongProgramType(
        f"line {line}: {found[1]}({found[2].strip()}) declares a {_MACRO_TYPES[found[1]]} program; the dispatcher can "
        "only tail-call raw_tracepoint programs: `int NAME(struct bpf_raw_tracepoint_args *ctx)` or "
        "RAW_TRACEPOINT_PROBE(sys_enter)", {"line": line})


def bcc_program_type(function: str) -> str | None:
    """The program type bcc gives ``function`` by its name; None for a raw_tracepoint one."""
    return next((kind for prefix, kind in BCC_TYPE_PREFIXES.items() if function.startswith(prefix)), None)


def raw_tp_candidates(source: str, functions: list[str]) -> list[str]:
    declared = set(_RAW_TP_SIGNATURE.findall(source))
    declared |= {f"raw_tracepoint__{tp}" for tp in _RAW_TP_MACRO.findall(source)}
    return [f for f in functions if f in declared and bcc_program_type(f) is None]


def _with_types(functions: list[str]) -> list[str]:
    return [f"{f} ({bcc_program_type(f) or 'raw_tracepoint'})" for f in functions]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _fail(err: TailcalldError) -> dict[str, Any]:
    candidates = err.details.get("candidates", []) if isinstance(err.details, dict) else []
    return {"ok": False, "code": err.code, "message": err.message, "candidates": candidates}


class Said:
    """What a block printed on fd 2, readable once the block is over."""

    text = ""


@contextmanager
def stderr_copy(work_dir: Path, edit: Callable[[bytes], bytes] | None = None) -> Iterator[Said]:
    """Keep a copy of what libbcc, LLVM and libbpf print on fd 2 inside the block (they write to
    the fd directly), and pass it on to the real fd 2 afterwards, so the daemon still gets it:
    the copy is how a map the kernel refused is told apart from a compile error.  The copy is a
    file in the compile's folder, so that the daemon can read it when the block never ends (an
    abort at the memory limit).  ``edit`` rewrites what was said before it is passed on."""
    said = Said()
    sys.stderr.flush()
    saved = os.dup(2)
    path = work_dir / STDERR_COPY
    with path.open("w+b") as copy:
        os.dup2(copy.fileno(), 2)
        try:
            yield said
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            copy.seek(0)
            data = copy.read() if edit is None else edit(copy.read())
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
            said.text = data.decode(errors="replace")
    path.unlink()


def _map_failure(said: Said) -> MapError | None:
    match = _MAP_FAILED.search(said.text)
    if match is None:
        return None
    message = f"the kernel refused to create a map: {match.group(0).strip()}"
    if _PINNED_BY_ID.search(match.group(0)):
        message += ("; when that map is pinned already (BPF_TABLE_PINNED), libbcc opens it by its id, which needs "
                    "CAP_SYS_ADMIN, and tailcalld runs without it (see README, Privileges)")
    return MapError(message)


def _bcc_maps(b: Any) -> list[mapbudget.MapSpec]:
    """The maps bcc created for the module, as the kernel has them."""
    from bcc import lib  # noqa: PLC0415 - libbcc/LLVM only in workers that need them

    lib.bpf_num_tables.argtypes, lib.bpf_num_tables.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.bpf_table_fd_id.argtypes, lib.bpf_table_fd_id.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    specs = []
    for i in range(lib.bpf_num_tables(b.module)):
        fd = lib.bpf_table_fd_id(b.module, i)
        if fd >= 0:
            m = bpfsys.map_info(fd)
            specs.append(mapbudget.MapSpec(m.name, m.type, m.key_size, m.value_size, m.max_entries))
    return specs


def load_with_bcc(request: dict[str, Any], work_dir: Path) -> tuple[dict[str, Any], int | None, object]:
    from bcc import BPF, lib  # noqa: PLC0415 - libbcc/LLVM only in workers that need them

    class NoAutoAttach(BPF):  # type: ignore[misc, valid-type]
        """bcc attaches kprobe__/raw_tracepoint__* functions as soon as BPF() is built; a handler
        must only be loaded, never attached on its own, so that step is skipped."""

        def _trace_autoload(self) -> None:
            return None

    source: str = request["source"]
    wanted: str | None = request.get("function")
    if (wrong := other_type_macro(source)) is not None:
        return _fail(wrong), None, None
    try:
        source, formats = number_printfs(source)
        cflags = [*request.get("cflags", []), *channel_cflags(request),
                  *format_cflags(formats, request.setdefault("_frozen", {}))]
    except TailcalldError as err:
        return _fail(err), None, None
    with stderr_copy(work_dir) as said:
        try:
            b = NoAutoAttach(text=source, cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for a failed compile
            b, failure = None, exc
    mark(request, "compile")  # bcc's BPF(): its clang passes, and the maps it creates
    if b is None:
        return _fail(_map_failure(said) or CompileError(f"the source does not compile ({failure})")), None, None
    # bcc creates the maps while it compiles, so this refuses them just after: the worker's
    # exit frees them.  (libbpf's are checked before they are created.)
    try:
        mapbudget.check(_bcc_maps(b), request["max_map_bytes"], bpfsys.num_possible_cpus())
    except TailcalldError as err:
        return _fail(err), None, b

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
                               "`int NAME(struct bpf_raw_tracepoint_args *ctx)`; choose one with --function "
                               f"({', '.join(_with_types(candidates or functions))})",
                               {"candidates": candidates or functions})), None, b
        chosen = candidates[0]
    kind = bcc_program_type(chosen)
    if kind is not None:
        return _fail(WrongProgramType(
            f"{chosen} is a {kind} program (bcc names it so and would attach it as one); the dispatcher can "
            "only tail-call raw_tracepoint programs: `int NAME(struct bpf_raw_tracepoint_args *ctx)` or "
            f"RAW_TRACEPOINT_PROBE(sys_enter); in this source: {', '.join(_with_types(functions))}",
            {"candidates": raw_tp_candidates(source, functions)})), None, b

    try:
        fd = load_bcc_function(b, chosen, work_dir)
    except VerifierRejected as err:
        return _fail(err), None, b
    result: dict[str, Any] = {"ok": True, "function": chosen}
    if request.get("want_product") and products.channel_fixed(request.get("channel_fds")) \
            and not _PINNED_TABLE.search(source):
        fname = chosen.encode()
        insns = ctypes.string_at(lib.bpf_function_start(b.module, fname), lib.bpf_function_size(b.module, fname))
        product = products.insns_product(insns, lib.bpf_module_license(b.module), request.get("_frozen", {}))
        if product is not None:
            result["product"] = product
    return result, fd, b


# A bcc table opened from a pin (BPF_TABLE_PINNED) is shared with whoever pinned it: a load from
# the compile cache would make a map of its own instead, so such handlers are compiled each time.
_PINNED_TABLE = re.compile(r"\bBPF_\w*PINNED\w*\s*\(")


def load_bcc_function(b: Any, name: str, work_dir: Path) -> int:
    """bcc's BPF.load_func as a raw_tracepoint program, with a verifier log of bounded size
    (bcc's own grows until the whole log fits), and with the log when the kernel says E2BIG
    (the verifier walked a million instructions), where bcc prints only "Program too large
    (29 insns)".  Raises VerifierRejected saying what the verifier said."""
    from bcc import BPF, lib  # noqa: PLC0415 - libbcc/LLVM only in workers that need them

    fname = name.encode()
    log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    load = (b.module, BPF.RAW_TRACEPOINT, fname, lib.bpf_function_start(b.module, fname),
            lib.bpf_function_size(b.module, fname), lib.bpf_module_license(b.module),
            lib.bpf_module_kern_version(b.module))
    with stderr_copy(work_dir, edit=lambda said: _BCC_TOO_LARGE.sub(b"", said) if log.value else said) as said:
        # log_level 0 first, as bcc does: a log slows the verifier, and most loads succeed.
        fd = lib.bcc_func_load(*load, 0, log, len(log), None, -1)
        failure = ctypes.get_errno()
        if fd < 0 and failure == errno.E2BIG:  # bcc asked for no log: ask again, with one
            lib.bcc_func_load(*load, 1, log, len(log), None, -1)
            sys.stderr.buffer.write(log.value + b"\n")
            sys.stderr.flush()
    if fd >= 0:
        return int(fd)
    raise refused(name, said.text, os.strerror(failure))


def refused(name: str, log: str, otherwise: str) -> VerifierRejected:
    """The kernel's refusal of ``name``, saying what the verifier said in ``log`` (which follows
    the message), or ``otherwise`` when the log has no verdict."""
    verdict = verifier_verdict(log)
    return VerifierRejected(f"the kernel refused {name!r}: {verdict}; the verifier's log is below" if verdict
                            else f"the kernel refused {name!r} ({otherwise})")


def run_clang(request: dict[str, Any], out: Path) -> subprocess.CompletedProcess[bytes]:
    """clang on the source, with the precompiled vmlinux.h the daemon passed (pch.py) when there
    is one; when clang refuses that PCH, again without it, and the result says so
    (``pch_refused``: the daemon drops it).  What clang said of the PCH is not passed on."""
    def clang(pch: str | None) -> subprocess.CompletedProcess[bytes]:
        cmd = clang_command(list(request.get("include_dirs", [])), str(out),
                            [*request.get("cflags", []), *channel_cflags(request)], pch)
        return subprocess.run(cmd, input=request["source"].encode(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    pch = request.get("pch")
    r = clang(pch)
    if pch is not None and r.returncode != 0 and PCH_REFUSED.search(r.stdout.decode(errors="replace")):
        request["pch_refused"] = True
        r = clang(None)
    return r


def compile_with_clang(request: dict[str, Any], work_dir: Path) -> bytes:
    out = work_dir / "handler.bpf.o"
    r = run_clang(request, out)
    sys.stderr.buffer.write(r.stdout)
    sys.stderr.flush()
    if r.returncode != 0:
        if OUT_OF_MEMORY.search(r.stdout.decode(errors="replace")):
            raise CompileOutOfMemory("clang ran out of memory: the compile needs more than compile_memory_max "
                                     f"({request['memory_max'] >> 20} MiB)")
        if r.returncode < 0:
            raise CompilerCrashed(f"clang was killed by {signal_name(-r.returncode)}")
        first = _FIRST_ERROR.search(r.stdout.decode(errors="replace"))
        said = f": {first[1].strip()}" if first else ""
        raise CompileError(f"clang could not compile the source (exit status {r.returncode}){said}")
    return out.read_bytes()


def load_with_libbpf(request: dict[str, Any], work_dir: Path) -> tuple[dict[str, Any], int | None, object]:
    try:
        cached = request.get("cached")
        data = (base64.b64decode(request["object_b64"]) if request["dialect"] == "object"
                else base64.b64decode(cached["object_b64"]) if cached is not None
                else compile_with_clang(request, work_dir))
        mark(request, "compile")
        obj = BpfObject(data, request.get("pin_root"), request.get("object_name"))
    except TailcalldError as err:
        return _fail(err), None, None
    try:
        obj.set_globals(request.get("variables", {}))
        chosen = obj.choose(request.get("function"))
        mapbudget.check(obj.maps(), request["max_map_bytes"], bpfsys.num_possible_cpus())
        with stderr_copy(work_dir) as said:
            try:
                fd = obj.load_only(chosen.name, VERIFIER_LOG_BYTES)
            except VerifierRejected as err:
                failure: TailcalldError = err
                fd = -1
                sys.stderr.write(f"-- BEGIN PROG LOAD LOG --\n{obj.verifier_log()}-- END PROG LOAD LOG --\n")
                sys.stderr.flush()
        if fd < 0:
            if verifier_verdict(said.text):
                failure = refused(chosen.name, said.text, failure.message)
            return _fail(_map_failure(said) or failure), None, obj
    except TailcalldError as err:
        return _fail(err), None, obj
    result: dict[str, Any] = {"ok": True, "function": chosen.name}
    btf = obj.btf()
    if btf is not None:
        result["btf_b64"] = base64.b64encode(btf).decode()
    if request.get("want_product") and request["dialect"] == "libbpf" and request.get("cached") is None \
            and products.channel_fixed(request.get("channel_fds")):
        result["product"] = {"kind": "elf", "object_b64": base64.b64encode(data).decode()}
        loaded = _loaded_insns(obj, chosen.name, data, request)
        if loaded is not None:
            result["product"]["insns"] = loaded | {"btf_b64": result.get("btf_b64")}
    return result, fd, obj


def _loaded_insns(obj: BpfObject, name: str, data: bytes, request: dict[str, Any]) -> dict[str, Any] | None:
    """What libbpf handed the kernel for ``name`` (products.insns_product), and what it was
    made with: the function asked for and the --set values.  None for an object whose maps are
    pinned by name (a load must find those pins), or when libbpf kept no instructions."""
    insns, license = obj.loaded_insns(name), products.elf_license(data)
    if obj.pins_maps() or insns is None or license is None:
        return None
    product = products.insns_product(insns, license, {})
    if product is None:
        return None
    return product | {"kind": "libbpf", "function": name, "requested": request.get("function"),
                      "variables": request.get("variables", {})}


def compile_and_load(request: dict[str, Any], work_dir: Path) -> tuple[dict[str, Any], int | None, object]:
    """(result, program fd, what must stay open until the fd is sent)."""
    if request.get("dialect", "bcc") == "bcc":
        return load_with_bcc(request, work_dir)
    return load_with_libbpf(request, work_dir)


def _die_with_parent(parent: int) -> None:
    """A daemon killed with -9 must not leave compiles running behind it.  The daemon passes its
    pid: getppid() == 1 cannot mean "the parent died" when the daemon itself is PID 1 (in a
    container)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def open_channel(request: dict[str, Any]) -> None:
    """Open the event channel's pinned maps (before Landlock: bpffs is outside the ruleset),
    for the handler's tailcalld.h to reach by fd (TC_EVENTS_FD...).  They stay open for the
    worker's life: the fd numbers are written into the program, and the load resolves them."""
    channel = request.get("channel")
    if not channel:
        return
    try:
        # At the same numbers in every worker (products.CHANNEL_FDS): they are compiled in.
        request["channel_fds"] = {name: products.fixed_fd(bpfsys.obj_get(path), products.CHANNEL_FDS.get(name, -1))
                                  for name, path in channel.items()}
    except OSError as exc:  # unpinned behind the daemon's back: it pins them again within miss_log_interval
        print(f"tailcalld: the event channel is not reachable ({exc}); TC_PRINTF and TC_EMIT cannot compile "
              "until the daemon has pinned it again", file=sys.stderr)


def channel_cflags(request: dict[str, Any]) -> list[str]:
    fds = request.get("channel_fds")
    if not fds:
        return []
    return [f"-DTC_EVENTS_FD={fds['events']}", f"-DTC_COUNTS_FD={fds['counts']}", f"-DTC_CALL_FD={fds['call']}",
            f"-DTC_TAG={int(request.get('tag', 0)):#x}"]


# bcc has no read-only data, and bpf_snprintf() takes its format from a frozen map only: each
# TC_PRINTF(ctx, "literal", ...) of the source is numbered, on its own line, and its format put
# in that map at the number (tailcalld.h's __TC_PRINTF_AT).
_PRINTF_CALL = re.compile(r'\bTC_PRINTF\s*\(\s*([^,()]+?)\s*,\s*((?:"(?:[^"\\\n]|\\.)*"\s*)+)')
_LITERAL = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
FORMAT_SLOT = 256  # bytes per format in the map: tailcalld.h's __TC_FMT_SLOT
MAX_FORMATS = 64


def number_printfs(source: str) -> tuple[str, list[bytes]]:
    """The source with each TC_PRINTF numbered, and the formats in number order."""
    formats: list[bytes] = []

    def numbered(match: re.Match[str]) -> str:
        line = source.count("\n", 0, match.start()) + 1
        try:
            text = b"".join(ast.literal_eval(f'b"{piece}"') for piece in _LITERAL.findall(match[2]))
        except (ValueError, SyntaxError):
            raise CompileError(f"line {line}: the TC_PRINTF format must be plain ASCII text") from None
        if len(text) >= FORMAT_SLOT:
            raise CompileError(f"line {line}: the TC_PRINTF format is {len(text)} bytes; at most {FORMAT_SLOT - 1}")
        if len(formats) == MAX_FORMATS:
            raise CompileError(f"line {line}: more than {MAX_FORMATS} TC_PRINTF calls in one handler")
        formats.append(text)
        return f"__TC_PRINTF_AT({len(formats) - 1}, {match[1]}, {match[2]}"

    return _PRINTF_CALL.sub(numbered, source), formats


def format_cflags(formats: list[bytes], made: dict[int, bytes] | None = None) -> list[str]:
    """The -D that names the formats' map, made here; ``made`` gets its fd and contents (a
    product describes it: products.insns_product)."""
    if not formats:
        return []
    value = b"".join(f.ljust(FORMAT_SLOT, b"\0") for f in formats)
    fd = bpfsys.frozen_array("tailcalld_fmt", value)
    if made is not None:
        made[fd] = value
    return [f"-DTC_FMT_FD={fd}"]


def _prepare(request: dict[str, Any], work_dir: Path) -> None:
    """Limits, the compile's own folder, and Landlock: all before any source is looked at.
    clang inherits every one of them."""
    memory, cpu = request["memory_max"], request["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # A backstop for a clang orphaned by a daemon killed with -9 (the group kill never came).
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort at the memory limit dumps no 2 GiB core
    os.chdir(work_dir)
    os.environ["TMPDIR"] = str(work_dir)  # clang's own temporary files
    bpfsys.num_possible_cpus()  # read (and cached) while /sys is still readable
    # Listed at the end (program_maps), when Landlock refuses to open the folder.
    request["_fd_folder"] = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    open_channel(request)
    include_dirs = [*request.get("include_dirs", []),
                    *(flag[2:] for flag in request.get("cflags", []) if flag.startswith("-I"))]
    confine.restrict(confine.compile_ruleset(include_dirs, work_dir, reuses_pins=bool(request.get("pin_root"))))


def write_headers(request: dict[str, Any], work_dir: Path) -> None:
    """The source's local headers, under the compile's own folder by the names the source
    includes them by, and that folder first on the include path (bcc and clang alike), as the
    source's own folder would be.  Each name was checked (dialects.header_name_problem); the
    files are new (O_EXCL) in a folder only this compile has."""
    headers: dict[str, str] = request.get("headers") or {}
    if not headers:
        return
    root = work_dir / HEADERS_DIR
    for name, text in headers.items():
        if header_name_problem(name) is not None:
            raise ValueError(f"local header name {name!r}")  # the daemon refused it already
        path = root / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    key = "cflags" if request.get("dialect", "bcc") == "bcc" else "include_dirs"
    request[key] = [f"-I{root}" if key == "cflags" else str(root), *request.get(key, [])]


def program_maps(fd: int, fd_folder: int | None = None) -> list[dict[str, Any]]:
    """The maps the loaded program uses, as the kernel has them (`tailcallctl show`): the worker
    holds an fd of each (bcc's and libbpf's own, the event channel's it was passed), the daemon
    only the program's, and nobody may open a map by its id.  A failure costs only this list."""
    try:
        held = bpfsys.held_maps(fd_folder=fd_folder)
        return [dataclasses.asdict(held[i]) for i in bpfsys.prog_map_ids(fd) if i in held]
    except OSError:
        return []


def _write_result(work_dir: Path, result: dict[str, Any]) -> None:
    """A file, not the datagram: a result has no size limit (1500 candidate functions, say).
    Renamed into place, so the daemon never reads half of one."""
    tmp = work_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, work_dir / RESULT_FILE)


def mark(request: dict[str, Any], step: str) -> None:
    """The time ``step`` ended (CLOCK_MONOTONIC: the daemon's clock too), for the result's
    ``steps``: where a compile's time goes (BENCHMARKS.md)."""
    request.setdefault("_steps", {})[step] = time.monotonic()


def main() -> int:
    result_sock = socket.socket(fileno=int(sys.argv[1]))
    _die_with_parent(int(sys.argv[2]))
    if sys.argv[3:] == ["bcc"]:  # a worker started ahead for bcc (spares.py): libbcc and LLVM now, not on the clock
        from bcc import BPF  # noqa: F401, PLC0415
    request = json.loads(sys.stdin.buffer.read())
    request["_steps"] = {"imported": time.monotonic()}  # the request came: what the worker did before is done
    work_dir = Path(request["work_dir"])
    (work_dir / REQUEST_READ).touch()
    write_headers(request, work_dir)
    _prepare(request, work_dir)
    mark(request, "prepared")
    result, fd, _keep = compile_and_load(request, work_dir)
    mark(request, "loaded")
    if fd is not None:
        result["maps"] = program_maps(fd, request.get("_fd_folder"))
    result["steps"] = request["_steps"]
    if request.get("pch_refused"):
        result["pch_refused"] = True
    sys.stdout.flush()
    sys.stderr.flush()
    _write_result(work_dir, result)
    socket.send_fds(result_sock, [b"result"], [fd] if fd is not None else [])
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the interpreter's and LLVM's teardown would only delay the daemon, which
    # waits for the end of the output and kills the group anyway.
    os._exit(code)
