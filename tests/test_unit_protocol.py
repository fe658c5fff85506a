"""Unit tests for the wire format: parse_request, encode_ok, encode_error.  No kernel, no socket."""

from __future__ import annotations

import json
from typing import Any
from datetime import datetime, UTC

import pytest

from tailcalld.errors import BadRequest, RequestError, SlotOutOfRange, TailcalldError
from tailcalld.protocol import (
    COMMANDS,
    AttachRequest,
    AttachResult,
    DetachRequest,
    ListRequest,
    ListResult,
    PingRequest,
    PingResult,
    RequestId,
    SlotInfo,
    StatusRequest,
    encode_error,
    encode_ok,
    parse_request,
    response_adapter,
)


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def parse_error(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(raw)
    return info.value


# Valid requests ----------------------------------------------------------------------------

def test_ping() -> None:
    rid, req = parse_request(line({"id": 1, "command": "ping"}))
    assert rid == 1
    assert isinstance(req, PingRequest)
    assert req.command == "ping"


def test_attach_with_all_fields() -> None:
    rid, req = parse_request(line({"id": "a-1", "command": "attach", "slot": "fchmodat",
                                   "source": "int f(void *ctx) { return 0; }",
                                   "filename": "f.c", "function": "f"}))
    assert rid == "a-1"
    assert isinstance(req, AttachRequest)
    assert (req.slot, req.filename, req.function) == ("fchmodat", "f.c", "f")
    assert req.source.startswith("int f(")


def test_attach_defaults_and_numeric_slot() -> None:
    rid, req = parse_request(line({"command": "attach", "slot": 268, "source": "x"}))
    assert rid is None
    assert isinstance(req, AttachRequest)
    assert req.slot == 268 and type(req.slot) is int
    assert req.filename == "<source>"
    assert req.function is None


def test_detach() -> None:
    rid, req = parse_request(line({"id": 7, "command": "detach", "slot": "268"}))
    assert rid == 7
    assert isinstance(req, DetachRequest)
    assert req.slot == "268"


def test_list() -> None:
    _, req = parse_request(line({"command": "list"}))
    assert isinstance(req, ListRequest)


def test_status() -> None:
    _, req = parse_request(line({"id": 0, "command": "status"}))
    assert isinstance(req, StatusRequest)


def test_line_without_newline_and_with_spaces() -> None:
    _, req = parse_request(b'  {"command": "ping"}  ')
    assert isinstance(req, PingRequest)


# Malformed input ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"{",
    b"not json\n",
    b'{"command": "ping",}\n',
    b"",
    b"\xff\xfe\xfa\n",                     # invalid UTF-8
    b'{"command": "p\xffing"}\n',          # invalid UTF-8 inside a string
    b"\x00\n",                             # a NUL byte
    b'{"command": "ping"}\x00\n',          # trailing NUL after a valid object
    b'{"command": "pi\x00ng"}\n',          # NUL inside a string (raw control char)
    b'{\x00"command": "ping"}\n',          # NUL between tokens
], ids=["truncated", "text", "trailing-comma", "empty", "bad-utf8", "bad-utf8-in-string",
        "nul", "trailing-nul", "nul-in-string", "nul-between-tokens"])
def test_malformed_json_is_bad_request(raw: bytes) -> None:
    err = parse_error(raw)
    assert isinstance(err.error, BadRequest)
    assert err.error.code == "bad_request"
    assert err.error.message.startswith("malformed JSON")
    assert err.request_id is None


@pytest.mark.parametrize("value", [["ping"], [{"id": 3, "command": "ping"}], 42, 1.5, "ping", None, True])
def test_non_object_json_is_bad_request(value: object) -> None:
    err = parse_error(line(value))
    assert err.error.code == "bad_request"
    assert "must be a JSON object" in err.error.message
    assert err.request_id is None


def test_unknown_command() -> None:
    err = parse_error(line({"id": 5, "command": "reboot"}))
    assert err.error.code == "unknown_command"
    assert "'reboot'" in err.error.message
    assert err.error.details == {"known": list(COMMANDS)}
    assert err.request_id == 5


@pytest.mark.parametrize("command", ["PING", " ping", ["ping"], {"ping": 1}, 1])
def test_command_must_match_exactly(command: object) -> None:
    err = parse_error(line({"command": command}))
    assert err.error.code == "unknown_command"


