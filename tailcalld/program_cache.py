"""The compile cache: what compiling a handler produced (products.py), kept on disk so that the
same handler loads again without a compile: after a restart or a reboot, or on a re-attach.

An entry is found by a key made of everything the product depends on: the handler (source,
local headers, dialect, compiler flags, function for bcc, event tag), tailcalld's version and
its BPF headers, and the kernel (release, build, and a hash of its BTF).  A kernel update or a
new tailcalld therefore finds no entry, and compiles.

Every entry carries a SHA-256 of its contents: one that does not match (a torn write, a bad
disk, a hand edit) is removed and never loaded.  One that matches but no longer loads (the
verifier refuses it) is dropped by the compiler, which then compiles.  The cache is bounded:
past ``max_bytes`` the entries used longest ago go first.  The cache is an optimisation only: a
full or read-only disk costs compiles, never an attach.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .dialects import kernel_btf_sha256

logger = logging.getLogger("tailcalld")

FORMAT = 1
SUFFIX = ".entry"
# Once past the bound, entries are removed down to this share of it: one eviction makes room
# for several entries, not one at a time.
EVICT_TO = 0.9


@dataclass(frozen=True)
class Entry:
    product: dict[str, Any]  # products.py: {"kind": "elf" | "bcc", ...}
    function: str  # the function the compile loaded
    log: str  # what the compile said (warnings): said again at each load from the entry


class ProgramCache:
    def __init__(self, root: Path, max_bytes: Callable[[], int]) -> None:
        self.root = root
        self._max_bytes = max_bytes  # live: compile_cache_bytes; 0 turns the cache off
        self._write_failed = False  # said once, not at every compile

    @property
    def enabled(self) -> bool:
        return self._max_bytes() > 0

    @cached_property
    def identity(self) -> dict[str, str]:
        """What every product depends on besides the handler: tailcalld and the running kernel."""
        bpf = resources.files("tailcalld.bpf")
        headers = hashlib.sha256()
        for item in sorted(bpf.iterdir(), key=lambda i: i.name):
            if item.name.endswith(".h"):
                headers.update(item.name.encode() + b"\0" + item.read_bytes())
        try:
            btf = kernel_btf_sha256()
        except OSError:
            btf = ""  # bcc compiles against the headers of the release alone
        uname = platform.uname()
        return {"tailcalld": __version__, "bpf_headers": headers.hexdigest(), "release": uname.release,
                "build": uname.version, "machine": uname.machine, "btf": btf}

    def key(self, handler: Mapping[str, object]) -> str:
        text = json.dumps({"format": FORMAT, "handler": handler, "identity": self.identity}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str) -> Entry | None:
        """The entry of ``key``, checked; None when there is none or it is corrupt (removed)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("compile cache: cannot read %s (%s); the handler is compiled", path, exc.strerror)
            return None
        problem = _problem(raw, key)
        if problem is not None:
            self.drop(key, f"it is corrupt ({problem})")
            return None
        body = json.loads(json.loads(raw)["body"])
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: evicted last
        return Entry(body["product"], body["function"], body["log"])

    def put(self, key: str, entry: Entry) -> None:
        """Keep ``entry``; a disk that refuses is said once and otherwise ignored."""
        if not self.enabled:
            return
        body = json.dumps({"product": entry.product, "function": entry.function, "log": entry.log}, sort_keys=True)
        data = json.dumps({"format": FORMAT, "key": key, "sha256": hashlib.sha256(body.encode()).hexdigest(),
                           "body": body}).encode()
        if len(data) > self._max_bytes():
            return
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            if not self._write_failed:
                logger.warning("compile cache: cannot write to %s (%s); handlers are compiled at each load until "
                               "it can", self.root, exc.strerror or exc)
            self._write_failed = True
            return
        self._write_failed = False
        self._evict()

    def drop(self, key: str, why: str) -> None:
        logger.warning("compile cache: entry %s is dropped: %s; the handler is compiled anew", key[:16], why,
                       extra={"TAILCALLD_CACHE": "dropped"})
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("compile cache: cannot remove %s: %s", self._path(key), exc.strerror)

    def entries(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.root) as found:
                return [e for e in found if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)]
        except OSError:
            return []

    def _evict(self) -> None:
        """Past the bound, remove the entries used longest ago (a hit renews an entry's mtime)."""
        limit = self._max_bytes()
        sized = []
        for e in self.entries():
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            sized.append((st.st_mtime_ns, st.st_size, e.path))
        total = sum(size for _, size, _ in sized)
        if total <= limit:
            return
        for _, size, path in sorted(sized):
            if total <= limit * EVICT_TO:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            total -= size


def _problem(raw: bytes, key: str) -> str | None:
    """What is wrong with an entry's bytes, or None when it is whole and is ``key``'s."""
    try:
        outer = json.loads(raw)
        body = outer["body"]
        if outer.get("format") != FORMAT:
            return f"format {outer.get('format')!r}"
        if outer.get("key") != key:
            return "it names another key"
        if hashlib.sha256(body.encode()).hexdigest() != outer.get("sha256"):
            return "its SHA-256 does not match"
        inner = json.loads(body)
        if not (isinstance(inner.get("product"), dict) and isinstance(inner.get("function"), str)
                and isinstance(inner.get("log"), str)):
            return "fields missing"
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return f"unreadable: {exc}"
    return None
