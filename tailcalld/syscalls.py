"""Syscall names and numbers of the running architecture, for naming slots; on x86_64 also
the ia32 (32-bit compat) numbers and the 64-bit slot each of them is dispatched to.

Both tables come from the kernel's own syscall tables (syscall_64.tbl, syscall_32.tbl) as
the UAPI headers <asm/unistd_64.h> / <asm/unistd_32.h> carry them, read through the C
preprocessor: nothing is typed by hand.
"""

from __future__ import annotations

import difflib
import fnmatch
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import Literal

from .errors import SlotOutOfRange, UnknownSyscall
from .wire_limits import MAX_PRIORITY

_NR_DEFINE = re.compile(r"^#define __NR_(\w+) (\d+)$", re.MULTILINE)
# ia32 numbers on x86_64 stay below this (462 in 6.18); the dispatcher's compat maps have this many entries.
COMPAT_NR = 512


def _defines(header: str) -> dict[str, int]:
    try:
        out = subprocess.run(["cc", "-E", "-dM", "-"], input=f"#include <{header}>\n",
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {name: int(nr) for name, nr in _NR_DEFINE.findall(out)}


def _from_libc_headers() -> dict[str, int]:
    """The C library's <sys/syscall.h> is generated for the native arch, so the preprocessor
    resolves arch-specific spellings (asm/unistd_64.h, asm-generic) for us."""
    return _defines("sys/syscall.h")


def _ia32_from_headers() -> dict[str, int]:
    """The ia32 table, on x86_64 only: there the kernel hands sys_enter the ia32 number of a
    32-bit caller.  (arm64's compat tasks are not handled: see the README.)"""
    if platform.machine() != "x86_64":
        return {}
    return _defines("asm/unistd_32.h")


def _from_bcc() -> dict[str, int]:
    """bcc ships a static table; older than the headers but needs no compiler."""
    try:
        from bcc.syscall import syscalls  # noqa: PLC0415 - optional, and loads libbcc
    except ImportError:
        return {}
    return {name.decode(): nr for nr, name in syscalls.items()}


# Where in a syscall a slot's handler runs: on entry (raw_tracepoint/sys_enter, arguments) or
# on exit (raw_tracepoint/sys_exit, return value).
Hook = Literal["enter", "exit"]


def link_key(nr_keys: int, key: int, priority: int) -> int:
    """The key of slot ``key``'s handler at ``priority`` (attach --priority): one int, as slot
    keys are, above the ``nr_keys`` slot keys."""
    return nr_keys + key * (MAX_PRIORITY + 1) + priority


def split_link_key(nr_keys: int, key: int) -> tuple[int, int | None]:
    """(slot key, priority) of a key; priority None for a slot key (a handler without priority)."""
    if key < nr_keys:
        return key, None
    base, priority = divmod(key - nr_keys, MAX_PRIORITY + 1)
    return base, priority


@dataclass
class SyscallTable:
    """Resolves a slot given as a number or a syscall name; ``nr_slots`` bounds numbers.

    Inside tailcalld a slot is one int key: an enter slot is its syscall number, an exit slot
    ``nr_slots`` + its number.  ``key`` and ``split`` convert; the wire and the state file say
    the number and the hook instead."""

    nr_slots: int
    by_name: dict[str, int] = field(default_factory=dict)
    ia32_by_name: dict[str, int] = field(default_factory=dict)
    by_nr: dict[int, str] = field(init=False)
    ia32_by_nr: dict[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self.by_nr = {nr: name for name, nr in self.by_name.items()}
        self.ia32_by_nr = {nr: name for name, nr in self.ia32_by_name.items() if nr < COMPAT_NR}

    @classmethod
    def for_this_machine(cls, nr_slots: int) -> SyscallTable:
        # bcc's table only when there is no compiler: importing bcc maps libbcc and LLVM into
        # the daemon, ~60 MB of RSS it otherwise never needs (compiles run in workers).
        return cls(nr_slots, _from_libc_headers() or _from_bcc(), _ia32_from_headers())

    def compat_table(self) -> dict[int, int] | None:
        """What the dispatcher translates 32-bit callers with; None where there is no ia32 ABI."""
        return self.compat_slots() if self.ia32_by_nr else None

    def compat_slots(self) -> dict[int, int]:
        """ia32 number -> the 64-bit slot of the syscall of the same name.  An ia32 syscall with
        no 64-bit namesake (socketcall, ipc, statfs64...) has no entry: it is never dispatched."""
        return {nr: self.by_name[name] for nr, name in self.ia32_by_nr.items()
                if self.by_name.get(name, self.nr_slots) < self.nr_slots}

    def matching(self, pattern: str | None) -> list[tuple[str, int, str, int | None]]:
        """(abi, number, name, slot its calls go to) of every syscall whose name matches the shell
        ``pattern`` (case-insensitive) or whose number is ``pattern``; all of them for None."""
        compat = self.compat_slots()
        rows: list[tuple[str, int, str, int | None]] = [
            (platform.machine(), nr, name, nr) for name, nr in self.by_name.items() if nr < self.nr_slots]
        rows += [("ia32", nr, name, compat.get(nr)) for nr, name in self.ia32_by_nr.items()]
        if pattern is not None:
            text = pattern.strip().lower().removeprefix("sys_")
            rows = [r for r in rows if (str(r[1]) == text if text.isdigit() else fnmatch.fnmatchcase(r[2], text))]
        return sorted(rows, key=lambda r: (r[0] == "ia32", r[1]))

    def key(self, nr: int, hook: Hook = "enter") -> int:
        return nr if hook == "enter" else self.nr_slots + nr

    def split(self, key: int) -> tuple[int, Hook]:
        """(syscall number, hook) of a slot key (or of a handler's key in a chained slot)."""
        key = self.base(key)
        return (key, "enter") if key < self.nr_slots else (key - self.nr_slots, "exit")

    def link_key(self, key: int, priority: int | None) -> int:
        """The key of the handler at ``priority`` in slot ``key`` (the slot key itself for None)."""
        return key if priority is None else link_key(2 * self.nr_slots, key, priority)

    def base(self, key: int) -> int:
        """The slot key of a key: itself, or the slot a chained handler's key is in."""
        return split_link_key(2 * self.nr_slots, key)[0]

    def priority(self, key: int) -> int | None:
        return split_link_key(2 * self.nr_slots, key)[1]

    def slot_label(self, key: int) -> str:
        """How messages name a slot: 'openat (257)', 'openat exit (257)', 'openat (257) priority 10'."""
        nr, hook = self.split(key)
        priority = self.priority(key)
        return (f"{self.label(nr)}{' exit' if hook == 'exit' else ''} ({nr})"
                + (f" priority {priority}" if priority is not None else ""))

    def ia32_label(self, nr: int) -> str:
        return self.ia32_by_nr.get(nr) or f"syscall_{nr}"

    def name(self, nr: int) -> str | None:
        return self.by_nr.get(nr)

    def label(self, key: int) -> str:
        """The syscall's name ('openat'), for an exit slot key too."""
        nr = self.split(key)[0]
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

    def resolve_key(self, spec: int | str) -> int:
        """A slot key from a slot spec that may name the hook: 'openat', 257, 'openat:exit',
        '257:exit' (config files, where a slot is one value)."""
        if isinstance(spec, str) and spec.strip().lower().endswith((":exit", ":enter")):
            text, _, hook = spec.strip().rpartition(":")
            return self.key(self.resolve(text), "exit" if hook.lower() == "exit" else "enter")
        return self.resolve(spec)

    def _by_name(self, text: str) -> int:
        name = text.lower().removeprefix("sys_")
        if name in self.by_name:
            return self.by_name[name]
        close = difflib.get_close_matches(name, self.by_name, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownSyscall(f"unknown syscall name {text!r} on this architecture{hint}",
                             {"name": text, "suggestions": close})
