"""What a compile produced, in a form that loads again without compiling (the compile cache).

A bcc handler's product is what bcc handed the kernel: its instructions, with the maps they
refer to described (bcc creates each map while it compiles, and writes the map's fd into the
instructions), so that a load creates the maps anew and writes their fds in instead.  A libbpf
handler's is the object clang wrote (libbpf loads it as it would a `.o`), and beside it the
same kind of instructions for the function and --set values it was loaded with, as libbpf
relocated them; a handler whose maps are pinned by name has only the object.

Both refer to the event channel's maps by fd number (tailcalld.h's TC_EVENTS_FD...), written
into the instructions at compile time.  The compile worker therefore opens the channel at the
same numbers every time (``CHANNEL_FDS``): a product loads in any later worker, and one source
compiles to the same bytes whichever worker compiled it.

The compile worker captures products; instructions are loaded again by the daemon itself
(``load_insns``): a few bpf() calls on data it made and checked, where a worker would cost a
process start per handler (and libbpf a parse of the kernel's BTF).  No asyncio, no pydantic: the worker imports this module.
"""

from __future__ import annotations

import base64
import os
import resource
import struct
from typing import Any

from . import bpfsys, elfstrip, mapbudget
from .errors import MapError, VerifierRejected

# Where the compile worker puts the event channel's maps; well above anything a worker opens
# itself (fewer than 20 fds), and below the 1024 of a default RLIMIT_NOFILE.
CHANNEL_FDS = {"events": 900, "counts": 901, "call": 902}

_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: 16 bytes, the second half holds the upper imm
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
# Maps a product may create again from their description: their kernel object is all there is
# to them (no inner map, no BTF the kernel requires, no extra argument such as a bloom filter's).
RECREATABLE_MAP_TYPES = frozenset({1, 2, 4, 5, 6, 7, 9, 10, 11, 22, 23, 27})


def fixed_fd(fd: int, wanted: int) -> int:
    """``fd`` moved to number ``wanted`` (the original closed); ``fd`` itself when the fd limit
    leaves no room there (then what is compiled is no product: see ``channel_fixed``)."""
    if wanted < 0:
        return fd
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted >= soft:
        new_soft = min(hard, max(soft, 1024)) if hard != resource.RLIM_INFINITY else max(soft, 1024)
        if wanted >= new_soft:
            return fd
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    if fd == wanted:
        return fd
    os.dup2(fd, wanted, inheritable=False)
    os.close(fd)
    return wanted


def channel_fixed(channel_fds: dict[str, int] | None) -> bool:
    """Whether the channel's maps are at ``CHANNEL_FDS`` (or not passed at all)."""
    return not channel_fds or all(channel_fds.get(name) == fd for name, fd in CHANNEL_FDS.items())


