"""vmlinux.h precompiled once per kernel, so that a libbpf compile does not parse it again.

vmlinux.h is ~3 MB of C; clang spends ~0.7 s of a small handler's ~0.75 s compile parsing
it.  Parsed once into a precompiled header (PCH) kept beside the generated vmlinux.h, a
compile reads the parsed form instead and takes ~0.05 s, and the object it produces is the
same, byte for byte (tests/test_pch.py).

A PCH is made by clang in a process group of its own, bounded by compile_timeout, under a
temporary name, then renamed into place, and after it its record (``*.pch.json``): its sha256
and what it was made from (the key: clang's version, the flags, vmlinux.h's sha256, size and
mtime).  One is used only when all of these hold, checked before each compile:
- it and its folder are ours and writable by nobody else;
- its record names the key of this compile (so this clang, these flags) and vmlinux.h as it is;
- its content has the sha256 of its record (hashed once per file identity: device, inode,
  size, mtime, ctime: any write to it changes the ctime).
Otherwise it is not used, and a new one is made in the background: the compile goes on
without one.  A PCH that clang refuses all the same is reported by the worker (PCH_REFUSED:
it compiles again without) and dropped here, and a new one made.

A PCH changes what clang sees only when vmlinux.h is what a source includes first, and the
user's -D macros are not there (they could change how vmlinux.h reads): ``usable_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import children
from .dialects import pch_command
from .errors import ToolFailed

logger = logging.getLogger("tailcalld")

HEADER = "vmlinux.h"
# The source's first directive, once comments and blank lines are skipped.
_LEADING = re.compile(r'\A(?:\s+|//[^\n]*|/\*.*?\*/)*#[ \t]*include[ \t]*[<"]vmlinux\.h[>"][ \t]*(?://[^\n]*)?\n',
                      re.DOTALL)


def usable_for(source: str, defines: Mapping[str, str] | tuple[tuple[str, str], ...],
               headers: Mapping[str, str]) -> bool:
    """Whether a compile of ``source`` may read the PCH instead of vmlinux.h: only when the
    source includes vmlinux.h before anything else (the PCH stands for exactly that), with no
    -D of the user's (a macro could change how vmlinux.h reads, and clang lets a PCH stand
    for a header read with other macros) and no local header of that name (which the source
    would include instead)."""
    return not defines and HEADER not in headers and _LEADING.match(source) is not None


def _is_private(st: os.stat_result) -> bool:
    """Ours, and nobody else may write it."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Paths:
    pch: Path
    record: Path


