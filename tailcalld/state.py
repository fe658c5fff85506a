"""Persisted desired state: which handler should sit in which slot, and where it came from.

    state_dir/state.json            {"version": 1, "slots": {"268": SlotRecord, ...}, "exit_slots": {...},
                                     "links": [SlotRecord with its priority, ...], "exit_links": [...]}
    state_dir/sources/<sha256>.c|.o each handler's source (or ELF object), by the handler's identity
                                    (Artifact.sha256: the source's hash when it has no local headers)
    state_dir/sources/<sha256>.h    each local header, content-addressed, named in SlotRecord.headers
    state_dir/sources/<sha256>.btf  its BTF as compiled (libbpf C): decodes the structs it emits

Every write is atomic (temp file, fsync, rename, fsync of the folder), and a source is
written before the state that names it, so a crash at any point leaves a readable state.
A state file that cannot be read is moved aside (never deleted) and reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .bpfsys import MapInfo
from .dialects import Artifact, Dialect, build_key
from .errors import StateUnwritable
from .paths import TrustedDir, open_trusted_dir

STATE_VERSION = 1
_ARTIFACT_NAME = re.compile(r"[0-9a-f]{64}\.(?:c|o|h|btf)")


class MapRecord(BaseModel):
    """A map of the handler's program, as the kernel had it when the program was loaded
    (bpfsys.MapInfo): kept so that `show` can name the maps of a program a restart adopted."""
    model_config = ConfigDict(extra="forbid")

    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


def map_records(maps: Iterable[MapInfo]) -> list[MapRecord]:
    return [MapRecord(id=m.id, name=m.name, type=m.type, key_size=m.key_size, value_size=m.value_size,
                      max_entries=m.max_entries) for m in maps]


class SlotRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slot: int
    function: str | None
    prog_id: int  # the program that implemented it when recorded; ids do not survive a reboot
    # None for a program found in the kernel with no record (adopted after the state was lost):
    # it keeps running, but cannot be rebuilt after a reboot.
    source_sha256: str | None
    dialect: Dialect = "bcc"
    filename: str | None
    attached_by_uid: int | None
    attached_at: datetime | None
    journal: bool = False  # its events go to the journal too (attach --journal)
    # The source's local headers: name as the source includes it -> the sha256 of its text.
    headers: dict[str, str] = {}
    # The loader's settings it was attached with (--set, -D), reapplied when it is rebuilt.
    variables: dict[str, str] = {}
    defines: dict[str, str] = {}
    # The maps its program uses (ids of this program's maps: they change when it is rebuilt).
    maps: list[MapRecord] = []
    # An attach --for/--until: when the slot goes back to ``previous`` (what it held before this
    # attach; None: nothing).  Kept in the state file, so a deadline outlives a stop or a reboot.
    expires_at: datetime | None = None
    previous: SlotRecord | None = None
    # attach --cgroup: the handler runs only for tasks in this cgroup v2 subtree (its path: a
    # cgroup made again under the same path, a restarted service, is followed).
    cgroup: str | None = None
    # attach --priority: one of several handlers of the slot, run in order, lowest first (chain.py).
    priority: int | None = None


def record_build_key(record: SlotRecord) -> str | None:
    """dialects.build_key of the handler a record names: what its kept BTF is named by."""
    return build_key(record.source_sha256, record.defines) if record.source_sha256 else None


class StateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    slots: dict[int, SlotRecord] = {}  # enter slots (raw_tracepoint/sys_enter), by syscall number
    exit_slots: dict[int, SlotRecord] = {}  # exit slots (raw_tracepoint/sys_exit), by syscall number
    # The handlers of chained slots (attach --priority), each with its slot (the syscall
    # number) and priority, in slot and priority order.
    links: list[SlotRecord] = []
    exit_links: list[SlotRecord] = []

    def records(self) -> list[SlotRecord]:
        """Every record, enter and exit slots alike, and those the slots go back to when an
        attach --for ends (their sources are kept too)."""
        found = []
        for top in [*self.slots.values(), *self.exit_slots.values(), *self.links, *self.exit_links]:
            record: SlotRecord | None = top
            while record is not None:
                found.append(record)
                record = record.previous
        return found


class LoadedState(BaseModel):
    """What load() found: the state, and whether it could be trusted."""

    state: StateFile
    found: bool  # False: no state file (first start) or unreadable
    problem: str | None = None  # why it was unreadable, and where it was moved


def _atomic_write(dir_fd: int, name: str, shown: Path, data: bytes) -> None:
    """Write ``name`` in the folder ``dir_fd`` whole or not at all.  Raises StateUnwritable (say,
    a full or read-only disk); the previous file is then untouched."""
    try:
        _replace(dir_fd, name, data)
    except OSError as exc:
        raise StateUnwritable(f"cannot write {shown}: {exc.strerror or exc}; nothing was changed",
                              {"path": str(shown)}) from None


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def _read(dir_fd: int, name: str) -> bytes:
    """A regular file of a trusted folder, never through a link."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{name} is not a regular file")
        return f.read()


