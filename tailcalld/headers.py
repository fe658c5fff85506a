"""The kernel headers bcc compiles against, and whether they are the running kernel's.

bcc reads kernel structs (``task->real_parent->tgid``) at the offsets its headers give, with
no relocation: headers of another kernel (here the distro's 6.1 ones under a 6.18 kernel, see
scripts/setup.sh) give wrong offsets, and the reads return whatever lies there (often 0),
without any error.  libbpf's CO-RE relocates the same reads to the running kernel's BTF.  So a
bcc handler that reads kernel structs, compiled against such headers, gets a warning that
says so and points at the libbpf dialect.  Handlers that only read the raw_tp context, the
saved registers and helpers' results are not affected, and get none.

bcc finds its headers as bcc 0.26's loader does (src/cc/frontends/clang/loader.cc):
$BCC_KERNEL_SOURCE, else /lib/modules/$(uname -r)/source when build and source both exist
(the generated files, version included, are in build), else .../build; and when that folder
has no include/linux/kconfig.h, the running kernel's own (CONFIG_IKHEADERS), which match.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODULES = Path("/lib/modules")
_UTS_RELEASE = re.compile(r'^#define\s+UTS_RELEASE\s+"([^"]*)"', re.MULTILINE)
_VERSION_CODE = re.compile(r"^#define\s+LINUX_VERSION_CODE\s+(\d+)", re.MULTILINE)
_RELEASE_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

Version = tuple[int, int, int]


@dataclass(frozen=True)
class KernelHeaders:
    path: Path  # the folder bcc compiles in
    release: str | None  # their UTS_RELEASE, e.g. 6.1.0-28-amd64; None: not found
    version: Version | None  # their LINUX_VERSION_CODE as (6, 1, 192); None: not found


def parse_version(release: str) -> Version | None:
    """(major, minor, sublevel) of a release such as 6.18.44-fc-v657; the sublevel capped at 255
    as LINUX_VERSION_CODE caps it, so that the two compare."""
    found = _RELEASE_VERSION.match(release)
    if found is None:
        return None
    return int(found[1]), int(found[2]), min(int(found[3] or 0), 255)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _version_code(generated: Path) -> Version | None:
    found = _VERSION_CODE.search(_read(generated / "uapi" / "linux" / "version.h"))
    if found is None:
        return None
    code = int(found[1])
    return code >> 16, (code >> 8) & 0xFF, code & 0xFF


def bcc_headers(release: str | None = None, env: Mapping[str, str] | None = None,
                modules: Path = MODULES) -> KernelHeaders | None:
    """The headers bcc compiles against on this machine; None when bcc takes the running
    kernel's own (CONFIG_IKHEADERS) or finds none (its compile then fails, saying so)."""
    release = release or platform.release()
    env = os.environ if env is None else env
    kdir = modules / release
    if "BCC_KERNEL_SOURCE" in env:
        kpath = generated_in = Path(env["BCC_KERNEL_SOURCE"])
    elif (kdir / "build").is_dir() and (kdir / "source").is_dir():
        kpath, generated_in = kdir / "source", kdir / "build"
    else:
        kpath = generated_in = kdir / env.get("BCC_KERNEL_MODULES_SUFFIX", "build")
    if not (kpath / "include" / "linux" / "kconfig.h").is_file():
        return None
    generated = generated_in / "include" / "generated"
    uts = _UTS_RELEASE.search(_read(generated / "utsrelease.h"))
    return KernelHeaders(kpath, uts[1] if uts else None, _version_code(generated))


def mismatch(headers: KernelHeaders, release: str) -> bool:
    """Whether ``headers`` are not those of the kernel ``release``: their release names differ
    (6.1.0-28-amd64 is not 6.1.0-29-amd64: another build, maybe other offsets), or, with no
    release name in them, their version does.  Headers that say neither are not judged."""
    if headers.release is not None:
        return headers.release != release
    if headers.version is not None:
        return parse_version(release) not in (None, headers.version)
    return False


# -- does a bcc source read kernel structs? --------------------------------------------------

_COMMENT_OR_STRING = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"', re.DOTALL)
_STRUCT_USE = re.compile(r"\bstruct\s+([A-Za-z_]\w*)")
_STRUCT_DEFINED = re.compile(r"\bstruct\s+([A-Za-z_]\w*)\s*\{")
_CURRENT_TASK = re.compile(r"\bbpf_get_current_task(?:_btf)?\s*\(")
# Structs whose layout is ABI (UAPI, the BPF contexts, the saved registers): the same in any
# headers, so reading them is right whichever headers bcc has.
UAPI_STRUCTS = frozenset({
    "bpf_raw_tracepoint_args", "pt_regs", "user_pt_regs", "bpf_perf_event_data", "__sk_buff", "xdp_md",
    "bpf_sock", "bpf_sock_addr", "bpf_sock_ops", "bpf_pidns_info", "bpf_spin_lock", "bpf_timer",
    "sockaddr", "sockaddr_in", "sockaddr_in6", "sockaddr_un", "sockaddr_storage", "sockaddr_ll",
    "sockaddr_nl", "in_addr", "in6_addr", "iovec", "msghdr", "user_msghdr", "mmsghdr", "timespec",
    "__kernel_timespec", "timeval", "__kernel_old_timeval", "timezone", "itimerspec", "__kernel_itimerspec",
    "stat", "statx", "statfs", "linux_dirent64", "open_how", "epoll_event", "pollfd", "rlimit", "rusage",
    "new_utsname", "utsname", "clone_args", "sched_param", "sched_attr", "sysinfo", "tms", "iocb",
    "io_uring_params", "perf_event_attr", "mq_attr", "file_handle", "sembuf", "flock", "f_owner_ex",
    "mount_attr", "rseq", "sigaction", "siginfo", "sigevent", "kernel_sigaction",
})


def kernel_struct_reads(source: str) -> list[str]:
    """What in a bcc source reads kernel-internal structs, in the words a warning can use:
    ``struct task_struct``, ``bpf_get_current_task()``.  Empty for a handler that only uses
    its context, the registers, UAPI types and helpers.  A heuristic on the text: a struct
    the source defines itself, or one of UAPI_STRUCTS, does not count."""
    text = _COMMENT_OR_STRING.sub(" ", source)
    own = set(_STRUCT_DEFINED.findall(text))
    found = [f"struct {name}" for name in dict.fromkeys(_STRUCT_USE.findall(text))
             if name not in own and name not in UAPI_STRUCTS]
    if _CURRENT_TASK.search(text):
        found.append("bpf_get_current_task()")
    return found


def header_warning(source: str, filename: str | None, release: str | None = None,
                   headers: KernelHeaders | None = None) -> str | None:
    """The warning for a bcc ``source`` that reads kernel structs through headers of another
    kernel; None when it reads none, or the headers match (or bcc uses the kernel's own)."""
    reads = kernel_struct_reads(source)
    if not reads:
        return None
    release = release or platform.release()
    headers = headers or bcc_headers(release)
    if headers is None or not mismatch(headers, release):
        return None
    theirs = headers.release or ".".join(map(str, headers.version or ()))
    return (f"{filename or 'the handler'} reads kernel structs ({', '.join(reads[:4])}"
            f"{', ...' if len(reads) > 4 else ''}), and bcc compiles it against the kernel headers in "
            f"{headers.path} ({theirs}), not those of the running kernel ({release}): field offsets can differ, "
            "and such reads then give wrong values (often 0) without any error. Write it in the libbpf dialect "
            "(vmlinux.h, BPF_CORE_READ): CO-RE relocates each read to the running kernel")
