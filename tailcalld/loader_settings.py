"""What a user sets on a handler at load time: ``--set NAME=VALUE`` (a global variable of a
libbpf handler, in its .rodata, .data or .bss) and ``-D NAME=VALUE`` (a macro for the compile).

Pure Python, no libbpf: the names and values are checked here, and a value is encoded here
into the bytes of its variable, once bpf_object.py has found the variable's type in the
object's BTF.  Both kinds of setting are part of what a handler is (dialects.Artifact), are
persisted with its slot, and reapplied when it is rebuilt.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .errors import BadRequest, InvalidSetting

# A setting's name is a C identifier: it names a variable or a macro, nothing else.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_SETTINGS = 64  # of each kind, per handler
MAX_VALUE_CHARS = 4096  # a --set value (a char array's text)
MAX_DEFINE_CHARS = 256  # a -D value
# A macro's value is one line of printable ASCII: clang turns -DNAME=VALUE into the line
# `#define NAME VALUE`, so a newline would add directives of its own, and a final backslash
# would splice the next predefined line into this one.
_DEFINE_VALUE = re.compile(r"[\x20-\x7e]*")

Settings = tuple[tuple[str, str], ...]  # (name, value) pairs sorted by name: hashable, one spelling


def settings(values: Mapping[str, str] | None) -> Settings:
    """The canonical form of a name -> value mapping: the order it was given in never matters."""
    return tuple(sorted((values or {}).items()))


def check_dialect(dialect: str, variables: Settings, defines: Settings) -> None:
    """Refuse settings the handler's kind cannot take, before anything is compiled."""
    if variables and dialect == "bcc":
        raise BadRequest("--set writes global variables of libbpf handlers (C with SEC(), or a .o); for a bcc "
                         "handler, define a macro with -D NAME=VALUE")
    if defines and dialect == "object":
        raise BadRequest("-D defines a macro for the compile, and a prebuilt object is not compiled; set its "
                         "global variables with --set NAME=VALUE")


def check_define(name: str, value: str) -> None:
    """Raise ValueError (pydantic's validators turn it into a bad_request) for a -D clang must
    not get: anything but NAME=VALUE with an identifier and a bounded one-line value."""
    if not IDENTIFIER.fullmatch(name):
        raise ValueError(f"-D {name[:40]!r}: a macro name is a C identifier ([A-Za-z_][A-Za-z0-9_]*, at most 128)")
    if len(value) > MAX_DEFINE_CHARS:
        raise ValueError(f"-D {name}: the value is {len(value)} characters; at most {MAX_DEFINE_CHARS}")
    if not _DEFINE_VALUE.fullmatch(value) or value.endswith("\\"):
        raise ValueError(f"-D {name}: the value must be one line of printable ASCII, not ending in a backslash")


def define_flags(defines: Settings) -> list[str]:
    """The compiler flags of checked -D settings: one argument each, never split by a shell."""
    return [f"-D{name}={value}" for name, value in defines]


# -- global variables ----------------------------------------------------------------------

@dataclass(frozen=True)
class VarType:
    """What --set needs to know of a variable's type, as the object's BTF declares it."""

    kind: Literal["int", "bool", "chars", "other"]
    size: int  # bytes of the whole variable
    signed: bool = False
    spelling: str = ""  # the type as the source names it (u32, int, char[16], struct cfg), for messages

    def describe(self) -> str:
        if self.kind == "int":
            return f"{self.spelling} ({self.size} bytes, {'signed' if self.signed else 'unsigned'})"
        return self.spelling


@dataclass(frozen=True)
class GlobalVar:
    name: str
    section: str  # .rodata, .data, .bss (or .data.NAME, .rodata.NAME)
    offset: int  # in the section's map value
    type: VarType

    @property
    def settable(self) -> bool:
        return self.type.kind != "other"

    def describe(self) -> str:
        return f"{self.name} ({self.type.describe()}, {self.section})"


def int_range(t: VarType) -> tuple[int, int]:
    bits = 8 * t.size
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if t.signed else (0, (1 << bits) - 1)


def _parse_int(var: GlobalVar, text: str) -> int:
    try:
        return int(text.strip(), 0)  # 42, -1, 0x2a, 0o52, 0b101010
    except ValueError:
        raise InvalidSetting(f"--set {var.name}={text[:40]}: {var.type.describe()} takes an integer "
                             "(decimal, 0x.., 0o.. or 0b..)") from None


def _encode_int(var: GlobalVar, text: str) -> bytes:
    value = _parse_int(var, text)
    low, high = int_range(var.type)
    if not low <= value <= high:
        raise InvalidSetting(f"--set {var.name}={text[:40]}: out of range for {var.type.describe()}: "
                             f"{low}..{high}")
    return value.to_bytes(var.type.size, sys.byteorder, signed=var.type.signed)  # BPF runs in the host's order


_BOOLS = {"1": 1, "true": 1, "yes": 1, "0": 0, "false": 0, "no": 0}


def _encode_bool(var: GlobalVar, text: str) -> bytes:
    value = _BOOLS.get(text.strip().lower())
    if value is None:
        raise InvalidSetting(f"--set {var.name}={text[:40]}: {var.type.describe()} takes true, false, 1 or 0")
    return value.to_bytes(var.type.size, sys.byteorder)


def _encode_chars(var: GlobalVar, text: str) -> bytes:
    data = text.encode()
    if len(data) >= var.type.size:  # the C string's terminating NUL must fit too
        raise InvalidSetting(f"--set {var.name}=...: {len(data)} bytes do not fit {var.type.describe()} with its "
                             f"terminating NUL (at most {var.type.size - 1})")
    if b"\0" in data:
        raise InvalidSetting(f"--set {var.name}=...: the text has a NUL byte; C would see it end there")
    return data.ljust(var.type.size, b"\0")


def encode(var: GlobalVar, text: str) -> bytes:
    """The bytes ``text`` stands for in ``var``, exactly ``var.type.size`` of them.  Raises
    InvalidSetting (wrong type, not a number, out of range, too long)."""
    match var.type.kind:
        case "int":
            return _encode_int(var, text)
        case "bool":
            return _encode_bool(var, text)
        case "chars":
            return _encode_chars(var, text)
    raise InvalidSetting(f"--set {var.name}: {var.name} is a {var.type.describe()} ({var.section}); --set "
                         "writes integers, bool, enums and char arrays only")


def unknown(name: str, found: list[GlobalVar]) -> InvalidSetting:
    """The error for a --set of a variable the object does not have: the settable ones listed."""
    settable = [v.describe() for v in found if v.settable]
    listed = "; settable: " + ", ".join(settable) if settable else "; it has no variable --set can write"
    return InvalidSetting(f"--set {name}: the object has no global variable {name!r} in .rodata, .data or .bss"
                          + listed, {"candidates": [v.name for v in found if v.settable]})
