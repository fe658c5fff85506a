"""tailcallctl: talk to tailcalld.  Tables for people, --json for scripts.

    tailcallctl [--json] [--no-legend] [-q] [--socket PATH] [--timeout S] VERB [ARGS...]

The options before the verb may also come after it (``tailcallctl list --json``).  Data goes to
stdout, errors to stderr; with --json, errors are a JSON object on stdout instead
(``{"error": {"code": ..., "message": ..., "details": ...}}``, the daemon's own error body or one
of tailcallctl's: usage, unreachable, permission_denied, bad_reply), and the exit code is the same.

Exit codes (EXIT_CODES below, printed by --help and in the man page):
  0  success
  1  failure: a daemon error, the daemon unreachable, a reply that does not fit the protocol
  2  bad usage: arguments, or a FILE that cannot be read or decoded (with or without a daemon)
  3  attach, check: the handler does not compile
  4  attach, check: the kernel (verifier, program type, function) refuses it
  5  attach, detach --expect: the slot holds another program (nothing was changed)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import unicodedata
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

# What every verb needs, and nothing more: tailcallctl starts on each call, and `list`, `status`
# and `--help` answer within twice a bare Python start (issue 14).  pydantic and the protocol's
# models, tabulate, and each verb's own modules (apply_cli, events_cli, top, metrics_http,
# elfstrip, local_headers, spinner) are imported by the functions that use them.
# tests/test_ctl_startup.py checks what a verb imports.
from . import __version__, reply_check
from .client import Client, RemoteError, default_socket
from .ctl_parser import (APPLY_VERBS, EPILOG, EXIT_CODES, EXIT_CONFLICT, EXIT_FAILURE, EXIT_NO_COMPILE,  # noqa: F401
                         EXIT_REFUSED, EXIT_USAGE, ArgumentsError, build_parser)
from .errors import (CompileError, ForbiddenInclude, FunctionAmbiguous, FunctionNotFound, ObjectError,
                     RequestTooLarge, VerifierRejected, WrongProgramType)
from .plain_table import plain_table
from .wire_limits import MAX_HEADERS, MAX_HEADERS_BYTES, MAX_OBJECT_CHARS, MAX_SOURCE_CHARS

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

    from pydantic import ValidationError

    from .protocol import (AttachResult, CheckResult, DetachResult, ListResult, MapEntry, PingResult, ShowResult,
                           SlotInfo, StatusResult, SyscallsResult, TimingResult, UnloadResult)
    from .spinner import Spinner

# Keyed by the error classes' own codes, not literals: a misspelt class is a NameError at import,
# a misspelt string would silently have sent that failure to exit 1.
HANDLER_EXIT: Mapping[str, int] = {
    CompileError.code: EXIT_NO_COMPILE, ForbiddenInclude.code: EXIT_NO_COMPILE,
    VerifierRejected.code: EXIT_REFUSED, WrongProgramType.code: EXIT_REFUSED,
    FunctionNotFound.code: EXIT_REFUSED, FunctionAmbiguous.code: EXIT_REFUSED, ObjectError.code: EXIT_REFUSED,
}
CHECK_EXIT = HANDLER_EXIT  # its name before attach used it too
HANDLER_VERBS = frozenset({"attach", "check", "apply"})  # the verbs whose exit code tells how a handler failed
# The codes of tailcallctl's own errors, as --json says them (the daemon's are in errors.py).
USAGE_ERROR = "usage"
UNREACHABLE = "unreachable"
PERMISSION_DENIED = "permission_denied"
BAD_REPLY = "bad_reply"


class UsageError(Exception):
    pass


ELF_MAGIC = b"\x7fELF"
# The protocol's own maximum for a handler.  The daemon's max_source_bytes (which tailcallctl
# cannot know without asking) is at most this, so a larger file can never be attached:
# say so here, instead of sending megabytes the daemon will discard.
MAX_HANDLER_BYTES = MAX_SOURCE_CHARS
# The protocol's maximum for an object (base64 takes 4 characters per 3 bytes), and what is read
# of an object file before its debug info is removed (`clang -g` makes them 50 times larger).
MAX_OBJECT_BYTES = MAX_OBJECT_CHARS // 4 * 3
MAX_OBJECT_FILE_BYTES = 64 << 20


def _read_capped(path: str, limit: int = MAX_HANDLER_BYTES) -> bytes:
    """The file's bytes, reading no more than one byte past ``limit``."""
    try:
        if path == "-":
            data, size = sys.stdin.buffer.read(limit + 1), None
        else:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_HANDLER_BYTES and not data.startswith(ELF_MAGIC):
        _refuse_size(path, size if size is not None and size > MAX_HANDLER_BYTES else None, MAX_HANDLER_BYTES,
                     "(1 MiB), and its max_source_bytes may allow less")
    if len(data) > limit:
        _refuse_size(path, size if size is not None and size > limit else None, limit, "")
    return data


