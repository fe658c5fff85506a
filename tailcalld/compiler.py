"""Compiling and loading BPF programs without blocking (or endangering) the daemon.

Each load runs ``tailcalld.compile_worker`` in a child process of its own process group, in
a folder of its own: the event loop only waits on pipes, clang's diagnostics and the verifier
log arrive on the child's stderr, and when the worker is done or runs past
``compile_timeout`` the whole group (clang included) is killed and the folder removed.  The
worker confines itself (Landlock) and limits its memory (``compile_memory_max``).  The
program fd comes back over a socketpair (SCM_RIGHTS), the result as a file in the folder.
The worker is started before its request comes (spares.py), and libbpf compiles read a
precompiled vmlinux.h when there is one (pch.py); each load's steps are timed (Program.steps).

tailcalld's own dispatcher is compiled here too (``build_object``), by clang alone: its source
is ours, so no worker and no Landlock, but the same folder, time bound and group kill.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import logging
import math
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from . import bpfsys, children, confine, dialects, headers, pch, products, program_cache, spares
from .bpf_object import object_name
from .compile_worker import (HEADERS_DIR, OUT_OF_MEMORY, REQUEST_READ, RESULT_FILE, STDERR_COPY, VERIFIER_LOG_BYTES,
                             signal_name)
from .config import LiveSettings
from .diagnostics import name_the_file
from .dialects import Artifact, Dialect
from .errors import (BadRequest, CompileError, CompileOutOfMemory, CompilerCrashed, CompileTimeout, ForbiddenInclude,
                     MapTooLarge, StateUnwritable, TailcalldError, error_class)
from .loader_settings import Settings, define_flags

logger = logging.getLogger("tailcalld")

# Diagnostics can be huge (a template error repeated per instantiation, a verifier log of a
# program too large to verify); keep the head (clang's first errors) and the tail (the
# verifier's verdict and statistics).
MAX_DIAGNOSTICS = 64 * 1024
DIAGNOSTICS_TAIL = 48 * 1024
# Free space a compile folder needs at least, checked before a worker starts: below it, a compile
# could only fail later, less clearly (a full disk); clang's objects and results are tens of KiB.
MIN_COMPILE_ROOM = 64 << 10

_INCLUDE = re.compile(r"^\s*#\s*(?:include|include_next|import)\b\s*(.*)$", re.MULTILINE)
_INCLUDE_TARGET = re.compile(r'^[<"]([^>"]+)[>"]')
# An error the compiler reports on its way out: clang's "error: ...", LLVM's backend as
# "error: FILE:LINE:COL: in function NAME TYPE: what" or "LLVM ERROR: what"; only the what is kept.
_FATAL_COMPILER_ERROR = re.compile(r"^(?:.*?\berror: (?:.*?: in function .*?\): )?|LLVM ERROR: )(?P<what>.+)$",
                                   re.MULTILINE)
# Refusals of a load from the compile cache that compiling would repeat word for word: the
# handler's own (a function not in it, a --set it has no global for), not the entry's.
_HANDLER_FAULTS = frozenset({"function_not_found", "function_ambiguous", "wrong_program_type", "invalid_setting",
                             "map_too_large"})
# What the preprocessor removes before it sees a directive: comments, backslash-newlines.
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


def _as_preprocessor_sees_it(source: str) -> str:
    """Undo the spellings that hide a directive from a line-by-line look: `%:` (the digraph of
    `#`), `#/**/include`, a backslash-newline inside the word."""
    joined = source.replace("\\\r\n", "").replace("\\\n", "")
    return _COMMENT.sub(" ", joined).replace("%:", "#")


def check_text(source: str) -> None:
    """bcc hands the source to clang as a C string: a NUL byte would silently end it there, and
    a handler with its second half missing can still compile and attach."""
    at = source.find("\0")
    if at >= 0:
        raise BadRequest(f"the source has a NUL byte (line {source.count(chr(10), 0, at) + 1}); a C source is "
                         "text, and the compiler would silently drop everything after it", {"offset": at})


def check_includes(source: str) -> None:
    """Refuse #include of absolute paths, of '..', and computed includes, with an error that
    says why.  This is the friendly first line only: the worker's Landlock confinement is what
    keeps clang (which echoes lines it cannot parse) from reading files outside the headers,
    whatever the spelling."""
    for match in _INCLUDE.finditer(_as_preprocessor_sees_it(source)):
        target = _INCLUDE_TARGET.match(match.group(1).strip())
        if target is None:
            raise ForbiddenInclude(f"computed #include is not allowed: {match.group(0).strip()[:120]!r}")
        path = target.group(1)
        if path.startswith("/") or ".." in path.split("/"):
            raise ForbiddenInclude(f"#include {path!r} is not allowed: only kernel and BPF headers "
                                   "(relative paths without '..')", {"include": path})


def check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The local headers of a source, held to the rules of its own text and includes, by name
    (a header with `#include "../x.h"` is refused as the source would be).  Their names were
    checked on the wire; again here, since a restore reads them from the state folder."""
    for name, text in headers.items():
        problem = dialects.header_name_problem(name)
        if problem is not None:
            raise ForbiddenInclude(f"local header name {name!r} is not allowed: {problem}", {"header": name})
        try:
            check_text(text)
            check_includes(text)
        except (BadRequest, ForbiddenInclude) as err:
            raise type(err)(f"in the local header {name}: {err.message}", err.details) from None
    return dict(headers)


