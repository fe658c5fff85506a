"""The pinned dispatcher: its prog array, its miss counters, its program and its sys_enter link.

Layout of ``pin_dir`` (all created by tailcalld, all kept when the daemon stops):

    prog_array     BPF_MAP_TYPE_PROG_ARRAY, NR_SLOTS entries: the handler slots
    staged_array   BPF_MAP_TYPE_PROG_ARRAY, NR_SLOTS entries: every slot as an atomic change
                   leaves them, while it is made (empty at rest)
    staging        u32 array, 1 entry: 1 while a change is staged: both dispatchers then
                   dispatch through their staged_array
    counts         per-CPU array of {u64 calls, u64 misses}, NR_SLOTS entries: every call of
                   a slot's syscall, and those that fell through an empty slot (hits = calls - misses)
    timing         per-CPU {on, start, misses_before, slot}, 1 entry: handler timing (timing.py)
    call           per-CPU {slot, nr, flags}, 1 entry: what the dispatchers leave for the handler
                   they jump into (tailcalld.h's TC_ARG, TC_NR and event stamps)
    events, event_counts   the handlers' event channel (events.py)
    compat_slots   (x86_64) u32 array, COMPAT_NR entries: ia32 number -> 64-bit slot + 1
    compat_misses  (x86_64) per-CPU u64 array: calls of ia32-only syscalls, by ia32 number
    link           the raw_tracepoint/sys_enter bpf_link that keeps the dispatcher attached
    prog           the dispatcher program behind the link, named tcd_<hash of its code>
    exit/          the exit dispatcher's own prog_array, counts and (while an exit slot is
                   filled) link and prog (tcx_<hash>), on raw_tracepoint/sys_exit; it reads the
                   compat table above and writes the call map above
    scope/         the cgroup guards of scoped slots and their maps (scope.py)
    handlers/      what handlers leave: <sha256>/ the maps a libbpf handler pins by name,
                   progs/<id> each program a slot runs (enter and exit slots alike)

Everything is opened through these pins, never by id: BPF_{MAP,PROG}_GET_FD_BY_ID needs
CAP_SYS_ADMIN, which the daemon does not have (contrib/tailcalld.service).  That is why the
program is pinned beside its link (a link gives only its program's id, and the name is how a
restart tells an older dispatcher), and why the maps are created and pinned here before the
dispatcher is loaded: libbpf is handed their fds (bpf_map__reuse_fd).  A pinned link already
present is adopted, never duplicated: a second dispatcher would count every syscall twice.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import bpfsys
from .bpf_object import BpfObject
from .compiler import Compiler, bpf_source
from .errors import KernelError, ObjectError, PinConflict
from .events import PINS as EVENT_PINS
from .chain import CHAIN_DIR
from .scope import SCOPE_DIR
from .pins import HANDLERS_PINS, PinDirLock, open_or_create_map, pin_again, remove_handler_pins
from .syscalls import COMPAT_NR, Hook

NR_SLOTS = 1024  # covers every syscall number of x86_64 and arm64 with room to spare
SOURCE = "dispatcher.bpf.c"
MAPS_HEADER = "dispatcher_maps.h"  # included by the dispatcher: part of its code


@dataclass(frozen=True)
class HookSpec:
    """One of the two dispatchers: where in a syscall it runs, and where its pins live."""

    hook: Hook
    tracepoint: str
    subdir: str  # beneath pin_dir ("": pin_dir itself)
    prefix: str  # of its program's name, by which a start recognises it (and its version)

    def folder(self, pin_dir: Path) -> Path:
        return pin_dir / self.subdir if self.subdir else pin_dir


ENTER = HookSpec("enter", "sys_enter", "", "tcd_")
# Attached only while some exit slot is filled: with none, the exit path runs no program at all.
EXIT = HookSpec("exit", "sys_exit", "exit", "tcx_")
DISPATCH_PREFIX = ENTER.prefix


def dispatcher_function(hook: HookSpec = ENTER) -> str:
    """``tcd_`` (``tcx_`` on exit) + 11 hex digits of a hash of the dispatcher's code and layout:
    the kernel keeps 15 characters of a program's name, which is how a restart recognises an
    older dispatcher."""
    code = bpf_source(SOURCE) + bpf_source(MAPS_HEADER) + f"slots={NR_SLOTS} hook={hook.hook}"
    return hook.prefix + hashlib.sha256(code.encode()).hexdigest()[:11]


TS_COMPAT = 0x0002  # arch/x86/include/asm/thread_info.h: "32bit syscall active"


@dataclass(frozen=True)
class _MapSpec:
    pin: str  # also the map's name in dispatcher.bpf.c
    type: int
    value_size: int
    entries: int = NR_SLOTS
    prefix: str = "tailcalld_"  # of the map's name, which the kernel cuts at 15 characters
    key_size: int = 4

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.pin}"[:15]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.type, self.key_size, self.value_size, self.entries)


PROG_ARRAY = _MapSpec("prog_array", bpfsys.BPF_MAP_TYPE_PROG_ARRAY, 4)
# Atomic changes (see the class Dispatcher): the slots as a change stages them, and the switch.
STAGED = _MapSpec("staged_array", bpfsys.BPF_MAP_TYPE_PROG_ARRAY, 4)
STAGING = _MapSpec("staging", bpfsys.BPF_MAP_TYPE_ARRAY, 4, 1)
COUNTS = _MapSpec("counts", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 16)
COUNT_FIELDS = ("calls", "misses")  # struct slot_counts in dispatcher.bpf.c, u64 each
TIMING = _MapSpec("timing", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 32, 1)
CALL = _MapSpec("call", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 16, 1)
COMPAT_SLOTS = _MapSpec("compat_slots", bpfsys.BPF_MAP_TYPE_ARRAY, 4, COMPAT_NR, prefix="tcd_")
COMPAT_MISSES = _MapSpec("compat_misses", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 8, COMPAT_NR, prefix="tcd_")
ALL_MAPS = (PROG_ARRAY, STAGED, COUNTS, TIMING, CALL, STAGING, COMPAT_SLOTS, COMPAT_MISSES)
# Pins of older tailcalld layouts: an upgrade removes them once the old dispatcher is gone.
LEGACY_PINS = ("misses", "calls")
LINK_PIN = "link"
PROG_PIN = "prog"
# Where an upgrade pins the new dispatcher before it renames it into place (bpffs refuses
# names with dots).
NEW_LINK_PIN = "link_new"
NEW_PROG_PIN = "prog_new"
DISPATCHER_PINS = (LINK_PIN, NEW_LINK_PIN, PROG_PIN, NEW_PROG_PIN)

logger = logging.getLogger("tailcalld")


def _open_or_create_map(pin_dir: Path, spec: _MapSpec) -> int:
    return open_or_create_map(pin_dir / spec.pin, spec.type, spec.name, spec.key_size, spec.value_size, spec.entries)


def _map_specs(compat: dict[int, int] | None, hook: HookSpec) -> list[_MapSpec]:
    """The maps of the dispatcher's own folder."""
    if hook is EXIT:  # no timing; the compat table, the call map and the switch are the enter dispatcher's
        return [PROG_ARRAY, STAGED, COUNTS]
    return [PROG_ARRAY, STAGED, COUNTS, TIMING, CALL, STAGING] + ([COMPAT_SLOTS, COMPAT_MISSES] if compat is not None
                                                                   else [])