class Precompiled:
    """The PCHs of one daemon's vmlinux.h folders.  ``ready`` answers at once: the PCH, or
    None while one is made in the background.  ``timeout`` gives compile_timeout (live)."""

    def __init__(self, timeout: Callable[[], float]) -> None:
        self._timeout = timeout
        self._clang: str | None = None  # `clang --version`, asked once
        self._keys: dict[Path, tuple[str, dict[str, object]]] = {}  # per vmlinux.h folder
        self._verified: dict[Path, tuple[int, ...]] = {}  # PCH -> identity its sha256 was checked at
        self._builds: dict[Path, asyncio.Task[Path | None]] = {}

    async def ready(self, folder: Path, make: bool = True) -> Path | None:
        """The PCH of ``folder``'s vmlinux.h when there is a trusted one; else None, and (when
        ``make``) one is being made: the compile goes on without it."""
        try:
            key, made_from = await self._key(folder)
            paths = self._paths(folder, key)
            if await asyncio.to_thread(self._trusted, folder, paths, key, made_from):
                return paths.pch
        except (OSError, ValueError, ToolFailed) as exc:  # ValueError: a record that is not JSON
            logger.debug("no precompiled vmlinux.h in %s: %s", folder, exc)
        if make:
            self.start_build(folder)
        return None

    def start_build(self, folder: Path) -> asyncio.Task[Path | None]:
        """Make the PCH in the background, unless that is under way already."""
        task = self._builds.get(folder)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self.build(folder))
            self._builds[folder] = task
        return task

    async def build(self, folder: Path) -> Path | None:
        """Make ``folder``'s PCH now; None (and a warning) when that fails: compiles go on
        without one."""
        try:
            key, made_from = await self._key(folder)
            paths = self._paths(folder, key)
            await self._make(folder, paths, key, made_from)
        except (OSError, ToolFailed) as exc:
            logger.warning("cannot precompile %s (libbpf compiles stay slower): %s", folder / HEADER,
                           getattr(exc, "message", None) or exc)
            return None
        return paths.pch

    def discard(self, pch: Path) -> None:
        """Drop a PCH clang refused; the next compile starts a new one."""
        self._verified.pop(pch, None)
        for path in (pch, pch.with_name(pch.name + ".json")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        logger.warning("clang refused the precompiled %s; it is made again", pch)

    def close(self) -> None:
        """Stop a build under way (its clang is killed with its group as the task ends)."""
        for task in self._builds.values():
            task.cancel()
        self._builds.clear()

    async def aclose(self) -> None:
        """``close``, and wait for the build to have ended (its clang killed and reaped)."""
        builds = list(self._builds.values())
        self.close()
        await asyncio.gather(*builds, return_exceptions=True)

    async def _key(self, folder: Path) -> tuple[str, dict[str, object]]:
        """What a PCH of ``folder`` must have been made from: clang (its version), the flags
        and vmlinux.h (its sha256, size and mtime: a rewritten one is another header)."""
        header = folder / HEADER
        st = header.stat()
        known = self._keys.get(folder)
        if known is not None and known[1]["header_size"] == st.st_size and known[1]["header_mtime_ns"] == st.st_mtime_ns:
            return known
        if self._clang is None:
            done = await children.run(["clang", "--version"], self._timeout())
            self._clang = done.stdout.decode(errors="replace")
        made_from: dict[str, object] = {
            "clang": self._clang, "flags": pch_command(folder, "PCH")[:-1],
            "header_sha256": await asyncio.to_thread(file_sha256, header),
            "header_size": st.st_size, "header_mtime_ns": st.st_mtime_ns}
        key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
        self._keys[folder] = (key, made_from)
        return key, made_from

    @staticmethod
    def _paths(folder: Path, key: str) -> Paths:
        pch = folder / f"{HEADER}.{key[:16]}.pch"
        return Paths(pch, pch.with_name(pch.name + ".json"))

    def _trusted(self, folder: Path, paths: Paths, key: str, made_from: dict[str, object]) -> bool:
        """Whether ``paths.pch`` may be used (see the module's doc); reads and hashes files."""
        if not _is_private(folder.stat()):
            return False
        st = paths.pch.lstat()
        if not stat.S_ISREG(st.st_mode) or not _is_private(st) or not _is_private(paths.record.lstat()):
            return False
        record = json.loads(paths.record.read_text())
        if not isinstance(record, dict) or record.get("key") != key or record.get("made_from") != made_from:
            return False
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._verified.get(paths.pch) == identity:
            return True
        if file_sha256(paths.pch) != record.get("sha256"):
            return False
        self._verified[paths.pch] = identity
        return True

    async def _make(self, folder: Path, paths: Paths, key: str, made_from: dict[str, object]) -> None:
        if await asyncio.to_thread(self._trusted_quietly, folder, paths, key, made_from):
            return  # made meanwhile (a second compile asked while the first build ran)
        for left in folder.glob(f".{HEADER}.*.tmp*"):  # a build a killed daemon left (one builds per folder)
            with contextlib.suppress(FileNotFoundError):
                left.unlink()
        tmp = folder / f".{paths.pch.name}.{os.getpid()}.tmp"
        try:
            done = await children.run(pch_command(folder, str(tmp)), self._timeout(), cwd=folder)
            if done.returncode != 0:
                raise ToolFailed(f"clang exited with status {done.returncode}: "
                                 f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
            await asyncio.to_thread(self._install, folder, paths, tmp, key, made_from)
        finally:
            for left in (tmp, tmp.with_name(tmp.name + ".json")):
                with contextlib.suppress(FileNotFoundError):
                    left.unlink()  # only left when something failed

    def _trusted_quietly(self, folder: Path, paths: Paths, key: str, made_from: dict[str, object]) -> bool:
        try:
            return self._trusted(folder, paths, key, made_from)
        except (OSError, ValueError):
            return False

    def _install(self, folder: Path, paths: Paths, tmp: Path, key: str, made_from: dict[str, object]) -> None:
        """The PCH into place, then its record (a reader that sees the new PCH with the old
        record finds the sha256 wrong and does not use it); other PCHs of the folder (another
        clang's, other flags') go."""
        os.chmod(tmp, 0o600)
        record = {"key": key, "sha256": file_sha256(tmp), "made_from": made_from}
        tmp_record = tmp.with_name(tmp.name + ".json")
        fd = os.open(tmp_record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, paths.pch)
        os.replace(tmp_record, paths.record)
        for old in folder.glob(f"{HEADER}.*.pch*"):
            if old not in (paths.pch, paths.record):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        self._verified.pop(paths.pch, None)
