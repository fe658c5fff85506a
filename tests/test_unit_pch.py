"""Which sources may read the precompiled vmlinux.h (tailcalld/pch.py), and how a compile's time
is told by step: pure logic, no clang."""

from __future__ import annotations

import pytest

from tailcalld.compiler import worker_steps
from tailcalld.dialects import PCH_REFUSED, clang_command
from tailcalld.pch import usable_for

FIRST = ['#include "vmlinux.h"\nint x;\n', "#include <vmlinux.h>\n", "// a comment\n\n/* and\n another */\n#include \"vmlinux.h\"\n",
         '  #  include "vmlinux.h" // trailing\n']
NOT_FIRST = ['#include <linux/bpf.h>\n#include "vmlinux.h"\n', '#define task_struct t\n#include "vmlinux.h"\n',
             "int x;\n#include \"vmlinux.h\"\n", '#include "vmlinux.h.old"\n', "#include <bpf/bpf_helpers.h>\n", ""]


@pytest.mark.parametrize("source", FIRST)
def test_a_source_that_includes_vmlinux_h_first_may_use_it(source: str) -> None:
    assert usable_for(source, (), {})


@pytest.mark.parametrize("source", NOT_FIRST)
def test_a_source_with_anything_before_vmlinux_h_may_not(source: str) -> None:
    assert not usable_for(source, (), {})


def test_defines_or_a_local_vmlinux_h_keep_the_header_itself() -> None:
    source = FIRST[0]
    assert not usable_for(source, (("BPF_NO_PRESERVE_ACCESS_INDEX", "1"),), {})
    assert not usable_for(source, (), {"vmlinux.h": "struct mine { int a; };\n"})
    assert usable_for(source, (), {"other.h": "int y;\n"})


def test_the_pch_goes_before_the_source() -> None:
    cmd = clang_command(["/cache/v"], "out.o", ["-DX=1"], "/cache/v/vmlinux.h.k.pch")
    assert cmd[cmd.index("-include-pch") + 1] == "/cache/v/vmlinux.h.k.pch"
    assert cmd.index("-include-pch") < cmd.index("-") and "-include-pch" not in clang_command(["/c"], "o")


def test_clang_refusing_the_pch_is_told_from_the_users_own_errors() -> None:
    assert PCH_REFUSED.search("fatal error: file '/c/vmlinux.h' has been modified since the precompiled header "
                              "'/c/vmlinux.h.k.pch' was built: mtime changed\n")
    assert PCH_REFUSED.search("error: __OPTIMIZE__ predefined macro was enabled in PCH file but is currently disabled\n")
    assert PCH_REFUSED.search("fatal error: malformed or corrupted AST file: 'unable to load module'\n")
    assert not PCH_REFUSED.search('<stdin>:3:2: error: "precompiled header" in the users #error\n')
    assert not PCH_REFUSED.search("<stdin>:4:1: error: use of undeclared identifier 'x'\n")


def test_steps_split_a_compile_at_the_workers_marks() -> None:
    marks = {"imported": 10.05, "prepared": 10.06, "compile": 10.16, "loaded": 10.2}
    steps = worker_steps(9.99, 10.0, marks, with_pch=True)
    assert list(steps) == ["prepare", "worker start (python, imports; bcc's: libbcc)", "worker setup (limits, landlock)",
                           "compile (clang with PCH)", "load (verifier)"]
    assert steps["compile (clang with PCH)"] == pytest.approx(0.1) and steps["prepare"] == pytest.approx(0.01)
    assert worker_steps(1.0, 1.5, None, with_pch=False) == {"prepare": 0.5}  # a worker that died said nothing
