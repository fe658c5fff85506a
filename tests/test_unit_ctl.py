"""Unit tests for tailcallctl: argument parsing, table output, exit codes without a daemon or against
a one-shot stand-in that speaks the protocol through protocol.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tailcalld import apply_cli, ctl, events_cli
from tailcalld.client import SOCKET_ENV, RemoteError
from tailcalld.errors import CompileError, SlotEmpty, TailcalldError, VerifierRejected
from tailcalld.protocol import (COMMANDS, EventsRequest, EventsResult, SyscallEntry, SyscallsResult, AttachRequest, AttachResult, CheckResult, DetachResult, ListResult,
                                MapEntry, PingResult, Request, RequestId, ShowResult, SlotInfo, StatusResult, TimingResult,
                                UnloadResult, encode_error, encode_ok, parse_request)

NOBODY = 65534


def parse(*argv: str) -> argparse.Namespace:
    return ctl.build_parser().parse_args(list(argv))


# Parsing -----------------------------------------------------------------------------------

def test_parse_attach() -> None:
    args = parse("attach", "268", "f.c", "--function", "x")
    assert args.verb == "attach"
    assert args.slot == "268"  # the daemon resolves it; the client passes it as typed
    assert args.file == "f.c"
    assert args.function == "x"
    assert args.json is False
    assert args.socket is None
    assert args.timeout == 120.0


def test_parse_attach_without_function() -> None:
    args = parse("attach", "fchmodat", "-")
    assert (args.slot, args.file, args.function) == ("fchmodat", "-", None)


def test_parse_socket_and_json() -> None:
    args = parse("--socket", "/x", "list", "--json")
    assert args.verb == "list"
    assert args.socket == Path("/x")
    assert args.json is True
    assert args.no_legend is False


def test_parse_no_legend() -> None:
    args = parse("list", "--no-legend")
    assert args.verb == "list"
    assert args.no_legend is True
    assert args.json is False


def test_parse_detach_and_timeout() -> None:
    args = parse("--timeout", "2.5", "detach", "fchmodat")
    assert (args.verb, args.slot, args.timeout) == ("detach", "fchmodat", 2.5)


@pytest.mark.parametrize("argv", [["frobnicate"], ["attach", "268"],
                                  ["detach"], ["list", "--bogus"], ["status", "extra"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ctl.ArgumentsError):
        ctl.build_parser().parse_args(argv)
    assert ctl.main(argv) == 2
    captured = capsys.readouterr()
    assert "usage: tailcallctl" in captured.err and "error: " in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [[], ["--socket", "/x"]])
def test_main_without_verb_prints_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: tailcallctl") and "VERB" in captured.out
    assert "exit codes:" in captured.out
    assert captured.err == ""


def test_verbs_are_the_protocol_commands() -> None:
    """Every command of the protocol has a verb (events streams: events_cli; apply and save read
    and write files: apply_cli, tested in test_unit_apply), and every verb has a round trip below."""
    assert set(ctl.VERBS) | {"events"} | set(apply_cli.VERBS) == set(COMMANDS)
    assert set(ctl.VERBS) == set(REPLIES)


# Output ------------------------------------------------------------------------------------

SLOTS: dict[str, list[dict[str, Any]]] = {"slots": [
    {"slot": 110, "syscall": "getppid", "function": None, "prog_id": 7, "filename": None,
     "source_sha256": None, "attached_at": None, "misses": 0},
    {"slot": 268, "syscall": "fchmodat", "function": "count_calls", "dialect": "libbpf", "prog_id": 12345,
     "filename": "handler.c", "source_sha256": "ab" * 32,
     "attached_at": "2024-05-01T12:30:00+00:00", "hits": 1200, "misses": 57},
]}


def test_show_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    ctl.show_list(ListResult.model_validate(SLOTS), parse("list"))
    out = capsys.readouterr().out
    lines = out.splitlines()
    header, row1, row2 = lines[0], lines[1], lines[2]
    assert header.split() == ["SLOT", "SYSCALL", "HOOK", "FUNCTION", "DIALECT", "PROG", "SOURCE", "SINCE", "HITS", "MISSES"]
    assert header.startswith("SLOT")
    # every column starts at the same offset in the header and in both rows
    for title, v1, v2 in [("SYSCALL", "getppid", "fchmodat"), ("HOOK", "enter", "enter"),
                          ("FUNCTION", "?", "count_calls"),
                          ("DIALECT", "?", "libbpf"),
                          ("PROG", "7", "12345"), ("SOURCE", "-", "handler.c"), ("HITS", "0", "1200"),
                          ("MISSES", "0", "57")]:
        col = header.index(title)
        assert row1[col:].startswith(v1), (title, row1)
        assert row2[col:].startswith(v2), (title, row2)
    since = header.index("SINCE")
    assert row1[since:].startswith("-")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row2[since:])
    assert row1.startswith("110") and row2.startswith("268")
    assert lines[3] == ""
    assert lines[4] == "2 slots listed."
    assert len(lines) == 5


def test_show_list_no_legend(capsys: pytest.CaptureFixture[str]) -> None:
    ctl.show_list(ListResult.model_validate(SLOTS), parse("list", "--no-legend"))
    out = capsys.readouterr().out
    assert "SLOT" not in out and "listed" not in out
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:4] == ["110", "getppid", "enter", "?"]
    assert lines[1].split()[:4] == ["268", "fchmodat", "enter", "count_calls"]


def test_show_list_singular_and_empty(capsys: pytest.CaptureFixture[str]) -> None:
    ctl.show_list(ListResult.model_validate({"slots": SLOTS["slots"][:1]}), parse("list"))
    assert capsys.readouterr().out.splitlines()[-1] == "1 slot listed."
    ctl.show_list(ListResult(slots=[]), parse("list"))
    assert capsys.readouterr().out == "\n0 slots listed.\n"
    ctl.show_list(ListResult(slots=[]), parse("list", "--no-legend"))
    assert capsys.readouterr().out == ""


def test_show_attach(capsys: pytest.CaptureFixture[str]) -> None:
    r = {"slot": 268, "syscall": "fchmodat", "function": "f", "prog_id": 9, "insns": 12, "replaced_prog_id": None}
    ctl.show_attach(AttachResult.model_validate(r), parse("attach", "268", "f.c"))
    assert capsys.readouterr().out == "attached f to fchmodat (268): program 9, 12 instructions\n"
    ctl.show_attach(AttachResult.model_validate({**r, "replaced_prog_id": 4}), parse("attach", "268", "f.c"))
    assert capsys.readouterr().out == "replaced program 4 in fchmodat (268) with f: program 9, 12 instructions\n"


def test_print_error_shows_log_and_candidates(capsys: pytest.CaptureFixture[str]) -> None:
    ctl._print_error(RemoteError("verifier_rejected", "the kernel refused f", {"log": "R1 invalid\n"}))
    ctl._print_error(RemoteError("function_ambiguous", "which one?", {"candidates": ["a", "b"]}))
    ctl._print_error(RemoteError("slot_empty", "nothing there", ["not", "a", "dict"]))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "tailcallctl: the kernel refused f [verifier_rejected]", "R1 invalid",
        "tailcallctl: which one? [function_ambiguous]", "candidates: a, b",
        "tailcallctl: nothing there [slot_empty]",
    ]


def test_check_exit_codes_by_wire_code() -> None:
    """The wire codes are spelt out here on purpose: ctl takes them from the error classes, and
    this pins both the classes' codes and which of them mean "does not compile" (3) or "refused" (4)."""
    assert ctl.CHECK_EXIT == {
        "compile_error": 3, "forbidden_include": 3,
        "verifier_rejected": 4, "wrong_program_type": 4, "function_not_found": 4, "function_ambiguous": 4,
        "object_error": 4,
    }
    assert (ctl.EXIT_NO_COMPILE, ctl.EXIT_REFUSED) == (3, 4)


