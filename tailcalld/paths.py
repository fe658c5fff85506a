"""The folders tailcalld trusts, checked: ``state_dir``, the socket's folder and ``pin_dir``.

tailcalld runs as root and acts on what these folders hold: it compiles and loads the sources
saved in ``state_dir``, hands handler sources to whatever answers on the socket, chowns the
socket file and deletes files it finds there.  So each folder must be as trustworthy as root
itself.  It is checked the way sshd's StrictModes checks a home folder: the folder and every
ancestor up to ``/`` must be a real folder (not a symbolic link), owned by root (or by the
daemon's own uid), and writable by nobody else.

One exception, for ancestors only: a root-owned *sticky* folder such as ``/tmp`` or
``/sys/fs/bpf`` (mode 1777).  The sticky bit keeps others from renaming or removing an entry
they do not own, and the entry below it must pass the owner check itself, so nobody but its
owner can swap it.

The walk opens each component with ``O_NOFOLLOW`` relative to its parent's fd and checks the
folder it holds (``fstat``), not a name that could change between a check and a use.  The
final folder's fd is kept (``TrustedDir``): every later access goes through it (``openat``),
and an exclusive ``flock`` on it is how one daemon owns the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
from pathlib import Path

from .errors import AlreadyRunning, UnsafePath

_HOLD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # flock and fsync need a real fd
_PASS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # an ancestor: only walked through


class TrustedDir:
    """A checked folder, held open: ``fd`` is the folder itself, whatever happens to its name."""

    def __init__(self, path: Path, fd: int, role: str) -> None:
        self.path = path
        self.fd = fd
        self.role = role

    def lock(self, what: str) -> None:
        """Own the folder: an exclusive flock on its fd, held until ``close``.  Raises AlreadyRunning."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another tailcalld already owns {what}", {"path": str(self.path)}) from None

    def subdir(self, name: str, create_mode: int | None) -> TrustedDir:
        """A folder inside this one, checked the same way."""
        fd = _step(os.dup(self.fd), name, self.path / name, self.role, create_mode, last=True)
        return TrustedDir(self.path / name, fd, self.role)

    def close(self) -> None:
        """Idempotent: a closed fd number may already belong to someone else."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TrustedDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trusted_dir(path: Path, role: str, create_mode: int | None = None) -> TrustedDir:
    """Walk ``path`` from ``/`` without following links, check every step, and hold the folder.
    Missing folders are created with ``create_mode`` (None: a missing one is refused).
    ``role`` names the setting in messages (``state_dir``, ``socket``, ``pin_dir``).
    Raises UnsafePath naming the path and what is wrong with it."""
    if not path.is_absolute():
        raise UnsafePath(f"{role} {path} is not an absolute path", {"path": str(path), "role": role})
    parts = path.parts[1:]
    if ".." in parts:
        raise UnsafePath(f"{role} {path} contains '..'; give the real path", {"path": str(path), "role": role})
    fd = os.open("/", _HOLD if not parts else _PASS)
    here = Path("/")
    try:
        _check(here, os.fstat(fd), role, last=not parts)
        for i, name in enumerate(parts):
            here = here / name
            fd = _step(fd, name, here, role, create_mode, last=i == len(parts) - 1)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return TrustedDir(path, fd, role)


def _step(parent: int, name: str, here: Path, role: str, create_mode: int | None, last: bool) -> int:
    """Go from ``parent`` (an fd this call closes) down to ``name``; return the checked fd."""
    try:
        try:
            found = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            if create_mode is None:
                raise UnsafePath(f"{role}: {here} does not exist", {"path": str(here), "role": role}) from None
            with contextlib.suppress(FileExistsError):  # someone else made it first: checked below
                os.mkdir(name, create_mode, dir_fd=parent)
            found = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(found.st_mode):
            raise _refusal(role, here, f"is {_kind(found.st_mode)}, not a folder"
                           + ("; tailcalld does not follow links here" if stat.S_ISLNK(found.st_mode) else ""))
        try:
            fd = os.open(name, _HOLD if last else _PASS, dir_fd=parent)
        except OSError as exc:  # swapped for a link or a file since the stat above
            raise _refusal(role, here, f"changed while it was checked ({exc.strerror})") from None
    finally:
        os.close(parent)
    try:
        _check(here, os.fstat(fd), role, last)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(here: Path, st: os.stat_result, role: str, last: bool) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise _refusal(role, here, f"is owned by {_user(st.st_uid)}, not root")
    if st.st_mode & 0o022:
        sticky_ancestor = not last and st.st_mode & stat.S_ISVTX and st.st_uid == 0
        if not sticky_ancestor:
            who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
            raise _refusal(role, here, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")


def _refusal(role: str, here: Path, what: str) -> UnsafePath:
    return UnsafePath(f"unsafe {role}: {here} {what}; tailcalld only uses folders that root alone can change "
                      "(fix the owner and mode, or choose another path)", {"path": str(here), "role": role})


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a folder")


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
