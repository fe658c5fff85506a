"""A BPF object's debug info removed before it is sent (tailcallctl), as `llvm-strip -g` would;
and one section's bytes read (``section``).

Why: `clang -g` puts the source's DWARF in `.debug_*` sections (650 KB for a small handler
that includes vmlinux.h), which the kernel never sees: libbpf skips them and uses `.BTF` and
`.BTF.ext` (which stay).  Why not llvm-strip: it is not on every machine tailcallctl runs on.

How: every section keeps its index and header, so nothing that refers to sections by index
(symbols, relocation sections' links) changes; the `.debug_*` sections and their relocation
sections (`.rel.debug_*`) keep their headers with a size of 0, and the file is laid out
again without their bytes.  A file this does not understand (not a 64-bit ELF, program
headers, extended section numbering, sections out of the file's bounds) is returned as it
came: libbpf will say what is wrong with it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_ELFCLASS64 = 2
_ENDIAN = {1: "<", 2: ">"}  # EI_DATA: ELFDATA2LSB, ELFDATA2MSB
_EHDR = "16sHHIQQQIHHHHHH"  # Elf64_Ehdr
_SHDR = "IIQQQQIIQQ"  # Elf64_Shdr
_SHT_NOBITS = 8
_SHN_XINDEX = 0xFFFF
_DEBUG_PREFIXES = (".debug_", ".rel.debug_", ".rela.debug_")


@dataclass
class _Section:
    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


class _NotUnderstood(ValueError):
    """The file is not an ELF object this module rewrites."""


def strip_debug(data: bytes) -> bytes:
    """``data`` without the bytes of its DWARF sections; unchanged when it has none, or when
    it is not a relocatable 64-bit ELF file laid out as clang writes them."""
    try:
        return _strip(data)
    except (_NotUnderstood, struct.error):
        return data


def section(data: bytes, name: str) -> bytes | None:
    """The bytes of the section called ``name`` (the compile cache reads an object's "license"
    as libbpf gives it to the kernel); None when there is none, or the file is not one this
    module understands."""
    try:
        _, _, sections, names = _parse(data)
        found = next((s for i, s in enumerate(sections) if i and _name(data, names, s.name) == name), None)
    except (_NotUnderstood, struct.error):
        return None
    return None if found is None or found.type == _SHT_NOBITS else data[found.offset:found.offset + found.size]


def _parse(data: bytes) -> tuple[str, list[object], list[_Section], _Section]:
    """(byte order, ELF header fields, section headers, the section name table's header)."""
    if len(data) < 64 or data[4] != _ELFCLASS64 or data[5] not in _ENDIAN:
        raise _NotUnderstood("not a 64-bit ELF file")
    order = _ENDIAN[data[5]]
    header = list(struct.unpack_from(order + _EHDR, data))
    shoff, phnum, shentsize, shnum, shstrndx = header[6], header[9], header[11], header[12], header[13]
    if phnum or shnum == 0 or shstrndx in (0, _SHN_XINDEX) or shentsize != struct.calcsize(_SHDR):
        raise _NotUnderstood("program headers or extended numbering")
    sections = [_Section(*struct.unpack_from(order + _SHDR, data, shoff + i * shentsize)) for i in range(shnum)]
    for s in sections:
        if s.type != _SHT_NOBITS and s.offset + s.size > len(data):
            raise _NotUnderstood("a section past the end of the file")
    return order, header, sections, sections[shstrndx]


def _strip(data: bytes) -> bytes:
    order, header, sections, names = _parse(data)
    debug = {i for i, s in enumerate(sections) if i and _name(data, names, s.name).startswith(_DEBUG_PREFIXES)}
    if not debug:
        return data
    return _layout(data, order, header, sections, debug)


def _name(data: bytes, names: _Section, offset: int) -> str:
    start = names.offset + offset
    end = data.find(b"\0", start, names.offset + names.size)
    if offset >= names.size or end < 0:
        raise _NotUnderstood("a section name outside the section name table")
    return data[start:end].decode(errors="replace")


def _layout(data: bytes, order: str, header: list[object], sections: list[_Section], dropped: set[int]) -> bytes:
    """The file again: ELF header, each kept section's bytes at its alignment, the section
    headers last; dropped sections are emptied in place."""
    ehsize = struct.calcsize(_EHDR)
    out = bytearray(data[:ehsize])
    for i, s in enumerate(sections[1:], start=1):
        if i in dropped:
            s.size = 0
        if s.type == _SHT_NOBITS or s.size == 0:
            s.offset = len(out)
            continue
        out += bytes(-len(out) % max(s.addralign, 1))
        chunk = data[s.offset:s.offset + s.size]
        s.offset = len(out)
        out += chunk
    out += bytes(-len(out) % 8)
    header[6] = len(out)  # e_shoff
    for s in sections:
        out += struct.pack(order + _SHDR, s.name, s.type, s.flags, s.addr, s.offset, s.size, s.link, s.info,
                           s.addralign, s.entsize)
    struct.pack_into(order + _EHDR, out, 0, *header)
    return bytes(out)