def _refuse_size(path: str, size: int | None, limit: int, about: str) -> None:
    found = f"{size} bytes" if size is not None else f"over {limit} bytes"
    raise UsageError(f"{'<stdin>' if path == '-' else path} is too large for a handler ({found}); tailcalld "
                     f"accepts at most {limit} bytes{' ' + about if about else ''}")


def _read_handler(path: str, dialect: str) -> dict[str, Any]:
    """The request fields for a handler file: C source text, or an ELF object as base64.
    The daemon gets the contents, not the path: it may not see the client's files."""
    data = _read_capped(path, MAX_OBJECT_FILE_BYTES)
    fields: dict[str, Any] = {"filename": "<stdin>" if path == "-" else Path(path).name}
    if data.startswith(ELF_MAGIC):
        import base64

        from .elfstrip import strip_debug
        stripped = strip_debug(data)  # the kernel never sees DWARF; libbpf reads .BTF and .BTF.ext
        if len(stripped) > MAX_OBJECT_BYTES:
            _refuse_size(path, len(stripped), MAX_OBJECT_BYTES, "in an object without its debug info, and its "
                                                                "max_object_bytes may allow less")
        return {**fields, "object": base64.b64encode(stripped).decode()}
    try:
        source = data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is neither UTF-8 C source nor a BPF ELF object") from None
    return {**fields, "source": source, "dialect": dialect, "headers": _headers_beside(path, source)}


def _headers_beside(path: str, source: str) -> dict[str, str] | None:
    """The local headers ``source`` includes that sit next to ``path`` (none for stdin)."""
    if path == "-":
        return None
    from .local_headers import HeaderError, find_local_headers
    try:
        return find_local_headers(Path(path), source, MAX_HEADERS, MAX_HEADERS_BYTES) or None
    except HeaderError as err:
        raise UsageError(str(err)) from None


# What a terminal must never receive raw from a name or message: control characters (a newline
# forges a table row, ESC drives the terminal), format characters (bidi overrides reorder what
# is shown), lone surrogates (print() would raise) and Unicode line separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str, keep: str = "") -> str:
    """``text`` with each such character written as an escape (``\\n``, ``\\x1b``, ``\\u202e``),
    except those in ``keep``.  Every human output goes through this; --json does not need it."""
    if text.isprintable():
        return text
    return "".join(c if c in keep or unicodedata.category(c) not in _ESCAPED_CATEGORIES else _escape(c)
                   for c in text)


def printable_block(text: str) -> str:
    """A multi-line text (a compiler's or the verifier's log): its own line breaks and tabs stay."""
    return printable(text, keep="\n\t")


def _left(until: datetime | None) -> str:
    """The time an attach --for/--until has left, as people read it: 42s, 3m05s, 2h10m, 3d04h."""
    if until is None:
        return "-"
    seconds = max(0, int((until - datetime.now(UTC)).total_seconds()))
    for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s")):
        if seconds >= size:
            return f"{seconds // size}{unit}{seconds % size // small:02d}{small_unit}"
    return f"{seconds}s"


