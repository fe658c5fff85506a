"""Compiling and loading BPF programs without blocking (or endangering) the daemon.

Each load runs ``tailcalld.compile_worker`` in a child process: the event loop only
waits on pipes, clang's diagnostics and the verifier log arrive on the child's stderr,
a compile that spins is killed at ``timeout``, and LLVM's memory leaves with the child.
The program fd comes back over a socketpair (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from . import bpfsys, dialects
from .config import LiveSettings
from .dialects import Artifact, Dialect
from .errors import CompileTimeout, ForbiddenInclude, TailcalldError, error_class

# Diagnostics can be huge (a template error repeated per instantiation); keep the head.
MAX_DIAGNOSTICS = 64 * 1024

_INCLUDE = re.compile(r"^\s*#\s*(?:include|include_next|import)\b\s*(.*)$", re.MULTILINE)
_INCLUDE_TARGET = re.compile(r'^[<"]([^>"]+)[>"]')


def check_includes(source: str) -> None:
    """Refuse #include of absolute paths, of '..', and computed includes: clang echoes the
    lines it cannot parse, so `#include "/etc/shadow"` would send the file back to the client."""
    for match in _INCLUDE.finditer(source):
        target = _INCLUDE_TARGET.match(match.group(1).strip())
        if target is None:
            raise ForbiddenInclude(f"computed #include is not allowed: {match.group(0).strip()[:120]!r}")
        path = target.group(1)
        if path.startswith("/") or ".." in path.split("/"):
            raise ForbiddenInclude(f"#include {path!r} is not allowed: only kernel and BPF headers "
                                   "(relative paths without '..')", {"include": path})


class Program:
    """A loaded program and the one fd of ours that holds it.  The kernel keeps a program
    while any fd or map slot refers to it, so whoever owns a Program closes it exactly once
    (closing twice is a no-op: a recycled fd number must never be closed by mistake)."""

    def __init__(self, fd: int, id: int, function: str, insns: int, log: str = "") -> None:
        self._fd: int | None = fd
        self.id = id
        self.function = function
        self.insns = insns
        self.log = log  # what the compiler and loader said on the way (warnings)

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
        return Program(os.dup(self.fd), self.id, self.function, self.insns, self.log)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def bpf_include_dir() -> str:
    return str(resources.files("tailcalld.bpf"))


def bpf_source(name: str) -> str:
    return resources.files("tailcalld.bpf").joinpath(name).read_text()


class Compiler:
    def __init__(self, settings: LiveSettings, max_parallel: int = 2, cache_dir: Path | None = None) -> None:
        self._settings = settings  # compile_timeout is live: read at each compile
        # Each compile is ~0.5 s of one CPU; more at once than cores only adds latency.
        self._parallel_compiles = asyncio.Semaphore(max_parallel)
        self._cache_dir = cache_dir or Path(tempfile.gettempdir()) / "tailcalld-cache"

    async def load(self, source: str | None = None, function: str | None = None, cflags: Sequence[str] = (),
                   dialect: Dialect = "bcc", object_bytes: bytes | None = None) -> Program:
        """Compile ``source`` (bcc or libbpf C) or take ``object_bytes`` (a BPF ELF object), and
        load ``function`` (or the only raw_tp program) as a raw_tracepoint program.  Raises
        CompileError, VerifierRejected, FunctionNotFound, FunctionAmbiguous, WrongProgramType or
        CompileTimeout, each with the worker's output (clang, libbpf, verifier) as details."""
        request: dict[str, object] = {"dialect": dialect, "function": function}
        if dialect == "object":
            assert object_bytes is not None
            request["object_b64"] = base64.b64encode(object_bytes).decode()
        else:
            assert source is not None
            check_includes(source)
            request["source"] = source
        if dialect == "bcc":
            request["cflags"] = [f"-I{bpf_include_dir()}", *cflags]
        elif dialect == "libbpf":
            vmlinux = await dialects.vmlinux_header(self._cache_dir)
            request["include_dirs"] = [str(vmlinux), bpf_include_dir()]
        async with self._parallel_compiles:
            result, fd, output = await self._run_worker(json.dumps(request).encode())
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
        return Program(fd, info.id, result["function"], info.xlated_insns, output)

    async def load_artifact(self, artifact: Artifact, function: str | None) -> Program:
        if artifact.dialect == "object":
            return await self.load(function=function, dialect="object", object_bytes=artifact.data)
        return await self.load(artifact.source, function, dialect=artifact.dialect)

    async def _run_worker(self, request: bytes) -> tuple[dict, int | None, str]:
        timeout = self._settings.current.compile_timeout
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with parent:
            with child:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tailcalld.compile_worker", str(child.fileno()),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, pass_fds=(child.fileno(),))
            try:
                out, _ = await asyncio.wait_for(proc.communicate(request), timeout)
            except TimeoutError:
                raise CompileTimeout(
                    f"compiling and loading took longer than {timeout:g} s; the compile was killed",
                    {"timeout": timeout}) from None
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            output = _tidy(out)
            parent.setblocking(False)
            try:
                payload, fds, _flags, _addr = socket.recv_fds(parent, 1 << 16, 1)
            except BlockingIOError:
                raise TailcalldError(
                    f"the compile worker exited with status {proc.returncode} without a result",
                    {"log": output}) from None
        return json.loads(payload), (fds[0] if fds else None), output


def _tidy(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    if len(text) > MAX_DIAGNOSTICS:
        text = text[:MAX_DIAGNOSTICS] + f"\n[... {len(text) - MAX_DIAGNOSTICS} more characters cut]"
    return text