def _end_unfinished_change(folder: Path, maps: Mapping[str, int], hook: HookSpec) -> None:
    """An atomic change that a crash interrupted left its switch on, or staged slots: switch back
    to prog_array and empty the staged slots.  prog_array may then hold part of the change (the
    state file has all of it): the start's reconcile completes it slot by slot."""
    if hook is ENTER and bpfsys.array_value(maps[STAGING.pin], 0, 4) != bytes(4):
        logger.warning("an atomic change was interrupted (%s is set): dispatching through prog_array again; "
                       "the start completes the change slot by slot", folder / STAGING.pin)
        bpfsys.array_set_u32(maps[STAGING.pin], 0, 0)
    for slot in range(NR_SLOTS):
        bpfsys.map_delete(maps[STAGED.pin], slot)


def _fill_compat_slots(fd: int, compat: dict[int, int]) -> None:
    """Every entry, not just the named ones: a table adopted from an older kernel's run must
    not keep a stale translation."""
    for ia32_nr in range(COMPAT_SLOTS.entries):
        slot = compat.get(ia32_nr)
        bpfsys.array_set_u32(fd, ia32_nr, 0 if slot is None else slot + 1)


@dataclass(frozen=True)
class _Build:
    """What loading one of the dispatchers needs."""

    hook: HookSpec
    pin_dir: Path  # tailcalld's (the exit dispatcher's folder is beneath it)
    maps: Mapping[str, int]  # the pinned maps of its own folder, by pin name
    compat: bool  # it translates ia32 syscall numbers (x86_64), with the enter dispatcher's table

    @property
    def folder(self) -> Path:
        return self.hook.folder(self.pin_dir)


