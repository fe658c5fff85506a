"""The two ways people write handlers, told apart, and what compiling the libbpf one needs.

bcc C:     compiled by BCC at run time (tailcalld/compile_worker.py, bcc path).
libbpf C:  SEC(...), vmlinux.h, <bpf/bpf_helpers.h>: compiled by clang to a BPF ELF object
           against a vmlinux.h generated from the running kernel's BTF, then loaded with libbpf.
object:    a prebuilt BPF ELF object, loaded with libbpf as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from .errors import ToolFailed
from .loader_settings import Settings

Dialect = Literal["bcc", "libbpf", "object"]
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")

_LIBBPF_MARKERS = re.compile(r'\bSEC\s*\(|#\s*include\s*[<"](?:vmlinux\.h|bpf/bpf_helpers\.h)[>"]')
# uname -m -> the __TARGET_ARCH_* bpf_tracing.h expects
_TARGET_ARCH = {"x86_64": "x86", "aarch64": "arm64", "armv7l": "arm", "s390x": "s390", "ppc64le": "powerpc",
                "riscv64": "riscv", "loongarch64": "loongarch"}


def detect(source: str) -> Dialect:
    return "libbpf" if _LIBBPF_MARKERS.search(source) else "bcc"


# Old samples include libbpf's headers by their bare names (`#include "bpf_helpers.h"`), as when
# libbpf was a folder copied next to them; searched after every other folder (-idirafter), so that
# its bpf.h or btf.h never hides another header of the same name.
BARE_BPF_HEADERS = Path("/usr/include/bpf")
MAX_HEADER_NAME = 255


def header_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a local header's name, or None: the path rules of #include
    (compiler.check_includes: relative, no '..'), and a path a folder can hold."""
    parts = name.split("/")
    if not name or len(name) > MAX_HEADER_NAME or "\0" in name:
        return f"a header name has 1 to {MAX_HEADER_NAME} characters and no NUL"
    if name.startswith("/") or ".." in parts:
        return "only relative paths without '..' (as in #include)"
    if any(part in ("", ".") for part in parts):
        return "no empty or '.' path components"
    return None


def text_sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """What a handler is made from: C source (bcc or libbpf dialect) or an ELF object, and the
    local headers the source includes (by the names it includes them by)."""

    dialect: Dialect
    data: bytes
    # What the user calls it (diagnostics name it); not part of what the handler is.
    filename: str | None = field(default=None, compare=False)
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The loader's settings (loader_settings): --set globals, -D macros.  Part of what the
    # handler is: one file loaded with other settings is another program, never reused for
    # this one.  ``sha256`` stays the file's own hash (sources are kept, and pinned-by-name
    # maps found, by it): the registry compares settings next to it.
    variables: Settings = ()
    defines: Settings = ()

    @property
    def source(self) -> str | None:
        return None if self.dialect == "object" else self.data.decode()

    @property
    def header_sha256s(self) -> dict[str, str]:
        """Each header's hash, by name: how a slot's record refers to them (state.py)."""
        return {name: text_sha256(text) for name, text in sorted(self.headers.items())}

    @property
    def sha256(self) -> str:
        """The handler's identity: the same source with other headers is another handler (its
        program is not reused for it).  Without headers, the source's own hash, as before
        headers travelled: saved states name their sources by it."""
        if not self.headers:
            return text_sha256(self.data)
        return text_sha256(json.dumps({"source": text_sha256(self.data), "headers": self.header_sha256s}))

    @property
    def build_key(self) -> str:
        return build_key(self.sha256, self.defines)

    @property
    def tag(self) -> int:
        return tag_of(self.build_key)


def build_key(sha256: str, defines: Mapping[str, str] | Settings) -> str:
    """What a compile of handler ``sha256`` produces depends on, besides the kernel: its -D
    macros too (not its --set values, written after the compile).  Its BTF is kept by it."""
    if not defines:
        return sha256
    return text_sha256(json.dumps({"handler": sha256, "defines": sorted(dict(defines).items())}))


def tag_of(key: str) -> int:
    """The number a handler compiled from ``key`` (build_key) stamps its events with
    (tailcalld.h's TC_TAG): its BTF is found by it (events.py).  Never 0: "no tag"."""
    return int(key[:8], 16) or 1


def target_arch() -> str:
    machine = platform.machine()
    return _TARGET_ARCH.get(machine, machine)


