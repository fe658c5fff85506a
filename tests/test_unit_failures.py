"""Failures keep their cause (issue #12 item 8), the parts that need no kernel: a compile
worker that dies at a compiler error, a result that is not one, the verifier's verdict found
in its log, the log's end kept, and an object's debug info removed before it is sent."""

from __future__ import annotations

import struct
from pathlib import Path

from tailcalld.compile_worker import RESULT_FILE
from tailcalld.compiler import MAX_DIAGNOSTICS, _died, _read_result, _tidy
from tailcalld.diagnostics import name_the_file, verifier_verdict
from tailcalld.elfstrip import strip_debug
from tailcalld.errors import CompileError, CompilerCrashed

BACKEND_ERROR = ("error: /virtual/main.c:16:29: in function h i32 (%struct.bpf_raw_tracepoint_args*): "
                 "A call to built-in function '__multi3' is not supported.\n")


def test_a_worker_that_exits_at_a_compiler_error_gives_compile_error() -> None:
    err = _died(1, BACKEND_ERROR, 1 << 30)
    assert isinstance(err, CompileError)
    assert "A call to built-in function '__multi3' is not supported" in err.message and "status 1" in err.message
    assert err.details == {"log": BACKEND_ERROR, "status": 1}
    assert isinstance(_died(1, "LLVM ERROR: Cannot select: 0x1234\n", 1 << 30), CompileError)
    # Killed by a signal, the same words are a crash's last words, not the compile's verdict.
    assert isinstance(_died(-11, BACKEND_ERROR, 1 << 30), CompilerCrashed)
    assert isinstance(_died(1, "Traceback (most recent call last):\n", 1 << 30), CompilerCrashed)


def test_bccs_backend_error_line_is_the_users() -> None:
    source = "int h(void *ctx) {\n  unsigned __int128 a = 1;\n  return 0;\n}\n"
    assert name_the_file(BACKEND_ERROR, "mul.c", source).startswith("error: mul.c:4:29: in function h")


def test_a_result_that_is_not_one_is_none(tmp_path: Path) -> None:
    result = tmp_path / RESULT_FILE
    assert _read_result(tmp_path) is None  # none written
    for garbled in ("", '{"ok": tr', "[]", '"ok"', '{"ok": true}', '{"ok": true, "function": 3}', "\xff"):
        result.write_text(garbled)
        assert _read_result(tmp_path) is None, garbled
    result.write_text('{"ok": true, "function": "h"}')
    assert _read_result(tmp_path) == {"ok": True, "function": "h"}
    result.write_text('{"ok": false, "code": "compile_error", "message": "m"}')
    assert _read_result(tmp_path) == {"ok": False, "code": "compile_error", "message": "m"}


LOOP_LOG = """0: R1=ctx() R10=fp0
10: (05) goto pc-4
infinite loop detected at insn 7
cur state: R0=1 R1=scalar(smin=umin=1) R2=0 R10=fp0 fp-8=mmmm????
old state: R0=1 R1=scalar(smin=umin=1) R2=0 R10=fp0 fp-8=mmmm????
processed 16 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 0
"""
TOO_LARGE_LOG = """; sum = sum * 7 + i; @ loop.c:4
31: (7b) *(u64 *)(r10 -8) = r3
BPF program is too large. Processed 1000001 insn
processed 1000001 insns (limit 1000000) max_states_per_insn 4 total_states 7813 peak_states 7813 mark_read 0
"""
OTHER_LOG = """libbpf: prog 'h': -- BEGIN PROG LOAD LOG --
0: R1=ctx() R10=fp0
; return *(int *)ctx->args[0]; @ deref.bpf.c:6
0: (79) r1 = *(u64 *)(r1 +0)          ; R1=scalar()
1: (61) r0 = *(u32 *)(r1 +0)
R1 invalid mem access 'scalar'
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
-- END PROG LOAD LOG --
"""


def test_the_verdict_is_what_the_verifier_said() -> None:
    assert verifier_verdict(LOOP_LOG) == "infinite loop detected at insn 7"
    assert verifier_verdict(TOO_LARGE_LOG) == "BPF program is too large. Processed 1000001 insn"
    assert verifier_verdict(OTHER_LOG) == "R1 invalid mem access 'scalar'"
    assert verifier_verdict("bpf: Argument list too long. Program h too large (29 insns)\n") is None
    assert verifier_verdict("") is None


def test_a_long_log_keeps_its_end() -> None:
    log = ("0: (05) goto pc-4\n" * 100_000 + TOO_LARGE_LOG).encode()
    kept = _tidy(log)
    assert len(kept) < MAX_DIAGNOSTICS + 100 and "characters cut" in kept
    assert kept.startswith("0: (05) goto pc-4\n") and kept.endswith(TOO_LARGE_LOG)


# -- ELF: debug info removed ---------------------------------------------------------------------

def _section(name: int, type_: int, offset: int, size: int, link: int = 0, info: int = 0, align: int = 1,
             entsize: int = 0) -> bytes:
    return struct.pack("<IIQQQQIIQQ", name, type_, 0, 0, offset, size, link, info, align, entsize)


def tiny_object() -> bytes:
    """A relocatable ELF of sections .text, .debug_info, .rel.debug_info, .BTF, .shstrtab."""
    names = b"\0.text\0.debug_info\0.rel.debug_info\0.BTF\0.shstrtab\0"
    text, debug, rel, btf = b"\x95" + b"\0" * 7, b"D" * 4000, b"R" * 16, b"\x9f\xeb\x01\0" + b"B" * 28
    body = text + debug + rel + btf + names
    offsets = [64]
    for part in (text, debug, rel, btf):
        offsets.append(offsets[-1] + len(part))
    shoff = 64 + len(body)
    shdrs = (_section(0, 0, 0, 0) + _section(1, 1, offsets[0], len(text), align=8)
             + _section(7, 1, offsets[1], len(debug)) + _section(19, 9, offsets[2], len(rel), link=0, info=2,
                                                                  entsize=16)
             + _section(35, 1, offsets[3], len(btf), align=4) + _section(40, 3, offsets[4], len(names)))
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 1, 247, 1, 0, 0, shoff, 0, 64, 0,
                         0, 64, 6, 5)
    return header + body + shdrs


def _sections(data: bytes) -> list[tuple[int, int, int]]:
    shoff, shnum = struct.unpack_from("<Q", data, 40)[0], struct.unpack_from("<H", data, 60)[0]
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + 64 * i)[4:6] + (i,) for i in range(shnum)]


def test_debug_sections_are_emptied_and_the_rest_kept() -> None:
    original = tiny_object()
    stripped = strip_debug(original)
    assert len(stripped) < len(original) - 4000
    before, after = _sections(original), _sections(stripped)
    assert len(after) == len(before)  # every section keeps its index
    for (old_off, old_size, i), (new_off, new_size, _) in zip(before, after, strict=True):
        if i in (2, 3):  # .debug_info and .rel.debug_info
            assert new_size == 0
        else:
            assert stripped[new_off:new_off + new_size] == original[old_off:old_off + old_size], i
    assert strip_debug(stripped) == stripped  # nothing more to remove


def test_what_is_not_an_object_is_sent_as_it_came() -> None:
    for data in (b"", b"\x7fELF", b"\x7fELF\x01\x01" + b"\0" * 100, tiny_object()[:200]):
        assert strip_debug(data) == data
