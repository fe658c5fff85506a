"""Where each ABI passes syscall arguments, as tailcalld.h's TC_ARG reads them: the table is
written once, in the header (its "abi 0 1 2 3 4 5" comment lines, which its macros follow),
and the README's copy is generated from it: ``python -m tailcalld.handler_abi``."""

from __future__ import annotations

import re

from .compiler import bpf_source

_ROW = re.compile(r"^//\s+(x86_64|ia32|arm64)\s+(.+)$", re.MULTILINE)
_CALLERS = {"x86_64": "x86_64 (64-bit callers)", "ia32": "x86_64, 32-bit callers (int 0x80, sysenter)",
            "arm64": "arm64 (and AArch32 callers, 32 bits wide)"}


def register_table() -> dict[str, list[str]]:
    """ABI -> the pt_regs field of arguments 0..5."""
    return {abi: regs.split() for abi, regs in _ROW.findall(bpf_source("tailcalld.h"))}


def markdown() -> str:
    lines = ["| ABI | arg 0 | arg 1 | arg 2 | arg 3 | arg 4 | arg 5 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {_CALLERS[abi]} | " + " | ".join(f"`{r}`" for r in regs) + " |"
              for abi, regs in register_table().items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
