"""The saved state on an unlucky disk, and an entry in it that names no slot.

A full or read-only state_dir refuses a change with `state_unwritable` (the kernel keeps what
it had), and a start that has nothing to write starts on a read-only one.  The disks here are
real: a tiny tmpfs mounted for the test, filled up, then remounted read-only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import NR_FCHMODAT, counting_handler, kernel_slots, saved_slots, start_counting, start_daemon

OTHER_SLOT = 300  # fanotify_init: rarely called


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, root's alone (mode 0700), unmounted afterwards whatever happens."""
    mount = tmp_path / "state"
    mount.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Write until the disk says ENOSPC."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        f.close()


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def assert_refused(reply: dict[str, object]) -> None:
    assert "error" in reply, reply
    error = reply["error"]
    assert isinstance(error, dict) and error["code"] == "state_unwritable", error


def test_a_full_or_read_only_state_dir_refuses_changes_and_leaves_the_kernel(tmp_path: Path, pin_root: Path,
                                                                             small_disk: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, prog = start_counting(tmp_path, pin_root, counter)
    prog_array = d.pin_dir / "prog_array"
    try:
        for condition in ("full", "read-only"):
            if condition == "full":
                fill(small_disk)
            else:
                (small_disk / "filler").unlink()
                remount(small_disk, "ro")
            with d.client() as c:
                c.send_raw(json.dumps({"id": 1, "command": "attach", "slot": OTHER_SLOT,
                                       "source": counting_handler(counter, "other_count")}).encode() + b"\n")
                assert_refused(c.read_reply())
                c.send_raw(b'{"id": 2, "command": "detach", "slot": 268}\n')
                assert_refused(c.read_reply())
                assert c.call("list")["slots"][0]["prog_id"] == prog  # and the connection goes on
            assert kernel_slots(prog_array) == {NR_FCHMODAT: prog}, condition
            assert saved_slots(small_disk) == {NR_FCHMODAT: prog}, condition
        assert d.stop() == 0
        # Nothing needs writing at the next start: it starts on the read-only disk.
        d = start_daemon(tmp_path, pin_root / "daemon")
        with d.client() as c:
            assert [s["prog_id"] for s in c.call("list")["slots"]] == [prog]
            assert not c.call("status")["corrections"]
    finally:
        d.stop()


def test_a_state_entry_for_a_slot_that_does_not_exist_is_set_aside(tmp_path: Path, pin_root: Path) -> None:
    d, prog = start_counting(tmp_path, pin_root, pin_root / "maps" / "count")
    assert d.stop() == 0
    state_file = tmp_path / "state" / "state.json"
    state = json.loads(state_file.read_text())
    state["slots"]["5000"] = {**state["slots"][str(NR_FCHMODAT)], "slot": 5000}
    state_file.write_text(json.dumps(state))
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        with d.client() as c:
            assert [s["slot"] for s in c.call("list")["slots"]] == [NR_FCHMODAT]
            corrections = c.call("status")["corrections"]
        assert any("state file entry 5000" in line and "set aside" in line for line in corrections), corrections
        assert saved_slots(tmp_path / "state") == {NR_FCHMODAT: prog}
        kept = list((tmp_path / "state").glob("state.json.set-aside-*"))
        assert len(kept) == 1 and "5000" in json.loads(kept[0].read_text())["slots"]
    finally:
        d.stop()