def _since(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


# Request builders: the fields each verb sends, from its arguments alone.  They run before
# tailcallctl connects, so whatever is wrong with the caller's input is reported as that
# (exit 2), whether or not tailcalld runs.  A field left None is not sent.

def _pairs(given: list[str] | None, option: str, default: str | None = None) -> dict[str, str] | None:
    """NAME=VALUE arguments of a repeatable option as a mapping (None: none given, nothing sent).
    ``default``: the value of a bare NAME (-D NAME means NAME=1, as for cc)."""
    pairs: dict[str, str] = {}
    for item in given or []:
        name, sep, value = item.partition("=")
        if not sep and default is None:
            raise UsageError(f"{option} {item}: give NAME=VALUE")
        if name in pairs:
            raise UsageError(f"{option} {name} is given twice")
        pairs[name] = value if sep else str(default)
    return pairs or None


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"variables": _pairs(args.variables, "--set"), "defines": _pairs(args.defines, "-D", default="1")}


def attach_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"slot": args.slot, "function": args.function, "fresh": args.fresh or None, "journal": args.journal or None,
            "hook": "exit" if args.exit else None, "expect": args.expect, "for_seconds": args.for_seconds,
            "until": args.until, "cgroup": args.cgroup, "priority": args.priority, **_settings(args),
            **_read_handler(args.file, args.dialect)}


def check_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"function": args.function, **_settings(args), **_read_handler(args.file, args.dialect)}


def detach_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"slot": args.slot, "hook": "exit" if args.exit else None, "expect": args.expect,
            "priority": args.priority}


def no_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def show_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"slot": args.slot, "hook": "exit" if args.exit else None, "priority": args.priority}


def syscalls_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"pattern": args.pattern}


def timing_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"seconds": args.seconds}


# Result printers: each takes its verb's result model, so a field renamed in protocol.py is a
# mypy error here rather than a KeyError in front of the user.

def _warn(warnings: list[str], args: argparse.Namespace) -> None:
    """tailcalld's own warnings about the handler, after the compiler's, on stderr."""
    for warning in [] if args.quiet else warnings:
        print(printable(f"warning: {warning}"), file=sys.stderr)


def show_check(r: CheckResult, args: argparse.Namespace) -> None:
    if r.log.strip() and not args.quiet:
        print(printable_block(r.log.rstrip("\n")), file=sys.stderr)
    _warn(r.warnings, args)
    print(printable(f"{r.function} ({r.dialect}) verified: {r.prog_type} program, {r.insns} instructions"))


def _where(syscall: str, slot: int, hook: str) -> str:
    return f"{syscall}{' exit' if hook == 'exit' else ''} ({slot})"


def show_attach(r: AttachResult, args: argparse.Namespace) -> None:
    if r.log.strip() and not args.quiet:  # warnings, as clang prints them: on stderr
        print(printable_block(r.log.rstrip("\n")), file=sys.stderr)
    _warn(r.warnings, args)
    where = _where(r.syscall, r.slot, r.hook)
    if r.unchanged:
        print(printable(f"unchanged: {where} already runs {r.function} (program {r.prog_id})"))
    elif r.replaced_prog_id is not None:
        print(printable(f"replaced program {r.replaced_prog_id} in {where} with {r.function}: "
                        f"program {r.prog_id}, {r.insns} instructions"))
    else:
        print(printable(f"attached {r.function} to {where}: program {r.prog_id}, {r.insns} instructions"))


def show_detach(r: DetachResult, args: argparse.Namespace) -> None:
    print(printable(f"detached program {r.prog_id} from {_where(r.syscall, r.slot, r.hook)}"))


def _prog(s: SlotInfo) -> str:
    """The program tailcalld wants in the slot, and what the kernel holds there if that differs."""
    if s.state == "in-sync":
        return str(s.prog_id)
    if s.state == "not-restored":
        return f"{s.prog_id} (not restored)"
    if s.state == "restoring":
        return f"{s.prog_id} (restoring)"
    return f"{s.prog_id} (kernel: {'empty' if s.kernel_prog_id is None else s.kernel_prog_id})"


def _avg_ns(s: SlotInfo) -> str:
    return "-" if not s.timed_runs or s.timed_ns is None else f"{s.timed_ns / s.timed_runs:.0f}"


