"""Thin ctypes layer over libbpf's low-level bpf() wrappers.

Handlers are compiled and loaded in a worker process (``tailcalld.compiler``); what the
daemon needs itself is to create, pin, open and update maps, programs and links by fd.
libbpf.so.1 is on every host that has bcc, and its syscall wrappers are stable ABI.

Every object is reached through a pin (BPF_OBJ_GET) or an fd we were given, never by id:
BPF_*_GET_FD_BY_ID and BPF_*_GET_NEXT_ID need CAP_SYS_ADMIN, and the daemon runs with
CAP_BPF and CAP_PERFMON (contrib/tailcalld.service).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from functools import cache

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6

BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_LINK_TYPE_RAW_TRACEPOINT = 1

BPF_ANY = 0

PROG_TYPE_NAMES = {
    1: "socket_filter", 2: "kprobe", 3: "sched_cls", 4: "sched_act", 5: "tracepoint",
    6: "xdp", 7: "perf_event", 17: "raw_tracepoint", 26: "tracing", 28: "ext", 29: "lsm",
}


# The kernel's enum bpf_map_type, named as bpftool names them.
MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash", 6: "percpu_array",
    7: "stack_trace", 8: "cgroup_array", 9: "lru_hash", 10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps",
    13: "hash_of_maps", 14: "devmap", 15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash",
    19: "cgroup_storage", 20: "reuseport_sockarray", 21: "percpu_cgroup_storage", 22: "queue", 23: "stack",
    24: "sk_storage", 25: "devmap_hash", 26: "struct_ops", 27: "ringbuf", 28: "inode_storage", 29: "task_storage",
    30: "bloom_filter", 31: "user_ringbuf", 32: "cgrp_storage", 33: "arena",
}


class BpfError(OSError):
    """A bpf() operation failed; ``errno`` and the operation are kept for the message."""


# Leading fields of the kernel's info structs (include/uapi/linux/bpf.h).  The kernel accepts
# a shorter info_len and fills only what fits, so we declare just what we read.
class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _LinkInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        # The union's raw_tracepoint member: the kernel copies the name into our buffer.
        ("tp_name", ctypes.c_uint64),
        ("tp_name_len", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    xlated_insns: int
    tag: str = ""  # the kernel's hash of the instructions (map fds left out): bpftool's "tag"


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    tracepoint: str  # of a raw_tracepoint link ("sys_enter"); "" for other kinds


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_map_freeze.argtypes = [ctypes.c_int]
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_raw_tracepoint_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.libbpf_num_possible_cpus.argtypes = []
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_void_p]
    lib.bpf_btf_load.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno) on failure."""
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


@cache
def num_possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    return _check(_lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
                  f"create map {name}")


BPF_F_RDONLY_PROG = 1 << 7


class _MapCreateOpts(ctypes.Structure):
    """The head of libbpf's struct bpf_map_create_opts, up to map_flags."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


def frozen_array(name: str, value: bytes) -> int:
    """A one-entry array holding ``value``, read-only for programs and frozen: what
    bpf_snprintf() accepts as a format (ARG_PTR_TO_CONST_STR)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=BPF_F_RDONLY_PROG)
    fd = _check(_lib().bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode(), 4, len(value), 1, ctypes.byref(opts)),
                f"create map {name}")
    try:
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(value, len(value))
        _check(_lib().bpf_map_update_elem(fd, ctypes.byref(key), buf, BPF_ANY), f"fill map {name}")
        _check(_lib().bpf_map_freeze(fd), f"freeze map {name}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_create_flagged(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
                       flags: int) -> int:
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(_lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries,
                                        ctypes.byref(opts)), f"create map {name}")


class _ProgLoadOpts(ctypes.Structure):
    """libbpf's struct bpf_prog_load_opts up to the log buffer (libbpf 1.0's layout; later
    versions only add fields after it, which ``sz`` tells them we leave unset)."""
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_void_p)]


