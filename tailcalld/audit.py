"""The audit trail in the journal: who changed which slot, and who tried and failed.

Every change to the slots writes one entry (``MESSAGE_ID=CHANGE_MESSAGE_ID``, ``TAILCALLD_ACTION``
attach, replace, detach or unload), and so does every attach or detach that failed
(``MESSAGE_ID=FAILED_MESSAGE_ID``, ``TAILCALLD_ACTION`` attach-failed or detach-failed, with the
``ERROR_CODE`` and ``ERROR_MESSAGE`` the client got), whether the slots, the compiler, the kernel
or the protocol refused it.  Both name the peer that asked.  A check
changes nothing, so it is not audited.  contrib/tailcalld.catalog explains both ids
(``journalctl -x``).
"""

from __future__ import annotations

import json
import logging

from .dialects import Artifact
from .errors import TailcalldError
from .peers import Peer

CHANGE_MESSAGE_ID = "ab77497e97b147b5a2000d31aa477eb1"
FAILED_MESSAGE_ID = "1f78943457e14393a319c7a0926f1dda"
# A compile error's message is a line; its diagnostics go to the client (details), not here.
MAX_ERROR_CHARS = 2000
MAX_SLOT_CHARS = 100  # a slot or file name as requested, when it names no slot: whatever the client sent
AUDITED_COMMANDS = ("attach", "detach")  # the changes that are audited when they fail

Fields = dict[str, object]

logger = logging.getLogger("tailcalld")


def error_fields(err: BaseException) -> Fields:
    """The error as the client got it: its wire code and message.  A bug (not a TailcalldError)
    reaches the client as ``internal``; the entry says which exception it was."""
    if isinstance(err, TailcalldError):
        message = err.message
        code = err.code
    else:
        message = f"internal error: {type(err).__name__}: {err}"
        code = TailcalldError.code
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return {"ERROR_CODE": code, "ERROR_MESSAGE": message}


def requested_slot(spec: int | str) -> Fields:
    """A slot that could not be resolved, as the client named it (printable and short)."""
    return {"SLOT_REQUESTED": printable(str(spec))}


def attach_fields(filename: str, function: str | None, artifact: Artifact | None,
                  cgroup: str | None = None) -> Fields:
    """What an attach was asked to put in the slot (no artifact: it was not made, or its hash is
    given apart), and for which cgroup (attach --cgroup)."""
    fields: Fields = {"FILENAME": filename}
    if function is not None:
        fields["FUNCTION"] = function
    if artifact is not None:
        fields["SOURCE_SHA256"] = artifact.sha256
    if cgroup is not None:
        fields["CGROUP"] = cgroup
    return fields


def changed(action: str, peer: Peer, what: str, fields: Fields) -> None:
    logger.info("%s %s (by uid %d, pid %d, %s)", action, what, peer.uid, peer.pid, peer.comm,
                extra={"MESSAGE_ID": CHANGE_MESSAGE_ID, "TAILCALLD_ACTION": action, **peer.journal_fields(),
                       **fields})


def invalid_request(line: bytes, peer: Peer, err: TailcalldError) -> None:
    """An attach or detach the protocol refused before it could run (a field missing, or of a
    wrong type or value), audited as failed like one the slots refused.  Only a line that is a
    JSON object naming one of those commands is: malformed JSON names no command."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return
    if not isinstance(request, dict) or request.get("command") not in AUDITED_COMMANDS:
        return
    action: str = request["command"]
    slot, filename = request.get("slot"), request.get("filename")
    fields: Fields = requested_slot(slot) if isinstance(slot, int | str) else {}
    if isinstance(filename, str):
        fields["FILENAME"] = printable(filename)
    where = f"slot {fields['SLOT_REQUESTED']!r}" if "SLOT_REQUESTED" in fields else "no slot"
    failed(action, peer, f"{fields['FILENAME']} in {where}" if "FILENAME" in fields else where, err, fields)


def printable(text: str) -> str:
    """A value from the client, shortened, with anything unprintable escaped (a NUL would make
    the field binary, shown as a list of bytes)."""
    short = text[:MAX_SLOT_CHARS]
    short = "".join(c if c.isprintable() else repr(c)[1:-1] for c in short)
    return short + ("..." if len(text) > MAX_SLOT_CHARS else "")


def failed(action: str, peer: Peer, what: str, err: BaseException, fields: Fields) -> None:
    """A change that was asked for and did not happen: at warning level, since the slots are not
    what the peer meant them to be."""
    error = error_fields(err)
    logger.warning("%s failed: %s: %s [%s] (by uid %d, pid %d, %s)", action, what, error["ERROR_MESSAGE"],
                   error["ERROR_CODE"], peer.uid, peer.pid, peer.comm,
                   extra={"MESSAGE_ID": FAILED_MESSAGE_ID, "TAILCALLD_ACTION": f"{action}-failed",
                          **peer.journal_fields(), **fields, **error})