@dataclass
class _Attached:
    """A dispatcher's link and program, by fd (ours to close)."""

    link_fd: int
    prog_fd: int

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Dispatcher:
    """Handles on the pinned objects; the kernel side keeps running when this is closed."""

    def __init__(self, pin_dir: Path, lock: PinDirLock, maps: dict[str, int], attached: _Attached, adopted: bool,
                 upgraded_from: int | None = None, hook: HookSpec = ENTER, compat: bool = False) -> None:
        self.pin_dir = pin_dir  # this dispatcher's own folder (pin_dir/exit for the exit one)
        self.hook = hook
        self.compat = compat  # it translates ia32 syscall numbers (x86_64)
        self.nr_slots = NR_SLOTS
        self.adopted = adopted
        self.upgraded_from = upgraded_from
        self._lock = lock
        self._maps = maps  # pin name -> fd
        self._prog_array_fd = maps[PROG_ARRAY.pin]
        self._attached = attached
        self.link = bpfsys.link_info(attached.link_fd)

    @classmethod
    async def open_or_load(cls, pin_dir: Path, compiler: Compiler, compat: dict[int, int] | None = None,
                           lock: PinDirLock | None = None, hook: HookSpec = ENTER) -> Dispatcher:
        """Adopt the pinned dispatcher if it is this version's, upgrade it if it is an older
        one, load and pin a new one if there is none.  ``compat`` (x86_64: ia32 number -> 64-bit
        slot) is written to the compat table before any dispatcher that reads it attaches (the
        exit dispatcher only reads the enter one's).  ``lock``: the pin_dir's, taken already (the
        daemon takes every lock before it touches anything); the dispatcher releases it.
        ``pin_dir`` is tailcalld's; the exit dispatcher's pins go to its ``exit`` folder."""
        own_dir = hook.folder(pin_dir)
        lock = lock or PinDirLock(own_dir)
        maps: dict[str, int] = {}
        try:
            for spec in _map_specs(compat, hook):
                maps[spec.pin] = _open_or_create_map(own_dir, spec)
            if compat is not None and hook is ENTER:
                _fill_compat_slots(maps[COMPAT_SLOTS.pin], compat)
            _end_unfinished_change(own_dir, maps, hook)
            attached, adopted, upgraded_from = await _attach(_Build(hook, pin_dir, maps, compat is not None), compiler)
            return cls(own_dir, lock, maps, attached, adopted, upgraded_from, hook, compat is not None)
        except BaseException:
            for fd in maps.values():
                os.close(fd)
            lock.release()
            raise

    @property
    def prog_id(self) -> int:
        return self.link.prog_id

    def map_fd(self, spec: _MapSpec) -> int | None:
        """Our fd on one of the dispatcher's maps (borrowed: valid until close())."""
        return self._maps.get(spec.pin)

    def unpin_link(self) -> None:
        """Detach for good (the exit dispatcher with no exit slot left): unpin the link and the
        program, and drop our handles.  The maps stay pinned, counters included, for the next
        attach."""
        for name in (LINK_PIN, PROG_PIN):
            with contextlib.suppress(FileNotFoundError):
                (self.pin_dir / name).unlink()
        self.close()

    def set_slot(self, slot: int, prog_fd: int) -> None:
        try:
            bpfsys.prog_array_set(self._prog_array_fd, slot, prog_fd)
        except OSError as exc:
            raise KernelError(f"could not put the program in slot {slot}: {exc.strerror}") from None

    # -- atomic changes: the slots staged, then one switch (BpfKernel.set_slots) ---------------------

    def stage(self, slot: int, prog_fd: int) -> None:
        """Put ``prog_fd`` in the staged slot: the dispatcher runs it while the switch is on."""
        try:
            bpfsys.prog_array_set(self._maps[STAGED.pin], slot, prog_fd)
        except OSError as exc:
            raise KernelError(f"could not stage slot {slot}: {exc.strerror}") from None

    def unstage(self, slots: list[int]) -> None:
        """Empty staged slots (only ever read while the switch is on): they hold no program loaded."""
        for slot in slots:
            try:
                bpfsys.map_delete(self._maps[STAGED.pin], slot)
            except OSError as exc:
                logger.warning("staged slot %d could not be emptied: %s", slot, exc)

    def switch(self, staged: bool) -> None:
        """Dispatch through the staged slots (True) or prog_array (False), from the next call on,
        on every CPU: one update of the u32 both dispatchers read.  The enter dispatcher's."""
        try:
            bpfsys.array_set_u32(self._maps[STAGING.pin], 0, int(staged))
        except OSError as exc:
            raise KernelError(f"could not switch to the {'staged' if staged else 'changed'} slots: "
                              f"{exc.strerror}") from None

    def clear_slot(self, slot: int) -> bool:
        try:
            return bpfsys.map_delete(self._prog_array_fd, slot)
        except OSError as exc:
            raise KernelError(f"could not empty slot {slot}: {exc.strerror}") from None

    def slot_prog_id(self, slot: int) -> int | None:
        return bpfsys.prog_array_get(self._prog_array_fd, slot)

    def occupied(self) -> dict[int, int]:
        """slot -> program id, read from the kernel."""
        ids = {}
        for slot in range(self.nr_slots):
            prog_id = self.slot_prog_id(slot)
            if prog_id is not None:
                ids[slot] = prog_id
        return ids

    def miss_totals(self) -> list[int]:
        """Misses per slot since the counters were created (they survive daemon restarts)."""
        return self._count_column("misses")

    def call_totals(self) -> list[int]:
        """Calls per slot (dispatched or missed) since the counters were created."""
        return self._count_column("calls")

    def _count_column(self, field: str) -> list[int]:
        columns = bpfsys.percpu_u64_columns(self._maps[COUNTS.pin], self.nr_slots, len(COUNT_FIELDS))
        return columns[COUNT_FIELDS.index(field)]

    def compat_miss_totals(self) -> list[int]:
        """Calls of ia32-only syscalls by ia32 number (empty where there is no compat table)."""
        fd = self._maps.get(COMPAT_MISSES.pin)
        return [] if fd is None else bpfsys.percpu_u64_sums(fd, COMPAT_MISSES.entries)

    def restore_pins(self) -> list[str]:
        """Pin again what was unpinned behind our back (``rm -rf pin_dir``) while we run.  Our fds
        still hold the link, the program, the prog array and the counters, so tracing goes on
        for now, but it would end with this process.  Returns the pins made; a pin path now
        holding another object is left alone (PinConflict)."""
        held = {LINK_PIN: self._attached.link_fd, PROG_PIN: self._attached.prog_fd, **self._maps}
        if not self._lock.holds(self.pin_dir):
            lock = PinDirLock(self.pin_dir)  # made again, checked, and ours alone too
            self._lock.release()
            self._lock = lock
        return pin_again(self.pin_dir, held)

    def close(self) -> None:
        """Drop our handles; the pins keep the dispatcher attached and the slots filled."""
        for fd in self._maps.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._attached.close()
        self._lock.release()


