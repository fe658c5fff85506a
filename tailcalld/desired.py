"""The apply file: every slot a node should have, as `tailcallctl apply FILE` reads it, `tailcallctl
save` writes it and the daemon's ``desired_slots`` names it.

    [[slot]]
    slot = "fchmodat"            # syscall name or number (required)
    hook = "enter"               # enter (default) or exit
    file = "fchmodat.c"          # C source or .o, relative to this file's folder (required)
    function = "enter_fchmodat"  # optional: the program in the file
    dialect = "auto"             # optional: auto | bcc | libbpf (C source only)
    journal = false              # optional: events to the journal too
    cgroup = "/sys/fs/cgroup/system.slice/nginx.service"  # optional: its tasks only
    priority = 10                # optional: one of the slot's handlers, run in order, lowest first
    set = { debug = "1" }        # optional: loader-set globals (attach --set)
    define = { VERBOSE = "1" }   # optional: -D macros

and, before the first table, ``atomic = true``: every apply of the file switches its slots at one
instant (apply --atomic), the daemon's own desired_slots applies too.

Reading one gives an apply request's fields (protocol.ApplyRequest): each handler file read
once, however many slots use it, with the local headers found beside it as attach finds them.
Who reads decides how files are opened (``Reader``): tailcallctl opens them as its user does,
the daemon only from folders root alone can change (desired_slots.py).
"""

from __future__ import annotations

import base64
import difflib
import json
import posixpath
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .elfstrip import strip_debug
from .local_headers import HeaderError, find_local_headers
from .protocol import MAX_APPLY_SLOTS, MAX_HEADERS, MAX_HEADERS_BYTES, MAX_OBJECT_CHARS, MAX_PRIORITY, MAX_SOURCE_CHARS

ELF_MAGIC = b"\x7fELF"
MAX_APPLY_FILE_BYTES = 1 << 20  # the TOML itself: 2048 tables of a few lines fit many times over
MAX_OBJECT_BYTES = MAX_OBJECT_CHARS // 4 * 3  # what the protocol carries of an object (base64)
MAX_OBJECT_FILE_BYTES = 64 << 20  # read of an object before its debug info is dropped (clang -g)

# How a file is read: (path, at most this many bytes) -> its bytes; raises OSError, or
# DesiredFileError for a file that may not be used.
Reader = Callable[[Path, int], bytes]


class DesiredFileError(Exception):
    """An apply file, or a file it names, that cannot be used: the message says which and why."""


def plain_read(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit + 1)


Identifier = Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class SlotEntry(BaseModel):
    """One [[slot]] table."""

    model_config = ConfigDict(extra="forbid")
    slot: StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=100)]
    hook: Literal["enter", "exit"] = "enter"
    file: Annotated[StrictStr, Field(min_length=1, max_length=4096)]
    function: Identifier | None = None
    dialect: Literal["auto", "bcc", "libbpf"] = "auto"
    journal: StrictBool = False
    cgroup: Annotated[StrictStr, Field(min_length=1, max_length=4096)] | None = None  # attach --cgroup
    priority: Annotated[StrictInt, Field(ge=0, le=MAX_PRIORITY)] | None = None  # attach --priority
    # TOML numbers and booleans are taken as they are written (set = { pid = 42, on = true }).
    variables: dict[Identifier, StrictStr | StrictBool | StrictInt] = Field(default_factory=dict, alias="set")
    defines: dict[Identifier, StrictStr | StrictInt] = Field(default_factory=dict, alias="define")


class DesiredFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Every apply of this file switches its slots at one instant (apply --atomic), the daemon's
    # desired_slots included: the file says how it must be applied.
    atomic: StrictBool = False
    slot: Annotated[list[SlotEntry], Field(max_length=MAX_APPLY_SLOTS)] = Field(default_factory=list)


