"""Diagnostics that name the user's file and lines: the mapping on its own, then clang's and
the verifier's output through a real daemon, for bcc and libbpf handlers."""

from __future__ import annotations

from pathlib import Path

from harness import DaemonProcess
from tailcalld.diagnostics import name_the_file

BCC_SOURCE = """int h(struct bpf_raw_tracepoint_args *ctx) {
    u64 a = ctx->args[0];

    return *(int *)a;
}
"""
# What bcc 0.26 and the verifier print for BCC_SOURCE: bcc's own 12 lines come first.
BCC_LOG = """bpf: Failed to load program: Permission denied
0: R1=ctx() R10=fp0
; u64 a = ctx->args[0]; @ main.c:14
0: (79) r1 = *(u64 *)(r1 +0)          ; R1=scalar()
; return *(int *)a; @ main.c:16
1: (61) r0 = *(u32 *)(r1 +0)
R1 invalid mem access 'scalar'
"""


def test_clang_names_become_the_users_file() -> None:
    log = "/virtual/main.c:3:10: error: use of undeclared identifier 'x'\n<stdin>:9:10: fatal error: 'a.h' not found\n"
    assert name_the_file(log, "fchmodat.c", "") == (
        "fchmodat.c:3:10: error: use of undeclared identifier 'x'\nfchmodat.c:9:10: fatal error: 'a.h' not found\n")


def test_bcc_verifier_lines_are_mapped_back_to_the_users_lines() -> None:
    named = name_the_file(BCC_LOG, "deref.c", BCC_SOURCE)
    assert "; u64 a = ctx->args[0]; @ deref.c:2" in named and "; return *(int *)a; @ deref.c:4" in named
    assert "main.c" not in named


def test_lines_that_are_the_users_already_stay() -> None:
    log = "; return 0; @ <stdin>:7\n"
    source = "\n" * 6 + "return 0;\n"
    assert name_the_file(log, "h.bpf.c", source) == "; return 0; @ h.bpf.c:7\n"


def test_without_a_name_nothing_changes() -> None:
    assert name_the_file(BCC_LOG, None, BCC_SOURCE) == BCC_LOG


# -- through the daemon ------------------------------------------------------------------------

def attach_error(d: DaemonProcess, tmp_path: Path, name: str, source: str, exit_code: int) -> str:
    """What attach says on stderr; ``exit_code``: 3, does not compile; 4, the kernel refuses it."""
    path = tmp_path / name
    path.write_text(source)
    r = d.ctl("attach", "268", str(path))
    assert r.returncode == exit_code, r.stdout
    return r.stderr


def test_a_bcc_compile_error_names_the_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    err = attach_error(daemon, tmp_path, "broken.c", "int h(void *ctx) {\n\n  return undefined_thing;\n}\n",
                       3)
    assert "broken.c:3:10: error: use of undeclared identifier 'undefined_thing'" in err
    assert "/virtual/main.c" not in err


def test_a_bcc_verifier_rejection_names_the_files_lines(daemon: DaemonProcess, tmp_path: Path) -> None:
    err = attach_error(daemon, tmp_path, "deref.c", BCC_SOURCE, 4)
    assert "[verifier_rejected]" in err
    assert "@ deref.c:2" in err and "@ deref.c:4" in err, err


def test_a_libbpf_compile_error_names_the_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    source = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\nSEC("raw_tp/sys_enter")\nint h(void *c) { return nope; }\n'
    err = attach_error(daemon, tmp_path, "h.bpf.c", source, 3)
    assert "h.bpf.c:4:" in err and "<stdin>" not in err, err


def test_warnings_reach_the_client_on_attach(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "warns.c"
    path.write_text("int h(struct bpf_raw_tracepoint_args *ctx) {\n    int *p = ctx;\n    return 0;\n}\n")
    r = daemon.ctl("attach", "268", str(path))
    assert r.returncode == 0, r.stderr
    assert "warns.c:2:" in r.stderr and "warning" in r.stderr, r.stderr
    assert "warns.c:2:" in daemon.call("attach", slot=268, source=path.read_text(), filename="warns.c", fresh=True)["log"]
    quiet = daemon.ctl("attach", "--quiet", "268", str(path))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_libbpf_verifier_rejection_names_the_files_lines(daemon: DaemonProcess, tmp_path: Path) -> None:
    source = ('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\nSEC("raw_tp/sys_enter")\n'
              'int h(struct bpf_raw_tracepoint_args *ctx)\n{\n    return *(int *)ctx->args[0];\n}\n'
              'char LICENSE[] SEC("license") = "GPL";\n')
    err = attach_error(daemon, tmp_path, "deref.bpf.c", source, 4)
    assert "[verifier_rejected]" in err
    assert "@ deref.bpf.c:6" in err, err
