"""The pure parts of cgroup scopes (scope.py): finding cgroup v2 in mountinfo, the guard's
instructions, and the checks of a path before anything is compiled."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tailcalld.errors import BadCgroup
from tailcalld.scope import cgroup2_mounts, check_cgroup_path, guard_insns, guard_name

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,name=systemd
"""
UNIFIED = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
ODD = r"40 25 0:50 / /mnt/with\040space rw - cgroup2 none rw" + "\n"


def test_cgroup2_mounts_are_found_as_a_host_finds_them() -> None:
    assert cgroup2_mounts(HYBRID) == [Path("/sys/fs/cgroup/unified")]
    assert cgroup2_mounts(UNIFIED) == [Path("/sys/fs/cgroup")]
    assert cgroup2_mounts(ODD) == [Path("/mnt/with space")]  # mountinfo escapes blanks as \040
    assert cgroup2_mounts("") == []


def _decode(insns: bytes) -> list[tuple[int, int, int, int, int]]:
    out = []
    for i in range(0, len(insns), 8):
        code, regs, off, imm = struct.unpack("<BBhi", insns[i:i + 8])
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def test_the_guard_checks_the_cgroup_then_runs_or_counts() -> None:
    insns = _decode(guard_insns(key=268, entry=537, cgroups_fd=11, progs_fd=12, misses_fd=13))
    assert len(insns) == 25
    calls = [imm for code, _, _, _, imm in insns if code == 0x85]
    assert calls == [37, 1, 12]  # under_cgroup, map_lookup_elem (the scope miss), tail_call
    maps = [imm for code, _, src, _, imm in insns if code == 0x18]
    assert maps == [11, 13, 12] and all(src == 1 for code, _, src, _, _ in insns if code == 0x18)
    jeq = next(i for i, x in enumerate(insns) if x[0] == 0x15 and x[4] == 1)
    target = jeq + 1 + insns[jeq][3]
    assert insns[target] == (0xBF, 1, 6, 0, 0)  # the run block begins: r1 = ctx
    assert (0x62, 10, 0, -4, 268) in insns  # the scope miss counted under the slot's key
    assert sum(1 for x in insns if x[0] == 0xB7 and x[4] == 537) == 2  # the same entry for cgroup and handler
    assert insns[-1][0] == 0x95 and insns[jeq + 1 + insns[jeq][3] - 1][0] == 0x95  # both paths exit


def test_guard_names_fit_the_kernels_15_characters() -> None:
    assert guard_name(2047, 1) == "tcs_2047_1" and len(guard_name(2047, 1)) <= 15


@pytest.mark.parametrize("path, why", [("system.slice", "absolute"), ("/nonexistent-tailcalld/x", "does not exist"),
                                       ("/etc/hostname", "not a folder"), ("/tmp", "not a cgroup v2")])
def test_paths_that_name_no_cgroup_v2_folder_are_refused(path: str, why: str) -> None:
    with pytest.raises(BadCgroup, match=why) as err:
        check_cgroup_path(path)
    assert err.value.details["cgroup"] == path
