"""The folders tailcalld trusts (state_dir, the socket's folder, pin_dir) are refused at start
when someone other than root could change them: another owner, a group- or world-writable
mode, a symbolic link, or something that is not a folder.  The refusal names the path and what
is wrong with it, and comes before anything is loaded: no dispatcher is pinned.  Reload checks
them again, and the state folder's contents are reached without following links."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, counting_handler, journal, kernel_slots, pin_foreign_map, run_tailcalld,
                     start_daemon, write_config)
from tailcalld.errors import UnsafePath
from tailcalld.paths import open_trusted_dir

NOBODY = 65534


@dataclass
class Layout:
    """One start's paths: a folder for each role, every one of them root's alone at first."""

    tmp: Path
    pin_root: Path

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @property
    def socket(self) -> Path:
        return self.tmp / "sockets" / "s.sock"

    @property
    def pin_dir(self) -> Path:
        return self.pin_root / "daemon"

    def target(self, role: str) -> Path:
        return {"state_dir": self.state_dir, "socket": self.socket.parent, "pin_dir": self.pin_dir}[role]

    def config(self) -> Path:
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        return write_config(self.tmp / "c.toml", socket=self.socket, state_dir=self.state_dir, pin_dir=self.pin_dir)


def wrong_owner(path: Path) -> str:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)
    return f"{path} is owned by uid {NOBODY}"


def group_writable(path: Path) -> str:
    path.mkdir(exist_ok=True)
    path.chmod(0o770)
    return f"{path} is writable by group (mode 0770)"


def world_writable(path: Path) -> str:
    path.mkdir(exist_ok=True)
    path.chmod(0o1777)  # sticky or not: a folder tailcalld uses must be root's alone
    return f"{path} is writable by group and others (mode 1777)"


def symlink(path: Path) -> str:
    real = path.with_name(path.name + "-real")
    real.mkdir(mode=0o700)
    if path.exists():
        path.rmdir()
    path.symlink_to(real)
    return f"{path} is a symbolic link, not a folder"


def regular_file(path: Path) -> str:
    if path.exists():
        path.rmdir()
    if str(path).startswith("/sys/fs/bpf/"):
        pin_foreign_map(path)  # bpffs makes no plain files; a pinned object is one to stat
    else:
        path.write_text("not a folder\n")
    return f"{path} is a regular file, not a folder"


FAULTS: dict[str, Callable[[Path], str]] = {"wrong owner": wrong_owner, "group-writable": group_writable,
                                            "world-writable": world_writable, "symlink": symlink,
                                            "regular file": regular_file}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("role", ["state_dir", "socket", "pin_dir"])
def test_an_untrusted_folder_is_refused_before_anything_is_loaded(tmp_path: Path, pin_root: Path, role: str,
                                                                   fault: str) -> None:
    paths = Layout(tmp_path, pin_root)
    config = paths.config()
    expected = FAULTS[fault](paths.target(role))
    r = run_tailcalld(config)
    assert r.returncode == 1, r.stderr
    assert f"unsafe {role}: {expected}" in r.stderr
    assert not list(pin_root.rglob("link*")), "a dispatcher was pinned before the refusal"
    assert not (paths.state_dir / "state.json").exists()


def test_an_untrusted_ancestor_is_refused_and_a_sticky_root_one_is_not(tmp_path: Path, pin_root: Path) -> None:
    paths = Layout(tmp_path, pin_root)
    config = paths.config()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    write_config(config, socket=paths.socket, state_dir=shared / "state", pin_dir=paths.pin_dir)
    r = run_tailcalld(config)
    assert r.returncode == 1 and f"unsafe state_dir: {shared} is writable by group and others" in r.stderr
    assert not list(pin_root.rglob("link*"))
    # /tmp (1777, root) and /sys/fs/bpf (1777, root) are sticky: an entry below them that root
    # owns cannot be swapped by anyone else, so they are fine as ancestors.
    shared.chmod(0o1777)
    with open_trusted_dir(shared / "state", "state_dir", create_mode=0o700) as held:
        assert stat.S_IMODE(os.fstat(held.fd).st_mode) == 0o700


def test_the_walk_is_plain_logic_too(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath, match="is not an absolute path"):
        open_trusted_dir(Path("relative/state"), "state_dir")
    with pytest.raises(UnsafePath, match=r"contains '\.\.'"):
        open_trusted_dir(tmp_path / ".." / "x", "state_dir")
    with pytest.raises(UnsafePath, match=f"state_dir: {tmp_path / 'missing'} does not exist"):
        open_trusted_dir(tmp_path / "missing", "state_dir")  # no create_mode: nothing is made
    assert not (tmp_path / "missing").exists()


def test_a_symlinked_sources_folder_is_refused_and_nothing_is_deleted_through_it(tmp_path: Path,
                                                                               pin_root: Path) -> None:
    paths = Layout(tmp_path, pin_root)
    config = paths.config()
    victim = tmp_path / "root-only"
    victim.mkdir(mode=0o700)
    precious = victim / ("0" * 64 + ".c")  # a name the source collector would take for its own
    precious.write_text("root's file\n")
    paths.state_dir.mkdir(mode=0o700)
    (paths.state_dir / "sources").symlink_to(victim)
    r = run_tailcalld(config)
    assert r.returncode == 1
    assert f"unsafe state_dir: {paths.state_dir / 'sources'} is a symbolic link" in r.stderr
    assert precious.read_text() == "root's file\n"
    assert not list(pin_root.rglob("link*"))


def test_a_state_file_that_is_a_link_is_not_followed(tmp_path: Path, pin_root: Path) -> None:
    """Only root can put a link there now; still, what a link points at is never read as state."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"version": 1, "slots": {}}))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "state.json").symlink_to(secret)
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        with d.client() as c:
            corrections = c.call("status")["corrections"]
        assert any("state.json is unreadable" in line and "moved to" in line for line in corrections), corrections
        assert secret.read_text() == json.dumps({"version": 1, "slots": {}})  # the link moved aside, not its target
    finally:
        d.stop()


