"""Logging to the journal (structured fields) or, with no journald around, to stderr."""

from __future__ import annotations

import logging
import os
import socket
import sys

from .misses import MissReport

IDENTIFIER = "tailcalld"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# journalctl -x explains entries carrying this id (see contrib/tailcalld.catalog).
MISS_MESSAGE_ID = "5b1d1c4a6f0e4f1c9d2f3a8e7b6c5d40"

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


def _journal_handler() -> logging.Handler | None:
    if not journald_listening():
        return None
    try:
        from systemd.journal import JournalHandler  # noqa: PLC0415 - optional at run time
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)


def setup_logging(level: str = "info", *, force_stderr: bool = False) -> list[str]:
    """Route the ``tailcalld`` logger to the journal when journald runs, and to stderr when
    there is no journal or a person watches the terminal (``make run``).  Returns the targets."""
    handlers: dict[str, logging.Handler] = {}
    journal = None if force_stderr else _journal_handler()
    if journal is not None:
        handlers["journal"] = journal
    if journal is None or sys.stderr.isatty():
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
        logger.info(r.message, extra=fields)