# main() without a daemon -------------------------------------------------------------------

def test_main_unreachable_socket_returns_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.sock"
    assert ctl.main(["--socket", str(path), "list"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot talk to tailcalld" in captured.err
    assert str(path) in captured.err


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")


def test_main_permission_denied_says_who_may(capsys: pytest.CaptureFixture[str]) -> None:
    """A non-root user on the 0600 socket gets EACCES from connect(); run as uid 65534."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    try:
        usable = _as_nobody("import tailcalld.ctl").returncode == 0
    except PermissionError:  # not even the interpreter can be run from here by that user
        usable = False
    if not usable:
        pytest.skip("this checkout is not readable by uid 65534 (e.g. under /root)")
    public = Path(tempfile.mkdtemp(prefix="tailcalld-test-ctl-"))
    try:
        public.chmod(0o755)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(public / "s.sock"))
            os.chmod(public / "s.sock", 0o600)
            listener.listen(1)
            r = _as_nobody(f"import sys; from tailcalld import ctl; "
                           f"sys.exit(ctl.main(['--socket', '{public / 's.sock'}', 'list']))")
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert r.returncode == 1, r.stderr
    assert "permission denied on" in r.stderr and "allowed_group" in r.stderr


def test_main_uses_socket_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "env.sock"
    monkeypatch.setenv(SOCKET_ENV, str(path))
    assert ctl.main(["ping"]) == 1
    assert f"cannot talk to tailcalld at {path}" in capsys.readouterr().err


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A bound, listening AF_UNIX socket nobody serves: connect succeeds, nothing answers."""
    path = tmp_path / "l.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(4)
        yield path
    finally:
        sock.close()


def test_attach_missing_file_returns_2(listening: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.c"
    assert ctl.main(["--socket", str(listening), "--timeout", "1", "attach", "268", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"tailcallctl: cannot read {missing}")
    assert "No such file or directory" in captured.err


def test_attach_non_utf8_file_returns_2(listening: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "h.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")  # not C text, and no ELF magic either
    assert ctl.main(["--socket", str(listening), "--timeout", "1", "attach", "268", str(binary)]) == 2
    assert "is neither UTF-8 C source nor a BPF ELF object" in capsys.readouterr().err


# Inputs are read before connecting: a bad FILE is a usage error even with no daemon at all.

@pytest.mark.parametrize("verb", [["attach", "268"], ["check"]])
def test_missing_file_without_daemon_returns_2(verb: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    absent, missing = tmp_path / "absent.sock", tmp_path / "missing.c"
    assert ctl.main(["--socket", str(absent), *verb, str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"tailcallctl: cannot read {missing}: No such file or directory")
    assert "cannot talk" not in captured.err


@pytest.mark.parametrize("verb", [["attach", "268"], ["check"]])
def test_unreadable_bytes_without_daemon_return_2(verb: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "h.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), *verb, str(binary)]) == 2
    assert capsys.readouterr().err == f"tailcallctl: {binary} is neither UTF-8 C source nor a BPF ELF object\n"


def test_unreadable_stdin_without_daemon_returns_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00garbage")))
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), "check", "-"]) == 2
    assert capsys.readouterr().err == "tailcallctl: - is neither UTF-8 C source nor a BPF ELF object\n"


@pytest.mark.parametrize("verb", [["attach", "268"], ["check"]])
@pytest.mark.parametrize("content", [b"int h(void *ctx) { return 0; }\n", b"\x7fELF\x02\x01\x01"])
def test_good_file_without_daemon_returns_1(verb: list[str], content: bytes, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The same commands with a readable FILE get as far as connecting, and fail there."""
    handler, absent = tmp_path / "h.c", tmp_path / "absent.sock"
    handler.write_bytes(content)
    assert ctl.main(["--socket", str(absent), *verb, str(handler)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"tailcallctl: cannot talk to tailcalld at {absent}: ")
    assert "(is tailcalld running?)" in captured.err


# Every verb against a one-shot stand-in for tailcalld ------------------------------------------
#
# The stand-in reads the request with the daemon's own parser (protocol.parse_request) and answers
# with the daemon's own framing (protocol.encode_ok / encode_error) of a result model, so a verb that
# sends a request the daemon refuses, declares the wrong result model or prints a field that model
# lacks fails here.

HANDLER_C = "int h(void *ctx) { return 0; }\n"
STARTED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
STARTED_LOCAL = STARTED.astimezone().strftime("%Y-%m-%d %H:%M:%S")  # how _since shows it here

# verb -> (its arguments, FILE standing for a handler; the result the daemon sends; stdout; stderr)
REPLIES: dict[str, tuple[list[str], BaseModel, str, str]] = {
    "ping": ([], PingResult(version="0.1.0", pid=4242), "tailcalld 0.1.0 (pid 4242) is up\n", ""),
    "attach": (["fchmodat", "FILE", "--fresh"],
               AttachResult(slot=268, syscall="fchmodat", function="h", prog_id=91, insns=12, replaced_prog_id=90),
               "replaced program 90 in fchmodat (268) with h: program 91, 12 instructions\n", ""),
    "check": (["FILE", "--function", "h"],
              CheckResult(function="h", dialect="bcc", prog_type="raw_tracepoint", insns=12, log="warning: w\n"),
              "h (bcc) verified: raw_tracepoint program, 12 instructions\n", "warning: w\n"),
    "detach": (["268"], DetachResult(slot=268, syscall="fchmodat", prog_id=91),
               "detached program 91 from fchmodat (268)\n", ""),
    "list": (["--no-legend"],
             ListResult(slots=[SlotInfo(slot=268, syscall="fchmodat", function="h", dialect="bcc", prog_id=91,
                                        filename="h.c", source_sha256="ab" * 32, attached_at=None, hits=9,
                                        misses=3)]),
             "268  fchmodat  enter  h  bcc  91  h.c  -  9  3\n", ""),
    "status": ([],
               StatusResult(version="0.1.0", pid=4242, started_at=STARTED, pin_dir="/sys/fs/bpf/tailcalld",
                            socket="/run/tailcalld/control.sock", dispatcher_prog_id=7, dispatcher_link_id=8,
                            adopted=True, upgraded_from=5, slots_used=1, nr_slots=512, hits_total=9, misses_total=3,
                            miss_log_interval=60, connections=1, corrections=["slot 110: emptied"]),
               "Version     0.1.0\n"
               "PID         4242\n"
               f"Since       {STARTED_LOCAL}\n"
               "Dispatcher  program 7, link 8 (adopted from pins)\n"
               "Pins        /sys/fs/bpf/tailcalld\n"
               "Socket      /run/tailcalld/control.sock\n"
               "Slots       1 in use of 512\n"
               "Hits        9 handler runs since start\n"
               "Misses      3 since start, logged every 60 s\n"
               "Upgraded    from dispatcher program 5 at this start\n"
               "Timing      off\n"
               "\n"
               "Corrections (kernel and saved state disagreed, at start or while running):\n"
               "  slot 110: emptied\n", ""),
    "syscalls": (["fchmod*"],
                 SyscallsResult(syscalls=[
                     SyscallEntry(abi="x86_64", nr=268, name="fchmodat", slot=268, prog_id=91, function="h"),
                     SyscallEntry(abi="ia32", nr=306, name="fchmodat", slot=268, prog_id=91, function="h"),
                     SyscallEntry(abi="ia32", nr=268, name="statfs64", slot=None, prog_id=None, function=None)]),
                 "ABI     NR    NAME      SLOT    HANDLER\n"
                 "x86_64  268   fchmodat  268     h (program 91)\n"
                 "ia32    306   fchmodat  268     h (program 91)\n"
                 "ia32    268   statfs64  -       -\n"
                 "\n"
                 "3 syscalls listed; SLOT - means never dispatched (no 64-bit syscall of that name).\n", ""),
    "show": (["fchmodat", "--no-source"],
             ShowResult(slot=SlotInfo(slot=268, syscall="fchmodat", function="h", dialect="bcc", prog_id=91,
                                      filename="h.c", source_sha256="ab" * 32, attached_at=None, hits=9, misses=3),
                        maps=[MapEntry(id=12, name="hits", type="array", key_size=4, value_size=8, max_entries=7)],
                        source=HANDLER_C),
             "Slot      fchmodat (268)\n"
             "Function  h\n"
             "Dialect   bcc\n"
             "Program   91\n"
             "Source    h.c\n"
             f"SHA-256   {'ab' * 32}\n"
             "Since     -\n"
             "By uid    -\n"
             "Hits      9\n"
             "Misses    3\n"
             "Events    0 emitted, 0 lost, 0 delivered\n"
             "\n"
             "MAP ID    NAME    TYPE    KEY    VALUE    MAX ENTRIES\n"
             "12        hits    array   4      8        7\n"
             "\n"
             "1 map listed.\n", ""),
    "timing": (["30"], TimingResult(on=True, seconds_left=30.0, dispatch_ns=41.6),
               "handler timing is on for 30 s more (see list, top); a call that falls through takes 42 ns\n", ""),
    "unload-all": ([], UnloadResult(slots_emptied=[110, 268], pins_removed=["a", "b", "c"]),
                   "emptied 2 slots, removed 3 pins; tailcalld has stopped and left nothing in the kernel\n", ""),
}


class OneShotDaemon:
    """Accepts one connection, parses one request as tailcalld would, sends `reply(request id)`."""

    def __init__(self, path: Path, reply: Callable[[RequestId], bytes]) -> None:
        self.path = path
        self.request: Request | None = None
        self.error: Exception | None = None
        self._reply = reply
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(10)  # a client that never comes fails the test instead of hanging it
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn, conn.makefile("rb") as lines:
                rid, self.request = parse_request(lines.readline())
                conn.sendall(self._reply(rid))
        except Exception as exc:  # any failure here is the test's failure, raised by finish()
            self.error = exc

    def finish(self) -> None:
        """Wait for the exchange, then raise whatever went wrong on this side of it."""
        self._thread.join(10)
        self._listener.close()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """The test failed already: stop waiting for a client, and leave its error the one reported."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as nudge:
            nudge.connect(str(self.path))  # ends a pending accept() (shutdown() does not, for AF_UNIX)
        self._thread.join(10)
        self._listener.close()


@contextlib.contextmanager
def one_shot_daemon(path: Path, reply: Callable[[RequestId], bytes]) -> Iterator[OneShotDaemon]:
    daemon = OneShotDaemon(path, reply)
    try:
        yield daemon
    except BaseException:
        daemon.abandon()
        raise
    daemon.finish()


def run_verb(tmp_path: Path, verb: str, argv: list[str], reply: Callable[[RequestId], bytes],
             *options: str) -> tuple[int, Request | None]:
    """main() for `verb` against a OneShotDaemon; FILE in argv stands for a C handler."""
    handler = tmp_path / "h.c"
    handler.write_text(HANDLER_C)
    args = [str(handler) if a == "FILE" else a for a in argv]
    with one_shot_daemon(tmp_path / "d.sock", reply) as daemon:
        code = ctl.main(["--socket", str(daemon.path), "--timeout", "10", verb, *args, *options])
    return code, daemon.request


def ok(result: BaseModel | bytes) -> Callable[[RequestId], bytes]:
    return lambda rid: encode_ok(rid, result)


def error(err: TailcalldError) -> Callable[[RequestId], bytes]:
    return lambda rid: encode_error(rid, err)


@pytest.mark.parametrize("verb", sorted(REPLIES))
def test_every_verb_prints_its_result(verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, result, out, err = REPLIES[verb]
    code, request = run_verb(tmp_path, verb, argv, ok(result))
    assert (code, capsys.readouterr()) == (0, (out, err))
    assert request is not None and request.command == verb


@pytest.mark.parametrize("verb", sorted(REPLIES))
def test_every_verb_json_is_the_reply_as_received(verb: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv, result, _, _ = REPLIES[verb]
    sent = {**result.model_dump(mode="json"), "from_a_newer_daemon": True}  # passed through, not dropped
    code, _ = run_verb(tmp_path, verb, argv, ok(json.dumps(sent).encode()), "--json")
    assert (code, capsys.readouterr()) == (0, (json.dumps(sent, indent=2) + "\n", ""))


def test_attach_sends_the_handler(tmp_path: Path) -> None:
    code, request = run_verb(tmp_path, "attach", ["fchmodat", "FILE", "--fresh", "--function", "h"],
                             ok(REPLIES["attach"][1]))
    assert code == 0
    assert isinstance(request, AttachRequest)
    assert (request.slot, request.source, request.filename, request.function, request.fresh, request.dialect) == (
        "fchmodat", HANDLER_C, "h.c", "h", True, "auto")


@pytest.mark.parametrize(("verb", "argv", "err", "exit_code"), [
    ("check", ["FILE"], CompileError("clang said no", {"log": "h.c:1: error\n"}), 3),
    ("check", ["FILE"], VerifierRejected("the kernel refused h"), 4),
    ("attach", ["268", "FILE"], CompileError("clang said no"), 3),  # as check's
    ("attach", ["268", "FILE"], VerifierRejected("the kernel refused h"), 4),
    ("detach", ["268"], SlotEmpty("slot 268 is empty"), 1),
])
def test_daemon_errors_exit_codes(verb: str, argv: list[str], err: TailcalldError, exit_code: int, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_verb(tmp_path, verb, argv, error(err))
    captured = capsys.readouterr()
    assert code == exit_code
    assert captured.out == ""
    assert captured.err.startswith(f"tailcallctl: {err.message} [{err.code}]\n")


def test_reply_that_does_not_fit_the_model_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    renamed = {**REPLIES["attach"][1].model_dump(mode="json"), "replaced": 90}
    del renamed["replaced_prog_id"]
    code, _ = run_verb(tmp_path, "attach", ["268", "FILE"], ok(json.dumps(renamed).encode()))
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("tailcallctl: tailcalld's reply to attach does not fit the protocol "
                                   "(replaced_prog_id: Field required)")



def test_reply_that_does_not_fit_the_model_fails_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --json too (a reply that does not fit is no success), said as a JSON error on stdout."""
    renamed = {**REPLIES["attach"][1].model_dump(mode="json"), "replaced": 90}
    del renamed["replaced_prog_id"]
    code, _ = run_verb(tmp_path, "attach", ["268", "FILE"], ok(json.dumps(renamed).encode()), "--json")
    captured = capsys.readouterr()
    assert code == 1 and captured.err == ""
    error = json.loads(captured.out)["error"]
    assert error["code"] == "bad_reply"
    assert error["message"].startswith("tailcalld's reply to attach does not fit the protocol "
                                       "(replaced_prog_id: Field required)")


# events ------------------------------------------------------------------------------------

EVENT = {"time_ns": 1_700_000_000_123_456_000, "slot": 268, "hook": "enter", "syscall": "fchmodat", "pid": 42,
         "tid": 43, "uid": 1000, "comm": "chmod", "compat": False, "message": "mode 1a4", "fields": None}
EVENT_FIELDS = {**EVENT, "hook": "exit", "compat": True, "message": None, "fields": {"ret": -2, "path": "/tmp/x"}}


def test_event_lines_for_people() -> None:
    when = datetime.fromtimestamp(EVENT["time_ns"] / 1e9).strftime("%H:%M:%S.%f")
    assert events_cli.line(EVENT, ctl.printable) == f"{when} fchmodat chmod[42] uid 1000: mode 1a4"
    assert events_cli.line(EVENT_FIELDS, ctl.printable) == (
        f'{when} fchmodat:exit chmod[42] uid 1000 (32-bit): ret=-2 path="/tmp/x"')


def test_event_notices_name_what_was_missed() -> None:
    assert events_cli.notice({"dropped": 5, "where": "daemon", "reason": "slow"}) == "5 events dropped: slow"
    assert events_cli.notice({"lost": 3, "slot": 268, "hook": "exit", "syscall": "fchmodat", "where": "kernel",
                              "reason": "full"}) == "3 events of fchmodat:exit lost in the kernel: full"
    assert events_cli.notice({"events": []}) is None


def test_events_follow_prints_the_stream_and_its_notices(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def reply(rid: RequestId) -> bytes:
        return (encode_ok(rid, EventsResult.model_validate({"events": [EVENT], "following": True}))
                + json.dumps(EVENT_FIELDS).encode() + b"\n"
                + json.dumps({"dropped": 7, "where": "daemon", "reason": "slow"}).encode() + b"\n")

    code, request = run_verb(tmp_path, "events", ["-f", "--slot", "fchmodat", "--exit", "--json"], reply)
    out, err = capsys.readouterr()
    assert code == 0
    assert isinstance(request, EventsRequest)
    assert (request.follow, request.slot, request.hook, request.last) == (True, "fchmodat", "exit", None)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [EVENT, EVENT_FIELDS, {"dropped": 7, "where": "daemon", "reason": "slow"}]
    assert err == "tailcallctl: 7 events dropped: slow\n"


def test_events_without_follow_prints_the_latest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = EventsResult.model_validate({"events": [EVENT], "following": False})
    code, request = run_verb(tmp_path, "events", ["-n", "5"], ok(result))
    assert code == 0 and isinstance(request, EventsRequest) and request.last == 5 and not request.follow
    assert capsys.readouterr().out.endswith("chmod[42] uid 1000: mode 1a4\n")


def test_events_follow_for_people(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def reply(rid: RequestId) -> bytes:
        return (encode_ok(rid, EventsResult.model_validate({"events": [], "following": True}))
                + json.dumps(EVENT_FIELDS).encode() + b"\n"
                + json.dumps({"lost": 3, "slot": 268, "hook": "exit", "syscall": "fchmodat", "where": "kernel",
                              "reason": "full"}).encode() + b"\n")

    code, _ = run_verb(tmp_path, "events", ["-f"], reply)
    out, err = capsys.readouterr()
    assert code == 0
    assert out.endswith('fchmodat:exit chmod[42] uid 1000 (32-bit): ret=-2 path="/tmp/x"\n')
    assert err == "tailcallctl: 3 events of fchmodat:exit lost in the kernel: full\n"
