"""tailcallctl's arguments: the parser of every verb and option, and the exit codes --help prints.

A module of its own, light on purpose: ``tailcallctl --help`` (and any verb's arguments) needs
argparse and nothing of the daemon's -- no pydantic, no protocol models, no tabulate -- so that it
answers within twice a bare Python start (issue 14).  ctl.py runs the verbs; ctl_docs.py makes
the completion and the man page from ``build_parser``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .control_socket import SOCKET_ENV, default_socket
from .wire_limits import MAX_PRIORITY

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any, NoReturn, TypeAlias

EXIT_FAILURE = 1
EXIT_USAGE = 2
# attach, check and apply: which way a handler failed
EXIT_NO_COMPILE = 3
EXIT_REFUSED = 4
EXIT_CONFLICT = 5  # attach or detach --expect: the slot holds another program
EXIT_CODES = ((0, "success"),
              (EXIT_FAILURE, "failure: a daemon error, the daemon unreachable, a reply that does not fit"),
              (EXIT_USAGE, "bad usage: arguments, or a FILE that cannot be read or decoded"),
              (EXIT_NO_COMPILE, "attach, check, apply: a handler does not compile"),
              (EXIT_REFUSED, "attach, check, apply: the kernel (verifier, program type, function) refuses one"),
              (EXIT_CONFLICT, "attach, detach --expect: the slot holds another program (nothing was changed)"))
EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES)
APPLY_VERBS = ("apply", "save")  # apply_cli.py runs them


def _add_handler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="handler: bcc or libbpf C source, or a BPF .o ('-' reads stdin)")
    p.add_argument("--function", metavar="NAME", help="program to load (default: the only raw_tp one)")
    p.add_argument("--dialect", choices=["auto", "bcc", "libbpf"], default="auto",
                   help="C dialect (default: auto: SEC(), vmlinux.h or bpf/bpf_helpers.h mean libbpf)")
    p.add_argument("--set", dest="variables", action="append", metavar="NAME=VALUE",
                   help="set a global variable (.rodata, .data, .bss) of a libbpf handler before it is loaded: "
                        "an integer (42, -1, 0x2a), true/false, or text for a char array; repeatable")
    p.add_argument("-D", dest="defines", action="append", metavar="NAME[=VALUE]",
                   help="define a macro for the compile of C source (bcc or libbpf; NAME alone: NAME=1); repeatable")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value < 1e9:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    return parse


def _cgroup_path(text: str) -> str:
    """--cgroup's value, made absolute here: the daemon does not share the caller's folder."""
    return os.path.abspath(text)


def _priority(text: str) -> int:
    """--priority's value: 0..999."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a priority (a number, 0..{MAX_PRIORITY})") from None
    if not 0 <= value <= MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"priority {value} is out of range: 0..{MAX_PRIORITY}")
    return value


def _expected(text: str) -> int | str:
    """--expect's value: a program id, or "empty"."""
    if text == "empty":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is neither a program id nor 'empty'")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """--for's value: seconds, or a number with s, m, h or d."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no duration (90, 90s, 5m, 2h, 1d)") from None
    if not 0 < seconds <= 366 * 86400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: a duration above 0 and at most a year")
    return seconds


def _time(text: str) -> str:
    """--until's value as the daemon takes it: ISO 8601 with an offset (the local one if none)."""
    from datetime import datetime  # noqa: PLC0415 - only for this option (tailcallctl's start-up)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no ISO 8601 time (2026-12-24T18:00)") from None
    return (when if when.tzinfo is not None else when.astimezone()).isoformat()


_EXPECT_HELP = ("change the slot only if it still holds program PROG_ID (`tailcallctl list`), or nothing: "
                "'empty'; else nothing changes and the exit status is 5")


class ArgumentsError(Exception):
    """Bad arguments: what argparse would print before it exits 2, raised instead, so that main
    can say it as JSON when --json was given."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, which argparse's HelpFormatter asks for: $COLUMNS,
    else stdout's terminal, else 80.  Here so that tailcallctl need not import shutil (and with
    it bz2, lzma, fnmatch): every add_argument makes a formatter, help or not."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)  # argparse's own default


class _RawDescriptionFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)  # the verbs' parsers too: add_parser makes a _Parser
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(self.format_usage(), f"{self.prog}: error: {message}")


def _global_options(p: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
    """The options every verb takes, declared once: on the main parser with their defaults, and
    on each verb's with argparse.SUPPRESS (``default``), so that an option given before the
    verb is not reset by the verb's parser, and one given after it is seen as well."""
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print the daemon's reply as JSON, and errors as a JSON object on stdout")
    p.add_argument("--no-legend", action="store_true", default=default(False),
                   help="tables without their header and footer")
    p.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="no compiler warnings on success (failures are always said)")
    p.add_argument("--socket", type=Path, default=default(None), metavar="PATH",
                   help=f"control socket (default: ${SOCKET_ENV}, else {default_socket()})")
    p.add_argument("--timeout", type=float, default=default(120.0), metavar="SECONDS",
                   help="seconds to wait for a reply (default: 120)")


