"""Values decoded by their BTF type: how a handler's TC_EMIT struct becomes JSON fields.

The handler's own BTF (the .BTF section clang writes, as the compile worker read it after the
load) describes every struct it emits; ``BtfTypes.decode`` walks one type over the bytes of
an event.  Only what event structs are made of is decoded: integers, enums, floats, arrays
(char arrays as text), structs and unions, through typedefs and qualifiers; a pointer is its
address, as an integer.  Format: the kernel's Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# Bytes that follow the common part of a type: fixed per kind, plus per-member for vlen kinds.
_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
MAX_DEPTH = 16  # a struct nested deeper is shown as bytes: a bound on hostile BTF


class BtfError(ValueError):
    """The bytes are not BTF this module can read."""


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    extra: bytes  # the kind-specific part


class BtfTypes:
    def __init__(self, raw: bytes) -> None:
        if len(raw) < _HEADER.size:
            raise BtfError("too short for a BTF header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(raw)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        types = raw[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strings = raw[hdr_len + str_off:hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # id 0 is void
        at = 0
        while at < len(types):
            name_off, info, size_or_type = _TYPE.unpack_from(types, at)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            length = _EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            start = at + _TYPE.size
            self._types.append(_Type(kind, self._name(name_off), size_or_type, bool(info >> 31),
                                     types[start:start + length]))
            at = start + length

    def _name(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        return self._strings[offset:end if end >= 0 else None].decode(errors="replace")

    def _get(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._types):
            raise BtfError(f"no BTF type {type_id}")
        found = self._types[type_id]
        assert found is not None
        return found

    def _resolve(self, type_id: int) -> tuple[int, _Type]:
        for _ in range(MAX_DEPTH):
            t = self._get(type_id)
            if t.kind not in _QUALIFIERS:
                return type_id, t
            type_id = t.size_or_type
        raise BtfError("typedef chain too long")

    def size(self, type_id: int) -> int:
        _, t = self._resolve(type_id)
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            elem, _index, count = struct.unpack_from("<III", t.extra)
            return self.size(elem) * count
        raise BtfError(f"type {type_id} has no size")

    def name(self, type_id: int) -> str:
        return self._get(type_id).name

    def decode(self, type_id: int, data: bytes) -> Any:
        """The value of type ``type_id`` at the start of ``data``, as JSON-ready Python."""
        return self._decode(type_id, data, 0)

    def _decode(self, type_id: int, data: bytes, depth: int) -> Any:
        type_id, t = self._resolve(type_id)
        if depth > MAX_DEPTH:
            return data.hex()
        if t.kind == INT:
            return self._int(t, data)
        if t.kind == PTR:
            return int.from_bytes(data[:8], "little")
        if t.kind == ARRAY:
            return self._array(t, data, depth)
        if t.kind in (STRUCT, UNION):
            return self._struct(t, data, depth)
        if t.kind in (ENUM, ENUM64):
            return self._enum(t, data)
        if t.kind == FLOAT and t.size_or_type in (4, 8):
            return struct.unpack_from("<f" if t.size_or_type == 4 else "<d", data)[0]
        return data[:8].hex()

    @staticmethod
    def _int(t: _Type, data: bytes) -> int | bool | str:
        (encoding_word,) = struct.unpack_from("<I", t.extra)
        encoding, bits = encoding_word >> 24, encoding_word & 0xFF
        value = int.from_bytes(data[:t.size_or_type], "little", signed=bool(encoding & 1))
        if bits < t.size_or_type * 8:
            value &= (1 << bits) - 1
        return bool(value) if encoding & 4 else value

    def _array(self, t: _Type, data: bytes, depth: int) -> Any:
        elem, _index, count = struct.unpack_from("<III", t.extra)
        _, elem_type = self._resolve(elem)
        if elem_type.kind == INT and elem_type.size_or_type == 1 and elem_type.name in ("char", "signed char",
                                                                                       "unsigned char"):
            text = data[:count]
            return text.split(b"\0", 1)[0].decode(errors="replace")
        width = self.size(elem)
        return [self._decode(elem, data[i * width:(i + 1) * width], depth + 1) for i in range(min(count, 4096))]

    def _struct(self, t: _Type, data: bytes, depth: int) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for i in range(len(t.extra) // 12):
            name_off, member_type, offset = struct.unpack_from("<III", t.extra, i * 12)
            bit_size, bit_offset = (offset >> 24, offset & 0xFFFFFF) if t.kind_flag else (0, offset)
            name = self._name(name_off) or f"_{i}"
            if bit_size:
                word = int.from_bytes(data[bit_offset // 8:bit_offset // 8 + 8].ljust(8, b"\0"), "little")
                fields[name] = (word >> (bit_offset % 8)) & ((1 << bit_size) - 1)
            else:
                fields[name] = self._decode(member_type, data[bit_offset // 8:], depth + 1)
        return fields

    def _enum(self, t: _Type, data: bytes) -> int | str:
        value = int.from_bytes(data[:t.size_or_type], "little", signed=not t.kind_flag)
        step = 8 if t.kind == ENUM else 12
        for i in range(len(t.extra) // step):
            if t.kind == ENUM:
                name_off, v = struct.unpack_from("<Ii", t.extra, i * step)
            else:
                name_off, lo, hi = struct.unpack_from("<IIi", t.extra, i * step)
                v = (hi << 32) | lo
            if v == value:
                return self._name(name_off)
        return value


Encoder = Callable[[bytes, int], bytes]  # (the event's bytes, where the value starts) -> JSON text
_INT_FORMATS = {(1, False): "B", (1, True): "b", (2, False): "H", (2, True): "h", (4, False): "I", (4, True): "i",
                (8, False): "Q", (8, True): "q"}


class JsonEncoders:
    """Each type's value straight to JSON text, by a function made once per type: the event
    channel's hot path (``decode`` and json.dumps would cost several microseconds an event).
    The text is what ``json.dumps(types.decode(type_id, data))`` gives, less the spaces.  A
    struct of plain integers (the usual event) is one struct.unpack into one %-template."""

    def __init__(self, types: BtfTypes) -> None:
        self._types = types
        self._made: dict[int, Encoder] = {}

    def encode(self, type_id: int, data: bytes) -> bytes:
        found = self._made.get(type_id)
        if found is None:
            found = self._made[type_id] = self._make(type_id, 0)
        return found(data, 0)

    def _make(self, type_id: int, depth: int) -> Encoder:
        types = self._types
        type_id, t = types._resolve(type_id)
        if depth > MAX_DEPTH:
            return lambda data, at: json.dumps(data[at:at + 8].hex()).encode()
        if t.kind == INT and (fmt := self._int_format(t)) is not None:
            unpack = struct.Struct("<" + fmt).unpack_from
            return lambda data, at: b"%d" % unpack(data, at)[0]
        if t.kind == PTR:
            return lambda data, at: b"%d" % int.from_bytes(data[at:at + 8], "little")
        if t.kind == ARRAY:
            return self._array(t, depth)
        if t.kind in (STRUCT, UNION):
            return self._plain_struct(t) or self._struct(t, depth)
        # bool, enums, floats, odd integers and the rare rest: the general decoder
        return lambda data, at: json.dumps(types._decode(type_id, data[at:], depth), separators=(",", ":")).encode()

    @staticmethod
    def _int_format(t: _Type) -> str | None:
        """The struct format of a plain integer (all its bits, not a bool); None otherwise."""
        (encoding_word,) = struct.unpack_from("<I", t.extra)
        encoding, bits = encoding_word >> 24, encoding_word & 0xFF
        if encoding & 4 or bits != t.size_or_type * 8:
            return None
        return _INT_FORMATS.get((t.size_or_type, bool(encoding & 1)))

    def _members(self, t: _Type) -> list[tuple[str, int, int, int]]:
        """(name, member type, bit offset, bit size) of each member of a struct or union."""
        members = []
        for i in range(len(t.extra) // 12):
            name_off, member_type, offset = struct.unpack_from("<III", t.extra, i * 12)
            bit_size, bit_offset = (offset >> 24, offset & 0xFFFFFF) if t.kind_flag else (0, offset)
            members.append((self._types._name(name_off) or f"_{i}", member_type, bit_offset, bit_size))
        return members

    def _plain_struct(self, t: _Type) -> Encoder | None:
        """A struct whose members are all plain integers, in order: one unpack, one template."""
        if t.kind != STRUCT:
            return None
        fmt, keys, at = "<", [], 0
        for name, member_type, bit_offset, bit_size in self._members(t):
            _, m = self._types._resolve(member_type)
            code = self._int_format(m) if m.kind == INT and not bit_size and bit_offset % 8 == 0 else None
            if code is None or bit_offset // 8 < at:
                return None
            fmt += "x" * (bit_offset // 8 - at) + code
            at = bit_offset // 8 + m.size_or_type
            keys.append(json.dumps(name) + ":%d")
        unpack = struct.Struct(fmt).unpack_from
        template = ("{" + ",".join(keys) + "}").encode()
        return lambda data, at: template % unpack(data, at)

    def _array(self, t: _Type, depth: int) -> Encoder:
        elem, _index, count = struct.unpack_from("<III", t.extra)
        _, elem_type = self._types._resolve(elem)
        if elem_type.kind == INT and elem_type.size_or_type == 1 and elem_type.name in ("char", "signed char",
                                                                                       "unsigned char"):
            return lambda data, at: json.dumps(data[at:at + count].split(b"\0", 1)[0].decode(errors="replace")).encode()
        width = self._types.size(elem)
        one = self._make(elem, depth + 1)
        count = min(count, 4096)
        return lambda data, at: b"[" + b",".join(one(data, at + i * width) for i in range(count)) + b"]"

    def _struct(self, t: _Type, depth: int) -> Encoder:
        parts: list[tuple[bytes, int, int, Encoder | None]] = []  # key, bit offset, bit size, encoder
        for name, member_type, bit_offset, bit_size in self._members(t):
            key = json.dumps(name).encode() + b":"
            parts.append((key, bit_offset, bit_size, None if bit_size else self._make(member_type, depth + 1)))

        def encode(data: bytes, at: int) -> bytes:
            out = []
            for key, bit_offset, bit_size, member in parts:
                if member is None:
                    start = at + bit_offset // 8
                    word = int.from_bytes(data[start:start + 8].ljust(8, b"\0"), "little")
                    out.append(key + b"%d" % ((word >> (bit_offset % 8)) & ((1 << bit_size) - 1)))
                else:
                    out.append(key + member(data, at + bit_offset // 8))
            return b"{" + b",".join(out) + b"}"
        return encode