# What clang says when it will not use a precompiled header (pch.py: another clang, a changed
# vmlinux.h, a damaged file, other options); the compile worker compiles again without it.
# Said without a place (a user's `#error` has one: `<stdin>:3:2: error: ...`).
PCH_REFUSED = re.compile(r"^(?:fatal )?error: .*(?:precompiled header|AST file|PCH file)", re.MULTILINE)


def clang_options() -> list[str]:
    """What every libbpf compile and the precompiled vmlinux.h (pch.py) are made with: a PCH is
    only used by a compile with the same options."""
    return ["clang", "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{target_arch()}"]


def clang_command(include_dirs: list[str], output: str, cflags: Sequence[str] = (), pch: str | None = None) -> list[str]:
    """clang, as libbpf-tools build their .bpf.o: the source comes on stdin.  ``pch``: a
    precompiled vmlinux.h (pch.py), read as if included before the source."""
    multiarch = f"/usr/include/{platform.machine()}-linux-gnu"
    cmd = [*clang_options(), *cflags]
    cmd += [f"-I{d}" for d in include_dirs]
    if os.path.isdir(multiarch):
        cmd.append(f"-I{multiarch}")  # <asm/types.h> for <linux/bpf.h>
    cmd += bare_bpf_headers()
    if pch is not None:
        cmd += ["-include-pch", pch]
    return [*cmd, "-x", "c", "-c", "-", "-o", output]


def pch_command(folder: Path, output: str) -> list[str]:
    """clang making ``folder``/vmlinux.h into a precompiled header (pch.py).  vmlinux.h includes
    nothing, so no include folders."""
    return [*clang_options(), "-x", "c-header", str(folder / "vmlinux.h"), "-o", output]


def bare_bpf_headers() -> list[str]:
    """The flags that let `#include "bpf_helpers.h"` resolve (see BARE_BPF_HEADERS)."""
    return ["-idirafter", str(BARE_BPF_HEADERS)] if BARE_BPF_HEADERS.is_dir() else []


@cache
def kernel_btf_sha256() -> str:
    """The SHA-256 of the running kernel's BTF (5 MB: read once per process; the kernel does not
    change under it).  What vmlinux.h's folder and the compile cache's keys are named by.
    Raises OSError when it cannot be read."""
    return hashlib.sha256(BTF_VMLINUX.read_bytes()).hexdigest()


async def vmlinux_header(cache_dir: Path, timeout: float, fallback: Path | None = None) -> Path:
    """A folder holding vmlinux.h for the running kernel, generated once per BTF (that is, per
    kernel) with bpftool and kept under ``cache_dir``.  bpftool gets ``timeout`` seconds.
    When the cache cannot be written (a full or read-only state_dir) and ``fallback`` (an
    existing folder) is given, the header is made there, for one use: the dispatcher needs it
    at every start, and such a disk must not stop one (it takes bpftool ~0.15 s)."""
    # Not at the top: the compile worker imports this module, and asyncio adds ~20 ms to its start.
    import asyncio  # noqa: PLC0415

    try:
        btf = await asyncio.to_thread(kernel_btf_sha256)
    except OSError as exc:
        raise ToolFailed(f"libbpf C needs the kernel's BTF, and {BTF_VMLINUX} cannot be read: "
                         f"{exc.strerror}") from None
    folder = cache_dir / f"vmlinux-{btf[:16]}"
    if (folder / "vmlinux.h").exists():
        return folder
    header = await _dump_vmlinux(timeout)
    try:
        _write_header(folder, header)
    except OSError:
        if fallback is None:
            raise
        _write_header(fallback, header)
        return fallback
    return folder


async def _dump_vmlinux(timeout: float) -> bytes:
    from . import children  # noqa: PLC0415 - asyncio, see vmlinux_header

    try:
        done = await children.run(["bpftool", "btf", "dump", "file", str(BTF_VMLINUX), "format", "c"], timeout)
    except ToolFailed as err:
        raise ToolFailed(f"making vmlinux.h: {err.message} (apt-get install bpftool)", err.details) from None
    if done.returncode != 0:
        raise ToolFailed(f"bpftool could not dump {BTF_VMLINUX}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _write_header(folder: Path, header: bytes) -> None:
    """folder/vmlinux.h, renamed into place: a concurrent compile never reads half of one."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = folder / f".vmlinux.h.{os.getpid()}"
    try:
        tmp.write_bytes(header)
        os.replace(tmp, folder / "vmlinux.h")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # only left when the write failed (a full disk)
