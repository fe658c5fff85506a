"""bpffs pin folders: the one-daemon lock on pin_dir, the pins handlers leave (maps pinned by
name, programs by id), and telling what a pin holds.  The dispatcher's own pins are
``dispatcher.py``'s.

    pin_dir/handlers/<sha256>/   the maps a libbpf handler pins by name (LIBBPF_PIN_BY_NAME)
    pin_dir/handlers/progs/<id>  each program a slot runs, enter and exit slots alike
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from . import bpfsys
from .errors import KernelError, NoBpffs, PinConflict
from .paths import open_trusted_dir

logger = logging.getLogger("tailcalld")

BPF_FS_MAGIC = 0xCAFE4A11
# Maps a libbpf handler pins by name (LIBBPF_PIN_BY_NAME) go to pin_dir/handlers/<sha256>/,
# one folder per handler source, removed when the handler leaves its last slot.
HANDLERS_PINS = "handlers"
# pin_dir/handlers/progs/<id>: each program a slot runs, so that a restart can read its name
# and hold it by fd (opening a program by id needs CAP_SYS_ADMIN).
PROGRAM_PINS = "progs"


def fs_type(path: Path) -> int:
    # os.statvfs has no f_type; struct statfs starts with it (a long) on Linux.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(str(path).encode(), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_bpffs(pin_dir: Path) -> None:
    parent = pin_dir.parent
    while not parent.exists():
        parent = parent.parent
    if fs_type(parent) != BPF_FS_MAGIC:
        raise NoBpffs(
            f"{parent} is not on a BPF filesystem, so {pin_dir} cannot hold pins; "
            "mount it first: mount -t bpf bpf /sys/fs/bpf")


class PinDirLock:
    """One daemon per pin_dir: the folder checked (``paths``: root's alone, no links) and an
    exclusive flock on it (bpffs supports it).  ``create``: make a missing folder (a start);
    otherwise a missing one raises UnsafePath (a purge checks that it exists first)."""

    def __init__(self, pin_dir: Path, create: bool = True) -> None:
        if create:
            check_bpffs(pin_dir)
        self._dir = open_trusted_dir(pin_dir, "pin_dir", create_mode=0o700 if create else None)
        try:
            self._dir.lock(str(pin_dir))
        except BaseException:
            self._dir.close()
            raise

    def holds(self, pin_dir: Path) -> bool:
        """Whether the locked folder is still the one at ``pin_dir`` (not removed, not replaced)."""
        try:
            st = os.stat(pin_dir)
        except FileNotFoundError:
            return False
        held = os.fstat(self._dir.fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        self._dir.close()  # idempotent: the dispatcher and the daemon may both release it


def object_id(fd: int) -> tuple[str, int]:
    """What kind of object ``fd`` is, and its id (map, program and link ids are separate
    number spaces)."""
    kind = bpfsys.fd_kind(fd)
    if kind == "link":
        return kind, bpfsys.link_info(fd).id
    if kind == "prog":
        return kind, bpfsys.prog_info(fd).id
    return kind, bpfsys.map_info(fd).id if kind == "map" else 0


def check_pinned_is(path: Path, fd: int) -> None:
    """Raise PinConflict unless the pin at ``path`` is the object we hold as ``fd``."""
    try:
        pinned = bpfsys.obj_get(str(path))
    except OSError as exc:
        raise PinConflict(f"{path} is not a BPF object tailcalld can open ({exc})", {"path": str(path)}) from None
    try:
        same = object_id(pinned) == object_id(fd)
    except OSError:
        same = False
    finally:
        os.close(pinned)
    if not same:
        raise PinConflict(f"{path} was replaced by another object while tailcalld runs; it is left alone",
                          {"path": str(path)})


def open_or_create_map(path: Path, map_type: int, name: str, key_size: int, value_size: int, entries: int,
                       any_entries: bool = False) -> int:
    """Our fd on the map pinned at ``path``, made and pinned first if there is none.  A pin of
    another shape (``any_entries``: entries aside) was not made by this tailcalld: refused
    with PinConflict, and left alone."""
    if not path.exists():
        fd = bpfsys.map_create(map_type, name, key_size, value_size, entries)
        try:
            bpfsys.obj_pin(fd, str(path))
        except OSError:
            os.close(fd)
            raise
        return fd
    try:
        fd = bpfsys.obj_get(str(path))
    except OSError as exc:
        raise PinConflict(f"{path} exists but is not a BPF map tailcalld can open ({exc}); "
                          "remove it or choose another pin_dir", {"path": str(path)}) from None
    if bpfsys.fd_kind(fd) != "map":
        os.close(fd)
        raise PinConflict(f"{path} is not a BPF map; it was not created by this tailcalld, so it is left alone",
                          {"path": str(path)})
    info = bpfsys.map_info(fd)
    have = (info.type, info.key_size, info.value_size, info.max_entries)
    expected = (map_type, key_size, value_size, info.max_entries if any_entries else entries)
    if have != expected:
        os.close(fd)
        raise PinConflict(
            f"{path} is not tailcalld's {path.name}: map type/key/value/entries are {have}, expected {expected}; "
            "it was not created by this tailcalld, so it is left alone",
            {"path": str(path), "found": have, "expected": expected})
    return fd


def pin_again(folder: Path, held: Mapping[str, int]) -> list[str]:
    """Pin each object of ``held`` (pin name -> our fd) whose pin was removed behind our back;
    a pin still there must be the object we hold (PinConflict otherwise; KernelError when a
    pin cannot be made).  The pins made."""
    missing = [name for name in held if not (folder / name).exists()]
    for name, fd in held.items():
        if name not in missing:
            check_pinned_is(folder / name, fd)
    for name in missing:
        try:
            bpfsys.obj_pin(held[name], str(folder / name))
        except OSError as exc:
            raise KernelError(f"could not pin {folder / name} again: {exc.strerror}") from None
    return [str(folder / name) for name in missing]


def handler_pin_dir(pin_dir: Path, sha256: str) -> Path:
    return pin_dir / HANDLERS_PINS / sha256


def program_pin_dir(pin_dir: Path) -> Path:
    return pin_dir / HANDLERS_PINS / PROGRAM_PINS


def open_program_pin(pin_dir: Path, prog_id: int) -> int | None:
    """An fd of the handler program ``prog_id`` from its pin, None when it has none (attached by
    an older tailcalld, or by someone else) or the pin holds anything but that program."""
    try:
        fd = bpfsys.obj_get(str(program_pin_dir(pin_dir) / str(prog_id)))
    except OSError:
        return None
    try:
        if bpfsys.fd_kind(fd) == "prog" and bpfsys.prog_info(fd).id == prog_id:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def keep_program_pins(pin_dir: Path, progs: Mapping[int, int | None]) -> None:
    """Make pin_dir/handlers/progs/ hold exactly the programs the slots run: ``progs`` maps each
    program id to an fd of it (None: we hold none; its pin, if any, is kept).  A pin keeps its
    program loaded, so one no slot runs any more is removed.  Raises OSError."""
    folder = program_pin_dir(pin_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pinned = set(os.listdir(folder))
    for name in pinned - {str(prog_id) for prog_id in progs}:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for prog_id, fd in progs.items():
        if fd is not None and str(prog_id) not in pinned:
            bpfsys.obj_pin(fd, str(folder / str(prog_id)))


def remove_handler_pins(folder: Path) -> list[str]:
    """Unpin every map beneath ``folder`` (a bpffs folder holds pins and folders only); returns
    the pins removed."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
                removed.append(str(path))
    with contextlib.suppress(FileNotFoundError):
        folder.rmdir()
    return sorted(removed)


def pinned_programs(folder: Path, name: re.Pattern[str], what: str) -> dict[int, tuple[int, int, re.Match[str]]]:
    """The programs a previous run pinned in ``folder`` as ``<slot key>``, whose kernel name
    matches ``name`` with the same key as its first group: slot key -> (our fd, program id,
    the match).  Anything else there is logged as not ``what`` and left alone."""
    found: dict[int, tuple[int, int, re.Match[str]]] = {}
    for pin in os.listdir(folder):
        path = folder / pin
        try:
            fd = bpfsys.obj_get(str(path))
        except OSError:
            continue
        try:
            info = bpfsys.prog_info(fd) if bpfsys.fd_kind(fd) == "prog" else None
        except OSError:
            info = None
        match = name.fullmatch(info.name) if info is not None else None
        if info is None or match is None or match[1] != pin:
            os.close(fd)
            logger.warning("%s is not %s; it is left alone", path, what)
            continue
        found[int(pin)] = (fd, info.id, match)
    return found

