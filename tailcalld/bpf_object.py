"""Loading one program out of a BPF ELF object with libbpf (ctypes over libbpf.so.1).

Only the chosen program is loaded: every other program of the object has autoload off, so
a file that carries its own dispatcher (as the tail-call article's does) never loads or
attaches it.  Maps the object declares for itself are created, after their sizes are held
against the map budget.  Maps declared with LIBBPF_PIN_BY_NAME are pinned under the pin root
the daemon gives (a folder of the handler's own under ``pin_dir``), never at libbpf's default
/sys/fs/bpf/<name>, where a foreign map of the same name would be reused.

The dispatcher is loaded the same way, in the daemon itself, with each of its maps replaced
by the pinned map the daemon opened (``reuse_map``) rather than created.

Global variables (``--set NAME=VALUE``) are found in the object's BTF, in the DATASEC of
.rodata, .data or .bss (and their .NAME variants), and written into the initial value of
that section's map before the load.  A handler is opened under a name made from its file
(``object_name``): libbpf names those maps ``<name>.bss``, ``<name>.rodata``...
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache

from .bpfsys import BPF_PROG_TYPE_RAW_TRACEPOINT, PROG_TYPE_NAMES
from .mapbudget import MapSpec
from .errors import (FunctionAmbiguous, FunctionNotFound, InvalidSetting, ObjectError, VerifierRejected,
                     WrongProgramType)
from .loader_settings import GlobalVar, VarType, encode, unknown


@dataclass(frozen=True)
class ObjectProgram:
    name: str
    section: str
    type: int

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self.type, f"type {self.type}")


class _OpenOpts(ctypes.Structure):
    """The head of libbpf's struct bpf_object_open_opts, up to pin_root_path; ``sz`` tells
    libbpf how much of the struct the caller knows, so the later fields keep their defaults."""
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p), ("relaxed_maps", ctypes.c_bool),
                ("pin_root_path", ctypes.c_char_p)]


# libbpf names a handler's .bss map <object name>.bss in the kernel's 15 characters, keeping at
# most 8 of the object's name (BPF_OBJ_NAME_LEN 16, less ".rodata" and the NUL): fchmodat.bss.
OBJECT_NAME_CHARS = 8
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_]+")


def object_name(filename: str | None) -> str:
    """The object name a handler file gives its maps: the file's name up to its first dot
    (fchmodat.bpf.c -> fchmodat), in the characters the kernel takes in a map name."""
    stem = (filename or "").rsplit("/", 1)[-1].split(".", 1)[0]
    return _NOT_NAME_CHAR.sub("_", stem).strip("_")[:OBJECT_NAME_CHARS] or "handler"


def _candidates(names: list[str]) -> dict[str, list[str]]:
    return {"candidates": names}


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    vp = ctypes.c_void_p
    lib.bpf_object__open_mem.argtypes = [ctypes.c_char_p, ctypes.c_size_t, vp]
    lib.bpf_object__open_mem.restype = vp
    lib.bpf_object__next_program.argtypes = [vp, vp]
    lib.bpf_object__next_program.restype = vp
    lib.bpf_program__name.argtypes = [vp]
    lib.bpf_program__name.restype = ctypes.c_char_p
    lib.bpf_program__section_name.argtypes = [vp]
    lib.bpf_program__section_name.restype = ctypes.c_char_p
    lib.bpf_program__type.argtypes = [vp]
    lib.bpf_program__type.restype = ctypes.c_int
    lib.bpf_program__set_autoload.argtypes = [vp, ctypes.c_bool]
    lib.bpf_program__set_log_buf.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.bpf_object__load.argtypes = [vp]
    lib.bpf_program__fd.argtypes = [vp]
    lib.bpf_object__close.argtypes = [vp]
    lib.bpf_object__next_map.argtypes = [vp, vp]
    lib.bpf_object__next_map.restype = vp
    lib.bpf_map__name.argtypes = [vp]
    lib.bpf_map__name.restype = ctypes.c_char_p
    lib.bpf_object__find_map_by_name.argtypes = [vp, ctypes.c_char_p]
    lib.bpf_object__find_map_by_name.restype = vp
    lib.bpf_map__reuse_fd.argtypes = [vp, ctypes.c_int]
    lib.bpf_object__btf.argtypes = [vp]
    lib.bpf_object__btf.restype = vp
    lib.btf__raw_data.argtypes = [vp, ctypes.POINTER(ctypes.c_uint32)]
    lib.btf__raw_data.restype = vp
    lib.bpf_map__fd.argtypes = [vp]
    for field in ("type", "key_size", "value_size", "max_entries"):
        getattr(lib, f"bpf_map__{field}").argtypes = [vp]
        getattr(lib, f"bpf_map__{field}").restype = ctypes.c_uint32
    lib.bpf_object__btf.argtypes, lib.bpf_object__btf.restype = [vp], vp
    lib.btf__type_cnt.argtypes, lib.btf__type_cnt.restype = [vp], ctypes.c_uint32
    lib.btf__type_by_id.argtypes, lib.btf__type_by_id.restype = [vp, ctypes.c_uint32], ctypes.POINTER(_BtfType)
    lib.btf__name_by_offset.argtypes, lib.btf__name_by_offset.restype = [vp, ctypes.c_uint32], ctypes.c_char_p
    lib.bpf_map__initial_value.argtypes = [vp, ctypes.POINTER(ctypes.c_size_t)]
    lib.bpf_map__initial_value.restype = vp
    lib.bpf_map__set_initial_value.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.bpf_program__insns.argtypes, lib.bpf_program__insns.restype = [vp], vp
    lib.bpf_program__insn_cnt.argtypes, lib.bpf_program__insn_cnt.restype = [vp], ctypes.c_size_t
    lib.bpf_map__pin_path.argtypes, lib.bpf_map__pin_path.restype = [vp], ctypes.c_char_p
    return lib


# -- BTF, as far as --set needs it (linux/btf.h) ------------------------------------------

class _BtfType(ctypes.Structure):
    """struct btf_type: name, kind and vlen packed in info, then size or type; what a kind
    adds (an int's encoding, an array's element, a DATASEC's variables) follows it."""
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_ENUM = 1, 2, 3, 6
BTF_KIND_TYPEDEF, BTF_KIND_VAR, BTF_KIND_DATASEC, BTF_KIND_ENUM64 = 8, 14, 15, 19
_QUALIFIERS = {9: "volatile", 10: "const", 11: "restrict", 18: "type_tag"}  # looked through
_KIND_WORDS = {2: "pointer", 4: "struct", 5: "union", 7: "forward declaration", 13: "function", 16: "float"}
BTF_INT_SIGNED, BTF_INT_BOOL = 1, 4
# The data sections libbpf makes maps of, whose initial value the loader may set.
_DATA_SECTION = re.compile(r"\.(?:rodata|data|bss)(?:\..+)?")


def _kind(t: _BtfType) -> int:
    return (t.info >> 24) & 0x1F


def _vlen(t: _BtfType) -> int:
    return t.info & 0xFFFF


def _extra(t: ctypes._Pointer[_BtfType], index: int = 0) -> int:
    """The ``index``-th u32 after a btf_type: what its kind adds."""
    return ctypes.cast(t, ctypes.POINTER(ctypes.c_uint32))[3 + index]


class _Btf:
    """The object's BTF, read through libbpf (valid while the object is open)."""

    def __init__(self, btf: int) -> None:
        self._btf = btf

    def type(self, type_id: int) -> ctypes._Pointer[_BtfType]:
        return _lib().btf__type_by_id(self._btf, type_id)

    def name(self, t: _BtfType) -> str:
        return (_lib().btf__name_by_offset(self._btf, t.name_off) or b"").decode(errors="replace")

    def datasecs(self) -> Iterator[tuple[str, ctypes._Pointer[_BtfType]]]:
        for type_id in range(1, _lib().btf__type_cnt(self._btf)):
            t = self.type(type_id)
            if _kind(t.contents) == BTF_KIND_DATASEC and _DATA_SECTION.fullmatch(self.name(t.contents)):
                yield self.name(t.contents), t

    def var_type(self, type_id: int, size: int) -> VarType:
        """What --set may write into a variable of type ``type_id`` (``size`` bytes)."""
        spelling = ""
        t = self.type(type_id)
        while _kind(t.contents) in _QUALIFIERS or _kind(t.contents) == BTF_KIND_TYPEDEF:
            if _kind(t.contents) == BTF_KIND_TYPEDEF and not spelling:
                spelling = self.name(t.contents)  # u32 rather than unsigned int
            t = self.type(t.contents.size_or_type)
        kind = _kind(t.contents)
        if kind == BTF_KIND_INT:
            encoding = _extra(t) >> 24 & 0x0F
            spelling = spelling or self.name(t.contents)
            if encoding & BTF_INT_BOOL:
                return VarType("bool", size, spelling=spelling)
            return VarType("int", size, bool(encoding & BTF_INT_SIGNED), spelling)
        if kind in (BTF_KIND_ENUM, BTF_KIND_ENUM64):
            return VarType("int", size, bool(t.contents.info >> 31), spelling or f"enum {self.name(t.contents)}")
        if kind == BTF_KIND_ARRAY:
            return self._array(t, size, spelling)
        words = _KIND_WORDS.get(kind, f"BTF kind {kind}")
        name = self.name(t.contents)
        return VarType("other", size, spelling=spelling or (f"{words} {name}" if name else words))

    def _array(self, t: ctypes._Pointer[_BtfType], size: int, spelling: str) -> VarType:
        nelems = _extra(t, 2)
        element = self.var_type(_extra(t, 0), size // nelems if nelems else 0)
        spelling = spelling or f"{element.spelling}[{nelems}]"
        if element.kind == "int" and element.size == 1:  # char, u8: written from a string
            return VarType("chars", size, spelling=spelling)
        return VarType("other", size, spelling=spelling)


class BpfObject:
    """An opened (not yet loaded) object; close() releases everything libbpf holds."""

    def __init__(self, data: bytes, pin_root: str | None = None, name: str | None = None) -> None:
        self._data = ctypes.create_string_buffer(data, len(data))  # must outlive the object
        # None: libbpf names the object after the buffer's address, and its maps "0x5a...bss".
        self._opts = _OpenOpts(ctypes.sizeof(_OpenOpts), name.encode() if name else None, False,
                               pin_root.encode() if pin_root else None)
        handle = _lib().bpf_object__open_mem(self._data, len(data), ctypes.byref(self._opts))
        if not handle:
            raise ObjectError("libbpf cannot open this file as a BPF ELF object "
                              f"(errno {ctypes.get_errno()}); see the log")
        self._obj = handle
        self._progs: dict[str, int] = {}
        self._log: ctypes.Array[ctypes.c_char] | None = None  # the verifier log of load_only
        prog = None
        while prog := _lib().bpf_object__next_program(self._obj, prog):
            self._progs[_lib().bpf_program__name(prog).decode()] = prog

    def programs(self) -> list[ObjectProgram]:
        lib = _lib()
        return [ObjectProgram(name, (lib.bpf_program__section_name(p) or b"").decode(), lib.bpf_program__type(p))
                for name, p in self._progs.items()]

    def maps(self) -> list[MapSpec]:
        """The maps the object declares, as libbpf will create them."""
        lib = _lib()
        specs: list[MapSpec] = []
        m = None
        while m := lib.bpf_object__next_map(self._obj, m):
            specs.append(MapSpec((lib.bpf_map__name(m) or b"").decode(errors="replace"), lib.bpf_map__type(m),
                                 lib.bpf_map__key_size(m), lib.bpf_map__value_size(m), lib.bpf_map__max_entries(m)))
        return specs

    def global_vars(self) -> list[GlobalVar]:
        """The variables of the object's data sections, as its BTF declares them."""
        handle = _lib().bpf_object__btf(self._obj)
        if not handle:
            return []
        btf = _Btf(handle)
        found: list[GlobalVar] = []
        for section, sec in btf.datasecs():
            for i in range(_vlen(sec.contents)):
                var_id, offset, size = (_extra(sec, 3 * i + k) for k in range(3))  # struct btf_var_secinfo
                var = btf.type(var_id)
                if _kind(var.contents) == BTF_KIND_VAR:
                    found.append(GlobalVar(btf.name(var.contents), section, offset,
                                           btf.var_type(var.contents.size_or_type, size)))
        return found

    def set_globals(self, values: Mapping[str, str]) -> None:
        """Write each NAME=VALUE into its variable's initial value, before the load.  Raises
        InvalidSetting: no such variable (the settable ones listed), a type --set cannot write,
        a value that is not of its type or out of its range."""
        if not values:
            return
        found = self.global_vars()
        if not found and not _lib().bpf_object__btf(self._obj):
            raise InvalidSetting("--set needs the object's BTF to find its variables, and this object has none "
                                 "(compile it with clang -g)")
        by_name = {v.name: v for v in found}
        for name, text in values.items():
            var = by_name.get(name)
            if var is None:
                raise unknown(name, found)
            self._patch(var, encode(var, text))

    def _patch(self, var: GlobalVar, data: bytes) -> None:
        lib = _lib()
        m = lib.bpf_object__find_map_by_name(self._obj, var.section.encode())  # a section name finds its map
        size = ctypes.c_size_t()
        current = lib.bpf_map__initial_value(m, ctypes.byref(size)) if m else None
        if not current or var.offset + len(data) > size.value:
            raise InvalidSetting(f"--set {var.name}: libbpf has no initial value of {var.section} to write it in")
        value = bytearray(ctypes.string_at(current, size.value))
        value[var.offset:var.offset + len(data)] = data
        if lib.bpf_map__set_initial_value(m, bytes(value), len(value)) != 0:
            raise InvalidSetting(f"--set {var.name}: libbpf refused the new value of {var.section} "
                                 f"(errno {ctypes.get_errno()})")

    def choose(self, wanted: str | None) -> ObjectProgram:
        progs = {p.name: p for p in self.programs()}
        if wanted is not None:
            if wanted not in progs:
                raise FunctionNotFound(f"no program {wanted!r} in the object", _candidates(list(progs)))
            chosen = progs[wanted]
        else:
            raw_tp = [p for p in progs.values() if p.type == BPF_PROG_TYPE_RAW_TRACEPOINT]
            if len(raw_tp) != 1:
                error = FunctionAmbiguous if raw_tp else FunctionNotFound
                raise error(("more than one" if raw_tp else "no") + ' SEC("raw_tracepoint/...") program in '
                            "the object; choose one with --function",
                            _candidates([p.name for p in raw_tp] or list(progs)))
            chosen = raw_tp[0]
        if chosen.type != BPF_PROG_TYPE_RAW_TRACEPOINT:
            raise WrongProgramType(f"{chosen.name} is a {chosen.type_name} program (SEC(\"{chosen.section}\")); "
                                   "the dispatcher can only tail-call raw_tracepoint programs: "
                                   'SEC("raw_tracepoint/sys_enter") or SEC("raw_tp/sys_enter")')
        return chosen

    def load_only(self, name: str, log_bytes: int = 0) -> int:
        """Load ``name`` alone; return its fd (valid until close()).  ``log_bytes``: the size of
        the verifier log libbpf asks for (and prints) when the load fails; 0: libbpf's own, which
        grows until the whole log fits."""
        lib = _lib()
        for prog_name, prog in self._progs.items():
            lib.bpf_program__set_autoload(prog, prog_name == name)
        if log_bytes:
            self._log = ctypes.create_string_buffer(log_bytes)  # must outlive the load
            lib.bpf_program__set_log_buf(self._progs[name], self._log, log_bytes)
        if lib.bpf_object__load(self._obj) != 0:
            raise VerifierRejected(f"the kernel refused {name!r} (see libbpf's log and the verifier's below)")
        return lib.bpf_program__fd(self._progs[name])

    def loaded_insns(self, name: str) -> bytes | None:
        """The instructions of ``name`` as libbpf handed them to the kernel (relocated, map fds
        written in); None when libbpf keeps none."""
        lib = _lib()
        prog = self._progs[name]
        insns, count = lib.bpf_program__insns(prog), lib.bpf_program__insn_cnt(prog)
        return ctypes.string_at(insns, count * 8) if insns and count else None

    def pins_maps(self) -> bool:
        """Whether a map of the object is pinned by name (shared through bpffs)."""
        lib = _lib()
        m = None
        while m := lib.bpf_object__next_map(self._obj, m):
            if lib.bpf_map__pin_path(m):
                return True
        return False

    def verifier_log(self) -> str:
        """What the verifier said in the last load_only with ``log_bytes`` (libbpf prints only a
        log of its own buffer)."""
        return self._log.value.decode(errors="replace") if self._log is not None else ""

    def reuse_map(self, name: str, fd: int) -> None:
        """Make the object's map ``name`` the existing map ``fd`` (a pinned one, opened by path)
        instead of creating it; libbpf keeps a dup of ``fd``.  libbpf 1.1 takes the map's type
        and sizes from the kernel without comparing them with the declaration, so a caller
        that needs them to agree checks first (the dispatcher: check_declared_maps)."""
        lib = _lib()
        m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise ObjectError(f"the object declares no map {name!r}")
        if lib.bpf_map__reuse_fd(m, fd) != 0:
            raise ObjectError(f"cannot use map fd {fd} as {name!r} (errno {ctypes.get_errno()})")

    def load_all(self) -> dict[str, int]:
        """Load every program of the object; their fds by name (valid until close())."""
        lib = _lib()
        if lib.bpf_object__load(self._obj) != 0:
            raise VerifierRejected(f"the kernel refused the object (errno {ctypes.get_errno()}); see libbpf's log")
        return {name: lib.bpf_program__fd(prog) for name, prog in self._progs.items()}

    def map_fd(self, name: str) -> int:
        lib = _lib()
        m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise ObjectError(f"the object declares no map {name!r}")
        return int(lib.bpf_map__fd(m))

    def btf(self) -> bytes | None:
        """The object's BTF, as libbpf loaded it (types keep their ids): what decodes the
        structs a handler emits (events.py)."""
        lib = _lib()
        btf = lib.bpf_object__btf(self._obj)
        if not btf:
            return None
        size = ctypes.c_uint32()
        data = lib.btf__raw_data(btf, ctypes.byref(size))
        return ctypes.string_at(data, size.value) if data else None

    def close(self) -> None:
        _lib().bpf_object__close(self._obj)
