"""Which kernel headers bcc compiles against, and when a bcc handler is warned that they are
not the running kernel's: folders laid out as distros and setup.sh lay them out, no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailcalld.headers import KernelHeaders, bcc_headers, header_warning, kernel_struct_reads, mismatch, parse_version

RUNNING = "6.18.44-fc-v657"


def headers_tree(root: Path, release: str | None, version_code: int | None = None, kconfig: bool = True) -> Path:
    """A headers folder: include/linux/kconfig.h, and the generated release and version."""
    (root / "include" / "linux").mkdir(parents=True)
    if kconfig:
        (root / "include" / "linux" / "kconfig.h").write_text("")
    generated = root / "include" / "generated"
    (generated / "uapi" / "linux").mkdir(parents=True)
    if release is not None:
        (generated / "utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    if version_code is not None:
        (generated / "uapi" / "linux" / "version.h").write_text(f"#define LINUX_VERSION_CODE {version_code}\n")
    return root


def modules(tmp: Path, build: Path | None, source: Path | None = None) -> Path:
    kdir = tmp / "modules" / RUNNING
    kdir.mkdir(parents=True)
    if build is not None:
        (kdir / "build").symlink_to(build)
    if source is not None:
        (kdir / "source").symlink_to(source)
    return tmp / "modules"


@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v657", (6, 18, 44)), ("6.1.0-28-amd64", (6, 1, 0)), ("5.15", (5, 15, 0)),
    ("4.19.300", (4, 19, 255)), ("weird", None),
])
def test_parse_version(release: str, version: tuple[int, int, int] | None) -> None:
    assert parse_version(release) == version


@pytest.mark.parametrize(("theirs", "version", "release", "differ"), [
    ("6.1.0-28-amd64", None, "6.1.0-28-amd64", False),
    ("6.1.0-28-amd64", None, "6.1.0-29-amd64", True),  # another build of the same version
    ("6.1.0-56-amd64", (6, 1, 192), RUNNING, True),  # this machine
    (None, (6, 18, 44), RUNNING, False),
    (None, (6, 1, 192), RUNNING, True),
    (None, (4, 19, 255), "4.19.300-x", False),  # LINUX_VERSION_CODE caps the sublevel at 255
    (None, None, RUNNING, False),  # headers that say nothing are not judged
])
def test_mismatch(theirs: str | None, version: tuple[int, int, int] | None, release: str, differ: bool) -> None:
    assert mismatch(KernelHeaders(Path("/h"), theirs, version), release) is differ


def test_build_and_source_pair(tmp_path: Path) -> None:
    """Debian: bcc compiles in source (-common), the generated files are in build (-amd64)."""
    build = headers_tree(tmp_path / "amd64", "6.1.0-56-amd64", 393664, kconfig=False)
    common = headers_tree(tmp_path / "common", None)
    found = bcc_headers(RUNNING, {}, modules(tmp_path, build, common))
    assert found is not None
    assert (found.path.name, found.release, found.version) == ("source", "6.1.0-56-amd64", (6, 1, 192))


def test_build_alone(tmp_path: Path) -> None:
    found = bcc_headers(RUNNING, {}, modules(tmp_path, headers_tree(tmp_path / "b", RUNNING)))
    assert found is not None and found.release == RUNNING and not mismatch(found, RUNNING)


def test_bcc_kernel_source_wins(tmp_path: Path) -> None:
    own = headers_tree(tmp_path / "own", "6.18.44-fc-v657")
    mods = modules(tmp_path, headers_tree(tmp_path / "b", "6.1.0-56-amd64"))
    found = bcc_headers(RUNNING, {"BCC_KERNEL_SOURCE": str(own)}, mods)
    assert found is not None and found.path == own and not mismatch(found, RUNNING)


def test_no_headers_means_the_kernels_own(tmp_path: Path) -> None:
    """No kconfig.h: bcc takes CONFIG_IKHEADERS (the running kernel's) or fails; nothing to warn about."""
    assert bcc_headers(RUNNING, {}, modules(tmp_path, None)) is None
    assert bcc_headers(RUNNING, {}, tmp_path / "nowhere") is None
    stale = headers_tree(tmp_path / "stale", "6.1.0-56-amd64", kconfig=False)
    assert bcc_headers(RUNNING, {}, modules(tmp_path / "x", stale)) is None


TASK = """#include <linux/sched.h>
BPF_ARRAY(ppids, u32, 1);
int on_exec(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    u32 ppid = task->real_parent->tgid, zero = 0;
    ppids.update(&zero, &ppid);
    return 0;
}
"""

SIMPLE = """#include <uapi/linux/ptrace.h>
struct event { u32 pid; char comm[16]; };  // our own struct task_struct mention in a comment
BPF_PERF_OUTPUT(events);
int on_openat(struct bpf_raw_tracepoint_args *ctx)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    struct event e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    long dirfd = 0;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    bpf_trace_printk("struct file %ld\\n", dirfd);
    events.perf_submit(ctx, &e, sizeof(e));
    return 0;
}
"""


def test_what_reads_kernel_structs() -> None:
    assert kernel_struct_reads(TASK) == ["struct task_struct", "bpf_get_current_task()"]
    assert kernel_struct_reads(SIMPLE) == []
    assert kernel_struct_reads("int f(void *ctx) { struct sockaddr_in a; struct file *f = 0; return 0; }") == [
        "struct file"]


def test_the_warning() -> None:
    theirs = KernelHeaders(Path("/lib/modules/x/source"), "6.1.0-56-amd64", (6, 1, 192))
    warning = header_warning(TASK, "ppid.c", RUNNING, theirs)
    assert warning is not None
    for words in ("ppid.c reads kernel structs (struct task_struct, bpf_get_current_task())", "6.1.0-56-amd64",
                  RUNNING, "/lib/modules/x/source", "libbpf dialect", "CO-RE"):
        assert words in warning
    assert header_warning(SIMPLE, "simple.c", RUNNING, theirs) is None
    assert header_warning(TASK, "ppid.c", RUNNING, KernelHeaders(Path("/h"), RUNNING, None)) is None