def _settings_shown(s: SlotInfo) -> str:
    """The loader settings a slot's handler was attached with, as they were given."""
    return " ".join([f"{k}={v}" for k, v in s.variables.items()] + [f"-D{k}={v}" for k, v in s.defines.items()])


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def show_list(r: ListResult, args: argparse.Namespace) -> None:
    timed = any(s.timed_runs is not None for s in r.slots)  # the column only while timing is on
    settings = any(s.variables or s.defines for s in r.slots)  # the column only when some slot has any
    ending = any(s.expires_at is not None for s in r.slots)  # the column only when an attach --for runs
    scoped = any(s.cgroup is not None for s in r.slots)  # the columns only when an attach --cgroup runs
    chained = any(s.priority is not None for s in r.slots)  # the column only when an attach --priority runs
    rows = [[s.slot, printable(s.syscall), s.hook] + ([_or_dash(s.priority)] if chained else [])
            + [printable(s.function or "?"), s.dialect or "?", _prog(s),
             printable(s.filename or "-"), _since(s.attached_at), s.hits, s.misses] + ([_avg_ns(s)] if timed else [])
            + ([printable(_settings_shown(s)) or "-"] if settings else []) + ([_left(s.expires_at)] if ending else [])
            + ([printable(s.cgroup or "-"), s.scope_misses if s.cgroup else "-"] if scoped else [])
            for s in r.slots]
    headers = ["SLOT", "SYSCALL", "HOOK"] + (["PRIO"] if chained else []) + [
        "FUNCTION", "DIALECT", "PROG", "SOURCE", "SINCE", "HITS", "MISSES"]
    headers += (["AVG NS"] if timed else []) + (["SETTINGS"] if settings else []) + (["LEFT"] if ending else [])
    headers += ["CGROUP", "OUTSIDE"] if scoped else []
    if rows:
        print(plain_table(rows, headers=[] if args.no_legend else headers))
    if not args.no_legend:
        print(f"\n{len(rows)} slot{'s' if len(rows) != 1 else ''} listed.")


def show_status(r: StatusResult, args: argparse.Namespace) -> None:
    rows = [
        ("Version", r.version), ("PID", r.pid), ("Since", _since(r.started_at)),
        ("Dispatcher", f"program {r.dispatcher_prog_id}, link {r.dispatcher_link_id}"
                       f" ({'adopted from pins' if r.adopted else 'loaded at start'})"),
        ("Pins", r.pin_dir), ("Socket", r.socket),
        ("Slots", f"{r.slots_used} in use of {r.nr_slots}"
                  + (f", {r.restoring} more being restored (list: restoring)" if r.restoring else "")),
        ("Hits", f"{r.hits_total} handler runs since start"
                 + (f"; {r.scoped} slot{'s' if r.scoped != 1 else ''} scoped to a cgroup" if r.scoped else "")
                 + (f"; {r.chained} slot{'s' if r.chained != 1 else ''} with handlers in order" if r.chained else "")),
        ("Misses", f"{r.misses_total} since start, logged every {r.miss_log_interval:g} s"),
    ]
    if r.upgraded_from:
        rows.append(("Upgraded", f"from dispatcher program {r.upgraded_from} at this start"))
    if r.atomic_applies:
        rows.append(("Atomic", f"{r.atomic_applies} apply --atomic change{'s' if r.atomic_applies != 1 else ''} "
                               "since start"))
    if r.next_expiry is not None:
        rows.append(("Next end", f"of an attach --for/--until in {_left(r.next_expiry)} (list: LEFT)"))
    rows.append(("Timing", f"on for {r.timing_seconds_left:.0f} s more" if r.timing_seconds_left else "off"))
    print(plain_table([(name, printable(str(value))) for name, value in rows]))
    if r.corrections:
        print("\nCorrections (kernel and saved state disagreed, at start or while running):")
        for line in r.corrections:
            print(f"  {printable(line)}")


