"""Who may talk to tailcalld, what is recorded of it, and the limits that keep one client
from hurting the others.  Also full teardown (unload-all, --purge) and ownership."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, DaemonProcess, JournalEntry, counting_handler, fchmodat, journal,
                     libbpf_pinned_handler, pin_foreign_map,
                     read_counter, run_tailcalld, start_counting, start_daemon, wait_journal, write_config)
from tailcalld import bpfsys
from tailcalld.server import ROOT_RESERVE

NOBODY = 65534
PEER_SCRIPT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno})); sys.exit(0)
s.sendall(b'{"id": 7, "command": "list"}\\n')
print(s.makefile().readline().strip())
"""


def as_user(sock: Path, uid: int, gid: int) -> dict:
    r = subprocess.run(["/usr/bin/python3", "-c", PEER_SCRIPT, str(sock)], capture_output=True, text=True,
                       user=uid, group=gid, extra_groups=[], timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def audit_entries(d: DaemonProcess, action: str) -> list[JournalEntry]:
    """The audit entries of one daemon for ``action``, once at least one is in the journal.  Its
    pid alone could also match an older daemon's entries: pids come round again in a long day."""
    return wait_journal(lambda: journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid),
                                        TAILCALLD_ACTION=action))


@pytest.mark.usefixtures("journald")
def test_non_root_peers_are_refused_and_audited(tmp_path: Path, pin_root: Path, public_dir: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", socket=public_dir / "s.sock")
    try:
        mode = os.stat(d.socket).st_mode
        assert stat.S_IMODE(mode) == 0o600 and os.stat(d.socket).st_uid == 0
        assert as_user(d.socket, NOBODY, NOBODY) == {"connect_error": 13}  # EACCES: the file mode
        os.chmod(d.socket, 0o666)  # an admin's mistake: SO_PEERCRED still stands in the way
        reply = as_user(d.socket, NOBODY, NOBODY)
        assert reply["id"] == 7 and reply["error"]["code"] == "permission_denied"
        refused = audit_entries(d, "refused")
        assert refused and refused[0]["PEER_UID"] == str(NOBODY) and refused[0]["PEER_COMM"] == "python3"
        with d.client() as c:
            assert c.call("list") == {"slots": []}  # root still served
    finally:
        d.stop()


@pytest.mark.usefixtures("journald")
def test_allowed_group_gets_access_and_changes_are_audited(tmp_path: Path, pin_root: Path,
                                                           public_dir: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name  # "nogroup" on Debian
    d = start_daemon(tmp_path, pin_root / "daemon", allowed_group=group, socket=public_dir / "s.sock")
    try:
        st = os.stat(d.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        assert as_user(d.socket, NOBODY, NOBODY)["result"] == {"slots": []}
        os.chmod(d.socket, 0o666)
        assert as_user(d.socket, NOBODY, 4242)["error"]["code"] == "permission_denied"  # not in the group

        with d.client() as c:
            attached = c.call("attach", slot=NR_FCHMODAT, source=counting_handler(pin_root / "maps" / "c"))
            c.call("detach", slot=NR_FCHMODAT)
        audit = audit_entries(d, "attach")
        assert audit, "no audit entry for the attach"
        entry = audit[0]
        assert entry["PEER_UID"] == "0" and entry["PEER_PID"] == str(os.getpid())
        assert entry["SLOT"] == "268" and entry["SYSCALL_NAME"] == "fchmodat"
        assert entry["PROG_ID"] == str(attached["prog_id"]) and len(entry["SOURCE_SHA256"]) == 64
        assert entry["PEER_COMM"]
        detach = audit_entries(d, "detach")
        assert detach and detach[0]["PROG_ID"] == str(attached["prog_id"])
    finally:
        d.stop()


def wait_for_connections(d: DaemonProcess, count: int) -> None:
    for _ in range(100):
        with d.client() as c:
            if c.call("status")["connections"] == count:
                return
        time.sleep(0.05)
    raise AssertionError(f"the daemon never had just {count} connections")


def test_connection_limit_and_idle_clients(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", max_connections=3, idle_timeout=1.5)
    held = [socket.socket(socket.AF_UNIX) for _ in range(3 + ROOT_RESERVE)]  # root's: the reserve too
    try:
        wait_for_connections(d, 1)  # only the asking one: start_daemon's probe is gone
        for s in held:
            s.connect(str(d.socket))
        with d.client() as c:  # one more
            c.send_raw(b'{"id": 1, "command": "ping"}\n')
            assert c.read_reply()["error"]["code"] == "too_many_connections"
        time.sleep(2.0)  # the silent ones are closed after idle_timeout
        for s in held:
            s.settimeout(5)
            assert s.recv(4096) == b""
        with d.client() as c:
            assert c.call("ping")["version"]
    finally:
        for s in held:
            s.close()
        d.stop()


def test_a_client_that_never_reads_does_not_block_others(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", idle_timeout=2.0)
    greedy = socket.socket(socket.AF_UNIX)
    try:
        greedy.connect(str(d.socket))
        greedy.setblocking(False)
        burst = b'{"command": "status"}\n' * 2000
        closed_by_daemon = False
        served_meanwhile = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                greedy.send(burst)  # requests keep coming, replies are never read
            except BlockingIOError:
                if not served_meanwhile:  # both buffers are full now: the daemon is stuck on us
                    with d.client(timeout=5) as c:
                        assert c.call("list") == {"slots": []}
                    served_meanwhile = True
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                closed_by_daemon = True
                break
        assert served_meanwhile, "the greedy client never filled its buffers"
        assert closed_by_daemon, "the daemon kept a client that never reads past idle_timeout"
        with d.client(timeout=5) as c:
            assert c.call("ping")["version"]
        assert d.proc.poll() is None
    finally:
        greedy.close()
        d.stop()


def test_unload_all_removes_everything_and_stops(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    r = d.ctl("unload-all")
    assert r.returncode == 0, r.stderr
    assert "emptied 1 slot" in r.stdout
    assert d.proc.wait(30) == 0
    assert not (pin_root / "daemon").exists()
    assert json.loads((tmp_path / "state" / "state.json").read_text())["slots"] == {}
    fchmodat(10)
    assert read_counter(counter) == 0  # the handler is gone with the dispatcher
    # A new start loads a fresh dispatcher, with nothing in it.
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        with d.client() as c:
            assert c.call("list") == {"slots": []} and not c.call("status")["adopted"]
    finally:
        d.stop()


def test_purge_offline_and_refused_while_running(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    with d.client() as c:
        c.call("attach", slot=NR_FCHMODAT, source=counting_handler(pin_root / "maps" / "c"))
    r = run_tailcalld(d.config, "--purge")
    assert r.returncode == 1 and "another tailcalld already owns" in r.stderr
    assert d.stop() == 0
    assert (pin_root / "daemon" / "link").exists()  # a plain stop keeps everything
    r = run_tailcalld(d.config, "--purge")
    assert r.returncode == 0, r.stderr
    assert not (pin_root / "daemon").exists()
    assert json.loads((tmp_path / "state" / "state.json").read_text())["slots"] == {}


def test_purge_removes_the_maps_handlers_pinned_by_name(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    with d.client() as c:
        c.call("attach", slot=301, source=libbpf_pinned_handler("tcdpurge"), dialect="libbpf")
    assert d.stop() == 0
    assert list((pin_root / "daemon" / "handlers").glob("*/tcdpurge"))  # pinned by name, kept by a stop
    r = run_tailcalld(d.config, "--purge")
    assert r.returncode == 0, r.stderr
    assert not (pin_root / "daemon").exists()  # handlers/ included: nothing of tailcalld is left


def test_second_daemon_and_foreign_pins_refuse_to_start(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        other = tmp_path / "other"
        other.mkdir()
        config = write_config(other / "c.toml", socket=other / "s.sock", pin_dir=pin_root / "daemon",
                              state_dir=other / "state")
        r = run_tailcalld(config)
        assert r.returncode == 1 and f"another tailcalld already owns {pin_root / 'daemon'}" in r.stderr
    finally:
        d.stop()

    foreign = pin_root / "foreign"
    foreign.mkdir()
    pin_foreign_map(foreign / "link")
    config = write_config(tmp_path / "f.toml", socket=tmp_path / "f.sock", pin_dir=foreign,
                          state_dir=tmp_path / "fstate")
    r = run_tailcalld(config)
    assert r.returncode == 1 and str(foreign / "link") in r.stderr
    assert bpfsys.map_info(fd := bpfsys.obj_get(str(foreign / "link"))).name == "notours"  # untouched
    os.close(fd)


HOLDER_SCRIPT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
lines = s.makefile()
for n in (1, 2):
    if n == 2:
        sys.stdin.readline()  # the test reloads the daemon in between
    try:
        s.sendall(b'{"id": %d, "command": "list"}\\n' % n)
        print(lines.readline().strip() or json.dumps({"closed": True}), flush=True)
    except OSError as e:
        print(json.dumps({"closed": e.errno}), flush=True)
"""


def test_a_reload_that_drops_allowed_group_closes_that_groups_open_connections(tmp_path: Path, pin_root: Path,
                                                                               public_dir: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name
    d = start_daemon(tmp_path, pin_root / "daemon", allowed_group=group, socket=public_dir / "s.sock")
    holder = subprocess.Popen(["/usr/bin/python3", "-c", HOLDER_SCRIPT, str(d.socket)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert json.loads(holder.stdout.readline())["result"] == {"slots": []}  # admitted, connection open
        write_config(d.config, socket=d.socket, pin_dir=d.pin_dir, state_dir=tmp_path / "state")
        os.kill(d.pid, signal.SIGHUP)
        for _ in range(200):  # the reload's reactions run together: the socket's mode is the sign
            if os.stat(d.socket).st_gid == 0:
                break
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        holder.stdin.write("go\n")
        holder.stdin.flush()
        second = json.loads(holder.stdout.readline())
        assert "closed" in second, f"the dropped group's open connection was still served: {second}"
        with d.client() as c:
            assert c.call("list") == {"slots": []}  # root, on a new connection, is served
    finally:
        holder.kill()
        holder.wait(10)
        d.stop()


def test_a_second_daemon_on_a_taken_socket_or_state_dir_touches_nothing(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d, _ = start_counting(tmp_path, pin_root, counter)
    saved = (tmp_path / "state" / "state.json").read_bytes()
    try:
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        cases = {"socket": dict(socket=d.socket, state_dir=other / "state", pin_dir=pin_root / "second"),
                 "state_dir": dict(socket=other / "s.sock", state_dir=tmp_path / "state", pin_dir=pin_root / "third")}
        for what, paths in cases.items():
            r = run_tailcalld(write_config(other / f"{what}.toml", **paths))
            assert r.returncode == 1 and "another" in r.stderr, (what, r.stderr)
            assert not list(Path(paths["pin_dir"]).glob("link*")), f"{what}: a second dispatcher was attached"
            assert (tmp_path / "state" / "state.json").read_bytes() == saved, f"{what}: the state was rewritten"
        fchmodat(10)
        assert read_counter(counter) == 10  # one dispatcher: the handler runs once per call
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_purge_is_refused_while_a_daemon_uses_its_state_dir(tmp_path: Path, pin_root: Path) -> None:
    d, _ = start_counting(tmp_path, pin_root, pin_root / "maps" / "count")
    saved = (tmp_path / "state" / "state.json").read_bytes()
    try:
        config = write_config(tmp_path / "other.toml", socket=tmp_path / "other.sock",
                              state_dir=tmp_path / "state", pin_dir=pin_root / "other")
        r = run_tailcalld(config, "--purge")
        assert r.returncode == 1 and f"another tailcalld already owns {tmp_path / 'state'}" in r.stderr
        assert (tmp_path / "state" / "state.json").read_bytes() == saved
    finally:
        d.stop()
    r = run_tailcalld(d.config, "--purge")  # once it is stopped, the purge goes through
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "state" / "state.json").read_text())["slots"] == {}