def _as_given(value: Any) -> Any:
    return value


def _suppressed(value: Any) -> Any:
    return argparse.SUPPRESS


def _attach(a: argparse.ArgumentParser) -> None:
    a.add_argument("slot", metavar="SLOT", help="syscall number or name, e.g. 268 or fchmodat")
    _add_handler_arguments(a)
    a.add_argument("--exit", action="store_true",
                   help="the syscall's exit slot: the handler runs on sys_exit and sees the return value")
    a.add_argument("--fresh", action="store_true",
                   help="compile and load anew, with maps of its own (default: reuse the program of a slot "
                        "that already runs the same handler)")
    a.add_argument("--journal", action="store_true",
                   help="write the slot's events (TC_PRINTF, TC_EMIT) to the journal too (rate-limited)")
    a.add_argument("--expect", type=_expected, metavar="PROG_ID|empty", help=_EXPECT_HELP)
    a.add_argument("--priority", type=_priority, metavar="N",
                   help="one of several handlers of the slot, run in order, lowest first (0..999); a handler "
                        "returning non-zero (TC_STOP) ends the chain")
    a.add_argument("--cgroup", type=_cgroup_path, metavar="PATH",
                   help="run the handler only for tasks in this cgroup v2 folder's subtree, e.g. "
                        "/sys/fs/cgroup/system.slice/nginx.service; other tasks' calls count as scope misses")
    ends = a.add_mutually_exclusive_group()
    ends.add_argument("--for", dest="for_seconds", type=_duration, metavar="DURATION",
                      help="then the slot goes back to what it held before, also across restarts: 90, 90s, 5m, 2h, 1d")
    ends.add_argument("--until", type=_time, metavar="TIME",
                      help="as --for, until TIME: ISO 8601, local time unless it has an offset (2026-12-24T18:00)")


def _detach(d: argparse.ArgumentParser) -> None:
    d.add_argument("slot", metavar="SLOT", help="syscall number or name")
    d.add_argument("--exit", action="store_true", help="empty the syscall's exit slot")
    d.add_argument("--expect", type=_expected, metavar="PROG_ID|empty", help=_EXPECT_HELP)
    d.add_argument("--priority", type=_priority, metavar="N",
                   help="the handler of that priority, in a slot that runs several; the others stay")


def _show(sh: argparse.ArgumentParser) -> None:
    sh.add_argument("slot", metavar="SLOT", help="syscall number or name")
    sh.add_argument("--exit", action="store_true", help="the syscall's exit slot")
    sh.add_argument("--priority", type=_priority, metavar="N",
                    help="the handler of that priority, in a slot that runs several (default: the first)")
    shown = sh.add_mutually_exclusive_group()
    shown.add_argument("--no-source", action="store_true", help="leave the source out")
    shown.add_argument("--source", action="store_true", help="print only the source, as it was saved")


def _top(t: argparse.ArgumentParser) -> None:
    t.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS",
                   help="between refreshes (default: 1)")
    t.add_argument("--iterations", type=_positive(int), default=None, metavar="N", help="stop after N refreshes")
    t.add_argument("--no-time", action="store_true",
                   help="do not switch handler timing on (it costs every syscall while top runs; see README)")


def _syscalls(sc: argparse.ArgumentParser) -> None:
    sc.add_argument("pattern", metavar="PATTERN", nargs="?", help="a shell pattern on names ('open*'), or a number")


def _timing(tm: argparse.ArgumentParser) -> None:
    tm.add_argument("seconds", metavar="SECONDS", nargs="?", type=float, default=60.0,
                    help="how long timing stays on unless renewed (default: 60, at most 600)")


