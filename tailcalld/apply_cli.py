"""tailcallctl apply and save: the node's slots as a file (desired.py), both ways.

apply FILE reads the apply file and every handler file it names (the daemon may not see the
client's files), sends them in one request, and prints what changed as a diff, one line per
slot: ``+`` added, ``~`` replaced, ``-`` emptied (``=`` unchanged, with -v).  save prints the
running set as an apply file and writes each handler's source (or object, and its local
headers) beside it, so that ``save > slots.toml; apply slots.toml`` changes nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .client import Client, RemoteError
# apply and save's arguments are parsed with every verb's, in the light ctl_parser.py (issue 14)
from .ctl_parser import APPLY_VERBS as VERBS, apply_parsers as add_parsers  # noqa: F401
from .desired import DesiredFileError, entry_text, read_request
from .dialects import header_name_problem
from .errors import RequestTooLarge
from .protocol import ApplyResult, SavedFile, SaveResult, SlotChange

Printable = Callable[[str], str]
Talking = Callable[[argparse.Namespace, Callable[[Client], int]], int]
# tailcallctl's own failure: on stderr, or a JSON error on stdout with --json (ctl._fail)
Fail = Callable[[argparse.Namespace, str, str], None]
EXIT_FAILURE = 1
EXIT_USAGE = 2
SIGNS = {"add": "+", "replace": "~", "remove": "-", "unchanged": "="}


def main(args: argparse.Namespace, talking: Talking, printable: Printable, fail: Fail) -> int:
    if args.verb == "apply":
        try:
            fields, _ = read_request(Path(args.file))
        except DesiredFileError as err:
            fail(args, "bad_apply_file", str(err))
            return EXIT_USAGE
        return talking(args, lambda client: _apply(client, args, fields, printable, fail))
    return talking(args, lambda client: _save(client, args, printable, fail))


def _complain(message: str, printable: Printable) -> None:
    print(f"tailcallctl: {printable(message)}", file=sys.stderr)


# apply -----------------------------------------------------------------------------------------

def _apply(client: Client, args: argparse.Namespace, fields: dict[str, Any], printable: Printable, fail: Fail) -> int:
    request = {**fields, "dry_run": args.dry_run or None, "atomic": (args.atomic or fields.get("atomic")) or None}
    try:
        raw = client.call("apply", **request)
    except RemoteError as err:
        if err.code != RequestTooLarge.code:
            raise
        size = len(json.dumps({"command": "apply", **request}))
        limit = err.details.get("limit") if isinstance(err.details, dict) else None
        fail(args, RequestTooLarge.code, f"{args.file} with its handler files makes a request of {size} bytes, over "
             f"the daemon's max_request_bytes ({limit}); raise max_request_bytes in its config (at most 16 MiB), or "
             "apply fewer or smaller files")
        return EXIT_FAILURE
    result = ApplyResult.model_validate(raw)
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    show_apply(result, args.verbose, printable)
    if not args.quiet:
        for c in result.changes:
            for text in [*c.warnings, *([c.log.rstrip("\n")] if c.log.strip() else [])]:
                print(printable(f"{_where(c)}: {text}"), file=sys.stderr)
    return 0


def _where(c: SlotChange) -> str:
    return (f"{c.syscall}{' exit' if c.hook == 'exit' else ''} ({c.slot})"
            + (f" priority {c.priority}" if c.priority is not None else ""))


def _note(c: SlotChange, dry_run: bool) -> str:
    if c.action == "remove":
        return f"(was program {c.replaced_prog_id})"
    was = f"was program {c.replaced_prog_id}: {', '.join(c.why)}" if c.action == "replace" else ""
    if dry_run or c.prog_id is None:
        return f"({was})" if was else ""
    return f"program {c.prog_id}" + (f" ({was})" if was else "")


def diff_lines(result: ApplyResult, verbose: bool, printable: Printable) -> list[str]:
    """One line per slot, as a diff: + added, ~ replaced, - emptied, = unchanged (verbose)."""
    rows = [[SIGNS[c.action], _where(c), c.function or ("(auto)" if result.dry_run else "?"), c.filename or "-",
             _note(c, result.dry_run)]
            for c in result.changes if verbose or c.action != "unchanged"]
    if not rows:
        return []
    text = tabulate([[printable(str(cell)) for cell in row] for row in rows], tablefmt="plain", disable_numparse=True)
    return [line.rstrip() for line in text.splitlines()]


def summary(result: ApplyResult) -> str:
    counts: Counter[str] = Counter(c.action for c in result.changes)
    if not result.changed:
        return f"nothing to change ({counts['unchanged']} slot{'s' if counts['unchanged'] != 1 else ''} as listed)."
    if result.dry_run:
        said = ", ".join(f"{word} {counts[a]}" for a, word in (("add", "add"), ("replace", "replace"),
                                                                ("remove", "empty")) if counts[a])
        return f"dry run: would {said}; {counts['unchanged']} unchanged; nothing was changed."
    said = ", ".join(f"{counts[a]} {word}" for a, word in (("add", "added"), ("replace", "replaced"),
                                                            ("remove", "emptied"), ("unchanged", "unchanged"))
                     if counts[a])
    return f"{said}."


def show_apply(result: ApplyResult, verbose: bool, printable: Printable) -> None:
    for line in diff_lines(result, verbose, printable):
        print(line)
    print(summary(result))


# save ------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def file_name(saved: SavedFile, fallback: str) -> str:
    """A plain file name for a saved handler: its own (without folders), made safe."""
    own = Path(saved.filename or "").name
    name = _UNSAFE.sub("_", own).lstrip(".") if own not in ("-", "<source>", "<stdin>") else ""
    name = name or _UNSAFE.sub("_", fallback)
    suffix = ".o" if saved.object is not None else ".c"
    return name if name.endswith(suffix) or (saved.object is None and name.endswith(".h")) else name + suffix


def file_contents(saved: SavedFile) -> bytes:
    return base64.b64decode(saved.object) if saved.object is not None else (saved.source or "").encode()


def place_files(result: SaveResult) -> tuple[dict[int, str], dict[str, bytes]]:
    """Where each saved file goes (a path relative to the sources folder, by file index) and
    every file to write there.  A file whose name, or a header's, is taken by other contents
    goes into a folder of its own (NAME-<sha256 prefix>/), with its headers."""
    writes: dict[str, bytes] = {}
    where: dict[int, str] = {}
    first_slot = {s.file: s.syscall for s in reversed(result.slots) if s.file is not None}
    for i, saved in enumerate(result.files):
        name = file_name(saved, first_slot.get(i, f"handler{i}"))
        mine = {name: file_contents(saved)}
        for header, text in sorted(saved.headers.items()):
            if header_name_problem(header) is not None:
                raise ValueError(f"the daemon sent a header named {header!r}")
            mine[header] = text.encode()
        if any(writes.get(path, data) != data for path, data in mine.items()):
            folder = f"{Path(name).stem}-{saved.sha256[:8]}"
            mine = {f"{folder}/{path}": data for path, data in mine.items()}
            name = f"{folder}/{name}"
        writes.update(mine)
        where[i] = name
    return where, writes


def apply_file_text(result: SaveResult, where: dict[int, str], prefix: str) -> str:
    lines = ["# tailcallctl save: every slot tailcalld runs. `tailcallctl apply` of this file fills each one",
             "# listed and empties every other slot.", ""]
    for s in result.slots:
        if s.file is None:
            lines += [f"# skipped: {s.syscall}{' exit' if s.hook == 'exit' else ''} ({s.slot}), program {s.prog_id} "
                      f"({s.function or 'unknown'}): its source is unknown", ""]
            continue
        slot: str | int = s.slot if s.syscall.startswith("syscall_") else s.syscall
        lines.append(entry_text(slot, s.hook, prefix + where[s.file], s.function, s.dialect, s.journal,
                                s.variables, s.defines, s.cgroup, s.priority))
    return "\n".join(lines)


def _save(client: Client, args: argparse.Namespace, printable: Printable, fail: Fail) -> int:
    raw = client.call("save")
    result = SaveResult.model_validate(raw)
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    unknown = [s for s in result.slots if s.file is None]
    for s in unknown:
        _complain(f"{s.syscall}{' exit' if s.hook == 'exit' else ''} ({s.slot}) runs program {s.prog_id}, whose "
                  "source tailcalld does not know (adopted from the kernel): it cannot be saved"
                  + ("; left out" if args.skip_unknown else ""), printable)
    if unknown and not args.skip_unknown:
        fail(args, "source_unknown", "nothing was written; --skip-unknown saves the other slots (an apply of that "
             "file empties the ones left out)")
        return EXIT_FAILURE
    out_dir = args.output.parent if args.output else Path.cwd()
    sources = args.sources or out_dir
    try:
        where, writes = place_files(result)
    except ValueError as err:
        fail(args, "save_failed", str(err))
        return EXIT_FAILURE
    prefix = os.path.relpath(sources, out_dir).replace(os.sep, "/") + "/"
    text = apply_file_text(result, where, "" if prefix == "./" else prefix)
    targets = {sources / path: data for path, data in writes.items()}
    if args.output:
        targets[args.output] = text.encode()
    problem = _check_targets(targets, args.force)
    if problem:
        fail(args, "file_exists", problem)
        return EXIT_FAILURE
    try:
        for path, data in targets.items():
            _write(path, data)
    except OSError as exc:
        fail(args, "save_failed", f"cannot write {exc.filename}: {exc.strerror}")
        return EXIT_FAILURE
    if not args.output:
        sys.stdout.write(text)
    return 0


def _check_targets(targets: dict[Path, bytes], force: bool) -> str | None:
    """Why the files cannot be written as they are (None: they can): a file that differs is
    overwritten only with --force, and never anything but a regular file."""
    differ = []
    for path, data in targets.items():
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return f"{path} exists and is not a regular file; nothing was written"
        if path.exists():
            try:
                same = path.read_bytes() == data
            except OSError as exc:
                return f"cannot read {path}: {exc.strerror}; nothing was written"
            if not same:
                differ.append(str(path))
    if differ and not force:
        return (f"{len(differ)} file{'s' if len(differ) != 1 else ''} would be overwritten with other contents: "
                f"{', '.join(differ)}; nothing was written (--force overwrites)")
    return None


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a temp file renamed into place."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tailcallctl-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
