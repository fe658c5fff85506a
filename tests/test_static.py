"""The code's own checks: types (mypy, every function annotated), lint (ruff), and the
declarations that live twice (BPF C and Python, header and README) agreeing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tailcalld.compiler import bpf_source
from tailcalld.handler_abi import markdown, register_table

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROOT = REPO


def test_types() -> None:
    r = subprocess.run([str(BIN / "mypy"), "tailcalld"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lint() -> None:
    r = subprocess.run([str(BIN / "ruff"), "check", "tailcalld", "tests", "bench"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_is_opened_by_id() -> None:
    """Opening a BPF object by id, or walking ids, needs CAP_SYS_ADMIN, which the unit does not
    give the daemon (README, "Privileges"): tailcalld reaches its objects through pins and fds."""
    by_id = re.compile(r"_get_fd_by_id|_get_next_id")  # libbpf's names: bpf_prog_get_fd_by_id, ...
    found = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tailcalld").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if by_id.search(line)]
    assert found == []


def _struct_body(source: str, name: str) -> list[str]:
    body = re.search(r"struct " + name + r" \{(.*?)\n\};", source, re.DOTALL)
    assert body is not None, name
    return [line.split("//")[0].strip() for line in body.group(1).splitlines() if line.split("//")[0].strip()]


def test_dispatcher_and_handlers_agree_on_the_call_record() -> None:
    """tailcalld.h (what handlers include) and the dispatcher declare struct tc_call apart."""
    assert _struct_body(bpf_source("tailcalld.h"), "tc_call") == _struct_body(bpf_source("dispatcher.bpf.c"), "tc_call")


def test_tc_arg_reads_the_registers_of_the_table() -> None:
    """The x86 macros of tailcalld.h follow its register table, which the README shows."""
    header = bpf_source("tailcalld.h")
    header = header[header.index("#else", header.index("#define __TC_IA32(n) __TC_NATIVE(n)")):]  # x86: after arm64
    table = register_table()
    for macro, abi in (("__TC_NATIVE", "x86_64"), ("__TC_IA32", "ia32")):
        body = re.search(r"#define " + macro + r"\(n\) (.*?)\n(?!\s)", header, re.DOTALL)
        assert body is not None
        assert re.findall(r"offsetof\(struct pt_regs, (\w+)\)", body.group(1)) == table[abi]
    assert markdown() in (ROOT / "README.md").read_text(), "README's register table: python -m tailcalld.handler_abi"