def prog_load(prog_type: int, name: str, license: bytes, insns: bytes, log_size: int, btf_fd: int = 0,
              funcs: list[tuple[int, int]] | None = None) -> tuple[int, str]:
    """Load raw instructions; (fd, "") or (-errno, the verifier's log).  The first try asks for
    no log, as bcc and libbpf do: a log slows the verifier, and most loads succeed.  ``funcs``:
    (instruction index, type id in the BTF ``btf_fd``) of each function, which the kernel wants
    for a subprogram that tail-calls (the chain's runner)."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    info = b"".join(struct.pack("<II", at, type_id) for at, type_id in funcs or [])
    info_buf = ctypes.create_string_buffer(info, len(info))
    btf = {"prog_btf_fd": btf_fd, "func_info": ctypes.addressof(info_buf), "func_info_cnt": len(funcs),
           "func_info_rec_size": 8} if funcs else {}
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), **btf)
    fd = _lib().bpf_prog_load(prog_type, name.encode()[:15], license, buf, len(insns) // 8, ctypes.byref(opts))
    if fd >= 0:
        return fd, ""
    # Only now the log's buffer: a megabyte per load, kept by malloc once freed, adds up over
    # hundreds of loads (a restore).
    log = ctypes.create_string_buffer(log_size)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), log_level=1, log_size=log_size, log_buf=ctypes.addressof(log),
                         **btf)
    fd = _lib().bpf_prog_load(prog_type, name.encode()[:15], license, buf, len(insns) // 8, ctypes.byref(opts))
    if fd >= 0:  # the verifier changed its mind: as good as the first try
        return fd, ""
    return -(ctypes.get_errno() or -fd), log.value.decode(errors="replace")


def btf_load(data: bytes) -> int:
    """Load a BTF blob (made by tailcalld: the chain runner's functions); its fd."""
    buf = ctypes.create_string_buffer(data, len(data))
    return _check(_lib().bpf_btf_load(buf, len(data), None), "load BTF")


def array_values(map_fd: int, max_entries: int, value_size: int) -> list[bytes]:
    """Every entry of an array map, as bytes: one batch lookup (key by key where the kernel has none)."""
    keys = (ctypes.c_uint32 * max_entries)()
    values = ctypes.create_string_buffer(max_entries * value_size)
    count = ctypes.c_uint32(max_entries)
    token = ctypes.c_uint32()
    ret = _lib().bpf_map_lookup_batch(map_fd, None, ctypes.byref(token), keys, values, ctypes.byref(count), None)
    if ret < 0:
        err = ctypes.get_errno() or -ret
        if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return [array_value(map_fd, key, value_size) for key in range(max_entries)]
        if err != errno.ENOENT:
            _check(ret, "read the map")
    found = [bytes(value_size)] * max_entries
    raw = values.raw
    for i in range(count.value):
        found[keys[i]] = raw[i * value_size:(i + 1) * value_size]
    return found


def array_value(map_fd: int, key: int, value_size: int) -> bytes:
    """Entry ``key`` of an array map, as bytes."""
    k = ctypes.c_uint32(key)
    value = ctypes.create_string_buffer(value_size)
    _check(_lib().bpf_map_lookup_elem(map_fd, ctypes.byref(k), value), f"read entry {key}")
    return value.raw


def array_fill(map_fd: int, key: int, value: bytes, freeze: bool = False) -> None:
    """Write entry ``key`` of an array map; ``freeze``: no more writes from user space after."""
    k = ctypes.c_uint32(key)
    buf = ctypes.create_string_buffer(value, len(value))
    _check(_lib().bpf_map_update_elem(map_fd, ctypes.byref(k), buf, BPF_ANY), f"write entry {key}")
    if freeze:
        _check(_lib().bpf_map_freeze(map_fd), "freeze the map")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib().bpf_obj_get(path.encode()), f"open pin {path}")


