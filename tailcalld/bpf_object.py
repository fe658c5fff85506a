"""Loading one program out of a BPF ELF object with libbpf (ctypes over libbpf.so.1).

Only the chosen program is loaded: every other program of the object has autoload off, so
a file that carries its own dispatcher (as the tail-call article's does) never loads or
attaches it.  Maps the object declares for itself are created, which is harmless.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

from .bpfsys import BPF_PROG_TYPE_RAW_TRACEPOINT, PROG_TYPE_NAMES
from .errors import FunctionAmbiguous, FunctionNotFound, ObjectError, VerifierRejected, WrongProgramType


@dataclass(frozen=True)
class ObjectProgram:
    name: str
    section: str
    type: int

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self.type, f"type {self.type}")


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
    lib.bpf_object__load.argtypes = [vp]
    lib.bpf_program__fd.argtypes = [vp]
    lib.bpf_object__close.argtypes = [vp]
    return lib


class BpfObject:
    """An opened (not yet loaded) object; close() releases everything libbpf holds."""

    def __init__(self, data: bytes) -> None:
        self._data = ctypes.create_string_buffer(data, len(data))  # must outlive the object
        handle = _lib().bpf_object__open_mem(self._data, len(data), None)
        if not handle:
            raise ObjectError("libbpf cannot open this file as a BPF ELF object "
                              f"(errno {ctypes.get_errno()}); see the log")
        self._obj = handle
        self._progs: dict[str, int] = {}
        prog = None
        while prog := _lib().bpf_object__next_program(self._obj, prog):
            self._progs[_lib().bpf_program__name(prog).decode()] = prog

    def programs(self) -> list[ObjectProgram]:
        lib = _lib()
        return [ObjectProgram(name, (lib.bpf_program__section_name(p) or b"").decode(), lib.bpf_program__type(p))
                for name, p in self._progs.items()]

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

    def load_only(self, name: str) -> int:
        """Load ``name`` alone; return its fd (valid until close())."""
        lib = _lib()
        for prog_name, prog in self._progs.items():
            lib.bpf_program__set_autoload(prog, prog_name == name)
        if lib.bpf_object__load(self._obj) != 0:
            raise VerifierRejected(f"the kernel refused {name!r} (see libbpf's log and the verifier's below)")
        return lib.bpf_program__fd(self._progs[name])

    def close(self) -> None:
        _lib().bpf_object__close(self._obj)
