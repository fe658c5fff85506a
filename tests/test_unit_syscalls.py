"""Unit tests for SyscallTable: slot resolution by number or name, with a hand-built table."""

from __future__ import annotations

import platform

import pytest

from tailcalld.errors import SlotOutOfRange, UnknownSyscall
from tailcalld.syscalls import SyscallTable


@pytest.fixture
def table() -> SyscallTable:
    return SyscallTable(nr_slots=1024, by_name={"fchmodat": 268, "getppid": 110, "fchmod": 91})


def test_by_nr_is_the_inverse_of_by_name(table: SyscallTable) -> None:
    assert table.by_nr == {268: "fchmodat", 110: "getppid", 91: "fchmod"}


@pytest.mark.parametrize("slot", [268, "268", " 268 ", "+268", "0268", "fchmodat", "sys_fchmodat",
                                  "FCHMODAT", "Sys_FchModAt", "SYS_FCHMODAT", "  fchmodat\n"])
def test_resolve_fchmodat(table: SyscallTable, slot: int | str) -> None:
    assert table.resolve(slot) == 268


def test_resolve_other_names(table: SyscallTable) -> None:
    assert table.resolve("getppid") == 110
    assert table.resolve("fchmod") == 91  # a prefix of fchmodat, must not be confused with it


@pytest.mark.parametrize("slot", [0, 1, 500, 1023, "0", "1023"])
def test_numbers_need_no_name(table: SyscallTable, slot: int | str) -> None:
    """Any number in range resolves, named or not."""
    assert table.resolve(slot) == int(slot)
    assert type(table.resolve(slot)) is int


@pytest.mark.parametrize("slot", [-1, 1024, 10**9, "-1", "1024", str(10**9), -(10**9)])
def test_out_of_range(table: SyscallTable, slot: int | str) -> None:
    with pytest.raises(SlotOutOfRange) as info:
        table.resolve(slot)
    err = info.value
    assert err.code == "slot_out_of_range"
    assert err.details == {"slot": int(slot), "max": 1023}
    assert "0..1023" in err.message


def test_range_follows_nr_slots() -> None:
    small = SyscallTable(nr_slots=8)
    assert small.resolve(7) == 7
    with pytest.raises(SlotOutOfRange) as info:
        small.resolve(8)
    assert info.value.details == {"slot": 8, "max": 7}


def test_unknown_name_suggests_close_names(table: SyscallTable) -> None:
    with pytest.raises(UnknownSyscall) as info:
        table.resolve("fchmodatt")
    err = info.value
    assert err.code == "unknown_syscall"
    assert err.details["name"] == "fchmodatt"
    assert err.details["suggestions"][0] == "fchmodat"
    assert "getppid" not in err.details["suggestions"]
    assert "did you mean fchmodat" in err.message
    assert "'fchmodatt'" in err.message


def test_unknown_name_keeps_what_the_user_typed(table: SyscallTable) -> None:
    with pytest.raises(UnknownSyscall) as info:
        table.resolve("SYS_GETPPIDD")
    assert info.value.details["name"] == "SYS_GETPPIDD"
    assert info.value.details["suggestions"] == ["getppid"]


@pytest.mark.parametrize("name", ["openat2", "zzzzzz", "", "   ", "12abc", "0x10c", "2.5"])
def test_unknown_name_without_suggestions(table: SyscallTable, name: str) -> None:
    with pytest.raises(UnknownSyscall) as info:
        table.resolve(name)
    assert info.value.details["suggestions"] == []
    assert "did you mean" not in info.value.message


def test_empty_table_knows_no_names() -> None:
    with pytest.raises(UnknownSyscall):
        SyscallTable(nr_slots=1024).resolve("fchmodat")


def test_name_and_label(table: SyscallTable) -> None:
    assert table.name(268) == "fchmodat"
    assert table.name(5) is None
    assert table.label(110) == "getppid"
    assert table.label(5) == "syscall_5"
    assert table.label(1023) == "syscall_1023"


def test_huge_numeric_string_is_out_of_range(table: SyscallTable) -> None:
    with pytest.raises(SlotOutOfRange):
        table.resolve("9" * 5000)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers are x86_64's")
def test_for_this_machine_x86_64() -> None:
    table = SyscallTable.for_this_machine(1024)
    if not table.by_name:
        pytest.skip("neither bcc nor a C compiler with <sys/syscall.h> is available")
    assert table.nr_slots == 1024
    assert table.resolve("fchmodat") == 268
    assert table.resolve("getppid") == 110
    assert table.resolve("sys_getppid") == 110
    assert table.label(268) == "fchmodat"
    assert table.label(0) == "read"


# ia32 (32-bit callers on x86_64) ------------------------------------------------------------

def test_compat_slots_pair_ia32_numbers_with_the_64_bit_slot_of_the_same_name() -> None:
    table = SyscallTable(1024, by_name={"fchmodat": 268, "getppid": 110, "statfs": 137},
                         ia32_by_name={"fchmodat": 306, "getppid": 64, "statfs64": 268, "socketcall": 102})
    assert table.compat_slots() == {306: 268, 64: 110}  # statfs64 and socketcall: no 64-bit namesake
    assert table.compat_table() == table.compat_slots()
    assert table.ia32_label(268) == "statfs64" and table.ia32_label(499) == "syscall_499"


def test_no_ia32_table_means_no_compat_translation() -> None:
    assert SyscallTable(1024, by_name={"read": 0}).compat_table() is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the ia32 ABI exists on x86_64 only")
def test_this_machine_has_the_kernels_ia32_table() -> None:
    table = SyscallTable.for_this_machine(1024)
    compat = table.compat_slots()
    assert compat[306] == table.resolve("fchmodat") == 268  # from <asm/unistd_32.h>, not typed here
    assert 268 not in compat and 102 not in compat  # statfs64, socketcall
    assert all(0 <= slot < 1024 for slot in compat.values())


def test_matching_by_pattern_or_number_across_both_abis() -> None:
    table = SyscallTable(1024, by_name={"fchmodat": 268, "fchmod": 91, "openat": 257},
                         ia32_by_name={"fchmodat": 306, "statfs64": 268})
    arch = platform.machine()
    assert table.matching("fchmod*") == [(arch, 91, "fchmod", 91), (arch, 268, "fchmodat", 268),
                                         ("ia32", 306, "fchmodat", 268)]
    assert table.matching("268") == [(arch, 268, "fchmodat", 268), ("ia32", 268, "statfs64", None)]
    assert table.matching("SYS_OpenAt") == [(arch, 257, "openat", 257)]
    assert table.matching("nothing*") == []
    assert len(table.matching(None)) == 5
