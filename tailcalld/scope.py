"""Handlers scoped to a cgroup: the guard programs that stand in their slots, and the maps behind them.

A scoped slot does not hold its handler: its prog-array entry holds a *guard*, a program of
two dozen instructions made here (no compiler), which asks the kernel whether the calling
task is in the cgroup's subtree (bpf_current_task_under_cgroup) and tail-calls the handler
only then; any other task's call is counted as a miss of that scope.  Unscoped slots never
meet a guard: the feature costs them nothing, and a scoped slot one helper call and one
tail call.

    pin_dir/scope/cgroups   BPF_MAP_TYPE_CGROUP_ARRAY, 2 entries per slot key: the cgroups
    pin_dir/scope/progs     BPF_MAP_TYPE_PROG_ARRAY, 2 entries per slot key: the handlers
    pin_dir/scope/misses    per-CPU u64 per slot key: calls of tasks outside the slot's cgroup
    pin_dir/scope/guards/<key>   the guard a slot runs (its name tcs_<key>_<half> says which
                                 of the slot's two entries it reads)

Each slot key owns two entries of the cgroup and handler arrays.  A change of a scoped slot
fills the half its running guard does not read, loads a guard for that half and swaps it
into the slot with one prog-array update: no call ever sees the new handler with the old
cgroup or the reverse, and none falls through (the zero-loss swap of plain slots).  The old
half is emptied once every program that may still run the old guard has returned (an RCU
grace period, waited for with membarrier(2)).

The guard holds the cgroup, not its path: a cgroup removed and made again (a service
restarted by systemd) is a new cgroup, so ``follow`` points a slot's entry at whatever the
path names now; a path that does not exist (yet) leaves the entry empty, and the guard
counts every call as a miss of the scope until it appears.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import bpfsys
from .errors import BadCgroup, KernelError
from .pins import fs_type, open_or_create_map, pin_again, pinned_programs

CGROUP2_SUPER_MAGIC = 0x63677270
SCOPE_DIR = "scope"
GUARDS = "guards"
_GUARD_NAME = re.compile(r"tcs_(\d+)_([01])")

logger = logging.getLogger("tailcalld")


# -- the cgroup a user names ----------------------------------------------------------------------

def cgroup2_mounts(mountinfo: str | None = None) -> list[Path]:
    """Where cgroup v2 is mounted, from /proc/self/mountinfo (a hybrid host has it at
    /sys/fs/cgroup/unified, a unified one at /sys/fs/cgroup, a container wherever)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) > 4:
            found.append(Path(fields[4].encode().decode("unicode_escape")))
    return found


def check_cgroup_path(path: str) -> None:
    """Raise BadCgroup unless ``path`` is an absolute path to a folder of a cgroup v2 hierarchy."""
    if not os.path.isabs(path):
        raise BadCgroup(f"cgroup {path!r}: give an absolute path (a folder of the cgroup v2 hierarchy)",
                        {"cgroup": path})
    fd = open_cgroup(path)
    os.close(fd)


def open_cgroup(path: str) -> int:
    """An fd of the cgroup folder ``path`` (what a cgroup array takes).  Raises BadCgroup, with
    where cgroup v2 is mounted when the path is not on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadCgroup(f"cgroup {path} does not exist", {"cgroup": path}) from None
    except NotADirectoryError:
        raise BadCgroup(f"cgroup {path} is not a folder; a cgroup is one", {"cgroup": path}) from None
    except OSError as exc:
        raise BadCgroup(f"cgroup {path} cannot be opened: {exc.strerror}", {"cgroup": path}) from None
    try:
        kind = fs_type(Path(f"/proc/self/fd/{fd}"))
    except OSError as exc:
        os.close(fd)
        raise BadCgroup(f"cgroup {path} cannot be examined: {exc.strerror}", {"cgroup": path}) from None
    if kind != CGROUP2_SUPER_MAGIC:
        os.close(fd)
        mounts = cgroup2_mounts()
        where = (f"cgroup v2 is mounted at {', '.join(map(str, mounts))}" if mounts
                 else "this host has no cgroup v2 mounted")
        raise BadCgroup(f"{path} is not a cgroup v2 folder (handlers can be scoped to cgroup v2 only; {where})",
                        {"cgroup": path, "cgroup2_mounts": [str(m) for m in mounts]})
    return fd


def cgroup_id(path: str) -> int | None:
    """The cgroup's id (its folder's inode on cgroup v2), None when the path names none."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


