"""Unit tests of tailcallctl's habits: global options before or after the verb, errors as JSON
with --json, help without a verb, --version without a daemon, exit codes, the spinner."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from tailcalld import ctl, spinner
from tailcalld.errors import CompileError, SlotEmpty, VerifierRejected, WrongProgramType
from test_unit_ctl import error, run_verb

VERBS_ARGS: dict[str, list[str]] = {
    "attach": ["268", "f.c"], "check": ["f.c"], "detach": ["268"], "list": [], "status": [], "show": ["268"], "top": [],
    "syscalls": [], "timing": [], "events": [], "ping": [], "unload-all": [], "apply": ["slots.toml"], "save": [],
    "metrics": [],
}


def parse(*argv: str) -> object:
    return ctl.build_parser().parse_args(list(argv))


def test_every_verb_is_covered() -> None:
    parser = ctl.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices  # type: ignore[union-attr]
    assert set(VERBS_ARGS) == set(verbs or {})


@pytest.mark.parametrize("verb", sorted(VERBS_ARGS))
def test_global_options_before_or_after_the_verb(verb: str) -> None:
    rest = VERBS_ARGS[verb]
    options = ["--json", "--no-legend", "--quiet", "--socket", "/s", "--timeout", "3"]
    before = ctl.build_parser().parse_args([*options, verb, *rest])
    after = ctl.build_parser().parse_args([verb, *rest, *options])
    plain = ctl.build_parser().parse_args([verb, *rest])
    for args in (before, after):
        assert (args.verb, args.json, args.no_legend, args.quiet, args.socket, args.timeout) == (
            verb, True, True, True, Path("/s"), 3.0)
    assert (plain.json, plain.no_legend, plain.quiet, plain.socket, plain.timeout) == (False, False, False, None, 120.0)


def test_an_option_on_one_side_is_not_reset_by_the_other() -> None:
    """The verb's parser must not put its own defaults over what came before the verb."""
    args = ctl.build_parser().parse_args(["--json", "list", "--no-legend"])
    assert (args.json, args.no_legend) == (True, True)
    args = ctl.build_parser().parse_args(["--no-legend", "--socket", "/a", "list", "--json"])
    assert (args.json, args.no_legend, args.socket) == (True, True, Path("/a"))
    # Given on both sides, the later one wins, as for any repeated option.
    args = ctl.build_parser().parse_args(["--socket", "/a", "list", "--socket", "/b"])
    assert args.socket == Path("/b")


def test_short_quiet() -> None:
    assert ctl.build_parser().parse_args(["check", "f.c", "-q"]).quiet is True


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code, meaning in ctl.EXIT_CODES:
        assert f"  {code}  {meaning}" in out


# Errors as JSON ----------------------------------------------------------------------------

def _json_error(out: str) -> dict[str, object]:
    body = json.loads(out)
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("where", ["before", "after"])
def test_unreachable_daemon_as_json(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent.sock"
    argv = ["--socket", str(absent), "list"]
    argv = ["--json", *argv] if where == "before" else [*argv, "--json"]
    assert ctl.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    err = _json_error(captured.out)
    assert err["code"] == "unreachable"
    assert err["details"] == {"socket": str(absent)}
    assert f"cannot talk to tailcalld at {absent}" in str(err["message"])


def test_usage_error_after_parsing_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.c"
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), "attach", "268", str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ""
    err = _json_error(captured.out)
    assert err["code"] == "usage"
    assert str(err["message"]).startswith(f"cannot read {missing}")


@pytest.mark.parametrize("argv", [["--json", "frobnicate"], ["attach", "268", "--json"], ["list", "--bogus", "--json"]])
def test_arguments_that_do_not_parse_as_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == ""
    err = _json_error(captured.out)
    assert err["code"] == "usage"
    assert "error: " in str(err["message"])
    assert str(err["details"]["usage"]).startswith("usage: tailcallctl")  # type: ignore[index]