# The kernel names a link's inode "bpf_link" when it makes the link, "bpf-link" when a pin is opened.
_FD_KINDS = {"anon_inode:bpf-map": "map", "anon_inode:bpf-prog": "prog", "anon_inode:bpf-link": "link",
             "anon_inode:bpf_link": "link"}


def fd_kind(fd: int) -> str:
    """"map", "prog" or "link" (what a pin holds, from the anon inode behind the fd), or "" for
    anything else.  bpf_obj_get_info_by_fd fills the info of the object's real kind whatever
    struct it is given, so the kind has to be known before an id is compared."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return _FD_KINDS.get(target, "")


def raw_tracepoint_open(tracepoint: str, prog_fd: int) -> int:
    """Attach a raw_tp program; the returned fd is a bpf_link (pin it to outlive us)."""
    return _check(_lib().bpf_raw_tracepoint_open(tracepoint.encode(), prog_fd),
                  f"attach raw_tracepoint/{tracepoint}")


def _info(fd: int, struct: type[ctypes.Structure], what: str) -> ctypes.Structure:
    info = struct()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)
    return info


def map_info(fd: int) -> MapInfo:
    i = _info(fd, _MapInfo, "map info")
    return MapInfo(i.type, i.id, i.key_size, i.value_size, i.max_entries, i.name.decode(errors="replace"),
                   i.map_flags)


def prog_info(fd: int) -> ProgInfo:
    i = _info(fd, _ProgInfo, "program info")
    return ProgInfo(i.type, i.id, i.name.decode(errors="replace"), i.xlated_prog_len // 8, bytes(i.tag).hex())


def link_info(fd: int) -> LinkInfo:
    i = _info(fd, _LinkInfo, "link info")
    if i.type != BPF_LINK_TYPE_RAW_TRACEPOINT:
        return LinkInfo(i.type, i.id, i.prog_id, "")
    # Asked again with a buffer for the name only now: other kinds of link read other pointers there.
    name = ctypes.create_string_buffer(64)
    named = _LinkInfo(tp_name=ctypes.addressof(name), tp_name_len=len(name))
    size = ctypes.c_uint32(ctypes.sizeof(named))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(named), ctypes.byref(size)), "link info")
    return LinkInfo(i.type, i.id, i.prog_id, name.value.decode(errors="replace"))


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps a program uses, as the kernel reports them (asked twice: first how
    many, then into a buffer of that size).  Ids only: opening a map by its id needs
    CAP_SYS_ADMIN, which tailcalld never uses (see the module's docstring)."""
    count = _info(fd, _ProgInfo, "program info").nr_map_ids  # type: ignore[attr-defined]
    if count == 0:
        return []
    ids = (ctypes.c_uint32 * count)()
    info = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return list(ids[:min(count, info.nr_map_ids)])


def held_maps(max_fd: int = 4096, fd_folder: int | None = None) -> dict[int, MapInfo]:
    """The maps this process holds an fd of, by id (each fd's kind read from /proc/self/fd; a
    readlink, which Landlock leaves alone, where listing the folder may be refused).
    ``fd_folder``: /proc/self/fd opened before Landlock, which lists it then (trying each of
    4096 fds instead costs a compile worker ~40 ms)."""
    try:
        fds = [int(name) for name in os.listdir(fd_folder if fd_folder is not None else "/proc/self/fd")]
    except OSError:
        fds = list(range(min(max_fd, os.sysconf("SC_OPEN_MAX"))))
    maps: dict[int, MapInfo] = {}
    for fd in fds:
        if fd_kind(fd) == "map":
            try:
                info = map_info(fd)
            except OSError:  # closed since it was listed
                continue
            maps.setdefault(info.id, info)
    return maps


def array_set_u32(map_fd: int, key: int, value: int) -> None:
    """Set entry ``key`` of a u32 -> u32 map (one update: atomic for readers in the kernel)."""
    k = ctypes.c_uint32(key)
    v = ctypes.c_uint32(value)
    _check(_lib().bpf_map_update_elem(map_fd, ctypes.byref(k), ctypes.byref(v), BPF_ANY), f"update key {key}")