# -- the guard -----------------------------------------------------------------------------------

_HELPER_MAP_LOOKUP = 1
_HELPER_TAIL_CALL = 12
_HELPER_UNDER_CGROUP = 37  # bpf_current_task_under_cgroup: 1 in the subtree, 0 outside, <0 no cgroup there


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map(dst: int, map_fd: int) -> bytes:
    """ld_imm64 of a map by fd (BPF_PSEUDO_MAP_FD): two instruction slots."""
    return insn(0x18, dst, 1, 0, map_fd) + insn(0)


def guard_insns(key: int, entry: int, cgroups_fd: int, progs_fd: int, misses_fd: int) -> bytes:
    """The guard of slot ``key`` reading entry ``entry`` of the cgroup and handler arrays."""
    mov64_reg, mov64_imm, add64_imm, call, exit_ = 0xBF, 0xB7, 0x07, 0x85, 0x95
    jeq_imm, st_w, ldx_dw, stx_dw = 0x15, 0x62, 0x79, 0x7B
    under = [
        insn(mov64_reg, 6, 1),                 # r6 = ctx
        ld_map(1, cgroups_fd),                 # r1 = &cgroups
        insn(mov64_imm, 2, imm=entry),         # r2 = entry
        insn(call, imm=_HELPER_UNDER_CGROUP),
    ]
    miss = [
        insn(st_w, 10, off=-4, imm=key),       # *(u32 *)(fp - 4) = key
        insn(mov64_reg, 2, 10),
        insn(add64_imm, 2, imm=-4),            # r2 = fp - 4
        ld_map(1, misses_fd),                  # r1 = &misses
        insn(call, imm=_HELPER_MAP_LOOKUP),
        insn(jeq_imm, 0, off=3, imm=0),        # no entry: done
        insn(ldx_dw, 1, 0),
        insn(add64_imm, 1, imm=1),
        insn(stx_dw, 0, 1),                    # (*r0)++ (per CPU: no atomics needed)
        insn(mov64_imm, 0, imm=0),
        insn(exit_),
    ]
    run = [
        insn(mov64_reg, 1, 6),                 # r1 = ctx
        ld_map(2, progs_fd),                   # r2 = &progs
        insn(mov64_imm, 3, imm=entry),
        insn(call, imm=_HELPER_TAIL_CALL),     # into the handler; only an empty entry returns
        insn(mov64_imm, 0, imm=0),
        insn(exit_),
    ]
    jump = insn(jeq_imm, 0, off=sum(len(i) for i in miss) // 8, imm=1)  # in the subtree: run it
    return b"".join(under) + jump + b"".join(miss) + b"".join(run)


def guard_name(key: int, half: int) -> str:
    return f"tcs_{key}_{half}"


# -- the pinned maps and the guards ---------------------------------------------------------------

BPF_MAP_TYPE_CGROUP_ARRAY = 8


@dataclass
class _Followed:
    path: str
    cgroup_id: int | None  # what the entry holds now; None: nothing (the path named none)


@dataclass(frozen=True)
class Guard:
    fd: int
    id: int
    half: int
    followed: _Followed | None = None  # the path it was made for, and the cgroup it holds (None: adopted)


def synchronize_rcu() -> None:
    """Wait until every BPF program that started before now has returned: membarrier(2)'s
    MEMBARRIER_CMD_GLOBAL is synchronize_rcu(), and programs on tracepoints run inside RCU
    read-side sections.  Where it is refused (a seccomp filter), a sleep stands in: the
    verifier bounds every program to microseconds, 50 ms is thousands of times that."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.syscall(324 if os.uname().machine == "x86_64" else 283, 1, 0, 0) != 0:  # __NR_membarrier
        time.sleep(0.05)


class Scopes:
    """The scope maps and the guards of the scoped slots, by slot key; the kernel side stays
    when this is closed."""

    def __init__(self, folder: Path, nr_keys: int) -> None:
        self._folder = folder
        self.nr_keys = nr_keys
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / GUARDS).mkdir(mode=0o700, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._guards: dict[int, Guard] = {}
        self._followed: dict[int, _Followed] = {}
        try:
            self._fds["cgroups"] = open_or_create_map(folder / "cgroups", BPF_MAP_TYPE_CGROUP_ARRAY,
                                                      "tailcalld_cgrp", 4, 4, 2 * nr_keys)
            self._fds["progs"] = open_or_create_map(folder / "progs", bpfsys.BPF_MAP_TYPE_PROG_ARRAY,
                                                    "tailcalld_scope", 4, 4, 2 * nr_keys)
            self._fds["misses"] = open_or_create_map(folder / "misses", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY,
                                                     "tailcalld_scmis", 4, 8, nr_keys)
            self._guards = self._pinned_guards()
        except BaseException:
            self.close()
            raise

    def _pinned_guards(self) -> dict[int, Guard]:
        """The guards a previous run pinned, by slot key (their names say which half they read)."""
        found = pinned_programs(self._folder / GUARDS, _GUARD_NAME, "a guard of tailcalld's")
        return {key: Guard(fd, prog_id, int(match[2])) for key, (fd, prog_id, match) in found.items()}

    # -- what the kernel's slots hold ---------------------------------------------------------------

    def handler_id(self, key: int, guard_id: int) -> int | None:
        """The id of the handler behind the guard ``guard_id`` found in slot ``key`` (None when
        it is no guard of that slot's, or its handler entry is empty)."""
        guard = self._guards.get(key)
        if guard is None or guard.id != guard_id:
            return None
        return bpfsys.prog_array_get(self._fds["progs"], 2 * key + guard.half)

    def scoped(self, key: int) -> bool:
        return key in self._guards

    def guard(self, key: int) -> Guard | None:
        """The guard slot ``key`` runs (borrowed: valid until it is replaced or this is closed)."""
        return self._guards.get(key)

    # -- changes ------------------------------------------------------------------------------------

    def make_guard(self, key: int, prog_fd: int, path: str) -> Guard:
        """Fill the half of slot ``key`` its running guard does not read with ``prog_fd`` and the
        cgroup at ``path`` (left empty when there is none yet), and load the guard that reads it.
        Nothing a running guard reads is touched.  Raises KernelError."""
        running = self._guards.get(key)
        half = 1 - running.half if running is not None else 0
        entry = 2 * key + half
        try:
            cgroup = open_cgroup(path)
        except BadCgroup:
            cgroup = None  # a restore before the cgroup exists: follow() fills it when it appears
        try:
            if cgroup is not None:
                bpfsys.array_set_u32(self._fds["cgroups"], entry, cgroup)
            else:
                bpfsys.map_delete(self._fds["cgroups"], entry)
            bpfsys.prog_array_set(self._fds["progs"], entry, prog_fd)
        except OSError as exc:
            raise KernelError(f"slot {key}: could not fill the cgroup scope: {exc.strerror}") from None
        finally:
            if cgroup is not None:
                os.close(cgroup)
        followed = _Followed(path, cgroup_id(path) if cgroup is not None else None)
        insns = guard_insns(key, entry, self._fds["cgroups"], self._fds["progs"], self._fds["misses"])
        fd, log = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_RAW_TRACEPOINT, guard_name(key, half), b"GPL", insns,
                                   1 << 16)
        if fd < 0:
            raise KernelError(f"slot {key}: the cgroup guard was refused: {os.strerror(-fd)}\n{log}")
        return Guard(fd, bpfsys.prog_info(fd).id, half, followed)

    def installed(self, key: int, guard: Guard, wait: bool = True) -> None:
        """``guard`` now runs in slot ``key``: pin it, and empty the half the old one read once
        nothing runs the old one any more (``wait``: the caller has waited for that already)."""
        old = self._guards.get(key)
        path = self._folder / GUARDS / str(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            bpfsys.obj_pin(guard.fd, str(path))
        except OSError as exc:
            logger.warning("the cgroup guard of slot %d could not be pinned (%s): a restart will not see it "
                           "as a scoped slot", key, exc)
        self._guards[key] = guard
        if guard.followed is not None:
            self._followed[key] = guard.followed
        if old is not None:
            os.close(old.fd)
            if wait:
                synchronize_rcu()
            self._empty(2 * key + old.half)

    def discard(self, key: int, guard: Guard) -> None:
        """A guard of slot ``key`` that was made but never installed: its half is emptied (the
        running guard reads the other), so the handler put there is not kept loaded."""
        os.close(guard.fd)
        self._empty(2 * key + guard.half)

    def removed(self, key: int, wait: bool) -> None:
        """Slot ``key`` holds no guard any more (emptied, or a plain handler in it): drop its pin and
        empty both its halves; ``wait``: once nothing runs its old guard (a plain handler took
        its place: a call the old guard let through still reaches the old handler)."""
        guard = self._guards.pop(key, None)
        self._followed.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            (self._folder / GUARDS / str(key)).unlink()
        if guard is not None:
            os.close(guard.fd)
        if wait:
            synchronize_rcu()
        for entry in (2 * key, 2 * key + 1):
            self._empty(entry)

    def _empty(self, entry: int) -> None:
        for name in ("progs", "cgroups"):
            try:
                bpfsys.map_delete(self._fds[name], entry)
            except OSError as exc:
                logger.warning("entry %d of the scope's %s could not be emptied: %s", entry, name, exc)

    def follow(self, wanted: Mapping[int, str]) -> list[tuple[int, str]]:
        """Point each scoped slot's cgroup entry at what its path names now (``wanted``: slot key ->
        path); returns what changed: (slot key, in words).  A path that names no cgroup any more leaves the
        entry as it is: the cgroup it held is gone, so the guard matches nobody."""
        changes = []
        for key, path in wanted.items():
            guard = self._guards.get(key)
            if guard is None:
                continue
            seen = self._followed.get(key)
            now = cgroup_id(path)
            if seen is not None and seen.path == path and seen.cgroup_id == now:
                continue
            if now is None:
                self._followed[key] = _Followed(path, None)
                if seen is None or seen.cgroup_id is not None:
                    changes.append((key, f"cgroup {path} does not exist (any more); the handler runs "
                                   "for nobody until it does"))
                continue
            try:
                fd = open_cgroup(path)
            except BadCgroup as err:
                changes.append((key, err.message))
                self._followed[key] = _Followed(path, None)
                continue
            try:
                bpfsys.array_set_u32(self._fds["cgroups"], 2 * key + guard.half, fd)
            except OSError as exc:
                changes.append((key, f"cgroup {path} could not be put in the scope: {exc.strerror}"))
                continue
            finally:
                os.close(fd)
            if seen is not None:  # a start sets every entry once; only a change after it is news
                changes.append((key, f"cgroup {path} was made again (id {now}); the scope follows it"))
            self._followed[key] = _Followed(path, now)
        return changes

    def restore_pins(self) -> list[str]:
        """Pin again the scope's maps and guards if someone unpinned them (``rm -rf pin_dir``):
        our fds keep them alive meanwhile, but a restart finds a scoped slot by its guard's pin.
        Returns the pins made; raises as ``pins.pin_again`` does."""
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self._folder / GUARDS).mkdir(mode=0o700, exist_ok=True)
        return (pin_again(self._folder, self._fds)
                + pin_again(self._folder / GUARDS, {str(key): g.fd for key, g in self._guards.items()}))

    def miss_totals(self) -> list[int]:
        return bpfsys.percpu_u64_sums(self._fds["misses"], self.nr_keys)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for guard in self._guards.values():
            os.close(guard.fd)
        self._guards.clear()