async def _attach(build: _Build, compiler: Compiler) -> tuple[_Attached, bool, int | None]:
    """The dispatcher's link and program: the pinned one adopted if it is this version's, an
    older one upgraded, a first one loaded.  Returns (them, adopted, the upgraded program's id)."""
    own_dir = build.folder
    _remove_unfinished_upgrade(own_dir)
    pinned = _pinned_dispatcher_prog(own_dir / PROG_PIN, build.hook)
    try:
        if not (own_dir / LINK_PIN).exists():
            attached = await _load_and_attach(build, compiler, LINK_PIN)
            # The program pin last: a start that dies before this leaves a link whose program
            # is not the pinned one, which the next start upgrades (safe).
            os.rename(own_dir / NEW_PROG_PIN, own_dir / PROG_PIN)
            return attached, False, None
        link_fd, link = _adopt_link(own_dir / LINK_PIN, build.hook)
        running = pinned if pinned is not None and pinned[1].id == link.prog_id else None
        if running is not None and running[1].name == dispatcher_function(build.hook):
            pinned = None  # the dispatcher keeps the fd
            return _Attached(link_fd, running[0]), True, None
        try:
            attached = await _upgrade(build, compiler, link.prog_id, running[1].name if running is not None else None)
        finally:
            os.close(link_fd)  # with the pin replaced, this was the old link's last reference
    finally:
        if pinned is not None:
            os.close(pinned[0])
    _remove_legacy_pins(own_dir)
    return attached, True, link.prog_id