def _events(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    ev.add_argument("--slot", metavar="SLOT", help="only this syscall's events (number or name)")
    ev.add_argument("--exit", action="store_true", help="with --slot: its exit slot's events")
    ev.add_argument("-n", "--lines", type=int, metavar="N", default=None,
                    help="at most N of the latest events first (default: all kept; 10 with -f)")


def _apply(a: argparse.ArgumentParser) -> None:
    a.add_argument("file", metavar="FILE", help="the apply file; handler files are found relative to its folder")
    a.add_argument("--dry-run", action="store_true", help="print what would change, change nothing (compiles nothing)")
    a.add_argument("--atomic", action="store_true",
                   help="switch every slot at one instant, as every syscall sees it; on any failure change nothing")
    a.add_argument("-v", "--verbose", action="store_true", help="list the unchanged slots too")


def _save(s: argparse.ArgumentParser) -> None:
    s.add_argument("-o", "--output", metavar="FILE", type=Path, help="write the apply file here (default: stdout)")
    s.add_argument("--sources", metavar="DIR", type=Path,
                   help="write the handler files here (default: the apply file's folder; with stdout, the current one)")
    s.add_argument("--force", action="store_true", help="overwrite files that differ")
    s.add_argument("--skip-unknown", action="store_true",
                   help="leave out slots whose source tailcalld does not know (an apply of the file empties them)")


def _metrics(me: argparse.ArgumentParser) -> None:
    me.add_argument("--metrics-socket", type=Path, metavar="PATH",
                    help="the daemon's metrics_socket (default: metrics.sock beside the control socket)")


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


Arguments: TypeAlias = "Callable[[argparse.ArgumentParser], None]"
# Every verb, in --help's order: its help line, and what adds its own arguments (the global
# options come from the common parent parser).
VERB_PARSERS: tuple[tuple[str, str, Arguments], ...] = (
    ("attach", "compile FILE and put it in SLOT (replaces atomically)", _attach),
    ("check", "compile and load FILE for the verifier only; attach nothing", _add_handler_arguments),
    ("detach", "empty SLOT", _detach),
    ("list", "show the filled slots", _no_arguments),
    ("status", "show the daemon's state", _no_arguments),
    ("show", "one slot in full: its handler, the maps its program uses, and its source", _show),
    ("top", "live per-slot hits and misses per second (Ctrl-C to stop)", _top),
    ("syscalls", "syscall numbers and names of this machine (and ia32 on x86_64), with their slots", _syscalls),
    ("timing", "time the handlers for SECONDS more (list and top show it); 0 only asks", _timing),
    ("events", "the handlers' latest events (TC_PRINTF, TC_EMIT); -f follows new ones", _events),
    ("apply", "make the slots match FILE (TOML: [[slot]] tables); slots it does not list are emptied", _apply),
    ("save", "print the running slots as an apply file, and write their sources beside it", _save),
    ("ping", "check that the daemon answers", _no_arguments),
    ("metrics", "print the daemon's Prometheus metrics (read from its metrics socket)", _metrics),
    ("unload-all", "empty every slot, remove the dispatcher and all pins, forget the state, stop the daemon",
     _no_arguments),
)

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class _Unmade:
    """A verb's parser not made yet: how to make it."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], argparse.ArgumentParser]) -> None:
        self.make = make


class _VerbParsers(dict):  # type: ignore[type-arg]  # dict[str, ArgumentParser], as argparse and shtab expect
    """The verbs' parsers by name (argparse's choices of the VERB argument), each made when it is
    first looked up: only the verb being run is ever made.  Making an ArgumentParser costs gettext
    lookups (a few stat() calls each), and made for all 15 verbs they were a third of what
    `tailcallctl list` spent of its own.  build_parser makes them all before it returns one that
    others may read (ctl_docs: shtab and argparse-manpage walk the dict)."""

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = super().__getitem__(name)
        if isinstance(parser, _Unmade):
            parser = parser.make()
            super().__setitem__(name, parser)
        return parser  # type: ignore[no-any-return]

    def add_unmade(self, name: str, make: Callable[[], argparse.ArgumentParser]) -> None:
        super().__setitem__(name, _Unmade(make))

    def make_all(self) -> None:
        for name in self:
            self[name]


class _Verbs(_SubParsers):
    """argparse's subparsers action (add_subparsers(action=...)), with verbs added unmade."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verb_parsers = _VerbParsers()
        self._name_parser_map = self.choices = self.verb_parsers

    def add_verb(self, name: str, help: str, arguments: Arguments, common: argparse.ArgumentParser) -> None:
        """What add_parser(name, parents=[common], help=help) does, but the parser is made
        (and ``arguments`` added to it) on first use."""
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))

        def make() -> argparse.ArgumentParser:
            parser = self._parser_class(prog=f"{self._prog_prefix} {name}", parents=[common])
            arguments(parser)
            return parser
        self.verb_parsers.add_unmade(name, make)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """tailcallctl's parser.  ``lazy``: each verb's own parser is made only when that verb is
    parsed (tailcallctl itself, which parses once); otherwise all are made (for anyone who reads
    the parser: ctl_docs, tests)."""
    common = _Parser(add_help=False)
    _global_options(common, _suppressed)
    p = _Parser(prog="tailcallctl", description="Control tailcalld, the eBPF tail-call dispatcher.",
                epilog=EPILOG, formatter_class=_RawDescriptionFormatter)
    _global_options(p, _as_given)
    p.add_argument("--version", action="store_true",
                   help="print tailcallctl's version and the daemon's (when it answers on the socket)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", action=_Verbs)
    assert isinstance(sub, _Verbs)
    for name, help, arguments in VERB_PARSERS:
        sub.add_verb(name, help, arguments, common)
    if not lazy:
        sub.verb_parsers.make_all()
    return p


def apply_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """apply and save's parsers on ``sub`` (an add_subparsers action; build_parser adds them itself)."""
    for name, help, arguments in VERB_PARSERS:
        if name in APPLY_VERBS:
            arguments(sub.add_parser(name, parents=[common], help=help))