class Program:
    """A loaded program and the one fd of ours that holds it.  The kernel keeps a program
    while any fd or map slot refers to it, so whoever owns a Program closes it exactly once
    (closing twice is a no-op: a recycled fd number must never be closed by mistake)."""

    def __init__(self, fd: int, id: int, function: str, insns: int, log: str = "", btf: bytes | None = None,
                 warnings: tuple[str, ...] = (), maps: tuple[bpfsys.MapInfo, ...] = (),
                 steps: Mapping[str, float] | None = None, from_cache: bool = False) -> None:
        self._fd: int | None = fd
        self.id = id
        self.function = function
        self.insns = insns
        self.log = log  # what the compiler and loader said on the way (warnings)
        self.btf = btf  # the handler's own BTF (libbpf): how its TC_EMIT structs are decoded
        self.warnings = warnings  # tailcalld's own about the handler (headers.header_warning)
        self.maps = maps  # the maps it uses, as the compile worker saw them when it loaded it
        self.steps = dict(steps or {})  # seconds of each step of its compile and load (worker_steps)
        self.from_cache = from_cache  # loaded from the compile cache (program_cache.py), not compiled

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"program {self.id} ({self.function}) is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def dup(self) -> Program:
        """Another owner of the same program (a warm attach: no compile, no load)."""
        return Program(os.dup(self.fd), self.id, self.function, self.insns, self.log, self.btf, self.warnings,
                       self.maps)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def bpf_include_dir() -> str:
    return str(resources.files("tailcalld.bpf"))


def bpf_source(name: str) -> str:
    return resources.files("tailcalld.bpf").joinpath(name).read_text()