def show_syscalls(r: SyscallsResult, args: argparse.Namespace) -> None:
    rows = [[e.abi, e.nr, e.name, "-" if e.slot is None else e.slot,
             "-" if e.prog_id is None else f"{printable(e.function or '?')} (program {e.prog_id})"] for e in r.syscalls]
    if rows:
        print(plain_table(rows, headers=[] if args.no_legend else ["ABI", "NR", "NAME", "SLOT", "HANDLER"]))
    if not args.no_legend:
        print(f"\n{len(rows)} syscall{'s' if len(rows) != 1 else ''} listed"
              + ("; SLOT - means never dispatched (no 64-bit syscall of that name)."
                 if any(e.slot is None for e in r.syscalls) else "."))


def _map_row(m: MapEntry) -> list[Any]:
    unknown = "?"
    return [m.id, printable(m.name) if m.name is not None else unknown, m.type or unknown,
            unknown if m.key_size is None else m.key_size, unknown if m.value_size is None else m.value_size,
            unknown if m.max_entries is None else m.max_entries]


def show_show(r: ShowResult, args: argparse.Namespace) -> None:
    """As systemctl status and bpftool prog show: a key/value block, then the maps' table, then
    the source (--no-source leaves it out, --source prints it alone, as it was saved)."""
    s = r.slot
    if args.source:
        _print_source(r, args)
        return
    rows = [("Slot", _where(s.syscall, s.slot, s.hook)), ("Function", s.function or "? (adopted: source unknown)"),
            ("Dialect", s.dialect or "?"), ("Program", _prog(s)), ("Source", s.filename or "-"),
            ("SHA-256", s.source_sha256 or "-"), ("Since", _since(s.attached_at)),
            ("By uid", "-" if s.attached_by_uid is None else s.attached_by_uid),
            ("Hits", s.hits), ("Misses", s.misses)]
    if s.timed_runs is not None:
        rows.append(("Avg ns", _avg_ns(s)))
    rows.append(("Events", f"{s.events_emitted} emitted, {s.events_lost} lost, {s.events_delivered} delivered"
                           + (", to the journal too" if s.journal else "")))
    if s.variables or s.defines:
        rows.append(("Settings", _settings_shown(s)))
    if s.priority is not None:
        rows.append(("Priority", f"{s.priority} of {', '.join(map(str, r.priorities))} (lowest runs first; hits "
                                 "are the slot's)"))
    if s.cgroup is not None:
        rows.append(("Cgroup", f"{s.cgroup}: runs for its tasks only; {s.scope_misses} calls of other tasks since "
                               "start"))
    if s.expires_at is not None:
        rows.append(("Ends", f"{_since(s.expires_at)} (in {_left(s.expires_at)}): the slot goes back to what it "
                             "held before"))
    print(plain_table([(name, printable(str(value))) for name, value in rows]))
    print()
    if r.maps:
        print(plain_table([_map_row(m) for m in r.maps],
                          headers=[] if args.no_legend else ["MAP ID", "NAME", "TYPE", "KEY", "VALUE", "MAX ENTRIES"]))
    if not args.no_legend:
        print(f"{chr(10) if r.maps else ''}{len(r.maps)} map{'s' if len(r.maps) != 1 else ''} listed"
              + (printable(f" ({r.maps_note}).") if r.maps_note else "."))
    if not args.no_source:
        print()
        _print_source(r, args)


def _print_source(r: ShowResult, args: argparse.Namespace) -> None:
    """The handler's source as saved, its local headers after it; a marker line before each unless
    --source alone asks for the text (to pipe it into a file)."""
    if r.source is None:
        what = (f"a BPF object of {r.object_bytes} bytes: no source was saved" if r.object_bytes is not None
                else "its source is unknown (a program tailcalld adopted without a record)")
        print(f"# {what}", file=sys.stderr if args.source else sys.stdout)
        return
    files = [(r.slot.filename or "<source>", r.source), *r.headers.items()]
    for n, (name, text) in enumerate(files):
        if n:
            print()
        if not args.source or len(files) > 1:
            print(printable(f"# {name}"))
        # Alone and into a pipe or file, the text as saved; on a terminal, escaped as all output is.
        print(text.rstrip("\n") if args.source and not sys.stdout.isatty() else printable_block(text.rstrip("\n")))


