"""Loader settings without a kernel: value encoding by type, -D checks, the wire fields, the
object name a file gives its maps, and tailcallctl's --set/-D parsing and display."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tailcalld import ctl
from tailcalld.bpf_object import object_name
from tailcalld.commands import artifact_of
from tailcalld.config import Settings
from tailcalld.errors import BadRequest, InvalidSetting, RequestError
from tailcalld.loader_settings import GlobalVar, VarType, check_define, define_flags, encode, settings, unknown
from tailcalld.protocol import AttachRequest, ListResult, SlotInfo, parse_request
from tailcalld.state import SlotRecord


def var(kind: str, size: int, signed: bool = False, spelling: str = "int") -> GlobalVar:
    return GlobalVar("v", ".rodata", 0, VarType(kind, size, signed, spelling))  # type: ignore[arg-type]


def le(value: int, size: int, signed: bool = False) -> bytes:
    return value.to_bytes(size, sys.byteorder, signed=signed)


@pytest.mark.parametrize(("size", "signed", "text", "value"), [
    (4, True, "1234", 1234), (4, True, "-1", -1), (4, True, "0x7fffffff", 2**31 - 1), (4, True, "-2147483648", -2**31),
    (1, False, "255", 255), (2, False, "0o17", 15), (8, False, "0xffffffffffffffff", 2**64 - 1),
    (8, True, " 0b101 ", 5),
])
def test_integers_in_range(size: int, signed: bool, text: str, value: int) -> None:
    assert encode(var("int", size, signed), text) == le(value, size, signed)


@pytest.mark.parametrize(("size", "signed", "text"), [
    (4, True, "2147483648"), (4, True, "-2147483649"), (1, False, "256"), (4, False, "-1"), (8, False, str(2**64)),
])
def test_integers_out_of_range(size: int, signed: bool, text: str) -> None:
    with pytest.raises(InvalidSetting, match="out of range"):
        encode(var("int", size, signed), text)


@pytest.mark.parametrize("text", ["", "twelve", "1.5", "010", "1<<3"])
def test_not_integers(text: str) -> None:
    with pytest.raises(InvalidSetting, match="takes an integer"):
        encode(var("int", 4, True), text)


def test_bool() -> None:
    assert [encode(var("bool", 1), t) for t in ("true", "1", "False", "no")] == [b"\1", b"\1", b"\0", b"\0"]
    with pytest.raises(InvalidSetting, match="true, false, 1 or 0"):
        encode(var("bool", 1), "2")


def test_char_arrays() -> None:
    chars = var("chars", 8, spelling="char[8]")
    assert encode(chars, "bash") == b"bash\0\0\0\0"
    assert encode(chars, "") == bytes(8)
    assert encode(chars, "1234567") == b"1234567\0"
    with pytest.raises(InvalidSetting, match=r"8 bytes do not fit char\[8\] with its terminating NUL \(at most 7\)"):
        encode(chars, "12345678")
    with pytest.raises(InvalidSetting, match="NUL byte"):
        encode(chars, "a\0b")


def test_other_types_are_refused_by_name() -> None:
    with pytest.raises(InvalidSetting, match=r"v is a struct cfg \(.rodata\); --set writes integers"):
        encode(var("other", 8, spelling="struct cfg"), "1")


def test_unknown_lists_the_settable_ones() -> None:
    found = [GlobalVar("pid", ".rodata", 0, VarType("int", 4, True, "int")),
             GlobalVar("cfg", ".rodata", 4, VarType("other", 8, spelling="struct cfg"))]
    err = unknown("nope", found)
    assert "no global variable 'nope'" in err.message and "settable: pid (int (4 bytes, signed), .rodata)" in err.message
    assert err.details == {"candidates": ["pid"]}
    assert "no variable --set can write" in unknown("x", []).message


def test_defines() -> None:
    check_define("DEBUG", "1")
    check_define("NAME", '"a string" (1 << 3)')
    for name, value in (("1X", "1"), ("A-B", "1"), ("X", "1\n#define Y"), ("X", "a\\"), ("X", "\x1b"),
                        ("X", "é"), ("X", "y" * 257), ("x" * 129, "1")):
        with pytest.raises(ValueError):
            check_define(name, value)
    assert define_flags(settings({"B": "2", "A": ""})) == ["-DA=", "-DB=2"]


def test_settings_are_canonical() -> None:
    assert settings({"b": "1", "a": "2"}) == settings({"a": "2", "b": "1"}) == (("a", "2"), ("b", "1"))
    assert settings(None) == ()


@pytest.mark.parametrize(("filename", "name"), [
    ("fchmodat.bpf.c", "fchmodat"), ("fchmodat_libbpf.bpf.c", "fchmodat"), ("a-b.o", "a_b"), ("<stdin>", "stdin"),
    ("<source>", "source"), (".bpf.o", "handler"), (None, "handler"), ("dir/x.c", "x"), ("é.c", "handler"),
])
def test_object_name(filename: str | None, name: str) -> None:
    assert object_name(filename) == name


def _request(**fields: object) -> AttachRequest:
    line = AttachRequest(command="attach", slot=268, **fields).model_dump_json()  # type: ignore[arg-type]
    _, request = parse_request(line.encode())
    assert isinstance(request, AttachRequest)
    return request


LIBBPF = 'SEC("raw_tp/x") int h(void *ctx) { return 0; }'


def test_wire_fields_become_the_artifact() -> None:
    artifact = artifact_of(_request(source=LIBBPF, variables={"pid": 42, "comm": "sh"}, defines={"D": "1"}), Settings())
    assert artifact.variables == (("comm", "sh"), ("pid", "42")) and artifact.defines == (("D", "1"),)
    with pytest.raises(BadRequest, match="-D NAME=VALUE"):
        artifact_of(_request(source="int h(void *ctx) { return 0; }", variables={"pid": 1}), Settings())
    with pytest.raises(BadRequest, match="not compiled"):
        artifact_of(_request(object="f0VMRg==", defines={"D": "1"}), Settings())


@pytest.mark.parametrize("fields", [
    {"variables": {"not an identifier": "1"}}, {"variables": {"x": True}}, {"variables": {"x": "y" * 4097}},
    {"defines": {"X": "1\n2"}}, {"defines": {f"X{i}": "1" for i in range(65)}},
])
def test_wire_refuses_bad_settings(fields: dict[str, object]) -> None:
    line = json.dumps({"command": "check", "source": LIBBPF, **fields}).encode()
    with pytest.raises(RequestError) as caught:
        parse_request(line)
    assert caught.value.error.code == "bad_request"


def test_old_state_records_have_no_settings() -> None:
    record = SlotRecord.model_validate({"slot": 1, "function": "f", "prog_id": 2, "source_sha256": None,
                                        "filename": None, "attached_by_uid": 0, "attached_at": None})
    assert (record.variables, record.defines) == ({}, {})


def test_ctl_parses_set_and_defines(tmp_path: Path) -> None:
    handler = tmp_path / "h.bpf.c"
    handler.write_text(LIBBPF)
    args = ctl.build_parser().parse_args(["attach", "268", str(handler), "--set", "pid=0x10", "--set", "comm=a=b",
                                          "-D", "DEBUG", "-D", "N=3"])
    fields = ctl.attach_request(args)
    assert fields["variables"] == {"pid": "0x10", "comm": "a=b"} and fields["defines"] == {"DEBUG": "1", "N": "3"}
    assert ctl.check_request(ctl.build_parser().parse_args(["check", str(handler)]))["variables"] is None
    for bad in (["--set", "pid"], ["--set", "a=1", "--set", "a=2"]):
        with pytest.raises(ctl.UsageError):
            ctl.check_request(ctl.build_parser().parse_args(["check", str(handler), *bad]))


def _slot(**fields: object) -> SlotInfo:
    return SlotInfo(slot=268, syscall="fchmodat", function="h", dialect="libbpf", prog_id=5, filename="h.bpf.c",
                    source_sha256="0" * 64, attached_at=datetime.now(UTC), misses=0, **fields)  # type: ignore[arg-type]


def test_list_shows_settings_only_when_some_slot_has_them(capsys: pytest.CaptureFixture[str]) -> None:
    args = ctl.build_parser().parse_args(["list"])
    ctl.show_list(ListResult(slots=[_slot()]), args)
    assert "SETTINGS" not in capsys.readouterr().out
    ctl.show_list(ListResult(slots=[_slot(variables={"pid": "7"}, defines={"D": "1"}), _slot()]), args)
    out = capsys.readouterr().out
    assert "SETTINGS" in out and "pid=7 -DD=1" in out