def _pinned_dispatcher_prog(path: Path, hook: HookSpec) -> tuple[int, bpfsys.ProgInfo] | None:
    """The dispatcher program pinned at ``path`` (fd, info), None when there is no pin (a
    layout older than the program pin).  Raises PinConflict when the pin holds anything but a
    dispatcher of tailcalld's: it is left alone."""
    try:
        fd = bpfsys.obj_get(str(path))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise PinConflict(f"{path} exists but is not a BPF object tailcalld can open ({exc}); "
                          "remove it or choose another pin_dir", {"path": str(path)}) from None
    info = bpfsys.prog_info(fd) if bpfsys.fd_kind(fd) == "prog" else None
    if info is None or not info.name.startswith(hook.prefix):
        os.close(fd)
        what = f"program {info.name!r}" if info is not None else "not a program"
        raise PinConflict(f"{path} is {what}, not tailcalld's dispatcher; it is left alone", {"path": str(path)})
    return fd, info


def _adopt_link(path: Path, hook: HookSpec) -> tuple[int, bpfsys.LinkInfo]:
    """The pinned link: it must be a raw_tracepoint link on the hook's tracepoint.  Which
    program it runs is known from the program pin beside it; without one (an older layout) a
    raw_tp link on that tracepoint at our pin path in our own folder is taken for an older
    dispatcher."""
    try:
        fd = bpfsys.obj_get(str(path))
    except OSError as exc:
        raise PinConflict(f"{path} exists but is not a BPF link ({exc}); remove it or choose another pin_dir",
                          {"path": str(path)}) from None
    link = bpfsys.link_info(fd) if bpfsys.fd_kind(fd) == "link" else None
    if link is None or link.type != bpfsys.BPF_LINK_TYPE_RAW_TRACEPOINT or link.tracepoint != hook.tracepoint:
        os.close(fd)
        what = "not a BPF link" if link is None else f"a link of type {link.type} on {link.tracepoint or '?'!r}"
        raise PinConflict(f"{path} is {what}, not tailcalld's {hook.tracepoint} dispatcher; it is left alone",
                          {"path": str(path)})
    return fd, link


async def _upgrade(build: _Build, compiler: Compiler, old_id: int, old_name: str | None) -> _Attached:
    """Replace an older dispatcher without a gap: attach the new one first (same prog array,
    so the slots need no moving), then swap the pins.  Until the kernel drops the old link,
    both run: a syscall in that window is dispatched twice (handlers run twice, a miss counts
    twice).  raw_tp links cannot be updated in place, so a window of either a gap or a double
    is unavoidable; a double loses nothing."""
    logger.warning("upgrading the %s dispatcher: program %d (%s) -> %s; handlers keep their slots", build.hook.hook,
                   old_id, old_name or "no program pin: a layout older than this tailcalld",
                   dispatcher_function(build.hook))
    attached = await _load_and_attach(build, compiler, NEW_LINK_PIN)
    own_dir = build.folder
    os.rename(own_dir / NEW_LINK_PIN, own_dir / LINK_PIN)  # atomic: the old pin is gone with it
    os.rename(own_dir / NEW_PROG_PIN, own_dir / PROG_PIN)  # last, as at a first start
    return attached


def _remove_unfinished_upgrade(pin_dir: Path) -> None:
    """The new pins of an upgrade (or start) that died before its renames: unpinning the link
    detaches what it attached, since the process that held it is gone."""
    for name in (NEW_LINK_PIN, NEW_PROG_PIN):
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()


def _remove_legacy_pins(pin_dir: Path) -> None:
    """The maps only an older dispatcher used: it holds them for as long as the kernel keeps
    it, so unpinning them now loses none of its counts that anyone still reads."""
    for name in LEGACY_PINS:
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
            logger.info("removed %s, used only by the older dispatcher", pin_dir / name)


def dispatcher_cflags(compat: bool, hook: HookSpec = ENTER) -> list[str]:
    flags = [f"-DTAILCALLD_SLOTS={NR_SLOTS}", f"-DTAILCALLD_DISPATCH={dispatcher_function(hook)}"]
    if hook is EXIT:
        flags.append("-DTAILCALLD_EXIT")
    if compat:
        flags += [f"-DTAILCALLD_COMPAT_NR={COMPAT_NR}", f"-DTAILCALLD_TS_COMPAT={TS_COMPAT:#x}"]
    return flags