def show_timing(r: TimingResult, args: argparse.Namespace) -> None:
    if not r.on:
        print("handler timing is off")
        return
    dispatch = "" if r.dispatch_ns is None else f"; a call that falls through takes {r.dispatch_ns:.0f} ns"
    print(f"handler timing is on for {r.seconds_left:.0f} s more (see list, top){dispatch}")


def show_unload_all(r: UnloadResult, args: argparse.Namespace) -> None:
    print(f"emptied {len(r.slots_emptied)} slot{'s' if len(r.slots_emptied) != 1 else ''}, "
          f"removed {len(r.pins_removed)} pins; tailcalld has stopped and left nothing in the kernel")


def show_ping(r: PingResult, args: argparse.Namespace) -> None:
    print(printable(f"tailcalld {r.version} (pid {r.pid}) is up"))


class Verb:
    """A tailcallctl verb; its name is also the wire command it sends.  (A plain class, not a
    dataclass: dataclasses imports inspect, a tenth of a bare Python start.)"""

    __slots__ = ("request", "model", "show")

    def __init__(self, request: Callable[[argparse.Namespace], dict[str, Any]], model: str,
                 show: Callable[[Any, argparse.Namespace], None]) -> None:
        self.request = request  # the request's fields, from the arguments
        # The protocol model (in protocol.py) the reply's result must fit, by name: the models
        # are imported when a reply needs one, not when tailcallctl starts.  That `show` takes
        # this very model is checked by tests/test_ctl_startup.py.
        self.model = model
        self.show = show  # that result, for people

    def result(self, verb: str, raw: dict[str, Any]) -> Any:
        """The reply's result as its model has it.  A list or status reply that plainly fits is
        read without pydantic (reply_check.py, the same values); any other goes through the
        model, which raises pydantic's ValidationError when it does not fit."""
        light = reply_check.READERS.get(verb)
        result: Any = light(raw) if light is not None else None  # the model's plain twin
        if result is None:
            from . import protocol
            result = getattr(protocol, self.model).model_validate(raw)
        return result


VERBS: Mapping[str, Verb] = {
    "attach": Verb(attach_request, "AttachResult", show_attach),
    "check": Verb(check_request, "CheckResult", show_check),
    "detach": Verb(detach_request, "DetachResult", show_detach),
    "list": Verb(no_fields, "ListResult", show_list),
    "status": Verb(no_fields, "StatusResult", show_status),
    "show": Verb(show_request, "ShowResult", show_show),
    "ping": Verb(no_fields, "PingResult", show_ping),
    "syscalls": Verb(syscalls_request, "SyscallsResult", show_syscalls),
    "timing": Verb(timing_request, "TimingResult", show_timing),
    "unload-all": Verb(no_fields, "UnloadResult", show_unload_all),
}


def _complain(message: str) -> None:
    print(f"tailcallctl: {printable(message)}", file=sys.stderr)


def _json_error(code: str, message: str, details: Any = None) -> None:
    """An error as --json says it, on stdout (as bpftool -j does): the wire's ErrorBody."""
    from .protocol import ErrorBody  # a failure's path: the models' import is no one's wait
    print(json.dumps({"error": ErrorBody(code=code, message=message, details=details).model_dump()}, indent=2))


def _fail(args: argparse.Namespace, code: str, message: str, details: Any = None) -> None:
    """A failure of tailcallctl's own (no daemon, a bad reply, bad input): on stderr, or with
    --json as a JSON error on stdout."""
    if args.json:
        _json_error(code, message, details)
    else:
        _complain(message)


def _print_error(err: RemoteError, args: argparse.Namespace | None = None) -> None:
    if args is not None and args.json:
        _json_error(err.code, err.message, err.details)
        return
    details = err.details if isinstance(err.details, dict) else {}
    message = err.message
    if err.code == RequestTooLarge.code and isinstance(details.get("limit"), int):
        message = f"the request was too large for the daemon (limit {details['limit']} bytes)"
    _complain(f"{message} [{err.code}]")
    log = details.get("log")
    if isinstance(log, str) and log:
        print(printable_block(log.rstrip("\n")), file=sys.stderr)
    candidates = details.get("candidates")
    if isinstance(candidates, list) and candidates:
        print(printable(f"candidates: {', '.join(str(c) for c in candidates)}"), file=sys.stderr)


