"""The local headers of a handler source, found by tailcallctl and sent with it.

Public handlers keep their own headers next to the file (`#include "syscount.h"`), and the
daemon, which gets the source's text and not its path, cannot read them.  So tailcallctl
sends them: each file a source (or a header it sends) includes in quotes that it finds next
to the source, under the name the source includes it by.  The path rules are those of the
daemon (compiler.check_includes): relative, without '..'; an absolute or '..' include is
not followed (the daemon refuses the source for it, with a message that says so).  A quoted
include that is not found there is not sent either: it may be a kernel or BPF header
(`#include "bpf_helpers.h"`), which the daemon has.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from pathlib import Path

from .dialects import header_name_problem

_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"\n]+)"', re.MULTILINE)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
# The daemon makes these itself, for the running kernel: a copy made for another kernel (as
# libbpf-tools keep next to their sources) would be wrong here, and it is megabytes.
DAEMON_PROVIDES = frozenset({"vmlinux.h"})


class HeaderError(Exception):
    """A local header that cannot be sent (unreadable, not UTF-8, over the protocol's bounds)."""


def quoted_includes(text: str) -> list[str]:
    """The targets of the `#include "..."` lines of ``text``, outside comments."""
    return _QUOTED_INCLUDE.findall(_COMMENT.sub(" ", text.replace("\\\n", "")))


def _open_and_read(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit + 1)


def find_local_headers(source_file: Path, source: str, max_count: int, max_bytes: int,
                       read: Callable[[Path, int], bytes] = _open_and_read) -> dict[str, str]:
    """The local headers of ``source`` (the text of ``source_file``), recursively, by name.
    Raises HeaderError past ``max_count`` files or ``max_bytes`` bytes together.  ``read(path,
    limit)`` reads at most limit + 1 bytes of a header (the daemon reads only trusted files)."""
    root = source_file.parent
    found: dict[str, str] = {}
    size = 0
    pending = [("", source)]  # (the including file's folder, relative to root; its text)
    while pending:
        folder, text = pending.pop()
        for target in quoted_includes(text):
            name = _local_name(root, folder, target)
            if name is None or name in found:
                continue
            if len(found) == max_count:
                raise HeaderError(f"{source_file} includes more than {max_count} local headers; tailcalld "
                                  f"accepts at most {max_count}, and its max_headers may allow fewer")
            found[name] = _read(root / name, max_bytes - size, max_bytes, read)
            size += len(found[name].encode())
            pending.append((posixpath.dirname(name), found[name]))
    return found


def _local_name(root: Path, folder: str, target: str) -> str | None:
    """The name under which ``target``, included from a file in ``folder``, is found next to the
    source: beside the including file first, then in the source's own folder, as the compiler
    looks (the daemon puts that folder on the include path); None when it is not there."""
    if target.startswith("/") or ".." in target.split("/"):
        return None  # a path the daemon does not take; its own include check says why
    for base in dict.fromkeys((folder, "")):
        name = posixpath.normpath(posixpath.join(base, target))  # "./x.h" is x.h
        if header_name_problem(name) is not None or name in DAEMON_PROVIDES:
            return None
        if (root / name).is_file():
            return name
    return None


def _read(path: Path, budget: int, max_bytes: int, read: Callable[[Path, int], bytes]) -> str:
    """The header's text, if it fits in the ``budget`` left of ``max_bytes``."""
    try:
        data = read(path, budget)
    except OSError as exc:
        raise HeaderError(f"cannot read the local header {path}: {exc.strerror or exc}") from None
    if len(data) > budget:
        raise HeaderError(f"with {path}, the local headers take more than {max_bytes} bytes; tailcalld accepts "
                          "at most that many together, and its max_headers_bytes may allow fewer")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise HeaderError(f"the local header {path} is not UTF-8 text") from None
