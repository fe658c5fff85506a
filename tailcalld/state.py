"""Persisted desired state: which handler should sit in which slot, and where it came from.

    state_dir/state.json            {"version": 1, "slots": {"268": SlotRecord, ...}}
    state_dir/sources/<sha256>.c|.o each handler's source (or ELF object), content-addressed

Every write is atomic (temp file, fsync, rename, fsync of the folder), and a source is
written before the state that names it, so a crash at any point leaves a readable state.
A state file that cannot be read is moved aside (never deleted) and reported.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .dialects import Artifact, Dialect
from .errors import StateUnwritable

STATE_VERSION = 1


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


class StateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    slots: dict[int, SlotRecord] = {}


class LoadedState(BaseModel):
    """What load() found: the state, and whether it could be trusted."""

    state: StateFile
    found: bool  # False: no state file (first start) or unreadable
    problem: str | None = None  # why it was unreadable, and where it was moved


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all.  Raises StateUnwritable (say, a full or read-only disk);
    the previous file is then untouched."""
    try:
        _replace(path, data)
    except OSError as exc:
        raise StateUnwritable(f"cannot write {path}: {exc.strerror or exc}; nothing was changed",
                         {"path": str(path)}) from None


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "state.json"
        self.sources = state_dir / "sources"

    def prepare(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.sources.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateUnwritable(f"cannot create the state folder {self.state_dir}: {exc.strerror or exc}",
                             {"path": str(self.state_dir)}) from None

    def load(self) -> LoadedState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return LoadedState(state=StateFile(), found=False)
        try:
            state = StateFile.model_validate_json(raw)
            missing = [r.source_sha256 for r in state.slots.values()
                       if r.source_sha256 and not self._artifact_path(r.source_sha256, r.dialect).is_file()]
            if state.version != STATE_VERSION or missing:
                raise ValueError(f"version {state.version}" if state.version != STATE_VERSION
                                 else f"missing sources {', '.join(m[:12] for m in missing)}")
        except (ValidationError, ValueError) as exc:
            aside = self.path.with_name(f"state.json.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
            os.replace(self.path, aside)
            reason = str(exc).splitlines()[0][:300]
            return LoadedState(state=StateFile(), found=False,
                               problem=f"{self.path} is unreadable ({reason}); moved to {aside}")
        return LoadedState(state=state, found=True)

    def save(self, state: StateFile) -> None:
        _atomic_write(self.path, state.model_dump_json(indent=2).encode() + b"\n")
        self._collect_sources(state)

    def put_artifact(self, artifact: Artifact) -> str:
        path = self._artifact_path(artifact.sha256, artifact.dialect)
        if not path.exists():
            _atomic_write(path, artifact.data)
        return artifact.sha256

    def artifact(self, sha: str, dialect: Dialect) -> Artifact:
        found = Artifact(dialect, self._artifact_path(sha, dialect).read_bytes())
        if found.sha256 != sha:
            raise ValueError(f"saved handler {sha[:12]} does not match its hash")
        return found

    def _artifact_path(self, sha: str, dialect: Dialect) -> Path:
        return self.sources / f"{sha}{'.o' if dialect == 'object' else '.c'}"

    def _collect_sources(self, state: StateFile) -> None:
        """Drop sources no slot refers to any more."""
        wanted = {r.source_sha256 for r in state.slots.values()}
        for path in self.sources.glob("*.[co]"):
            if path.stem not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