def _reply_problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(reply)'}: {e['msg']}"
                     for e in err.errors(include_url=False, include_input=False))


def _model_refused(err: ValueError) -> ValidationError | None:
    """``err`` when it is pydantic's ValidationError (a reply its model refused), else None.
    A model refused something only if pydantic was imported: this never imports it."""
    pydantic_core = sys.modules.get("pydantic_core")
    return err if pydantic_core is not None and isinstance(err, pydantic_core.ValidationError) else None


def _wants_json(argv: list[str]) -> bool:
    """--json among the arguments (before a ``--``): how errors found while parsing them are said."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code of arguments that do not parse (said on stderr as
    argparse does, or as a JSON error on stdout with --json)."""
    try:
        return parser.parse_args(argv)
    except ArgumentsError as err:
        if _wants_json(argv):
            _json_error(USAGE_ERROR, err.message, {"usage": err.usage.strip()})
        else:
            print(err.usage, end="", file=sys.stderr)
            print(err.message, file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `tailcallctl show x | head`: the reader has all it wanted
        # Python would flush stdout again at exit, and fail again: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _stdout_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll says POLLERR), as opposed to a
    BrokenPipeError of the daemon's socket."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (a test's capture)
        return False


def _main(argv: list[str]) -> int:
    parser = build_parser(lazy=True)  # only the verb run is made: see ctl_parser._VerbParsers
    args = parse_arguments(parser, argv)
    if isinstance(args, int):
        return args
    if args.version:
        return versions(args)
    if args.verb is None:  # as bpftool: asking for nothing is asking for help, and is no error
        parser.print_help()
        return 0
    if args.verb == "top":  # client side: samples `list` (and renews `timing`)
        from . import top
        return _talking(args, lambda client: top.run(client, args, printable))
    if args.verb == "events":  # a reply, then (with -f) a stream
        from . import events_cli
        return _talking(args, lambda client: events_cli.run(client, args, printable))
    if args.verb == "metrics":  # HTTP on the metrics socket, not the control protocol
        return show_metrics(args)
    if args.verb in APPLY_VERBS:  # files read (apply) or written (save) by tailcallctl itself
        from . import apply_cli
        return apply_cli.main(args, _talking, printable, _fail)
    verb = VERBS[args.verb]
    try:
        fields = verb.request(args)  # inputs first: see the request builders
    except UsageError as err:
        _fail(args, USAGE_ERROR, str(err))
        return EXIT_USAGE
    return _talking(args, lambda client: _call(client, args, verb, fields))


def _spinner(args: argparse.Namespace) -> Spinner:
    """The progress line of a verb that may compile (on a terminal, never with --json)."""
    from .spinner import Spinner
    what = f"{args.verb} {'<stdin>' if getattr(args, 'file', '-') == '-' else args.file}: compiling and loading"
    return Spinner(printable(what), enabled=args.verb in HANDLER_VERBS and not args.json)


def _call(client: Client, args: argparse.Namespace, verb: Verb, fields: dict[str, Any]) -> int:
    if args.verb in HANDLER_VERBS:  # the others never spin: no need for the spinner's thread (and threading)
        with _spinner(args):  # erased before anything below prints, the error of a failed call too
            raw = client.call(args.verb, **fields)
    else:
        raw = client.call(args.verb, **fields)
    # Validated for --json too: a reply that does not fit the protocol is not a success.
    result = verb.result(args.verb, raw)
    if args.json:
        print(json.dumps(raw, indent=2))  # as received, fields this tailcallctl does not know included
    else:
        verb.show(result, args)
    return 0