def prog_array_set(map_fd: int, slot: int, prog_fd: int) -> None:
    """Put a program in a slot: one map update, atomic for the dispatcher, replacing any occupant."""
    array_set_u32(map_fd, slot, prog_fd)


def prog_array_get(map_fd: int, slot: int) -> int | None:
    """The id of the program in a slot (user space reads ids, not fds), or None if empty."""
    key = ctypes.c_uint32(slot)
    value = ctypes.c_uint32()
    ret = _lib().bpf_map_lookup_elem(map_fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0:
        err = ctypes.get_errno() or -ret
        if err == errno.ENOENT:
            return None
        _check(ret, f"read slot {slot}")
    return value.value


def map_delete(map_fd: int, slot: int) -> bool:
    """Remove a key; False if it was not there."""
    key = ctypes.c_uint32(slot)
    ret = _lib().bpf_map_delete_elem(map_fd, ctypes.byref(key))
    if ret < 0:
        err = ctypes.get_errno() or -ret
        if err == errno.ENOENT:
            return False
        _check(ret, f"delete slot {slot}")
    return True


def percpu_array_set(map_fd: int, key: int, value: bytes) -> None:
    """Set entry ``key`` of a per-CPU array to ``value`` on every possible CPU at once."""
    ncpu = num_possible_cpus()
    stride = (len(value) + 7) // 8 * 8  # per-CPU values are 8-byte aligned
    buf = ctypes.create_string_buffer(b"".join(value.ljust(stride, b"\0") for _ in range(ncpu)), stride * ncpu)
    k = ctypes.c_uint32(key)
    _check(_lib().bpf_map_update_elem(map_fd, ctypes.byref(k), buf, 0), f"write entry {key} on every CPU")


def percpu_u64_sums(map_fd: int, max_entries: int) -> list[int]:
    """Every entry of a per-CPU u64 array, summed over the possible CPUs."""
    return percpu_u64_columns(map_fd, max_entries, 1)[0]


def percpu_u64_columns(map_fd: int, max_entries: int, width: int) -> list[list[int]]:
    """Every entry of a per-CPU array whose values are ``width`` u64s, each summed over the
    possible CPUs, as one list per field: one batch lookup (one syscall for the whole map,
    ~0.3 ms for 1024 entries instead of ~3 ms key by key)."""
    ncpu = num_possible_cpus()
    keys = (ctypes.c_uint32 * max_entries)()
    values = (ctypes.c_uint64 * (max_entries * ncpu * width))()
    count = ctypes.c_uint32(max_entries)
    token = ctypes.c_uint32()
    ret = _lib().bpf_map_lookup_batch(map_fd, None, ctypes.byref(token), keys, values, ctypes.byref(count), None)
    if ret < 0:
        err = ctypes.get_errno() or -ret
        if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernels without batch ops
            return _percpu_u64_columns_by_key(map_fd, max_entries, width)
        if err != errno.ENOENT:  # ENOENT: "no more", with the whole map in this one batch
            _check(ret, "read the counters")
    columns = [[0] * max_entries for _ in range(width)]
    for i in range(count.value):
        per_cpu = values[i * ncpu * width:(i + 1) * ncpu * width]  # cpu-major: cpu0's fields, cpu1's...
        for f in range(width):
            columns[f][keys[i]] = sum(per_cpu[f::width])
    return columns


def _percpu_u64_columns_by_key(map_fd: int, max_entries: int, width: int) -> list[list[int]]:
    columns = [[0] * max_entries for _ in range(width)]
    values = (ctypes.c_uint64 * (num_possible_cpus() * width))()
    for key in range(max_entries):
        k = ctypes.c_uint32(key)
        _check(_lib().bpf_map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(values)), f"read counter {key}")
        for f in range(width):
            columns[f][key] = sum(values[f::width])
    return columns
