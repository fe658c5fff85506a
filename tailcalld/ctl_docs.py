"""tailcallctl's shell completion (bash, zsh) and man page, generated from its own parser
(ctl.build_parser), so that neither can fall behind the verbs and options it takes.

shtab writes the completion scripts and argparse-manpage the roff; `make install` runs this
module (scripts/install.sh) and puts what it prints in the usual folders:

    python -m tailcalld.ctl_docs completion bash   # .../bash-completion/completions/tailcallctl
    python -m tailcalld.ctl_docs completion zsh    # .../zsh/site-functions/_tailcallctl
    python -m tailcalld.ctl_docs man               # .../man/man1/tailcallctl.1

Both are static: the completion never runs tailcallctl or asks the daemon.  SLOT completes the
syscall names of the machine it was generated on (the daemon's own table: syscalls.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from typing import Any

import shtab
from argparse_manpage.manpage import Manpage

from . import __version__, ctl
from .client import SOCKET_ENV
from .dispatcher import NR_SLOTS
from .syscalls import SyscallTable

PROG = "tailcallctl"
SHELLS = ("bash", "zsh")
SYSCALLS_BASH = "_tailcallctl_compgen_syscalls"
_WORD = re.compile(r"[A-Za-z0-9_]+")  # what goes into the scripts' word lists unquoted
# The options every verb takes (ctl._global_options): the man page says them once, at the top.
GLOBAL_DESTS = frozenset({"json", "no_legend", "quiet", "socket", "timeout"})


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and each verb's."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def _syscalls_completion(names: list[str]) -> dict[str, Any]:
    """shtab's completion of a word from a fixed list, for bash (a function it calls with the
    word) and zsh (a list of values)."""
    words = " ".join(names)
    return {"bash": SYSCALLS_BASH, "zsh": f"({words})",
            "preamble": {"bash": f"{SYSCALLS_BASH}() {{\n  compgen -W '{words}' -- \"$1\"\n}}\n"}}


def syscall_names() -> list[str]:
    """This machine's syscall names, as tailcalld resolves them (none when it cannot tell)."""
    return sorted(name for name in SyscallTable.for_this_machine(NR_SLOTS).by_name if _WORD.fullmatch(name))


def completion(shell: str, names: list[str] | None = None) -> str:
    """The completion script for ``shell``: verbs, options, --dialect's choices, files for FILE
    and --socket, and syscall ``names`` (this machine's by default) for SLOT."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell!r}: {', '.join(SHELLS)}")
    parser = ctl.build_parser()
    names = syscall_names() if names is None else names
    for p in _parsers(parser):
        for action in p._actions:
            if action.dest in ("file", "socket"):
                action.complete = shtab.FILE  # type: ignore[attr-defined]
            elif action.metavar == "SLOT" and names:  # no names (no compiler here): nothing offered
                action.complete = _syscalls_completion(names)  # type: ignore[attr-defined]
    return shtab.complete(parser, shell=shell)


def _roff(text: str) -> str:
    """Plain text for a roff line: backslashes and hyphens escaped as argparse-manpage does, and
    no line that starts with a dot or a quote (roff would take it for a request)."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _tagged(items: list[tuple[str, str]]) -> str:
    return "\n".join(f".TP\n{tag}\n{_roff(body)}" for tag, body in items)


DESCRIPTION = (
    "tailcallctl talks to tailcalld over its control socket: it compiles handlers and puts them in "
    "the syscall slots of tailcalld's dispatcher, empties slots, and shows what runs. "
    "The options below are accepted before or after the verb. Data goes to stdout and errors to "
    "stderr; with --json, the reply is printed as JSON and so is an error, on stdout, as "
    '{"error": {"code", "message", "details"}}.')


def _unwrapped(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=10_000)


def manpage() -> str:
    """tailcallctl.1: NAME, SYNOPSIS, DESCRIPTION, the options, one COMMANDS subsection per verb
    (its own arguments; the global options are said once), EXIT STATUS, ENVIRONMENT, SEE ALSO."""
    parser = ctl.build_parser()
    parser.epilog = None  # the exit codes get a section of their own
    parser.description = None  # DESCRIPTION says it, and more
    for group in parser._action_groups:
        if any(isinstance(a, argparse._SubParsersAction) for a in group._group_actions):
            group.title = "commands"  # not argparse's "positional arguments"
    for verb in list(_parsers(parser))[1:]:
        verb.formatter_class = _unwrapped  # roff fills the usage line to the page's width itself
        for action in verb._actions:
            if action.dest in GLOBAL_DESTS:
                action.help = argparse.SUPPRESS
    page = Manpage(parser, {"project_name": "tailcalld", "version": __version__, "manual_title": "tailcalld",
                            "description": "control tailcalld, the eBPF tail-call dispatcher"},
                   format="single-commands-section")
    page.add_section("description", "<", _roff(DESCRIPTION))
    page.add_section("exit status", "=", _tagged([(f"\\fB{code}\\fR", meaning) for code, meaning in ctl.EXIT_CODES]))
    page.add_section("environment", "=", _tagged([(f"\\fB{SOCKET_ENV}\\fR",
                                                   "the control socket when --socket is not given")]))
    page.add_section("see also", "=", "\\fBbpftool\\fR(8), \\fBjournalctl\\fR(1), \\fBsystemctl\\fR(1)")
    return str(page)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tailcalld.ctl_docs",
                                description="print tailcallctl's shell completion or man page")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("completion", help="the completion script for SHELL")
    c.add_argument("shell", choices=SHELLS)
    sub.add_parser("man", help="the man page, tailcallctl.1 (roff)")
    args = p.parse_args(argv)
    sys.stdout.write(completion(args.shell) if args.what == "completion" else manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