def show_metrics(args: argparse.Namespace) -> int:
    from . import metrics_http
    path = args.metrics_socket or (args.socket or default_socket()).parent / "metrics.sock"
    try:
        text = metrics_http.fetch(path, args.timeout)
    except PermissionError:
        _fail(args, PERMISSION_DENIED, f"permission denied on {path}: tailcalld's metrics are for root and its "
                                       "allowed_group", {"socket": str(path)})
        return EXIT_FAILURE
    except (OSError, metrics_http.MetricsUnavailable) as err:
        _fail(args, UNREACHABLE, f"cannot read tailcalld's metrics at {path}: {err} (is tailcalld running, with "
                                 "metrics_socket?)", {"socket": str(path)})
        return EXIT_FAILURE
    sys.stdout.write(text.decode(errors="replace"))
    return 0


# --version asks the daemon too, but a version is no reason to wait long for one that hangs.
VERSION_TIMEOUT = 5.0


def versions(args: argparse.Namespace) -> int:
    """tailcallctl's version, and the daemon's when it answers on the socket (a ping); exit 0
    either way: the client's version is the answer, the daemon's is a bonus."""
    from pydantic import ValidationError

    from .protocol import PingResult
    path = args.socket or default_socket()
    daemon: dict[str, Any] | None = None
    problem = None
    try:
        with Client(path, timeout=min(args.timeout, VERSION_TIMEOUT)) as client:
            pong = PingResult.model_validate(client.call("ping"))
        daemon = {"version": pong.version, "pid": pong.pid, "socket": str(path)}
    except RemoteError as err:
        problem = f"{err.message} [{err.code}]"
    except ValidationError as err:
        problem = f"its reply does not fit the protocol ({_reply_problems(err)})"
    except (OSError, ConnectionError, ValueError) as err:
        problem = str(err)
    if args.json:
        print(json.dumps({"tailcallctl": __version__, "tailcalld": daemon,
                          **({"tailcalld_unreachable": problem} if daemon is None else {})}, indent=2))
    else:
        print(f"tailcallctl {__version__}")
        print(printable(f"tailcalld {daemon['version']} (pid {daemon['pid']}) at {path}" if daemon is not None
                        else f"tailcalld: not reachable at {path} ({problem})"))
    return 0


def exit_code(verb: str, code: str) -> int:
    """The exit code of a daemon error: attach, check and apply tell a handler that does not compile (3)
    from one the kernel refuses (4); a compare-and-swap that lost is 5; anything else is a failure (1)."""
    if code == "conflict":
        return EXIT_CONFLICT
    return HANDLER_EXIT.get(code, EXIT_FAILURE) if verb in HANDLER_VERBS else EXIT_FAILURE


def _talking(args: argparse.Namespace, work: Callable[[Client], int]) -> int:
    """Run ``work`` on a connection to the daemon; every way that can fail becomes a message
    and an exit code."""
    path = args.socket or default_socket()
    try:
        with Client(path, timeout=args.timeout) as client:
            return work(client)
    except RemoteError as err:
        _print_error(err, args)
        return exit_code(args.verb, err.code)
    except BrokenPipeError as err:
        if _stdout_gone():  # our stdout, not the socket: main says nothing of it
            raise
        _fail(args, UNREACHABLE, f"tailcalld at {path} closed the connection: {err}", {"socket": str(path)})
        return EXIT_FAILURE
    except PermissionError:
        _fail(args, PERMISSION_DENIED, f"permission denied on {path}: tailcalld serves root, and the members of its "
                                       "allowed_group if one is configured (sudo tailcallctl ...)", {"socket": str(path)})
        return EXIT_FAILURE
    except (OSError, ConnectionError) as err:
        _fail(args, UNREACHABLE, f"cannot talk to tailcalld at {path}: {err} (is tailcalld running?)",
              {"socket": str(path)})
        return EXIT_FAILURE
    except ValueError as err:
        refused = _model_refused(err)
        if refused is not None:
            _fail(args, BAD_REPLY, f"tailcalld's reply to {args.verb} does not fit the protocol "
                                   f"({_reply_problems(refused)}); are tailcallctl and tailcalld the same version?")
        else:  # a reply line that is not JSON
            _fail(args, BAD_REPLY, f"tailcalld's reply to {args.verb} is not JSON ({err})")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
