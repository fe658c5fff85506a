"""Confining a compile worker with Landlock, so that no spelling of `#include` reaches a file
outside the folders a compile needs.

Why Landlock and not only a check of the source: the preprocessor has many spellings for an
include (`%:include`, `#/**/include`, a backslash-newline, a path relative to the working
folder), and clang echoes lines it cannot parse, so any file it can open is a file whose
lines a client could read in the diagnostics.  Landlock makes the kernel refuse the open
itself, whatever the spelling.  The worker restricts itself after reading its request and
before it compiles; clang, started by the worker for libbpf C, inherits the restriction.

The ruleset handles reading, writing and executing files and listing folders.  Creating and
removing names is left to the kernel's ordinary rules: bcc pins maps where a handler asks
(BPF_TABLE_PINNED, bpffs only), and libbpf pins maps under the handler's pin folder.  What
the worker may read (and execute), found by trial with strace on Debian 12, bcc 0.26, clang 14:

- kernel headers: /lib/modules/$(uname -r) and the folders its build/source links point to;
- /usr/include (libbpf's headers, <asm/types.h>), /usr/lib/llvm-* (clang and its own headers);
- shared libraries: /usr/lib/<multiarch>, /usr/lib64 (ld.so), /etc/ld.so.cache, for clang;
- Python's library folders and tailcalld's package (lazy imports after the restriction);
- /sys/kernel/btf/vmlinux (libbpf's CO-RE relocations), /proc/kallsyms (bcc reads it) and
  /sys/devices/system/cpu/possible (libbpf sizes per-CPU values with it);
- the include folders of the request (tailcalld's bpf folder, the vmlinux.h cache);
- the compile's own temp folder, also writable (clang's output, the result);
- for a libbpf load that may reuse a map pinned by name (a second function of the same file,
  --fresh): opening folders anywhere, but no file in them. libbpf 1.1's bpf_map__reuse_fd
  opens "/" only to get a new fd number for the map; without it the reuse fails with EACCES.
  A folder opened so gives its names, never a file's contents, and clang cannot include a folder.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from glob import glob
from pathlib import Path

# The same numbers on every architecture (they were added after the syscall tables were unified).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

ACCESS_EXECUTE = 1 << 0
ACCESS_WRITE_FILE = 1 << 1
ACCESS_READ_FILE = 1 << 2
ACCESS_READ_DIR = 1 << 3
ACCESS_TRUNCATE = 1 << 14  # Landlock ABI 3
FILE_ONLY = ACCESS_EXECUTE | ACCESS_WRITE_FILE | ACCESS_READ_FILE | ACCESS_TRUNCATE  # a rule on a file: no READ_DIR

READ = ACCESS_READ_FILE | ACCESS_READ_DIR | ACCESS_EXECUTE
READ_WRITE = READ | ACCESS_WRITE_FILE | ACCESS_TRUNCATE


class _RulesetAttr(ctypes.Structure):
    # Only the first field: the kernel accepts this prefix of struct landlock_ruleset_attr.
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class ConfineError(OSError):
    """Landlock is there but the ruleset could not be built or applied."""


@dataclass(frozen=True)
class Ruleset:
    read: tuple[Path, ...]  # read (and execute) beneath these
    write: tuple[Path, ...]  # read and write beneath these
    list_dirs: tuple[Path, ...] = ()  # open and list folders beneath these, read no file


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The Landlock ABI of the running kernel; 0 when it is not built in or not enabled."""
    version = _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def compile_ruleset(include_dirs: Iterable[str], work_dir: Path, reuses_pins: bool = False) -> Ruleset:
    """What a bcc or clang+libbpf compile needs (see the module's docstring), nothing else.
    ``reuses_pins``: the load may reuse maps pinned by name, for which libbpf opens "/"."""
    release = platform.release()
    modules = Path("/lib/modules") / release
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    read: list[Path] = [modules, *(Path(os.path.realpath(modules / link)) for link in ("build", "source"))]
    read += [Path("/usr/include"), *map(Path, sorted(glob("/usr/lib/llvm-*")))]
    read += [Path(os.path.realpath(p)) for p in (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/lib64")]
    read += [Path("/etc/ld.so.cache"), Path("/sys/kernel/btf/vmlinux"), Path("/proc/kallsyms"),
             Path("/sys/devices/system/cpu/possible")]
    read += [Path(p) for p in {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}]
    read += [p for p in (_package_dir("tailcalld"), _package_dir("bcc")) if p is not None]
    read += [Path(d) for d in include_dirs]
    return Ruleset(tuple(read), (work_dir,), (Path("/"),) if reuses_pins else ())


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def restrict(ruleset: Ruleset) -> bool:
    """Confine this process (and what it starts) to ``ruleset``.  False when the kernel has no
    Landlock; raises ConfineError when it has one and the restriction fails."""
    abi = abi_version()
    if abi == 0:
        return False
    handled = ACCESS_EXECUTE | ACCESS_WRITE_FILE | ACCESS_READ_FILE | ACCESS_READ_DIR
    if abi >= 3:
        handled |= ACCESS_TRUNCATE
    attr = _RulesetAttr(handled)
    libc = _libc()
    ruleset_fd = int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                                  ctypes.c_uint32(0)))
    if ruleset_fd < 0:
        _raise("landlock_create_ruleset")
    try:
        for paths, access in ((ruleset.read, READ), (ruleset.write, READ_WRITE), (ruleset.list_dirs, ACCESS_READ_DIR)):
            for path in paths:
                _allow(ruleset_fd, path, access & handled)
        # Required of a process without CAP_SYS_ADMIN; harmless for root, and nothing the
        # worker starts (clang) needs to gain privileges.
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _raise("prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, ctypes.c_uint32(0)) != 0:
            _raise("landlock_restrict_self")
    finally:
        os.close(ruleset_fd)
    return True


def _allow(ruleset_fd: int, path: Path, access: int) -> None:
    """Add ``path`` (a folder: everything beneath it) to the ruleset; a missing path is skipped,
    since what exists differs between hosts (no /usr/lib64, no headers for this kernel)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not path.is_dir():
            access &= FILE_ONLY
        rule = _PathBeneathAttr(access, fd)
        if _libc().syscall(SYS_LANDLOCK_ADD_RULE, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                           ctypes.c_uint32(0)) != 0:
            _raise(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise ConfineError(err, f"{what}: {os.strerror(err)}")
