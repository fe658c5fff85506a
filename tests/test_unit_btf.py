"""BTF decoding (tailcalld/btf.py) on the BTF clang really writes: the general decoder's values
for every kind an event struct is made of, and the fast encoders' JSON text equal to it."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from tailcalld.bpf_object import BpfObject
from tailcalld.btf import BtfError, BtfTypes, JsonEncoders

SOURCE = r"""
typedef unsigned int u32;
enum color { RED = 1, GREEN = 2, BLUE = -3 };
struct plain { u32 a; int b; unsigned long long c; short d; unsigned char e; };
struct odd {
    unsigned int low : 3, high : 5;
    _Bool flag;
    enum color color;
    char name[8];
    union { int i; unsigned char bytes[4]; } u;
    struct plain nested[2];
    double ratio;
    void *ptr;
    signed char tiny[3];
};
struct plain p;
struct odd o;
"""


@pytest.fixture(scope="module")
def types(tmp_path_factory: pytest.TempPathFactory) -> BtfTypes:
    folder = tmp_path_factory.mktemp("btf")
    (folder / "t.c").write_text(SOURCE)
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-c", str(folder / "t.c"), "-o", str(folder / "t.o")],
                   check=True)
    obj = BpfObject((folder / "t.o").read_bytes())
    try:
        raw = obj.btf()
    finally:
        obj.close()
    assert raw is not None
    return BtfTypes(raw)


def type_id(types: BtfTypes, name: str) -> int:
    return next(i for i in range(1, 200) if types.name(i) == name)


def test_a_plain_struct_decodes_field_by_field(types: BtfTypes) -> None:
    tid = type_id(types, "plain")
    data = (7).to_bytes(4, "little") + (-5).to_bytes(4, "little", signed=True) + (2**64 - 1).to_bytes(8, "little") \
        + (-2).to_bytes(2, "little", signed=True) + bytes([200]) + b"\0" * 5
    assert types.decode(tid, data) == {"a": 7, "b": -5, "c": 2**64 - 1, "d": -2, "e": 200}
    assert JsonEncoders(types).encode(tid, data) == b'{"a":7,"b":-5,"c":18446744073709551615,"d":-2,"e":200}'


def test_every_kind_of_member(types: BtfTypes) -> None:
    tid = type_id(types, "odd")
    data = bytearray(types.size(tid))
    data[0] = 0b10101_011  # low = 3, high = 21
    data[1] = 1  # flag (the first byte after the bitfields' storage unit: clang packs them into 1 byte)
    decoded = types.decode(tid, bytes(data))
    assert (decoded["low"], decoded["high"]) == (3, 21)
    assert set(decoded) == {"low", "high", "flag", "color", "name", "u", "nested", "ratio", "ptr", "tiny"}
    assert decoded["name"] == "" and decoded["u"] == {"i": 0, "bytes": ""} and decoded["ptr"] == 0
    assert decoded["nested"] == [{"a": 0, "b": 0, "c": 0, "d": 0, "e": 0}] * 2


@pytest.mark.parametrize("name", ["plain", "odd"])
def test_the_fast_encoders_write_what_the_decoder_reads(types: BtfTypes, name: str) -> None:
    """Random bytes, many times: the encoders' JSON is json.dumps of the decoded value."""
    tid = type_id(types, name)
    encoders = JsonEncoders(types)
    rng = random.Random(1)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(types.size(tid)))
        expected = json.dumps(types.decode(tid, data), separators=(",", ":")).encode()
        assert encoders.encode(tid, data) == expected


def test_enums_show_their_names(types: BtfTypes) -> None:
    tid = type_id(types, "odd")
    offset = 4  # after the bitfield unit (1 byte) and the bool (1), aligned to 4
    data = bytearray(types.size(tid))
    data[offset:offset + 4] = (-3).to_bytes(4, "little", signed=True)
    assert types.decode(tid, bytes(data))["color"] == "BLUE"
    data[offset:offset + 4] = (9).to_bytes(4, "little")
    assert types.decode(tid, bytes(data))["color"] == 9  # no name: the number


@pytest.mark.parametrize("raw", [b"", b"\x00" * 24])
def test_what_is_not_btf_is_refused(raw: bytes) -> None:
    with pytest.raises(BtfError):
        BtfTypes(raw)


def test_an_unknown_type_is_an_error(types: BtfTypes) -> None:
    with pytest.raises(BtfError):
        types.decode(100000, b"")