def test_json_after_a_double_dash_is_an_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["frobnicate", "--", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: tailcallctl" in captured.err


@pytest.mark.parametrize(("verb", "argv", "err", "exit_code"), [
    ("attach", ["268", "FILE"], CompileError("clang said no", {"log": "h.c:1: error\n"}), 3),
    ("attach", ["268", "FILE"], WrongProgramType("h is a kprobe program"), 4),
    ("check", ["FILE"], VerifierRejected("the kernel refused h", {"log": "R1 invalid\n"}), 4),
    ("detach", ["268"], SlotEmpty("slot 268 is empty", {"slot": 268}), 1),
])
def test_daemon_errors_as_json_keep_their_exit_code(verb: str, argv: list[str], err: CompileError, exit_code: int,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_verb(tmp_path, verb, argv, error(err), "--json")
    captured = capsys.readouterr()
    assert code == exit_code
    assert captured.err == ""  # the log is in the details, not on stderr
    assert _json_error(captured.out) == {"code": err.code, "message": err.message, "details": err.details}


def test_exit_code_map() -> None:
    assert ctl.exit_code("attach", "compile_error") == ctl.exit_code("check", "compile_error") == 3
    assert ctl.exit_code("attach", "verifier_rejected") == ctl.exit_code("check", "verifier_rejected") == 4
    assert ctl.exit_code("detach", "verifier_rejected") == 1
    assert ctl.exit_code("attach", "slot_out_of_range") == 1


# No verb, --version --------------------------------------------------------------------------

def test_version_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent.sock"
    assert ctl.main(["--socket", str(absent), "--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"tailcallctl {ctl.__version__}"
    assert lines[1].startswith(f"tailcalld: not reachable at {absent} (")
    assert len(lines) == 2


def test_version_without_a_daemon_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--version", "--json", "--socket", str(tmp_path / "absent.sock")]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["tailcallctl"] == ctl.__version__
    assert body["tailcalld"] is None
    assert "No such file" in body["tailcalld_unreachable"]


# The spinner ----------------------------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _wait_for_a_frame(stream: FakeTerminal) -> None:
    deadline = time.monotonic() + 10
    while spinner.FRAMES[0] not in stream.getvalue():
        assert time.monotonic() < deadline, "the spinner never drew"
        time.sleep(0.01)


def test_spinner_draws_on_a_terminal_and_erases_itself() -> None:
    term = FakeTerminal(tty=True)
    with spinner.Spinner("attach f.c: compiling and loading", enabled=True, stream=term, delay=0, period=0.01) as s:
        _wait_for_a_frame(term)
    text = term.getvalue()
    assert s.drawn
    assert "attach f.c: compiling and loading (" in text
    assert text.endswith(spinner.ERASE)  # nothing of it is left on the line


def test_spinner_is_silent_on_a_pipe_and_when_disabled() -> None:
    for term, enabled in ((FakeTerminal(tty=False), True), (FakeTerminal(tty=True), False)):
        with spinner.Spinner("x", enabled=enabled, stream=term, delay=0, period=0.01) as s:
            time.sleep(0.05)
        assert term.getvalue() == "" and not s.drawn


def test_spinner_draws_nothing_for_a_quick_reply() -> None:
    term = FakeTerminal(tty=True)
    with spinner.Spinner("x", enabled=True, stream=term, delay=3600) as s:
        pass
    assert term.getvalue() == "" and not s.drawn


def test_spinner_is_off_with_json_and_for_quick_verbs() -> None:
    assert ctl._spinner(ctl.build_parser().parse_args(["attach", "268", "f.c", "--json"]))._enabled is False
    assert ctl._spinner(ctl.build_parser().parse_args(["list"]))._enabled is False


# --no-legend on every verb that prints a table: its rows alone -----------------------------

TABLE_HEADINGS = ("SLOT", "SYSCALL", "ABI", "MAP ID", "HITS/S", "listed", "tailcalld top")


@pytest.mark.parametrize("verb", ["list", "syscalls", "show"])
def test_no_legend_leaves_only_the_rows(verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_unit_ctl import REPLIES, ok
    argv, result, _, _ = REPLIES[verb]
    argv = [a for a in argv if a != "--no-legend"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_verb(tmp_path / "a", verb, argv, ok(result))[0] == 0
    full = capsys.readouterr().out
    assert any(h in full for h in TABLE_HEADINGS), full  # the legend is there without it
    assert run_verb(tmp_path / "b", verb, argv, ok(result), "--no-legend")[0] == 0
    bare = capsys.readouterr().out
    assert bare and not any(h in bare for h in TABLE_HEADINGS), bare
    # What is left is the rows (show: the key/value block too, which has no legend to drop).
    kept = [line.split() for line in full.splitlines() if line and not any(h in line for h in TABLE_HEADINGS)]
    assert [line.split() for line in bare.splitlines() if line] == kept


class ListingClient:
    """Answers top's calls: two list samples, 60 hits apart."""

    def __init__(self) -> None:
        self.hits = 0

    def call(self, command: str, **fields: object) -> dict[str, object]:
        assert command == "list", command  # --no-time: timing is never asked
        self.hits += 60
        return {"slots": [{"slot": 110, "syscall": "getppid", "function": "h", "prog_id": 7, "filename": "h.c",
                           "source_sha256": None, "attached_at": None, "hits": self.hits, "misses": 0}]}


@pytest.mark.parametrize("legend", [True, False])
def test_top_with_and_without_legend(legend: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from tailcalld import top
    argv = ["top", "--iterations", "1", "--interval", "0.001", "--no-time", *([] if legend else ["--no-legend"])]
    assert top.run(ListingClient(), ctl.build_parser().parse_args(argv), ctl.printable) == 0  # type: ignore[arg-type]
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines[-1].split()[:3] == ["110", "getppid", "h"]
    assert (lines[0].startswith("tailcalld top: 1 slots") and lines[1].split()[0] == "SLOT") == legend
    assert len(lines) == (3 if legend else 1)
