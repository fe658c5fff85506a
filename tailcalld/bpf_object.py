"""Loading one program out of a BPF ELF object with libbpf (ctypes over libbpf.so.1).

Only the chosen program is loaded: every other program of the object has autoload off, so
a file that carries its own dispatcher (as the tail-call article's does) never loads or
attaches it.  Maps the object declares for itself are created, after their sizes are held
against the map budget.  Maps declared with LIBBPF_PIN_BY_NAME are pinned under the pin root
the daemon gives (a folder of the handler's own under ``pin_dir``), never at libbpf's default
/sys/fs/bpf/<name>, where a foreign map of the same name would be reused.

The dispatcher is loaded the same way, in the daemon itself, with each of its maps replaced
by the pinned map the daemon opened (``reuse_map``) rather than created.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

from .bpfsys import BPF_PROG_TYPE_RAW_TRACEPOINT, PROG_TYPE_NAMES
from .mapbudget import MapSpec
from .errors import FunctionAmbiguous, FunctionNotFound, ObjectError, VerifierRejected, WrongProgramType


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
    return lib


class BpfObject:
    """An opened (not yet loaded) object; close() releases everything libbpf holds."""

    def __init__(self, data: bytes, pin_root: str | None = None) -> None:
        self._data = ctypes.create_string_buffer(data, len(data))  # must outlive the object
        self._opts = _OpenOpts(ctypes.sizeof(_OpenOpts), None, False, pin_root.encode() if pin_root else None)
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