class Compiler:
    def __init__(self, settings: LiveSettings, max_parallel: int | None = None, cache_dir: Path | None = None,
                 work_root: Path | None = None,
                 observe: Callable[[str, float], None] = lambda dialect, seconds: None) -> None:
        self._settings = settings  # compile_timeout and the limits are live: read at each compile
        self._observe = observe  # (dialect, seconds) of every compile and load, failed or not (metrics)
        # Each compile is ~0.5 s of one CPU; more at once than cores only adds latency.
        self._parallel_compiles = asyncio.Semaphore(max_parallel or len(os.sched_getaffinity(0)))
        self._cache_dir = cache_dir or Path(tempfile.gettempdir()) / "tailcalld-cache"
        self.cache = program_cache.ProgramCache(self._cache_dir / "programs",
                                                lambda: self._settings.current.compile_cache_bytes)
        self._vmlinux: Path | None = None  # the folder vmlinux_header gave (the BTF is the kernel's: it stays)
        self._vmlinux_lock = asyncio.Lock()
        self.precompiled = pch.Precompiled(lambda: self._settings.current.compile_timeout)
        self._spares = spares.Spares(self._compile_root)
        # One folder per compile beneath this one (None: the system's temp folder).
        self._work_root = work_root
        # The event channel's pins (events.py), which handlers reach by fd: None without one.
        self.channel: dict[str, str] | None = None
        if confine.abi_version() == 0:
            logger.warning("this kernel has no Landlock: compiles run unconfined, and only the #include "
                           "check keeps handler sources from reading files outside the kernel headers")

    def remove_leftovers(self) -> None:
        """Remove the compile folders a daemon killed mid-compile left behind.  Only for the
        daemon that owns the pins: another one may be compiling in them otherwise."""
        if self._work_root is not None:
            shutil.rmtree(self._work_root, ignore_errors=True)

    async def load(self, source: str | None = None, function: str | None = None, cflags: Sequence[str] = (),
                   dialect: Dialect = "bcc", object_bytes: bytes | None = None, pin_root: Path | None = None,
                   filename: str | None = None, headers: Mapping[str, str] | None = None, tag: int = 0,
                   variables: Settings = (), defines: Settings = ()) -> Program:
        """Compile ``source`` (bcc or libbpf C) or take ``object_bytes`` (a BPF ELF object), and
        load ``function`` (or the only raw_tp program) as a raw_tracepoint program.  Maps that
        libbpf pins by name go under ``pin_root``.  Raises CompileError, VerifierRejected,
        FunctionNotFound, FunctionAmbiguous, WrongProgramType, MapTooLarge, MapError,
        CompileTimeout, CompileOutOfMemory or CompilerCrashed, each with the worker's output
        (clang, libbpf, verifier) as details, in which the source is called ``filename``.
        ``headers``: the local headers the source includes in quotes, by name (see check_headers).
        ``tag``: what the handler's events are stamped with (tailcalld.h's TC_TAG).
        ``variables`` (--set) are written into the object's globals before the load (libbpf and
        objects; InvalidSetting when one cannot be), ``defines`` (-D) go to the compiler."""
        request: dict[str, object] = {"dialect": dialect, "function": function, "channel": self.channel, "tag": tag}
        if dialect == "object":
            assert object_bytes is not None
            request["object_b64"] = base64.b64encode(object_bytes).decode()
        else:
            assert source is not None
            check_text(source)
            check_includes(source)
            request["source"] = source
            if headers:
                request["headers"] = check_headers(headers)
        if dialect == "bcc":
            request["cflags"] = [f"-I{bpf_include_dir()}", *cflags, *dialects.bare_bpf_headers(), *define_flags(defines)]
        else:
            request |= {"cflags": define_flags(defines), "variables": dict(variables),
                        "object_name": object_name(filename)}
            request["pin_root"] = str(pin_root) if pin_root else None
            if pin_root:
                pin_root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # libbpf makes pin_root itself
        asked = time.monotonic()
        if dialect == "libbpf":
            assert source is not None
            vmlinux = await self.vmlinux_folder()
            request["include_dirs"] = [str(vmlinux), bpf_include_dir()]
        key = self._cache_key(request) if dialect != "object" and self.cache.enabled else None
        if key is not None:
            program = await self._load_cached(key, request, asked, filename, source)
            if program is not None:
                return program
            request["want_product"] = True
        if dialect == "libbpf" and pch.usable_for(source or "", defines, headers or {}):
            request["pch"] = await self._ready_pch(Path(request["include_dirs"][0]))  # type: ignore[index]
        result, fd, output, started = await self._compile(request, filename, source)
        if result.get("pch_refused") and request.get("pch"):
            self.precompiled.discard(Path(str(request["pch"])))
        steps = worker_steps(asked, started, result.get("steps"), bool(request.get("pch")))
        output = name_the_file(output, filename, source)
        if key is not None and result.get("ok") and isinstance(result.get("product"), dict):
            entry = program_cache.Entry(result["product"], result["function"], output)
            await asyncio.to_thread(self.cache.put, key, entry)
            if dialect == "bcc" and function is None:
                # Also under the function it resolved to: a restart asks for it by name.
                named = self._cache_key(request | {"function": result["function"]})
                await asyncio.to_thread(self.cache.put, named, entry)
        return self._program(request, result, fd, output, steps, asked, filename, source)

    async def _compile(self, request: dict[str, object], filename: str | None,
                       source: str | None) -> tuple[dict[str, Any], int | None, str, float]:
        """Run the worker on ``request`` once its turn comes: (result, fd, output, when it started)."""
        dialect = str(request["dialect"])
        async with self._parallel_compiles:
            started = time.monotonic()  # the compile's own time, not its wait for a turn
            try:
                result, fd, output = await self._run_worker(request)
            except (CompileError, CompilerCrashed, CompileOutOfMemory) as err:  # the worker died
                raise _name_the_file_in(err, filename, source) from None
            finally:
                self._observe(dialect, time.monotonic() - started)
        return result, fd, output, started

    def _cache_key(self, request: Mapping[str, object]) -> str:
        """What a product depends on, of the request (the cache adds tailcalld and the kernel).
        A libbpf object holds every function: the function is chosen when it is loaded."""
        handler = {name: request.get(name) for name in ("dialect", "source", "headers", "cflags", "tag", "include_dirs")}
        handler["channel"] = request.get("channel") is not None
        if request["dialect"] == "bcc":
            handler["function"] = request.get("function")
        return self.cache.key(handler)

    async def _load_cached(self, key: str, request: dict[str, object], asked: float, filename: str | None,
                           source: str | None) -> Program | None:
        """The program loaded from the cache entry of ``key``; None when there is none, or when
        it no longer loads (then it is dropped, and the caller compiles)."""
        entry = await asyncio.to_thread(self.cache.get, key)
        if entry is None:
            return None
        product = entry.product
        if product.get("kind") == "bcc":
            program = await self._load_insns(product, entry, asked, filename, source)
            if program is None:
                self.cache.drop(key, "it no longer loads")
            return program
        insns = product.get("insns")
        if isinstance(insns, dict) and request.get("function") in (insns.get("requested"), insns.get("function")) \
                and request.get("variables", {}) == insns.get("variables"):
            program = await self._load_insns(insns, entry, asked, filename, source)
            if program is not None:
                return program  # else libbpf loads the object, as it would any
        cached = request | {"cached": product}  # a libbpf object: the worker loads it, no clang
        try:
            result, fd, output, started = await self._compile(cached, filename, source)
        except TailcalldError as err:
            self.cache.drop(key, f"loading it failed ({err.message})")
            return None
        if not result.get("ok"):
            if result.get("code") in _HANDLER_FAULTS:  # the compile would say the same (a function not found)
                return self._program(cached, result, fd, name_the_file(output, filename, source), {}, asked,
                                     filename, source)
            self.cache.drop(key, f"it no longer loads ({result.get('message', '?')})")
            return None
        steps = worker_steps(asked, started, result.get("steps"), False)
        steps["from cache"] = steps.pop("compile", 0.0)
        return self._program(cached, result, fd, entry.log, steps, asked, filename, source, from_cache=True)

    async def _load_insns(self, product: dict[str, Any], entry: program_cache.Entry, asked: float,
                          filename: str | None, source: str | None) -> Program | None:
        """Instructions from the cache (products.load_insns), loaded by the daemon itself, off
        the event loop (the verifier may take a while on a large program); None when they no
        longer load (said in the journal)."""
        s = self._settings.current
        function = str(product.get("function") or entry.function)
        try:
            fd, maps = await asyncio.to_thread(products.load_insns, product, function, self.channel,
                                               s.max_map_bytes, VERIFIER_LOG_BYTES)
        except MapTooLarge as err:  # the handler's fault (a lowered max_map_bytes): compiling says the same
            raise _name_the_file_in(err, filename, source) from None
        except (TailcalldError, OSError, KeyError, ValueError, TypeError) as err:
            logger.warning("compile cache: %s from the cache does not load (%s)", function, err)
            return None
        try:
            info = bpfsys.prog_info(fd)
        except OSError:
            os.close(fd)
            raise
        dialect = "bcc" if product.get("kind") == "bcc" else "libbpf"
        warnings = _warnings(source, filename) if dialect == "bcc" and source is not None else ()
        btf = base64.b64decode(product["btf_b64"]) if product.get("btf_b64") else None
        steps = {"prepare": 0.0, "from cache": time.monotonic() - asked}
        self._observe(dialect, steps["from cache"])
        logger.debug("loaded %s (%s) from the compile cache in %.3f s", function, dialect, steps["from cache"])
        return Program(fd, info.id, function, info.xlated_insns, entry.log, btf, warnings, maps, steps, from_cache=True)

    def _program(self, request: Mapping[str, object], result: dict[str, Any], fd: int | None, output: str,
                 steps: dict[str, float], asked: float, filename: str | None, source: str | None,
                 from_cache: bool = False) -> Program:
        """The worker's answer as a Program, or its failure raised."""
        dialect = request["dialect"]
        if not result.get("ok"):
            error = error_class(result.get("code", ""))
            details = {"log": output, "candidates": result.get("candidates", [])}
            raise error(result.get("message", "the compile worker failed"), details)
        if fd is None:
            raise TailcalldError("the compile worker reported success but sent no program", output)
        try:
            info = bpfsys.prog_info(fd)
        except OSError:
            os.close(fd)
            raise
        btf = base64.b64decode(result["btf_b64"]) if result.get("btf_b64") else None
        warnings = _warnings(source, filename) if dialect == "bcc" and source is not None else ()
        maps = tuple(bpfsys.MapInfo(**m) for m in result.get("maps", []))
        steps["finished"] = time.monotonic() - asked - sum(steps.values())
        logger.debug("%s %s (%s) in %.3f s: %s", "loaded from the compile cache" if from_cache else "compiled and loaded",
                     result["function"], dialect, time.monotonic() - asked,
                     ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
        return Program(fd, info.id, result["function"], info.xlated_insns, output, btf, warnings, maps, steps,
                       from_cache)

    async def vmlinux_folder(self) -> Path:
        """The folder of this kernel's vmlinux.h (dialects.vmlinux_header), found once: the BTF
        it is made from is the running kernel's, read (5 MB) and hashed only the first time."""
        async with self._vmlinux_lock:  # a restore asks for it hundreds of times at once: found once
            if self._vmlinux is None or not (self._vmlinux / "vmlinux.h").exists():
                self._vmlinux = await dialects.vmlinux_header(self._cache_dir, self._settings.current.compile_timeout)
            return self._vmlinux

    async def _ready_pch(self, vmlinux: Path) -> str | None:
        found = await self.precompiled.ready(vmlinux)
        return str(found) if found is not None else None

    def close(self) -> None:
        """Stop the background work: the workers started ahead, a precompile under way."""
        self._spares.close()
        self.precompiled.close()

    async def aclose(self) -> None:
        """``close``, and wait for the workers started ahead to be gone (tests that end their
        event loop right after)."""
        await self.precompiled.aclose()
        await self._spares.aclose()

    async def load_artifact(self, artifact: Artifact, function: str | None, pin_root: Path | None = None) -> Program:
        tag = artifact.tag
        if artifact.dialect == "object":
            return await self.load(function=function, dialect="object", object_bytes=artifact.data, pin_root=pin_root,
                                   filename=artifact.filename, tag=tag, variables=artifact.variables)
        return await self.load(artifact.source, function, dialect=artifact.dialect, pin_root=pin_root,
                               filename=artifact.filename, headers=artifact.headers, tag=tag,
                               variables=artifact.variables, defines=artifact.defines)

    async def build_own_object(self, source_name: str, cflags: Sequence[str] = ()) -> bytes:
        """Compile one of tailcalld's own libbpf sources (tailcalld/bpf/``source_name``) to a
        BPF ELF object, against this kernel's vmlinux.h.  Trusted code, so no confined worker;
        still clang runs in a process group of its own, killed whole at ``compile_timeout``, in
        a folder removed after.  Raises CompileError (clang's output as details["log"]) or
        ToolFailed (no clang, or past compile_timeout)."""
        timeout = self._settings.current.compile_timeout
        source = bpf_source(source_name)
        # The dispatcher is compiled at every start after a reboot: from the cache, the socket
        # answers ~0.3 s sooner.  The kernel's BTF and our headers are in every key.
        key = self.cache.key({"own": source_name, "source": source, "cflags": list(cflags)}) \
            if self.cache.enabled else None
        if key is not None:
            entry = await asyncio.to_thread(self.cache.get, key)
            if entry is not None and isinstance(entry.product.get("object_b64"), str):
                return base64.b64decode(entry.product["object_b64"])
        data = await self._build_own_object(source_name, source, cflags, timeout)
        if key is not None:
            product = {"kind": "elf", "object_b64": base64.b64encode(data).decode()}
            await asyncio.to_thread(self.cache.put, key, program_cache.Entry(product, "", ""))
        return data

    async def _build_own_object(self, source_name: str, source: str, cflags: Sequence[str], timeout: float) -> bytes:
        work_dir = self._new_work_dir()
        try:
            vmlinux = await dialects.vmlinux_header(self._cache_dir, timeout, fallback=work_dir)
            out = work_dir / "object.bpf.o"
            # Our own -D macros are none that vmlinux.h reads: the PCH serves when there is
            # one.  Only a handler's compile has one made: a start (every test's daemon) does
            # not spend ~2 s of CPU on it.  Never in a fallback folder: it goes with this compile.
            usable = vmlinux != work_dir and pch.usable_for(source, (), {})
            found = await self.precompiled.ready(vmlinux, make=False) if usable else None
            cmd = dialects.clang_command([str(vmlinux), bpf_include_dir()], str(out), cflags,
                                         str(found) if found is not None else None)
            done = await children.run(cmd, timeout, input=source.encode(), cwd=work_dir)
            refused = dialects.PCH_REFUSED.search(done.stderr.decode(errors="replace"))
            if done.returncode != 0 and found is not None and refused:
                self.precompiled.discard(found)
                cmd = dialects.clang_command([str(vmlinux), bpf_include_dir()], str(out), cflags)
                done = await children.run(cmd, timeout, input=source.encode(), cwd=work_dir)
            if done.returncode != 0:
                raise CompileError(f"clang could not compile tailcalld's {source_name} (exit status {done.returncode})",
                                   {"log": _tidy(done.stdout + done.stderr)})
            return out.read_bytes()
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    async def _run_worker(self, request: dict[str, object]) -> tuple[dict[str, Any], int | None, str]:
        s = self._settings.current
        work_dir = self._new_work_dir()
        request |= {"work_dir": str(work_dir), "memory_max": s.compile_memory_max, "max_map_bytes": s.max_map_bytes,
                    "cpu_seconds": math.ceil(s.compile_timeout) + 1}
        try:
            kind = "bcc" if request["dialect"] == "bcc" else "libbpf"
            return await self._run_in(work_dir, json.dumps(request).encode(), s.compile_timeout, s.compile_memory_max,
                                      kind)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _compile_root(self) -> Path:
        root = self._work_root or Path(tempfile.gettempdir())
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    def _new_work_dir(self) -> Path:
        """A fresh folder for one compile.  A full or read-only disk is said as such here,
        before a worker starts: the worker would only fail later to write its result."""
        root = self._work_root or Path(tempfile.gettempdir())
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fs = os.statvfs(root)
            if fs.f_flag & os.ST_RDONLY or fs.f_bavail * fs.f_frsize < MIN_COMPILE_ROOM:
                raise OSError(errno.EROFS if fs.f_flag & os.ST_RDONLY else errno.ENOSPC, "no room for a compile")
            return Path(tempfile.mkdtemp(prefix="tailcalld-compile-", dir=root))
        except OSError as exc:
            raise StateUnwritable(f"cannot make a compile folder in {root}: {exc.strerror or exc}; nothing was changed",
                                  {"path": str(root)}) from None

    async def _run_in(self, work_dir: Path, request: bytes, timeout: float,
                      memory_max: int, kind: str) -> tuple[dict[str, Any], int | None, str]:
        worker, waited = await self._spares.take(kind)
        try:
            return await self._run_worker_in(worker, work_dir, request, timeout, memory_max, kind)
        except CompilerCrashed:
            # A worker started ahead can be killed while it waits (the OOM killer, an admin's
            # kill) and still look alive when taken: if it never read the request, that is no
            # fault of the handler's, and a worker started now does the compile.
            if not waited or (work_dir / REQUEST_READ).exists():
                raise
        worker = await spares.spawn(kind, self._compile_root())
        return await self._run_worker_in(worker, work_dir, request, timeout, memory_max, kind)

    async def _run_worker_in(self, worker: spares.Worker, work_dir: Path, request: bytes, timeout: float,
                             memory_max: int, kind: str) -> tuple[dict[str, Any], int | None, str]:
        proc = worker.proc
        with worker.sock as parent:
            try:
                out, _ = await asyncio.wait_for(proc.communicate(request), timeout)
            except TimeoutError:
                raise CompileTimeout(
                    f"compiling and loading took longer than {timeout:g} s; the compile was killed",
                    {"timeout": timeout}) from None
            finally:
                # The worker leads a process group of its own: this ends clang too, which a
                # kill of the worker alone would leave running.
                children.kill_group(proc.pid)
                if proc.returncode is None:
                    await proc.wait()
                children.reap_group(proc.pid)  # the clang of a killed worker, when we are PID 1
                self._spares.replenish(kind)  # the next compile of this kind finds its worker started
            output = _local_names(_tidy(out), work_dir)
            parent.setblocking(False)
            try:
                _payload, fds, _flags, _addr = socket.recv_fds(parent, 64, 1)
            except BlockingIOError:
                fds = []
        result = _read_result(work_dir)
        if result is None:
            for fd in fds:
                os.close(fd)
            raise _died(proc.returncode, output + _local_names(_unsaid(work_dir), work_dir), memory_max)
        return result, (fds[0] if fds else None), output


def worker_steps(asked: float, started: float, marks: object, with_pch: bool) -> dict[str, float]:
    """Seconds of each step of a load, from the daemon's marks (asked: the request came;
    started: its turn came, the worker is spawned) and the worker's (``marks``: CLOCK_MONOTONIC
    times at which each of its steps ended, compile_worker.mark).  Steps the worker did not
    reach are left out."""
    steps = {"prepare": started - asked}  # vmlinux.h, the PCH check, the wait for a turn
    if not isinstance(marks, dict):
        return steps
    names = {"imported": "worker start (python, imports; bcc's: libbcc)", "prepared": "worker setup (limits, landlock)",
             "compile": "compile (clang with PCH)" if with_pch else "compile",
             "loaded": "load (verifier)"}
    last = started
    for mark, name in names.items():
        at = marks.get(mark)
        if isinstance(at, (int, float)):
            steps[name] = max(0.0, at - last)
            last = at
    return steps


def _read_result(work_dir: Path) -> dict[str, Any] | None:
    """The worker's result; None when it wrote none, or one that is not a result (a worker that
    died mid-write, or a bug): the caller then reports how the worker ended, never a traceback."""
    try:
        result = json.loads((work_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):  # ValueError: empty, cut short, not UTF-8
        return None
    if not isinstance(result, dict) or (result.get("ok") is True and not isinstance(result.get("function"), str)):
        return None
    return result


def _local_names(output: str, work_dir: Path) -> str:
    """Local headers as the source includes them (``syscount.h``), not by the compile folder's path."""
    return output.replace(f"{work_dir / HEADERS_DIR}/", "")


def _warnings(source: str, filename: str | None) -> tuple[str, ...]:
    """tailcalld's own warnings about a bcc handler just loaded, also written to the journal:
    the reply may go to a script that never shows them."""
    warning = headers.header_warning(source, filename)
    if warning is None:
        return ()
    logger.warning("%s", warning, extra={"TAILCALLD_WARNING": "kernel_headers"})
    return (warning,)


def _unsaid(work_dir: Path) -> str:
    """What the worker printed while it kept a copy of its fd 2 and then died (see
    compile_worker.stderr_copy): the last words, which the pipe never got."""
    try:
        return _tidy((work_dir / STDERR_COPY).read_bytes())
    except OSError:
        return ""


def _died(status: int | None, output: str, memory_max: int) -> TailcalldError:
    """The worker ended without a result: out of memory (compile_memory_max), a compiler error
    that ends the process (LLVM's backend exits when it cannot lower an operation, and bcc
    compiles in the worker's own process), or a crash."""
    how = f"was killed by {signal_name(-status)}" if status is not None and status < 0 else f"exited with status {status}"
    details = {"log": output, "status": status}
    if OUT_OF_MEMORY.search(output):
        return CompileOutOfMemory(f"the compile ran out of memory and {how}: it needs more than "
                                  f"compile_memory_max ({memory_max >> 20} MiB)", details)
    said = _FATAL_COMPILER_ERROR.search(output)
    if said is not None and status is not None and status > 0:
        return CompileError(f"the source does not compile: {said['what'].strip()} (the compiler stopped, and the "
                            f"compile worker {how})", details)
    return CompilerCrashed(f"the compile worker {how} without a result; its output is below", details)


def _name_the_file_in(err: TailcalldError, filename: str | None, source: str | None) -> TailcalldError:
    """``err`` (a dead worker's, from _died) with its log naming the user's file."""
    if isinstance(err.details, dict) and isinstance(err.details.get("log"), str):
        err.details["log"] = name_the_file(err.details["log"], filename, source)
    return err


def _tidy(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    if len(text) > MAX_DIAGNOSTICS:
        head = MAX_DIAGNOSTICS - DIAGNOSTICS_TAIL
        text = (text[:head] + f"\n[... {len(text) - MAX_DIAGNOSTICS} characters cut ...]\n"
                + text[-DIAGNOSTICS_TAIL:])
    return text
