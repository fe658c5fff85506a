"""Syscall names and numbers of the running architecture, for naming slots."""

from __future__ import annotations

import difflib
import re
import subprocess
from dataclasses import dataclass, field

from .errors import SlotOutOfRange, UnknownSyscall

_NR_DEFINE = re.compile(r"^#define __NR_(\w+) (\d+)$", re.MULTILINE)


def _from_libc_headers() -> dict[str, int]:
    """The C library's <sys/syscall.h> is generated for the native arch, so the preprocessor
    resolves arch-specific spellings (asm/unistd_64.h, asm-generic) for us."""
    try:
        out = subprocess.run(["cc", "-E", "-dM", "-"], input="#include <sys/syscall.h>\n",
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {name: int(nr) for name, nr in _NR_DEFINE.findall(out)}


def _from_bcc() -> dict[str, int]:
    """bcc ships a static table; older than the headers but needs no compiler."""
    try:
        from bcc.syscall import syscalls  # noqa: PLC0415 - optional, and loads libbcc
    except ImportError:
        return {}
    return {name.decode(): nr for nr, name in syscalls.items()}


@dataclass
class SyscallTable:
    """Resolves a slot given as a number or a syscall name; ``nr_slots`` bounds numbers."""

    nr_slots: int
    by_name: dict[str, int] = field(default_factory=dict)
    by_nr: dict[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self.by_nr = {nr: name for name, nr in self.by_name.items()}

    @classmethod
    def for_this_machine(cls, nr_slots: int) -> SyscallTable:
        # bcc's table only when there is no compiler: importing bcc maps libbcc and LLVM into
        # the daemon, ~60 MB of RSS it otherwise never needs (compiles run in workers).
        return cls(nr_slots, _from_libc_headers() or _from_bcc())

    def name(self, nr: int) -> str | None:
        return self.by_nr.get(nr)

    def label(self, nr: int) -> str:
        return self.name(nr) or f"syscall_{nr}"

    def resolve(self, slot: int | str) -> int:
        if isinstance(slot, str):
            text = slot.strip()
            if not re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII):
                return self._by_name(text)
            if len(text) > 100:  # int() refuses 4300+ digits, and anything this long is out of range
                raise SlotOutOfRange(f"slot {text[:20]}{'...' if len(text) > 20 else ''} is out of range: "
                                     f"slots are 0..{self.nr_slots - 1}", {"max": self.nr_slots - 1})
            slot = int(text)
        if not 0 <= slot < self.nr_slots:
            raise SlotOutOfRange(f"slot {slot} is out of range: slots are 0..{self.nr_slots - 1}",
                                 {"slot": slot, "max": self.nr_slots - 1})
        return slot

    def _by_name(self, text: str) -> int:
        name = text.lower().removeprefix("sys_")
        if name in self.by_name:
            return self.by_name[name]
        close = difflib.get_close_matches(name, self.by_name, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownSyscall(f"unknown syscall name {text!r} on this architecture{hint}",
                             {"name": text, "suggestions": close})
