"""Logging to the journal (structured fields) or, with no journald around, to stderr.

journald may go away while the daemon runs (a restart, a crash): the journal handler then
writes each entry to stderr as a plain line and keeps it, and once journald answers again it
sends what it kept, in order, before anything new.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from .misses import MissReport

IDENTIFIER = "tailcalld"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# journalctl -x explains entries carrying this id (see contrib/tailcalld.catalog).
MISS_MESSAGE_ID = "5b1d1c4a6f0e4f1c9d2f3a8e7b6c5d40"
BACKLOG = 10_000  # entries kept for the journal while it is away (each was on stderr too)

Sender = Callable[..., None]  # systemd.journal.send's signature: (MESSAGE, **FIELDS)

logger = logging.getLogger(IDENTIFIER)


def journald_listening(path: str = JOURNAL_SOCKET) -> bool:
    """A socket file alone proves nothing: a journald that died leaves it behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino when a unit's stderr is connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _Backlog:
    """What the journal missed while it was away, oldest first, and how many did not fit."""

    def __init__(self, size: int) -> None:
        self.entries: deque[tuple[str, dict[str, Any]]] = deque(maxlen=size)
        self.dropped = 0

    def keep(self, message: str, fields: dict[str, Any]) -> None:
        if len(self.entries) == self.entries.maxlen:
            self.dropped += 1
        self.entries.append((message, fields))


class Resend:
    """The sender a JournalHandler calls (its ``sender_function``).  It sends to the journal;
    when the journal cannot be reached (journald stopped or restarting) it writes the entry to
    ``stderr`` as a plain line and keeps it, instead of raising, which logging would turn into
    a "--- Logging error ---" traceback per entry.  Every later entry tries the journal again,
    and sends what was kept first, so the journal gets everything, in order."""

    def __init__(self, send: Sender, stderr: TextIO | None, backlog: int = BACKLOG,
                 fields: dict[str, str] | None = None) -> None:
        self._send = send
        self._stderr = stderr  # None when a stderr handler writes every entry already
        self._backlog = _Backlog(backlog)
        # Those of the handler (SYSLOG_IDENTIFIER, TAILCALLD_INSTANCE), for the entries sent here
        # that no handler made (the count of entries that went to stderr only).
        self._fields = fields if fields is not None else {"SYSLOG_IDENTIFIER": IDENTIFIER}

    @property
    def away(self) -> bool:
        return bool(self._backlog.entries) or self._backlog.dropped > 0

    def __call__(self, message: str, /, **fields: Any) -> None:  # fields hold a "message" too
        if self.away:
            self.resend()
        if not self.away:
            try:
                self._send(message, **fields)
                return
            except OSError as err:
                self._write("WARNING", f"the journal is unreachable ({err.strerror or err}); "
                                       "logging to stderr until it is back")
        self._backlog.keep(message, {**fields, "TAILCALLD_LOGGED_AT": datetime.now(UTC).isoformat()})
        self._write(_LEVELS.get(str(fields.get("PRIORITY")), "INFO"), message)

    def resend(self) -> None:
        """Send what the journal missed, oldest first; stop at the first failure (still away)."""
        try:
            if self._backlog.dropped:
                self._send(f"{self._backlog.dropped} log entries went to stderr only while the journal was away",
                           PRIORITY="4", **self._fields)
                self._backlog.dropped = 0
            while self._backlog.entries:
                message, fields = self._backlog.entries[0]
                self._send(message, **fields)
                self._backlog.entries.popleft()
        except OSError:
            return

    def _write(self, level: str, message: str) -> None:
        if self._stderr is not None:
            stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
            self._stderr.write(f"{stamp} {IDENTIFIER}[{os.getpid()}] {level}: {message}\n")
            self._stderr.flush()


_LEVELS = {"7": "DEBUG", "6": "INFO", "5": "NOTICE", "4": "WARNING", "3": "ERROR", "2": "CRITICAL", "1": "ALERT",
           "0": "EMERGENCY"}


def entry_fields(instance: str) -> dict[str, str]:
    """The fields every journal entry of the daemon carries, whoever logs it."""
    return {"SYSLOG_IDENTIFIER": IDENTIFIER, "TAILCALLD_INSTANCE": instance}


def _journal_handler(stderr: TextIO | None, instance: str) -> logging.Handler | None:
    if not journald_listening():
        return None
    try:
        from systemd.journal import JournalHandler, send  # noqa: PLC0415 - optional at run time
    except ImportError:
        return None
    fields = entry_fields(instance)
    handler: logging.Handler = JournalHandler(sender_function=Resend(send, stderr, fields=fields), **fields)
    return handler


def setup_logging(level: str, *, instance: str, force_stderr: bool = False) -> list[str]:
    """Route the ``tailcalld`` logger to the journal when journald runs, and to stderr when
    there is no journal or a person watches the terminal (``make run``).  Every journal entry
    carries ``TAILCALLD_INSTANCE=instance`` (Settings.instance_name).  Returns the targets."""
    handlers: dict[str, logging.Handler] = {}
    watched = sys.stderr.isatty()
    # The journal's own fallback writes to stderr only when no stderr handler does already.
    journal = None if force_stderr else _journal_handler(None if watched else sys.stderr, instance)
    if journal is not None:
        handlers["journal"] = journal
    if journal is None or watched:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s tailcalld[%(process)d] %(levelname)s: %(message)s"))
        handlers["stderr"] = stderr
    for old in list(logger.handlers):
        logger.removeHandler(old)
    for handler in handlers.values():
        logger.addHandler(handler)
    set_log_level(level)
    logger.propagate = False
    return list(handlers)


def set_log_level(level: str) -> None:
    logger.setLevel(level.upper())


def log_misses(reports: list[MissReport]) -> None:
    for r in reports:
        fields: dict[str, object] = {
            "MESSAGE_ID": MISS_MESSAGE_ID,
            "SYSCALL_NR": r.nr,
            "SYSCALL_NAME": r.syscall,
            "MISSES": r.misses,
            "INTERVAL_SEC": f"{r.seconds:.1f}",
        }
        if r.abi is not None:
            fields["SYSCALL_ABI"] = r.abi
        if r.hook != "enter":
            fields["SLOT_HOOK"] = r.hook
        logger.info(r.message, extra=fields)