def map_refs(insns: bytes) -> list[tuple[int, int]]:
    """(instruction index, fd) of every instruction that loads a map by fd (or a pointer into
    its value)."""
    refs = []
    i = 0
    while i + 8 <= len(insns):
        code, regs = insns[i], insns[i + 1]
        if code == _LD_IMM64:
            if regs >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                refs.append((i // 8, struct.unpack_from("<i", insns, i + 4)[0]))
            i += 16
        else:
            i += 8
    return refs


def patched(insns: bytes, fds: dict[int, int]) -> bytes:
    """``insns`` with every map fd of ``fds`` replaced by its new number."""
    out = bytearray(insns)
    for index, fd in map_refs(insns):
        if fd in fds:
            struct.pack_into("<i", out, index * 8 + 4, fds[fd])
    return bytes(out)


def insns_product(insns: bytes, license: bytes, frozen: dict[int, bytes]) -> dict[str, Any] | None:
    """Loaded ``insns`` with their maps described; None when one of the maps cannot be made
    again from a description (then the handler is compiled at each load, as before the cache).
    ``frozen``: the frozen arrays the worker made itself (TC_PRINTF's formats), by fd, with
    their contents.  Every other fd the instructions name must be one of the channel's or a
    map this process holds.  A one-entry array (a libbpf data section: .rodata, .data, .bss)
    keeps its contents, as the loader wrote them; a read-only one (.rodata) is frozen again."""
    maps: list[dict[str, Any]] = []
    channel = set(CHANNEL_FDS.values())
    for fd in sorted({fd for _, fd in map_refs(insns)}):
        if fd in channel:
            continue
        if fd in frozen:
            maps.append({"fd": fd, "frozen_b64": base64.b64encode(frozen[fd]).decode()})
            continue
        try:
            info = bpfsys.map_info(fd)
        except OSError:
            return None
        if info.type not in RECREATABLE_MAP_TYPES:
            return None
        spec: dict[str, Any] = {"fd": fd, "type": info.type, "name": info.name, "key_size": info.key_size,
                                "value_size": info.value_size, "max_entries": info.max_entries, "flags": info.flags}
        if info.type == bpfsys.BPF_MAP_TYPE_ARRAY and info.max_entries == 1:
            try:
                spec["initial_b64"] = base64.b64encode(bpfsys.array_value(fd, 0, info.value_size)).decode()
            except OSError:
                return None
            spec["freeze"] = bool(info.flags & bpfsys.BPF_F_RDONLY_PROG)
        maps.append(spec)
    return {"kind": "bcc", "insns_b64": base64.b64encode(insns).decode(), "license": license.decode(errors="replace"),
            "maps": maps}


def elf_license(data: bytes) -> bytes | None:
    """The contents of an ELF object's "license" section (what libbpf gives the kernel), up to
    its NUL; None when there is none or the file is not one elfstrip understands."""
    found = elfstrip.section(data, "license")
    return None if found is None else found.split(b"\0", 1)[0]


def map_specs(product: dict[str, Any]) -> list[tuple[str, int, int, int, int]]:
    """(name, type, key size, value size, max entries) of each map a bcc product creates (for
    the max_map_bytes check, before any is created)."""
    return [(m["name"], m["type"], m["key_size"], m["value_size"], m["max_entries"])
            for m in product["maps"] if "frozen_b64" not in m]


def create_maps(product: dict[str, Any]) -> dict[int, int]:
    """Make a bcc product's maps again; old fd -> new fd (the caller holds the new ones for as
    long as the program's load needs them).  Raises OSError (BpfError) for a map refused."""
    made: dict[int, int] = {}
    try:
        for m in product["maps"]:
            if "frozen_b64" in m:
                made[m["fd"]] = bpfsys.frozen_array("tailcalld_fmt", base64.b64decode(m["frozen_b64"]))
                continue
            fd = made[m["fd"]] = bpfsys.map_create_flagged(m["type"], m["name"], m["key_size"], m["value_size"],
                                                           m["max_entries"], m["flags"])
            if "initial_b64" in m:
                bpfsys.array_fill(fd, 0, base64.b64decode(m["initial_b64"]), freeze=m.get("freeze", False))
    except BaseException:
        for fd in made.values():
            os.close(fd)
        raise
    return made


def load_insns(product: dict[str, Any], name: str, channel: dict[str, str] | None, max_map_bytes: int,
               log_size: int) -> tuple[int, tuple[bpfsys.MapInfo, ...]]:
    """Load instructions (``insns_product``) as the raw_tp program ``name``: its maps made anew (checked against
    ``max_map_bytes`` first), the event channel's opened from their pins (``channel``: name ->
    path), every fd written into the instructions.  Returns the program's fd and its maps.
    Raises MapTooLarge, MapError, or VerifierRejected with the verifier's log."""
    mapbudget.check([mapbudget.MapSpec(*spec) for spec in map_specs(product)], max_map_bytes,
                    bpfsys.num_possible_cpus())
    fds: dict[int, int] = {}
    try:
        try:
            for map_name, path in (channel or {}).items():
                if map_name in CHANNEL_FDS:
                    fds[CHANNEL_FDS[map_name]] = bpfsys.obj_get(path)
            fds |= create_maps(product)
        except OSError as exc:
            raise MapError(f"the kernel refused a map of the cached handler: {exc}") from None
        raw = base64.b64decode(product["insns_b64"])
        unknown = {fd for _, fd in map_refs(raw)} - set(fds)
        if unknown:  # never an fd of whatever this process holds at that number
            raise MapError(f"the cached instructions name maps by fds {sorted(unknown)} that nothing here provides")
        insns = patched(raw, fds)
        fd, log = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, name, product["license"].encode(), insns,
                                   log_size)
        if fd < 0:
            raise VerifierRejected(f"the kernel refused {name!r} ({os.strerror(-fd)})", {"log": log})
        used = set(bpfsys.prog_map_ids(fd))
        maps = tuple(info for info in (bpfsys.map_info(f) for f in fds.values()) if info.id in used)
        return fd, maps
    finally:
        for f in fds.values():
            os.close(f)