def test_missing_command() -> None:
    err = parse_error(line({"id": "x", "slot": 268}))
    assert err.error.code == "bad_request"
    assert 'no "command"' in err.error.message and "known: ping, attach" in err.error.message
    assert err.request_id == "x"


@pytest.mark.parametrize("command,extra", [
    ("ping", {}), ("list", {}), ("status", {}), ("detach", {"slot": 1}),
    ("attach", {"slot": 1, "source": "x"}),
])
def test_unknown_field_is_bad_request_naming_the_field(command: str, extra: dict[str, object]) -> None:
    err = parse_error(line({"id": 9, "command": command, **extra, "colour": "blue"}))
    assert err.error.code == "bad_request"
    assert "colour" in err.error.message
    assert err.error.details == [{"field": "colour", "message": "Extra inputs are not permitted"}]
    assert err.request_id == 9


@pytest.mark.parametrize("slot", [268.0, 1.5, True, False, [268], {"nr": 268}, None])
def test_slot_of_wrong_type(slot: object) -> None:
    for command, extra in (("attach", {"source": "x"}), ("detach", {})):
        err = parse_error(line({"command": command, "slot": slot, **extra}))
        assert err.error.code == "bad_request", (command, slot)
        assert err.error.message.startswith(f"invalid {command} request: slot")
        assert all(p["field"].startswith("slot") for p in err.error.details)


@pytest.mark.parametrize("command", ["attach", "detach"])
def test_missing_slot(command: str) -> None:
    err = parse_error(line({"command": command, "source": "x"} if command == "attach" else {"command": command}))
    assert err.error.code == "bad_request"
    assert {"field": "slot", "message": "Field required"} in err.error.details


@pytest.mark.parametrize("source", [42, 1.0, True, ["x"], {"text": "x"}])
def test_source_of_wrong_type(source: object) -> None:
    err = parse_error(line({"command": "attach", "slot": 268, "source": source}))
    assert err.error.code == "bad_request"
    assert [p["field"] for p in err.error.details] == ["source"]


def test_empty_source() -> None:
    err = parse_error(line({"command": "attach", "slot": 268, "source": ""}))
    assert err.error.code == "bad_request"
    assert [p["field"] for p in err.error.details] == ["source"]
    assert "at least 1 character" in err.error.message


def test_missing_source() -> None:
    err = parse_error(line({"command": "attach", "slot": 268}))
    assert err.error.details == [{"field": "(request)", "message":
                            "Value error, give exactly one of source (C text) or object (base64 ELF)"}]


@pytest.mark.parametrize("extra", [{"source": None}, {"source": "int x;", "object": "AAAA"}])
def test_source_and_object_are_exclusive(extra: dict[str, object]) -> None:
    err = parse_error(line({"command": "attach", "slot": 268, **extra}))
    assert err.error.code == "bad_request" and "exactly one of source" in err.error.message


@pytest.mark.parametrize("function", ["1abc", "a-b", "a b", "", "x" * 129, "f\n", "f()", "é", 5])
def test_bad_function_name(function: object) -> None:
    err = parse_error(line({"command": "attach", "slot": 268, "source": "x", "function": function}))
    assert err.error.code == "bad_request"
    assert [p["field"] for p in err.error.details] == ["function"]


@pytest.mark.parametrize("function", ["f", "_", "count_calls", "A9_z", "x" * 128])
def test_good_function_name(function: str) -> None:
    _, req = parse_request(line({"command": "attach", "slot": 268, "source": "x", "function": function}))
    assert isinstance(req, AttachRequest) and req.function == function


def test_several_problems_are_all_reported() -> None:
    err = parse_error(line({"command": "attach", "slot": 1.5, "source": "", "function": "-"}))
    fields = {p["field"].split(".")[0] for p in err.error.details}
    assert fields == {"slot", "source", "function"}


# Request ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", [0, 17, -3, 2**70, "", "abc", "17"])
def test_usable_id_is_echoed_on_errors(rid: object) -> None:
    err = parse_error(line({"id": rid, "command": "nope"}))
    assert err.request_id == rid
    assert type(err.request_id) is type(rid)
    err = parse_error(line({"id": rid, "command": "detach"}))
    assert err.request_id == rid


