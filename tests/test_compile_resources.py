"""Hostile sources leave the host as it was (issue #10, item 7): macro nests that want all the
memory there is, compiles that run past compile_timeout (clang included), endless includes and
huge maps.  After each one no process of the compile is left, its folder is gone, and the
daemon serves on.

Orphans: this test process is made a child subreaper for the module, so that a clang the
daemon failed to kill is re-parented here instead of to PID 1, where it could not be told
apart from anyone else's processes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DaemonProcess, busy_children_of, children_of, kernel_slots, own_daemon, settled
from tailcalld.client import RemoteError

PR_SET_CHILD_SUBREAPER = 36
LIBBPF_HEAD = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
LICENSE = 'char _license[] SEC("license") = "GPL";\n'
STOPPED = {"compile_timeout", "compile_out_of_memory"}  # which one comes first depends on the machine


def doubling_nest(levels: int) -> str:
    """2**levels tokens from a few lines: preprocessing takes memory and time without end."""
    lines = ["#define A0 x+", *[f"#define A{i} A{i - 1} A{i - 1}" for i in range(1, levels + 1)]]
    return "\n".join(lines) + "\n"


def function_nest(levels: int) -> str:
    lines = ["#define E0(x) x+1", *[f"#define E{i}(x) E{i - 1}(E{i - 1}(x))" for i in range(1, levels + 1)]]
    return "\n".join(lines) + "\n"


BCC_FN = "int h(struct bpf_raw_tracepoint_args *ctx) {{ int x = 1; return {expr}; }}\n"
LIBBPF_FN = 'SEC("raw_tp/sys_enter")\nint h(struct bpf_raw_tracepoint_args *ctx) {{ int x = 1; return {expr}; }}\n' + LICENSE

CASES: dict[str, tuple[str, str, set[str]]] = {
    "bcc: macro nest": ("bcc", doubling_nest(40) + BCC_FN.format(expr="A40 0"), STOPPED),
    "libbpf: macro nest (clang)": ("libbpf", LIBBPF_HEAD + doubling_nest(40) + LIBBPF_FN.format(expr="A40 0"),
                                   STOPPED),
    "libbpf: nest of macro calls (clang)": ("libbpf", LIBBPF_HEAD + function_nest(40) + LIBBPF_FN.format(
        expr="E40(0)"), STOPPED),
    "bcc: endless include": ("bcc", '#include "main.c"\n' + BCC_FN.format(expr="0"), {"compile_error"}),
    "bcc: 1 GiB of maps": ("bcc", "struct v { char b[1024]; };\nBPF_ARRAY(big, struct v, 1048576);\n"
                           + BCC_FN.format(expr="0"), {"map_too_large"}),
    "libbpf: 4 GiB of maps": ("libbpf", LIBBPF_HEAD + "struct v { char b[4096]; };\nstruct { __uint(type, "
                              "BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1048576); __type(key, u32); __type(value, "
                              'struct v); } big SEC(".maps");\n' + LIBBPF_FN.format(expr="0"), {"map_too_large"}),
}


@pytest.fixture(scope="module")
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def served(machine: None, subreaper: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with own_daemon(tmp_path_factory.mktemp("resources"), compile_timeout=8.0, compile_memory_max=512 << 20) as d:
        yield d


def leftovers(d: DaemonProcess, before: set[int]) -> list[str]:
    """Processes of past compiles: the daemon's children (but the idle workers it started ahead
    for the next compiles), and orphans re-parented to us (not our children from ``before`` the
    compile, such as a journald the session started)."""
    found = []
    orphans = [p for p in children_of(os.getpid()) if p != d.pid and p not in before and settled(p)]
    for pid in busy_children_of(d.pid) + orphans:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.parametrize("dialect, source, codes", CASES.values(), ids=CASES.keys())
def test_a_hostile_source_leaves_the_host_as_it_was(served: DaemonProcess, dialect: str, source: str,
                                                    codes: set[str]) -> None:
    compile_folders = served.socket.parent / "compile"  # made by the dispatcher's compile at start
    before = set(children_of(os.getpid()))
    with pytest.raises(RemoteError) as err:
        served.call("attach", slot=310, source=source, dialect=dialect)
    assert err.value.code in codes, err.value
    assert leftovers(served, before) == []
    assert compile_folders.is_dir() and list(compile_folders.iterdir()) == []
    assert served.call("list") == {"slots": []}
    assert kernel_slots(served.pin_dir / "prog_array") == {}
