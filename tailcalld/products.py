"""What a compile produced, in a form that loads again without compiling (the compile cache).

A libbpf handler's product is the object clang wrote: libbpf loads it as it would a `.o`.  A
bcc handler's is what bcc handed the kernel: its instructions, with the maps they refer to
described (bcc creates each map while it compiles, and writes the map's fd into the
instructions), so that a load creates the maps anew and writes their fds in instead.

Both refer to the event channel's maps by fd number (tailcalld.h's TC_EVENTS_FD...), written
into the instructions at compile time.  The compile worker therefore opens the channel at the
same numbers every time (``CHANNEL_FDS``): a product loads in any later worker, and one source
compiles to the same bytes whichever worker compiled it.

The compile worker captures products; a bcc product is loaded again by the daemon itself
(``load_bcc``): a few bpf() calls on data it made and checked, where a worker would cost a
process start per handler.  No asyncio, no pydantic: the worker imports this module.
"""

from __future__ import annotations

import base64
import os
import resource
import struct
from typing import Any

from . import bpfsys, mapbudget
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


def bcc_product(insns: bytes, license: bytes, frozen: dict[int, bytes]) -> dict[str, Any] | None:
    """The product of a bcc load of ``insns``; None when one of its maps cannot be made again
    from a description (then the handler is compiled at each load, as before the cache).
    ``frozen``: the frozen arrays the worker made itself (TC_PRINTF's formats), by fd, with
    their contents.  Every other fd the instructions name must be one of the channel's or a
    map this process holds."""
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
        maps.append({"fd": fd, "type": info.type, "name": info.name, "key_size": info.key_size,
                     "value_size": info.value_size, "max_entries": info.max_entries, "flags": info.flags})
    return {"kind": "bcc", "insns_b64": base64.b64encode(insns).decode(), "license": license.decode(errors="replace"),
            "maps": maps}


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
            else:
                made[m["fd"]] = bpfsys.map_create_flagged(m["type"], m["name"], m["key_size"], m["value_size"],
                                                          m["max_entries"], m["flags"])
    except BaseException:
        for fd in made.values():
            os.close(fd)
        raise
    return made


def load_bcc(product: dict[str, Any], name: str, channel: dict[str, str] | None, max_map_bytes: int,
             log_size: int) -> tuple[int, tuple[bpfsys.MapInfo, ...]]:
    """Load a bcc product as the raw_tp program ``name``: its maps made anew (checked against
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
        insns = patched(base64.b64decode(product["insns_b64"]), fds)
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