def parse(text: str, origin: str) -> DesiredFile:
    """The file's slots.  Raises DesiredFileError naming ``origin``, the [[slot]] table (from 1)
    and the field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DesiredFileError(f"{origin} is not valid TOML: {exc}") from None
    try:
        return DesiredFile.model_validate(data)
    except ValidationError as exc:
        raise DesiredFileError(f"{origin}: {'; '.join(_problem(e) for e in exc.errors())}") from None


def _problem(error: Any) -> str:
    loc = list(error["loc"])
    if loc[:1] != ["slot"]:
        where = ".".join(str(p) for p in loc) or "(top level)"
        hint = ("; an apply file holds `atomic = true|false` and [[slot]] tables only"
                if error["type"] == "extra_forbidden" else "")
        return f"{where}: {error['msg']}{hint}"
    if len(loc) == 1:
        return f"slot: {error['msg']} (write each slot as a [[slot]] table)"
    index, fields = loc[1], loc[2:]
    # A union's branches add their type names to the location (slot.0.slot.str): keep the fields.
    names = [str(p) for p in fields if not str(p).startswith(("str", "int", "bool", "function-", "constrained-"))]
    what = error["msg"]
    if error["type"] == "extra_forbidden":
        known = [f.alias or name for name, f in SlotEntry.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1) if len(names) == 1 else []
        what = "unknown field" + (f" (did you mean {close[0]}?)" if close else f"; the fields are {', '.join(known)}")
    return f"[[slot]] {index + 1 if isinstance(index, int) else index}: {'.'.join(names) or '(table)'}: {what}"


def read_request(path: Path, read: Reader = plain_read, origin: str | None = None,
                 tried: list[Path] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """The apply request's fields (files, slots, source) for the apply file at ``path``, and
    every file that was read (the daemon watches them).  Raises DesiredFileError; ``tried``
    then holds the files it read or tried to (a missing handler file among them), so that the
    daemon tries again once one of them changes or appears."""
    origin = origin or str(path)
    read_files = [path] if tried is None else tried
    read_files.append(path)
    text = _text(_read(read, path, MAX_APPLY_FILE_BYTES, "apply file"), path, "apply file")
    desired = parse(text, origin)
    files: list[dict[str, Any]] = []
    index_of: dict[str, int] = {}
    slots: list[dict[str, Any]] = []
    for i, entry in enumerate(desired.slot):
        name = posixpath.normpath(entry.file)
        if name not in index_of:
            read_files.append(path.parent / name)
            try:
                fields, used = handler_file(path.parent / name, entry.file, read)
            except DesiredFileError as err:
                raise DesiredFileError(f"{origin}, [[slot]] {i + 1}: {err}") from None
            index_of[name] = len(files)
            files.append(fields)
            read_files += used[1:]  # its local headers (the file itself is in already)
        slots.append({"slot": entry.slot, "hook": entry.hook, "file": index_of[name], "function": entry.function,
                      "dialect": entry.dialect, "journal": entry.journal, "cgroup": entry.cgroup,
                      "priority": entry.priority,
                      "variables": {k: _text_value(v) for k, v in entry.variables.items()},
                      "defines": {k: str(v) for k, v in entry.defines.items()}})
    return {"files": files, "slots": slots, "source": origin, "atomic": desired.atomic}, read_files


def _text_value(value: str | bool | int) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def handler_file(path: Path, name: str, read: Reader) -> tuple[dict[str, Any], list[Path]]:
    """A handler's file as protocol.HandlerFile fields (its name as the apply file gives it), and
    the files read for it (it and its local headers)."""
    data = _read(read, path, MAX_OBJECT_FILE_BYTES, "handler file")
    if data.startswith(ELF_MAGIC):
        stripped = strip_debug(data)  # as attach sends it: the kernel never sees DWARF
        if len(stripped) > MAX_OBJECT_BYTES:
            raise DesiredFileError(f"{path} is too large for a handler: {len(stripped)} bytes without its debug "
                                   f"info; tailcalld accepts at most {MAX_OBJECT_BYTES}")
        return {"filename": name, "object": base64.b64encode(stripped).decode()}, [path]
    if len(data) > MAX_SOURCE_CHARS:
        raise DesiredFileError(f"{path} is too large for a handler source; tailcalld accepts at most "
                               f"{MAX_SOURCE_CHARS} bytes")
    source = _text(data, path, "handler file", "neither UTF-8 C source nor a BPF ELF object")
    try:
        headers = find_local_headers(path, source, MAX_HEADERS, MAX_HEADERS_BYTES, read=read)
    except HeaderError as err:
        raise DesiredFileError(str(err)) from None
    used = [path] + [path.parent / h for h in headers]
    return {"filename": name, "source": source, "headers": headers or None}, used


def _read(read: Reader, path: Path, limit: int, what: str) -> bytes:
    try:
        data = read(path, limit)
    except FileNotFoundError:
        raise DesiredFileError(f"the {what} {path} does not exist") from None
    except OSError as exc:
        raise DesiredFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise DesiredFileError(f"the {what} {path} is larger than {limit} bytes")
    return data


def _text(data: bytes, path: Path, what: str, problem: str = "not UTF-8 text") -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise DesiredFileError(f"the {what} {path} is {problem}") from None


# Writing one (tailcallctl save) -------------------------------------------------------------

def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (\\uXXXX for control characters)."""
    return json.dumps(text, ensure_ascii=False)


def _table(values: dict[str, str]) -> str:
    return "{ " + ", ".join(f"{k} = {_string(v)}" for k, v in values.items()) + " }"


def entry_text(slot: str | int, hook: str, file: str, function: str | None, dialect: str | None, journal: bool,
               variables: dict[str, str], defines: dict[str, str], cgroup: str | None = None,
               priority: int | None = None) -> str:
    """One [[slot]] table, with only the fields that differ from their defaults (dialect is
    always written for C: the file's detection could say otherwise if the handler was forced)."""
    lines = ["[[slot]]", f"slot = {_string(slot) if isinstance(slot, str) else slot}"]
    if hook != "enter":
        lines.append(f"hook = {_string(hook)}")
    lines.append(f"file = {_string(file)}")
    if function is not None:
        lines.append(f"function = {_string(function)}")
    if dialect in ("bcc", "libbpf"):
        lines.append(f"dialect = {_string(dialect)}")
    if journal:
        lines.append("journal = true")
    if cgroup is not None:
        lines.append(f"cgroup = {_string(cgroup)}")
    if priority is not None:
        lines.append(f"priority = {priority}")
    if variables:
        lines.append(f"set = {_table(variables)}")
    if defines:
        lines.append(f"define = {_table(defines)}")
    return "\n".join(lines) + "\n"
