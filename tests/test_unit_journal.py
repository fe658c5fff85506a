"""Unit tests for the journal's fallback (journal.Resend): a journal that goes away and comes
back, played by a sender that refuses on demand, behind systemd-python's real JournalHandler."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from systemd.journal import JournalHandler

from tailcalld.journal import Resend


class Journal:
    """Keeps what it is sent while up; refuses like a stopped journald's socket while down."""

    def __init__(self) -> None:
        self.up = True
        self.got: list[tuple[str, dict[str, Any]]] = []

    def send(self, message: str, /, **fields: Any) -> None:  # as journal.send: fields hold "message" too
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        self.got.append((message, fields))

    def messages(self) -> list[str]:
        return [m for m, _ in self.got]


@pytest.fixture
def journal() -> Journal:
    return Journal()


def make_logger(journal: Journal, stderr: io.StringIO | None, backlog: int = 100) -> logging.Logger:
    log = logging.getLogger(f"test-resend-{id(journal)}")
    log.handlers = [JournalHandler(SYSLOG_IDENTIFIER="tailcalld", sender_function=Resend(journal.send, stderr,
                                                                                         backlog))]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log


def test_while_the_journal_is_up_nothing_goes_to_stderr(journal: Journal) -> None:
    stderr = io.StringIO()
    make_logger(journal, stderr).info("attach %s", "x", extra={"SLOT": 268})
    assert journal.messages() == ["attach x"] and journal.got[0][1]["SLOT"] == 268
    assert stderr.getvalue() == ""


def test_while_it_is_away_entries_are_stderr_lines_and_no_traceback(
        journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
    stderr = io.StringIO()
    log = make_logger(journal, stderr)
    journal.up = False
    log.info("first")
    log.warning("second")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("WARNING: the journal is unreachable (Connection refused); logging to stderr until it "
                             "is back")  # once per outage, not per entry
    assert lines[1].endswith("INFO: first") and lines[2].endswith("WARNING: second")
    assert "Logging error" not in capsys.readouterr().err


def test_when_it_is_back_it_gets_what_it_missed_in_order(journal: Journal) -> None:
    log = make_logger(journal, io.StringIO())
    log.info("before")
    journal.up = False
    log.info("during 1")
    log.info("during 2")
    journal.up = True
    log.info("after")
    assert journal.messages() == ["before", "during 1", "during 2", "after"]
    delayed = [f for m, f in journal.got if "TAILCALLD_LOGGED_AT" in f]
    assert len(delayed) == 2
    assert "TAILCALLD_LOGGED_AT" not in journal.got[-1][1]


def test_a_full_backlog_says_how_many_went_to_stderr_only(journal: Journal) -> None:
    stderr = io.StringIO()
    log = make_logger(journal, stderr, backlog=2)
    journal.up = False
    for n in range(5):
        log.info("during %d", n)
    assert sum("during" in line for line in stderr.getvalue().splitlines()) == 5  # each on stderr
    journal.up = True
    log.info("after")
    assert journal.messages() == ["3 log entries went to stderr only while the journal was away",
                                  "during 3", "during 4", "after"]


def test_no_stderr_fallback_when_a_stderr_handler_exists(journal: Journal) -> None:
    log = make_logger(journal, None)
    journal.up = False
    log.info("kept")  # no stream to write to: nothing raised, and the journal gets it later
    journal.up = True
    log.info("next")
    assert journal.messages() == ["kept", "next"]


def test_an_exception_entry_survives_the_outage(journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
    stderr = io.StringIO()
    log = make_logger(journal, stderr)
    journal.up = False
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("while serving")
    assert "ValueError: boom" in stderr.getvalue()
    journal.up = True
    log.info("after")
    assert journal.messages()[0].startswith("while serving\nTraceback")
    assert "Logging error" not in capsys.readouterr().err
