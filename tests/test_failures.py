"""Failures keep their cause (issue #12 item 8), on the real kernel, for bcc and libbpf: an
LLVM backend error is a compile_error with the compiler's words, an unbounded loop says what
the verifier said with its log, and an object built with -g is sent without its debug info."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import DaemonProcess, start_daemon
from test_libbpf import ProgMap, build_object

LIBBPF_HEAD = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\nSEC("raw_tracepoint/sys_enter")\n'
LIBBPF_TAIL = 'char LICENSE[] SEC("license") = "GPL";\n'

MULTIPLY = """int h(struct bpf_raw_tracepoint_args *ctx) {
    unsigned __int128 a = ctx->args[1];
    unsigned __int128 b = ctx->args[0];
    unsigned __int128 c = a * b;
    return (int)(c >> 64);
}
"""
# The verifier finds the same state twice: it says "infinite loop detected".
SPIN = """int h(struct bpf_raw_tracepoint_args *ctx) {
    volatile int i = 0;
    while (ctx->args[1] != 0) { i++; }
    return i;
}
"""
# Bounded, but by a million: the verifier walks a million instructions and gives up (E2BIG, where
# bcc printed only "Program too large (37 insns)" and no log).
MILLION = """int h(struct bpf_raw_tracepoint_args *ctx) {
    volatile u64 sum = ctx->args[1];
    for (u32 i = 0; i < 1000000; i++)
        sum = sum * 7 + i;
    return sum;
}
"""


def as_dialect(body: str, dialect: str) -> tuple[str, str]:
    """(file name, source) of ``body`` in ``dialect``; the body's line 1 is the file's line 1 in bcc, 4 in libbpf."""
    if dialect == "bcc":
        return "h.c", body
    return "h.bpf.c", LIBBPF_HEAD + body + LIBBPF_TAIL


def error_of(d: DaemonProcess, command: str, **fields: Any) -> dict[str, Any]:
    with d.client() as c:
        c.send_raw(json.dumps({"id": 1, "command": command, **fields}).encode() + b"\n")
        reply = c.read_reply()
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    return error


def check(d: DaemonProcess, tmp_path: Path, body: str, dialect: str) -> subprocess.CompletedProcess[str]:
    name, source = as_dialect(body, dialect)
    (tmp_path / name).write_text(source)
    return d.ctl("check", str(tmp_path / name))


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_a_128_bit_multiply_is_a_compile_error_with_the_compilers_words(daemon: DaemonProcess, tmp_path: Path,
                                                                       dialect: str) -> None:
    r = check(daemon, tmp_path, MULTIPLY, dialect)
    assert r.returncode == 3 and "[compile_error]" in r.stderr, r.stderr
    assert "A call to built-in function '__multi3' is not supported" in r.stderr
    line = 4 if dialect == "bcc" else 7  # the multiply's line in the user's file
    assert f"{as_dialect('', dialect)[0]}:{line}:" in r.stderr, r.stderr
    assert "internal" not in r.stderr and "/virtual/main.c" not in r.stderr
    error = error_of(daemon, "attach", slot=268, source=as_dialect(MULTIPLY, dialect)[1])
    assert error["code"] == "compile_error"
    assert "__multi3" in error["message"] and "__multi3" in error["details"]["log"]
    assert daemon.call("list") == {"slots": []}


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
@pytest.mark.parametrize(("body", "verdict"), [(SPIN, "infinite loop detected at insn"),
                                               (MILLION, "BPF program is too large. Processed 1000001 insn")])
def test_an_unbounded_loop_says_what_the_verifier_said(daemon: DaemonProcess, tmp_path: Path, dialect: str,
                                                      body: str, verdict: str) -> None:
    r = check(daemon, tmp_path, body, dialect)
    assert r.returncode == 4 and "[verifier_rejected]" in r.stderr, r.stderr
    message = r.stderr.splitlines()[0]
    assert f"the kernel refused 'h': {verdict}" in message, message
    assert "too large (" not in r.stderr  # bcc's "Program too large (37 insns)"
    assert "processed " in r.stderr and verdict in r.stderr.split(message, 1)[1]  # the log, with its end
    assert len(r.stderr) < 70_000  # not the hundreds of MiB the verifier can write


# CO-RE reads of task_struct bring its types, and all they reach, into the DWARF of `clang -g`.
DEBUG_HEAVY = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
} debug_hits SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int with_debug(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    u32 zero = 0;
    if (BPF_CORE_READ(task, real_parent, tgid) == 0x7fffffff)
        return 0;
    u64 *n = bpf_map_lookup_elem(&debug_hits, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_an_object_built_with_debug_info_attaches_and_counts(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.ctl("check", "-", input=DEBUG_HEAVY).returncode == 0  # fills the vmlinux.h cache
    obj = build_object(DEBUG_HEAVY, tmp_path, daemon)
    assert obj.stat().st_size > 512 * 1024  # over max_source_bytes, the limit objects had
    r = daemon.ctl("attach", "getppid", str(obj))
    assert r.returncode == 0, r.stderr
    [slot] = json.loads(daemon.ctl("list", "--json").stdout)["slots"]
    hits = ProgMap(slot["prog_id"], "debug_hits")
    try:
        before = hits.value()
        os.getppid()
        assert hits.value() > before
    finally:
        hits.close()


def test_size_refusals_name_the_setting(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", max_request_bytes=4 << 20, max_object_bytes=4096,
                     max_source_bytes=4096)
    try:
        error = error_of(d, "check", object=base64.b64encode(b"\x7fELF" + bytes(5000)).decode())
        assert error["code"] == "source_too_large" and "(max_object_bytes)" in error["message"], error
        assert error["details"]["setting"] == "max_object_bytes"
        error = error_of(d, "check", source="/*" + "x" * 5000 + "*/")
        assert error["code"] == "source_too_large" and "(max_source_bytes)" in error["message"], error
        assert d.call("list") == {"slots": []}
    finally:
        d.stop()
