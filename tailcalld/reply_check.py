"""Replies that plainly fit the protocol, read without pydantic: tailcallctl's start-up (issue 14).

Importing pydantic and building protocol.py's models costs tailcallctl several times a bare
Python start, for ``list`` and ``status`` which only print what the daemon says.  So the reply
envelope, and the results of those two verbs, are first read here, by plain checks that are
*stricter* than the models: a value passes only when the model would take it unchanged (an int
that is an int, not a float or a numeric string; a time in the ISO form the daemon writes).  A
reply that passes is exactly what the model would give (tests/test_unit_reply_check.py proves it
field by field, against the models, on generated replies); anything else -- a missing field, a
value the model would coerce or refuse -- is handed to the pydantic model, which decides and says
what is wrong as before.  So protocol.py stays the definition of the wire format: the specs below
only restate it for the common case, and the tests fail when the two part.
"""

from __future__ import annotations

import math
import re  # argparse has imported it already
from collections.abc import Callable, Mapping
from datetime import datetime
from types import SimpleNamespace

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any, TypeAlias


class Unsure(Exception):
    """A value this module does not vouch for: the pydantic model decides."""


Check: TypeAlias = "Callable[[Any], Any]"
REQUIRED = object()  # a field without a default


def _int(value: Any) -> int:
    if type(value) is not int:  # bool is an int subclass, and the model's int takes 1.0 and "1": not ours
        raise Unsure
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise Unsure
    return value


def _bool(value: Any) -> bool:
    if value is not True and value is not False:
        raise Unsure
    return value


def _float(value: Any) -> float:
    # ints up to 2**53 are floats exactly; inf and nan are the model's business
    if type(value) is int and abs(value) <= 1 << 53:
        return float(value)
    if type(value) is float and math.isfinite(value):
        return value
    raise Unsure


def _optional(check: Check) -> Check:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)
    return optional


def _one_of(*choices: str) -> Check:
    def one_of(value: Any) -> str:
        if type(value) is not str or value not in choices:
            raise Unsure
        return value
    return one_of


# The form pydantic writes a datetime in (model_dump_json), with or without an offset.
_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)?", re.ASCII)


def _datetime(value: Any) -> datetime:
    if type(value) is not str or not _ISO_TIME.fullmatch(value):
        raise Unsure
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # 25:00, a 13th month: the model says what is wrong
        raise Unsure from None


def _str_dict(value: Any) -> dict[str, str]:
    if type(value) is not dict or not all(type(k) is str and type(v) is str for k, v in value.items()):
        raise Unsure
    return dict(value)


def _str_list(value: Any) -> list[str]:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise Unsure
    return list(value)


# Each field of a result model: its check, and its default (REQUIRED: none; a list or dict
# default is copied, as the model's default_factory makes a new one).
Spec: TypeAlias = "Mapping[str, tuple[Check, Any]]"

SLOT_INFO: Spec = {
    "slot": (_int, REQUIRED), "syscall": (_str, REQUIRED), "function": (_optional(_str), REQUIRED),
    "dialect": (_optional(_one_of("bcc", "libbpf", "object")), None), "prog_id": (_int, REQUIRED),
    "filename": (_optional(_str), REQUIRED), "source_sha256": (_optional(_str), REQUIRED),
    "attached_at": (_optional(_datetime), REQUIRED), "attached_by_uid": (_optional(_int), None),
    "hook": (_one_of("enter", "exit"), "enter"), "journal": (_bool, False),
    "variables": (_str_dict, {}), "defines": (_str_dict, {}), "expires_at": (_optional(_datetime), None),
    "cgroup": (_optional(_str), None), "priority": (_optional(_int), None),
    "state": (_one_of("in-sync", "kernel-empty", "kernel-other", "not-restored", "restoring"), "in-sync"),
    "kernel_prog_id": (_optional(_int), None), "hits": (_int, 0), "misses": (_int, REQUIRED),
    "scope_misses": (_int, 0), "timed_runs": (_optional(_int), None), "timed_ns": (_optional(_int), None),
    "events_emitted": (_int, 0), "events_lost": (_int, 0), "events_delivered": (_int, 0),
}

STATUS_RESULT: Spec = {
    "version": (_str, REQUIRED), "pid": (_int, REQUIRED), "started_at": (_datetime, REQUIRED),
    "pin_dir": (_str, REQUIRED), "socket": (_str, REQUIRED), "dispatcher_prog_id": (_int, REQUIRED),
    "dispatcher_link_id": (_int, REQUIRED), "adopted": (_bool, REQUIRED), "upgraded_from": (_optional(_int), None),
    "slots_used": (_int, REQUIRED), "nr_slots": (_int, REQUIRED), "restoring": (_int, 0),
    "next_expiry": (_optional(_datetime), None), "scoped": (_int, 0), "chained": (_int, 0), "atomic_applies": (_int, 0),
    "hits_total": (_int, 0),
    "misses_total": (_int, REQUIRED), "miss_log_interval": (_float, REQUIRED), "connections": (_int, 0),
    "timing_seconds_left": (_float, 0.0), "corrections": (_str_list, []), "events_emitted": (_int, 0),
    "events_lost": (_int, 0), "events_delivered": (_int, 0), "events_subscribers": (_int, 0),
    "events_buffer_bytes": (_int, 0),
}


def _fields(raw: Any, spec: Spec) -> SimpleNamespace:
    """The fields of ``raw`` as the model would have them; fields the spec does not know are
    ignored, as the models ignore them."""
    if type(raw) is not dict:
        raise Unsure
    values = {}
    for name, (check, default) in spec.items():
        if name in raw:
            values[name] = check(raw[name])
        elif default is REQUIRED:
            raise Unsure
        else:
            values[name] = default.copy() if isinstance(default, (dict, list)) else default
    return SimpleNamespace(**values)


def _slots(value: Any) -> list[SimpleNamespace]:
    if type(value) is not list:
        raise Unsure
    return [_fields(item, SLOT_INFO) for item in value]


def list_result(raw: Any) -> SimpleNamespace | None:
    """``list``'s result with the attributes of protocol.ListResult, or None: let the model decide."""
    try:
        if type(raw) is not dict or "slots" not in raw:
            raise Unsure
        return SimpleNamespace(slots=_slots(raw["slots"]))
    except Unsure:
        return None


def status_result(raw: Any) -> SimpleNamespace | None:
    """``status``'s result with the attributes of protocol.StatusResult, or None."""
    try:
        return _fields(raw, STATUS_RESULT)
    except Unsure:
        return None


READERS: Mapping[str, Callable[[Any], SimpleNamespace | None]] = {"list": list_result, "status": status_result}


def _request_id(value: Any) -> bool:
    return value is None or type(value) in (int, str)


def envelope_fits(reply: Any) -> bool:
    """Whether ``reply`` is plainly an OkResponse or an ErrorResponse (protocol.response_adapter
    would take it as it is); False: ask the adapter."""
    if type(reply) is not dict or "id" not in reply or not _request_id(reply["id"]):
        return False
    if reply.get("ok") is True:
        return type(reply.get("result")) is dict
    error = reply.get("error")
    return (reply.get("ok") is False and type(error) is dict and type(error.get("code")) is str
            and type(error.get("message")) is str)
