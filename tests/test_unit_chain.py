"""The pure parts of chained slots (attach --priority): the runner's instructions and BTF, the
order entries, the handler keys, and the rules an apply file's entries follow."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tailcalld.chain import (LINK_FUNC, RUNNER_FUNC, pack_order, runner_btf, runner_insns, runner_subprog_offset,
                             unpack_order)
from tailcalld.desired import DesiredFileError, entry_text, parse
from tailcalld.dialects import Artifact
from tailcalld.errors import BadRequest, PriorityClash
from tailcalld.plan import Wanted, check_unique
from tailcalld.syscalls import SyscallTable
from tailcalld.wire_limits import MAX_LINKS, MAX_PRIORITY

TABLE = SyscallTable(1024, {"fchmodat": 268, "openat": 257})


def decode(insns: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) of each 8-byte instruction slot."""
    out = []
    for i in range(0, len(insns), 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", insns, i)
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def test_the_runner_calls_each_link_in_order_and_stops_on_a_non_zero_return() -> None:
    entries, links_fd = [4288, 4290, 4289], 77
    insns = decode(runner_insns(entries, links_fd))
    out = 1 + 3 * len(entries)
    calls = [(i, ins) for i, ins in enumerate(insns) if ins[0] == 0x85 and ins[2] == 1]  # BPF_PSEUDO_CALL
    subs = [runner_subprog_offset(len(entries), n) for n in range(len(entries))]
    assert [i + 1 + ins[4] for i, ins in calls] == subs  # one subprogram per handler, in order
    for i, _ in calls:
        code, dst, _, off, imm = insns[i + 1]
        assert (code, dst, imm, i + 1 + off + 1) == (0x55, 0, 0, out)  # r0 != 0: to the end
    assert insns[out:out + 2] == [(0xB7, 0, 0, 0, 0), (0x95, 0, 0, 0, 0)]  # return 0
    for sub, entry in zip(subs, entries, strict=True):
        # r2 = the links map (ld_imm64 by fd), r3 = the entry as a constant (a direct jump once
        # JITed), bpf_tail_call, return 0 when the entry is empty.
        assert insns[sub][:3] == (0x18, 2, 1) and insns[sub][4] == links_fd
        assert insns[sub + 2] == (0xB7, 3, 0, 0, entry)
        assert insns[sub + 3] == (0x85, 0, 0, 0, 12)
        assert insns[sub + 4:sub + 6] == [(0xB7, 0, 0, 0, 0), (0x95, 0, 0, 0, 0)]
    assert len(insns) == subs[-1] + 6


def test_the_runner_btf_names_its_two_functions() -> None:
    blob = runner_btf()
    magic, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
    assert (magic, version, hdr_len, type_off) == (0xEB9F, 1, 24, 0)
    assert hdr_len + str_off + str_len == len(blob) and str_off == type_len
    strings = blob[hdr_len + str_off:]
    assert b"\0runner\0" in strings and b"\0link\0" in strings
    # The last two types are FUNCs (RUNNER_FUNC, LINK_FUNC): runner global (linkage 1), link static (0).
    types = blob[hdr_len:hdr_len + type_len]
    runner_info, link_info = (struct.unpack_from("<I", types, len(types) - at)[0] for at in (20, 8))
    assert (runner_info >> 24, runner_info & 0xFFFF) == (12, 1)
    assert (link_info >> 24, link_info & 0xFFFF) == (12, 0)
    assert (RUNNER_FUNC, LINK_FUNC) == (4, 5)


def test_an_order_entry_round_trips() -> None:
    order = {0: 50, 3: 0, MAX_LINKS - 1: MAX_PRIORITY}
    assert unpack_order(pack_order(order)) == order
    assert unpack_order(pack_order({})) == {}
    assert len(pack_order(order)) == 2 * MAX_LINKS


def test_handler_keys_name_their_slot_and_priority() -> None:
    exit_openat = TABLE.key(257, "exit")
    for base in (268, exit_openat):
        for priority in (0, 10, MAX_PRIORITY):
            key = TABLE.link_key(base, priority)
            assert key >= 2 * TABLE.nr_slots
            assert (TABLE.base(key), TABLE.priority(key)) == (base, priority)
            assert TABLE.split(key) == TABLE.split(base)
    assert TABLE.link_key(268, None) == 268 and TABLE.priority(268) is None
    assert TABLE.slot_label(TABLE.link_key(268, 10)) == "fchmodat (268) priority 10"
    assert TABLE.slot_label(TABLE.link_key(exit_openat, 0)) == "openat exit (257) priority 0"
    keys = {TABLE.link_key(base, p) for base in range(2 * TABLE.nr_slots) for p in (0, MAX_PRIORITY)}
    assert len(keys) == 2 * 2 * TABLE.nr_slots  # no two handlers share a key


def wanted(index: int, key: int) -> Wanted:
    return Wanted(index, key, Artifact("bcc", b"int f(void *ctx) { return 0; }"), None, False, f"{index}.c")


def test_an_apply_names_each_priority_once_and_never_mixes_kinds() -> None:
    check_unique([wanted(0, TABLE.link_key(268, 10)), wanted(1, TABLE.link_key(268, 50)), wanted(2, 257)], TABLE, "f")
    with pytest.raises(PriorityClash, match=r"\[\[slot\]\] 1 and 2 both fill fchmodat \(268\) priority 10"):
        check_unique([wanted(0, TABLE.link_key(268, 10)), wanted(1, TABLE.link_key(268, 10))], TABLE, "f")
    with pytest.raises(PriorityClash, match="one without a priority"):
        check_unique([wanted(0, 268), wanted(1, TABLE.link_key(268, 10))], TABLE, "f")
    with pytest.raises(BadRequest, match="both fill fchmodat"):
        check_unique([wanted(0, 268), wanted(1, 268)], TABLE, "f")


def test_an_apply_file_gives_priorities_and_save_writes_them(tmp_path: Path) -> None:
    text = entry_text("fchmodat", "enter", "audit.c", None, "bcc", False, {}, {}, priority=10)
    assert "priority = 10\n" in text
    assert parse(text, "f").slot[0].priority == 10
    assert "priority" not in entry_text("fchmodat", "enter", "a.c", None, "bcc", False, {}, {})
    with pytest.raises(DesiredFileError, match="priority"):
        parse('[[slot]]\nslot = 268\nfile = "a.c"\npriority = 1000\n', "f")
    with pytest.raises(DesiredFileError, match="priority"):
        parse('[[slot]]\nslot = 268\nfile = "a.c"\npriority = "10"\n', "f")
