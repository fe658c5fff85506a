"""tailcallctl against hostile or unlucky input (issue #10, items 17 and 20): a file too large
to be a handler is refused before anything is sent, a request the daemon found too large is
reported as such, and names or messages carrying control characters cannot forge output or
drive the terminal.  Unit tests first, then the same against a real daemon."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from harness import DaemonProcess, start_daemon
from tailcalld import ctl
from tailcalld.client import RemoteError
from tailcalld.errors import RequestTooLarge
from tailcalld.protocol import MAX_SOURCE_CHARS, ListResult, encode_error
from test_unit_ctl import SLOTS, one_shot_daemon, parse

HANDLER = "int nothing(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
HOSTILE = "evil\n268     fchmodat  fake  bcc  1  x.c\x1b[2J\x1b]0;owned\x07\u202e"


# Escaping ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "shown"), [
    ("plain.c", "plain.c"),
    ("a\nb", "a\\nb"),
    ("tab\there\r", "tab\\there\\r"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),  # NUL, DEL, and the C1 CSI some terminals obey
    ("\u202eabc.c", "\\u202eabc.c"),  # a bidi override: shows the name reversed
    ("line\u2028sep", "line\\u2028sep"),
    ("\ud800", "\\ud800"),  # a lone surrogate: print() would raise
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),  # printable non-ASCII stays as it is
])
def test_printable_escapes_what_a_terminal_would_obey(raw: str, shown: str) -> None:
    assert ctl.printable(raw) == shown


def test_a_log_keeps_its_lines_but_not_its_escapes() -> None:
    assert ctl.printable_block("a.c:1: error\n\tint x\x1b[2J;\n") == "a.c:1: error\n\tint x\\x1b[2J;\n"


def test_a_hostile_name_in_list_is_one_row(capsys: pytest.CaptureFixture[str]) -> None:
    slots = [{**SLOTS["slots"][1], "filename": HOSTILE, "function": "f\x1bx"}]
    ctl.show_list(ListResult.model_validate({"slots": slots}), parse("list"))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert out.splitlines()[2:] == ["", "1 slot listed."]  # header, one row, footer: no forged row
    assert "evil\\n268" in out and "f\\x1bx" in out


def test_errors_from_the_daemon_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    ctl._print_error(RemoteError("compile_error", f"cannot compile {HOSTILE}",
                                 {"log": "x.c:1:1: error\n\x1b]0;owned\x07\n", "candidates": ["a\nb"]}))
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert err.splitlines() == [
        "tailcallctl: cannot compile evil\\n268     fchmodat  fake  bcc  1  x.c\\x1b[2J\\x1b]0;owned\\x07\\u202e"
        " [compile_error]",
        "x.c:1:1: error", "\\x1b]0;owned\\x07",
        "candidates: a\\nb",
    ]


def test_json_output_stays_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reply = {"slots": [{**SLOTS["slots"][1], "filename": HOSTILE}]}
    with one_shot_daemon(tmp_path / "d.sock", lambda rid: json.dumps({"id": rid, "ok": True,
                                                                      "result": reply}).encode() + b"\n") as d:
        assert ctl.main(["--socket", str(d.path), "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)["slots"][0]["filename"] == HOSTILE


# Size ----------------------------------------------------------------------------------------

def test_a_file_over_the_protocol_maximum_is_refused_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.c"
    with big.open("wb") as f:
        f.truncate(50 << 20)  # sparse: 50 MB that cost nothing
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), "attach", "268", str(big)]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{big} is too large for a handler ({50 << 20} bytes)" in err
    assert f"at most {MAX_SOURCE_CHARS} bytes" in err and "cannot talk" not in err


def test_stdin_over_the_maximum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/" * (MAX_SOURCE_CHARS + 1))))
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), "check", "-"]) == ctl.EXIT_USAGE
    assert f"<stdin> is too large for a handler (over {MAX_SOURCE_CHARS} bytes)" in capsys.readouterr().err


def test_a_file_at_the_maximum_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edge = tmp_path / "edge.c"
    edge.write_bytes(b"/" * MAX_SOURCE_CHARS)
    assert ctl.main(["--socket", str(tmp_path / "absent.sock"), "attach", "268", str(edge)]) == 1
    assert "cannot talk to tailcalld" in capsys.readouterr().err  # it got as far as connecting


def test_an_oversized_request_is_reported_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon answers a line it discarded with no id: that is our request's reply, not a
    protocol mismatch."""
    handler = tmp_path / "h.c"
    handler.write_text(HANDLER)
    too_large = RequestTooLarge("request larger than 1024 bytes; it was discarded", {"limit": 1024})
    with one_shot_daemon(tmp_path / "d.sock", lambda rid: encode_error(None, too_large)) as d:
        assert ctl.main(["--socket", str(d.path), "attach", "268", str(handler)]) == 1
    assert capsys.readouterr().err == ("tailcallctl: the request was too large for the daemon (limit 1024 bytes) "
                                       "[request_too_large]\n")


# Against a real daemon -------------------------------------------------------------------------

def test_size_limits_against_a_real_daemon(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", max_request_bytes=1024)
    try:
        big = tmp_path / "big.c"
        with big.open("wb") as f:
            f.truncate(50 << 20)
        r = d.ctl("attach", "600", str(big))
        assert r.returncode == 2 and "is too large for a handler" in r.stderr, r.stderr
        padded = tmp_path / "padded.c"
        padded.write_text("/*" + "x" * 2000 + "*/\n" + HANDLER)
        r = d.ctl("attach", "600", str(padded))
        assert r.returncode == 1
        assert r.stderr == ("tailcallctl: the request was too large for the daemon (limit 1024 bytes) "
                            "[request_too_large]\n")
        assert d.call("list") == {"slots": []}  # nothing changed, and the daemon still serves
    finally:
        d.stop()


def _hostile_file(folder: Path) -> Path:
    path = folder / "x\n600     nothing  bcc  1  fake.c\x1b[2J\x1b]0;owned\x07.c"
    path.write_text(HANDLER)
    return path


def test_a_hostile_file_name_against_a_real_daemon(tmp_path: Path, pin_root: Path) -> None:
    d: DaemonProcess = start_daemon(tmp_path, pin_root / "daemon")
    try:
        r = d.ctl("attach", "600", str(_hostile_file(tmp_path)))  # slot 600: no syscall has it
        assert r.returncode == 0, r.stderr
        r = d.ctl("list")
        assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout
        lines = r.stdout.splitlines()
        assert len(lines) == 4 and lines[2:] == ["", "1 slot listed."], r.stdout
        assert "x\\n600" in lines[1]
        r = d.ctl("list", "--json")
        assert json.loads(r.stdout)["slots"][0]["filename"] == _hostile_file(tmp_path).name
    finally:
        d.stop()