class StateStore:
    """``state_dir`` and its ``sources``, checked (``paths``) and held open: every file is
    reached through the held folders (openat), so a link put in their place is never followed."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "state.json"
        self.sources = state_dir / "sources"
        self._dir: TrustedDir | None = None
        self._sources: TrustedDir | None = None

    def prepare(self) -> None:
        """Check (creating what is missing) and hold the folders.  Raises UnsafePath, or
        StateUnwritable when a missing folder cannot be made."""
        if self._dir is not None:
            return
        try:
            self._dir = open_trusted_dir(self.state_dir, "state_dir", create_mode=0o700)
            self._sources = self._dir.subdir("sources", create_mode=0o700)
        except OSError as exc:
            self.close()
            raise StateUnwritable(f"cannot create the state folder {self.state_dir}: {exc.strerror or exc}",
                                  {"path": str(self.state_dir)}) from None
        except BaseException:
            self.close()
            raise

    def lock(self) -> None:
        """Own ``state_dir`` (one daemon, or one --purge, per state folder).  Raises AlreadyRunning."""
        self.prepare()
        assert self._dir is not None
        self._dir.lock(str(self.state_dir))

    def close(self) -> None:
        for held in (self._sources, self._dir):
            if held is not None:
                held.close()
        self._dir = self._sources = None

    @property
    def _fds(self) -> tuple[int, int]:
        self.prepare()
        assert self._dir is not None and self._sources is not None
        return self._dir.fd, self._sources.fd

    def load(self) -> LoadedState:
        dir_fd, _ = self._fds
        try:
            raw = _read(dir_fd, self.path.name)
        except FileNotFoundError:
            return LoadedState(state=StateFile(), found=False)
        except (OSError, ValueError) as exc:  # a link (ELOOP), a FIFO, a folder: not a state file
            return self._set_aside(str(getattr(exc, "strerror", None) or exc))
        try:
            state = StateFile.model_validate_json(raw)
            missing = [r.source_sha256 for r in state.records()
                       if r.source_sha256 and not self._has_artifact(r.source_sha256, r.dialect)]
            missing += [sha for r in state.records() for sha in r.headers.values() if not self._has_file(f"{sha}.h")]
            if state.version != STATE_VERSION or missing:
                raise ValueError(f"version {state.version}" if state.version != STATE_VERSION
                                 else f"missing sources {', '.join(m[:12] for m in missing)}")
        except (ValidationError, ValueError) as exc:
            return self._set_aside(str(exc).splitlines()[0][:300])
        return LoadedState(state=state, found=True)

    def _set_aside(self, reason: str) -> LoadedState:
        aside = self.keep_aside("corrupt", move=True)
        return LoadedState(state=StateFile(), found=False,
                           problem=f"{self.path} is unreadable ({reason}); moved to {aside}")

    def keep_aside(self, why: str, move: bool = False) -> Path:
        """Keep the state file as ``state.json.<why>-<time>``, moved or copied (for a file that
        is about to be rewritten); never deleted."""
        dir_fd, _ = self._fds
        name = f"{self.path.name}.{why}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        if move:
            os.replace(self.path.name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            _atomic_write(dir_fd, name, self.state_dir / name, _read(dir_fd, self.path.name))
        return self.state_dir / name

    def save(self, state: StateFile) -> None:
        dir_fd, _ = self._fds
        _atomic_write(dir_fd, self.path.name, self.path, state.model_dump_json(indent=2).encode() + b"\n")
        self._collect_sources(state)

    def put_artifact(self, artifact: Artifact) -> str:
        """Save the handler's source (or object) and its local headers, before a state names them."""
        _, sources_fd = self._fds
        for header, sha in artifact.header_sha256s.items():
            if not self._has_file(f"{sha}.h"):
                _atomic_write(sources_fd, f"{sha}.h", self.sources / f"{sha}.h", artifact.headers[header].encode())
        name = self._artifact_name(artifact.sha256, artifact.dialect)
        if not self._has_artifact(artifact.sha256, artifact.dialect):
            _atomic_write(sources_fd, name, self.sources / name, artifact.data)
        return artifact.sha256

    def put_btf(self, sha: str, btf: bytes) -> None:
        """Keep the BTF a compile of artifact ``sha`` produced, for the events of a program
        adopted from its pin at the next start (a pinned program's BTF cannot be read back
        without CAP_SYS_ADMIN).  Rewritten when it differs: a new kernel, a new compile."""
        _, sources_fd = self._fds
        name = f"{sha}.btf"
        with contextlib.suppress(OSError, ValueError):
            if _read(sources_fd, name) == btf:
                return
        _atomic_write(sources_fd, name, self.sources / name, btf)

    def btf(self, sha: str) -> bytes | None:
        _, sources_fd = self._fds
        try:
            return _read(sources_fd, f"{sha}.btf")
        except (OSError, ValueError):
            return None

    def artifact(self, sha: str, dialect: Dialect, headers: Mapping[str, str] | None = None) -> Artifact:
        """The saved handler ``sha``, with its local ``headers`` (name -> sha256, as in SlotRecord)."""
        _, sources_fd = self._fds
        texts = {name: _read(sources_fd, f"{header_sha}.h").decode() for name, header_sha in (headers or {}).items()}
        found = Artifact(dialect, _read(sources_fd, self._artifact_name(sha, dialect)), headers=texts)
        if found.sha256 != sha or found.header_sha256s != dict(sorted((headers or {}).items())):
            raise ValueError(f"saved handler {sha[:12]} does not match its hash")
        return found

    def _has_artifact(self, sha: str, dialect: Dialect) -> bool:
        return self._has_file(self._artifact_name(sha, dialect))

    def _has_file(self, name: str) -> bool:
        _, sources_fd = self._fds
        try:
            st = os.stat(name, dir_fd=sources_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode)

    @staticmethod
    def _artifact_name(sha: str, dialect: Dialect) -> str:
        return f"{sha}{'.o' if dialect == 'object' else '.c'}"

    def _collect_sources(self, state: StateFile) -> None:
        """Drop sources no slot refers to any more: only names tailcalld gives them, only in the
        held folder (unlinkat never follows a link, it removes the link itself)."""
        _, sources_fd = self._fds
        wanted = {self._artifact_name(r.source_sha256, r.dialect) for r in state.records() if r.source_sha256}
        wanted |= {f"{record_build_key(r)}.btf" for r in state.records() if r.source_sha256}
        wanted |= {f"{sha}.h" for r in state.records() for sha in r.headers.values()}
        for name in os.listdir(sources_fd):
            if _ARTIFACT_NAME.fullmatch(name) and name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=sources_fd)