def check_declared_maps(declared: list[tuple[str, tuple[int, int, int, int]]], maps: Mapping[str, int]) -> None:
    """Raise ObjectError unless the object declares each map we hand it as its _MapSpec says:
    libbpf takes a reused map as it is, so a struct changed on one side only would go unseen."""
    specs = {spec.pin: spec.shape for spec in ALL_MAPS if spec.pin in maps}
    found = dict(declared)  # one it declares beyond these would be created unpinned: refused too
    if found != specs:
        raise ObjectError(f"{SOURCE} declares its maps as {found}, but the pinned maps are {specs} "
                          "(tailcalld/dispatcher.py's _MapSpecs)")


def _load(data: bytes, build: _Build) -> int:
    """Load the dispatcher of the object ``data`` on its pinned maps (by fd); its program fd."""
    maps = dict(build.maps)
    # The exit dispatcher reads the enter one's compat table and writes its call map.
    shared = [CALL, STAGING] + ([COMPAT_SLOTS] if build.compat else [])
    borrowed = {spec.pin: _open_or_create_map(build.pin_dir, spec) for spec in shared if spec.pin not in maps}
    maps |= borrowed
    obj = BpfObject(data)
    try:
        check_declared_maps([(m.name, (m.type, m.key_size, m.value_size, m.max_entries)) for m in obj.maps()], maps)
        for name, fd in maps.items():
            obj.reuse_map(name, fd)
        # libbpf closes its own fd with the object; the loaded program holds its maps.
        return os.dup(obj.load_only(dispatcher_function(build.hook)))
    finally:
        obj.close()
        for fd in borrowed.values():
            os.close(fd)


async def _load_and_attach(build: _Build, compiler: Compiler, link_pin: str) -> _Attached:
    """Build, load and attach this version's dispatcher; pin its link at ``link_pin`` and its
    program at NEW_PROG_PIN (in its own folder), for the caller to rename into place."""
    own_dir = build.folder
    data = await compiler.build_own_object(SOURCE, dispatcher_cflags(build.compat, build.hook))
    prog_fd = _load(data, build)
    try:
        bpfsys.obj_pin(prog_fd, str(own_dir / NEW_PROG_PIN))
        try:
            link_fd = bpfsys.raw_tracepoint_open(build.hook.tracepoint, prog_fd)
        except BaseException:
            (own_dir / NEW_PROG_PIN).unlink()
            raise
    except BaseException:
        os.close(prog_fd)
        raise
    attached = _Attached(link_fd, prog_fd)
    pin = own_dir / link_pin
    try:
        bpfsys.obj_pin(link_fd, str(pin))
    except OSError as exc:
        attached.close()  # detaches: nothing half-made stays behind
        (own_dir / NEW_PROG_PIN).unlink()
        if exc.errno == errno.EEXIST:
            raise PinConflict(f"{pin} appeared while loading", {"path": str(pin)}) from None
        raise
    return attached


def _remove_dispatcher_pins(folder: Path) -> list[str]:
    removed = []
    for name in (*DISPATCHER_PINS, *(spec.pin for spec in ALL_MAPS), *LEGACY_PINS, *EVENT_PINS):
        path = folder / name
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def remove_pins(pin_dir: Path) -> list[str]:
    """Unpin everything tailcalld made under ``pin_dir``, the links first (that detaches a
    dispatcher once no fd holds it), then the programs, the maps, the handlers' pinned maps
    and programs, then the folders if they are empty.  Both unload-all and ``--purge`` come
    here."""
    exit_dir = EXIT.folder(pin_dir)
    removed = _remove_dispatcher_pins(exit_dir)
    with contextlib.suppress(OSError):
        exit_dir.rmdir()
    removed += _remove_dispatcher_pins(pin_dir)
    removed += remove_handler_pins(pin_dir / HANDLERS_PINS)
    removed += remove_handler_pins(pin_dir / SCOPE_DIR)  # the cgroup guards and their maps
    removed += remove_handler_pins(pin_dir / CHAIN_DIR)  # the chains' runners and their maps
    with contextlib.suppress(OSError):
        pin_dir.rmdir()
    return removed