@pytest.mark.parametrize("rid", [True, False, 1.0, 2.5, {"n": 1}, [1], None])
def test_unusable_id_is_not_echoed(rid: object) -> None:
    err = parse_error(line({"id": rid, "command": "nope"}))
    assert err.request_id is None


@pytest.mark.parametrize("rid", [True, 1.0, {"n": 1}, [1]])
def test_unusable_id_makes_a_valid_request_bad(rid: object) -> None:
    err = parse_error(line({"id": rid, "command": "ping"}))
    assert err.error.code == "bad_request"
    assert err.request_id is None
    assert all(p["field"].startswith("id") for p in err.error.details)


def test_null_id_is_accepted() -> None:
    rid, req = parse_request(line({"id": None, "command": "ping"}))
    assert rid is None and isinstance(req, PingRequest)


# Bugs ----------------------------------------------------------------------------------------

def test_huge_integer_is_bad_request() -> None:
    raw = b'{"id": 1, "command": "detach", "slot": ' + b"9" * 5000 + b"}\n"
    err = parse_error(raw)
    assert err.error.code == "bad_request"


def test_deeply_nested_json_is_bad_request() -> None:
    err = parse_error(b"[" * 100_000 + b"\n")
    assert err.error.code == "bad_request"


# Encoding replies --------------------------------------------------------------------------

def _one_line(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    return json.loads(data)


def test_encode_ok_ping() -> None:
    data = encode_ok(3, PingResult(version="0.1.0", pid=1234))
    reply = _one_line(data)
    assert reply == {"id": 3, "ok": True, "result": {"version": "0.1.0", "pid": 1234}}
    assert response_adapter.validate_json(data).ok is True


def test_encode_ok_serialises_datetimes_and_nested_models() -> None:
    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    result = ListResult(slots=[SlotInfo(slot=268, syscall="fchmodat", function="f", prog_id=9,
                                        filename="f.c\nwith newline", source_sha256="ab" * 32,
                                        attached_at=when, misses=0)])
    data = encode_ok("req", result)
    reply = _one_line(data)  # a newline in a value must not break the framing
    assert reply["id"] == "req"
    slot = reply["result"]["slots"][0]
    assert slot["filename"] == "f.c\nwith newline"
    assert datetime.fromisoformat(slot["attached_at"]) == when
    response_adapter.validate_json(data)


def test_encode_ok_with_null_id() -> None:
    data = encode_ok(None, AttachResult(slot=1, syscall="write", function="f", prog_id=2, insns=3,
                                        replaced_prog_id=None))
    reply = _one_line(data)
    assert reply["id"] is None and reply["ok"] is True
    assert reply["result"]["replaced_prog_id"] is None
    response_adapter.validate_python(reply)


@pytest.mark.parametrize("rid", [None, 4, "four"])
def test_encode_error(rid: RequestId) -> None:
    err = SlotOutOfRange("slot 2000 is out of range", {"slot": 2000, "max": 1023})
    data = encode_error(rid, err)
    reply = _one_line(data)
    assert reply == {"id": rid, "ok": False,
                     "error": {"code": "slot_out_of_range", "message": "slot 2000 is out of range",
                               "details": {"slot": 2000, "max": 1023}}}
    parsed = response_adapter.validate_json(data)
    assert parsed.ok is False and parsed.error.code == "slot_out_of_range"


def test_encode_error_of_a_parse_failure_round_trips() -> None:
    err = parse_error(line({"id": 11, "command": "attach", "slot": 1, "source": "", "x": 1}))
    data = encode_error(err.request_id, err.error)
    reply = _one_line(data)
    assert reply["id"] == 11
    assert reply["error"]["code"] == "bad_request"
    assert {p["field"] for p in reply["error"]["details"]} == {"source", "x"}
    response_adapter.validate_json(data)


def test_encode_error_with_multiline_message_stays_one_line() -> None:
    err = TailcalldError("line one\nline two", {"log": "a\nb\n"})
    data = encode_error(None, err)
    reply = _one_line(data)
    assert reply["error"] == {"code": "internal", "message": "line one\nline two",
                              "details": {"log": "a\nb\n"}}


def test_response_adapter_rejects_inconsistent_replies() -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        response_adapter.validate_python({"id": 1, "ok": True, "error": {"code": "x", "message": "y"}})
    with pytest.raises(ValidationError):
        response_adapter.validate_python({"id": 1.5, "ok": True, "result": {}})