def test_reload_rechecks_the_folders_and_never_chowns_through_a_link(tmp_path: Path, pin_root: Path) -> None:
    """A socket folder given away after the start: its new owner swaps the socket for a link to
    a root file, then a reload with allowed_group would chown and chmod that file."""
    paths = Layout(tmp_path, pin_root)
    paths.socket.parent.mkdir(mode=0o755)
    d = start_daemon(tmp_path, paths.pin_dir, socket=paths.socket)
    root_file = tmp_path / "root-file"
    root_file.write_text("root only\n")
    root_file.chmod(0o600)
    try:
        with d.client() as c:
            c.call("attach", slot=NR_FCHMODAT, source=counting_handler(pin_root / "maps" / "c"))
        os.chown(paths.socket.parent, NOBODY, NOBODY)
        paths.socket.unlink()
        paths.socket.symlink_to(root_file)
        write_config(d.config, socket=paths.socket, state_dir=tmp_path / "state", pin_dir=paths.pin_dir,
                     allowed_group="nogroup")
        os.kill(d.pid, signal.SIGHUP)
        refused = _wait_for(lambda: "reload refused" in d.output() or _journal_says(d.pid, "reload refused"))
        assert refused, d.output()
        st = root_file.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
        assert d.proc.poll() is None
        assert NR_FCHMODAT in kernel_slots(paths.pin_dir / "prog_array")  # the handler kept its slot
    finally:
        os.chown(paths.socket.parent, 0, 0)
        d.stop()


def _journal_says(pid: int, text: str) -> bool:
    try:
        return any(text in e.get("MESSAGE", "") for e in journal(_PID=str(pid)))
    except (OSError, ValueError):
        return False


def _wait_for(condition: Callable[[], bool], tries: int = 200) -> bool:
    """Poll a condition a bounded number of times; what is asserted is the condition, not the time."""
    for _ in range(tries):
        if condition():
            return True
        time.sleep(0.05)
    return False
