"""The daemon's ``desired_slots``: an apply file it makes the slots match, by itself.

It reconciles to the file at start (after the restore, before READY=1), on every reload
(SIGHUP), and when the file, or a handler file or header it names, changes: each upkeep
(miss_log_interval) stats the files read last time, and only when a stat differs reads them
again and applies them if their contents differ from what was applied last.  A Kubernetes
ConfigMap volume swaps a symbolic link (..data) to update its files: the stat of the path,
which follows it, sees the new file.

The daemon runs as root and compiles what it reads, so it reads these files only from folders
root alone can change (paths.open_trusted_dir: the folder and every ancestor owned by root and
writable by nobody else), and only files owned by root and writable by nobody else.  A link
is followed (the ConfigMap's), and both the folder that holds the link and the folder of the
file it leads to are checked.

A file that cannot be read, parsed or built changes nothing: the error is logged, the daemon
serves on, and the next change of the files (or a reload) tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import ValidationError

from .config import LiveSettings
from .desired import DesiredFileError, read_request
from .errors import ApplyIncomplete, TailcalldError, UnsafePath
from .paths import open_trusted_dir
from .protocol import ApplyRequest, ApplyResult

logger = logging.getLogger("tailcalld")
ROLE = "desired_slots"

Signature = tuple[tuple[str, tuple[int, ...] | None], ...]


def trusted_read(path: Path, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of ``path``, which must be a regular file owned by root (or
    us) and writable by nobody else, in folders root alone can change.  Raises UnsafePath or OSError."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    if real != path:  # the folder of the link must be trusted too: whoever can change it, chooses the file
        open_trusted_dir(Path(os.path.realpath(path.parent)), ROLE).close()
    with open_trusted_dir(real.parent, ROLE) as folder:
        fd = os.open(real.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder.fd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{ROLE}: {path} is not a regular file", {"path": str(path), "role": ROLE})
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                raise UnsafePath(f"unsafe {ROLE}: {path} is owned by uid {st.st_uid} with mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}; tailcalld only reads files that root alone can "
                                 "change (owned by root, not writable by group or others)",
                                 {"path": str(path), "role": ROLE})
            return f.read(limit + 1)


def signature(paths: list[Path]) -> Signature:
    """What a change of these files changes: each one's stat (through links), or None if gone."""
    found: list[tuple[str, tuple[int, ...] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append((str(path), None))
            continue
        found.append((str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    return tuple(found)


class DesiredSlots:
    """Reconciles the slots to the ``desired_slots`` file; ``run`` applies a request (commands.run_apply)."""

    def __init__(self, settings: LiveSettings, run: Callable[[ApplyRequest], Awaitable[ApplyResult]]) -> None:
        self._settings = settings
        self._run = run
        self._path: Path | None = None  # the file the last reconcile read
        self._used: list[Path] = []  # every file it read
        self._seen: Signature = ()
        self._applied: str | None = None  # the hash of the request last applied
        self._one_at_a_time = asyncio.Lock()

    async def reconcile(self, why: str, only_if_changed: bool = False) -> ApplyResult | None:
        """Read the file and apply it; None when there is none, or nothing was applied (logged)."""
        path = self._settings.current.desired_slots
        async with self._one_at_a_time:
            if path is None:
                self._path, self._used, self._seen = None, [], ()
                return None
            if path != self._path:
                self._path, self._used, self._applied = path, [path], None
            tried: list[Path] = []
            try:
                fields, used = await asyncio.to_thread(read_request, path, trusted_read, str(path), tried)
                request = ApplyRequest.model_validate({"command": "apply", **fields})
            except (DesiredFileError, TailcalldError, ValidationError) as err:
                # Retried once one of the files it read, or tried to (one missing), changes.
                self._used = list(dict.fromkeys(tried))
                self._seen = await asyncio.to_thread(signature, self._used)
                logger.error("%s %s (%s): nothing was changed: %s", ROLE, path, why, _reason(err),
                             extra={"TAILCALLD_DESIRED": str(path)})
                return None
            self._used = used
            self._seen = await asyncio.to_thread(signature, used)
            digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
            if only_if_changed and digest == self._applied:
                return None
            self._applied = digest
            return await self._apply(request, path, why)

    async def _apply(self, request: ApplyRequest, path: Path, why: str) -> ApplyResult | None:
        try:
            result = await self._run(request)
        except TailcalldError as err:
            # The compiler's or the verifier's words are in the details: the journal gets them too.
            log = err.details.get("log") if isinstance(err.details, dict) else None
            logger.error("%s %s (%s): %s%s%s", ROLE, path, why,
                         "" if isinstance(err, ApplyIncomplete) else "nothing was changed: ", err.message,
                         f"\n{log.rstrip()}" if isinstance(log, str) and log.strip() else "",
                         extra={"TAILCALLD_DESIRED": str(path)})
            return None
        changed = [c for c in result.changes if c.action != "unchanged"]
        logger.info("%s %s (%s): %s", ROLE, path, why,
                    f"{len(changed)} slot(s) changed" if changed else "the slots match it already",
                    extra={"TAILCALLD_DESIRED": str(path)})
        return result

    async def check(self) -> None:
        """At each upkeep: reconcile if the file's path or any file read last time changed."""
        path = self._settings.current.desired_slots
        if path is None and self._path is None:
            return
        if path != self._path:
            await self.reconcile("desired_slots changed")
            return
        if await asyncio.to_thread(signature, self._used) != self._seen:
            await self.reconcile("file changed", only_if_changed=True)


def _reason(err: Exception) -> str:
    if isinstance(err, TailcalldError):
        return err.message
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return str(err)

