"""tailcalld end to end: the real daemon process, its socket, tailcallctl, the kernel."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import (NR_FCHMODAT, VENV_BIN, DaemonProcess, Workload, busy_children_of, counting_handler, fchmodat,
                     read_counter, run_tailcalld, start_daemon, write_config)
from tailcalld.client import Client, RemoteError
from tailcalld.protocol import response_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def slow_source(levels: int = 11) -> str:
    """A valid handler whose preprocessing takes seconds (nested macro expansion doubles per level)."""
    lines = ["#define E0(x) x+1"]
    lines += [f"#define E{i}(x) E{i - 1}(E{i - 1}(x))" for i in range(1, levels + 1)]
    lines.append(f"int slow(struct bpf_raw_tracepoint_args *ctx) {{ volatile long v = E{levels}(0); return 0; }}")
    return "\n".join(lines) + "\n"


def test_user_session_with_tailcallctl(daemon: DaemonProcess, pin_root: Path, tmp_path: Path) -> None:
    """The README's session: attach the examples by number and name, list, detach."""
    r = daemon.ctl("attach", "268", str(EXAMPLES / "fchmodat.c"))
    assert r.returncode == 0, r.stderr
    assert "attached enter_fchmodat to fchmodat (268)" in r.stdout

    r = daemon.ctl("attach", "fchmodat", str(EXAMPLES / "fchmodat_v2.c"))
    assert r.returncode == 0, r.stderr
    assert "replaced program" in r.stdout and "enter_fchmodat_v2" in r.stdout

    target = tmp_path / "somefile"
    target.write_text("x")
    subprocess.run(["chmod", "644", str(target)], check=True)

    r = daemon.ctl("list")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == ["SLOT", "SYSCALL", "HOOK", "FUNCTION", "DIALECT", "PROG", "SOURCE", "SINCE", "HITS", "MISSES"]
    assert row.split()[:7] == ["268", "fchmodat", "enter", "enter_fchmodat_v2", "bcc", row.split()[5], "fchmodat_v2.c"]
    assert r.stdout.rstrip().endswith("1 slot listed.")

    listed = json.loads(daemon.ctl("list", "--json").stdout)
    assert [s["slot"] for s in listed["slots"]] == [268]

    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert status["slots_used"] == 1 and status["nr_slots"] == 1024 and not status["adopted"]

    r = daemon.ctl("detach", "268")
    assert r.returncode == 0 and "detached program" in r.stdout
    r = daemon.ctl("detach", "268")
    assert r.returncode == 1 and "[slot_empty]" in r.stderr

    r = daemon.ctl("attach", "fchmodatt", str(EXAMPLES / "fchmodat.c"))
    assert r.returncode == 1 and "did you mean fchmodat" in r.stderr


def test_ctl_reports_compile_and_verifier_errors(daemon: DaemonProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int h(struct bpf_raw_tracepoint_args *ctx) { return undefined_thing; }\n")
    r = daemon.ctl("attach", "268", str(bad))
    assert r.returncode == 3  # does not compile
    assert "[compile_error]" in r.stderr and "use of undeclared identifier 'undefined_thing'" in r.stderr

    rejected = tmp_path / "rejected.c"
    rejected.write_text("int h(struct bpf_raw_tracepoint_args *ctx) { u64 *p = (u64 *)ctx; return p[100]; }\n")
    r = daemon.ctl("attach", "268", str(rejected))
    assert r.returncode == 4  # the kernel refuses it
    assert "[verifier_rejected]" in r.stderr and "invalid bpf_context access" in r.stderr
    assert json.loads(daemon.ctl("list", "--json").stdout)["slots"] == []


def test_ctl_without_daemon_fails_cleanly(tmp_path: Path) -> None:
    r = subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(tmp_path / "none.sock"), "list"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "cannot talk to tailcalld" in r.stderr and r.stdout == ""
    env = {**os.environ, "TAILCALLD_SOCKET": str(tmp_path / "env.sock")}
    r = subprocess.run([str(VENV_BIN / "tailcallctl"), "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and str(tmp_path / "env.sock") in r.stderr


def test_hot_swap_under_load_loses_and_doubles_nothing(daemon: DaemonProcess, pin_root: Path) -> None:
    c1, c2 = pin_root / "maps" / "v1", pin_root / "maps" / "v2"
    with daemon.client() as c:
        c.call("attach", slot=NR_FCHMODAT, source=counting_handler(c1, "v1"), filename="v1.c")
        with Workload() as work:
            while read_counter(c1) < 20_000:
                time.sleep(0.01)
            swap = c.call("attach", slot="fchmodat", source=counting_handler(c2, "v2"), filename="v2.c")
            while read_counter(c2) < 20_000:
                time.sleep(0.01)
    assert swap["replaced_prog_id"] is not None
    v1, v2 = read_counter(c1), read_counter(c2)
    assert v1 > 0 and v2 > 0
    assert v1 + v2 == work.made


@pytest.mark.parametrize("payload, code", [
    (b"{not json\n", "bad_request"),
    (b"\xff\xfe\x00garbage\n", "bad_request"),
    (b"[1, 2, 3]\n", "bad_request"),
    (b'{"id": 4, "command": "explode"}\n', "unknown_command"),
    (b'{"id": 5}\n', "bad_request"),
    (b'{"id": 6, "command": "detach", "slot": 1024}\n', "slot_out_of_range"),
    (b'{"id": 7, "command": "detach", "slot": -1}\n', "slot_out_of_range"),
    (b'{"id": 8, "command": "detach", "slot": "fchmodatt"}\n', "unknown_syscall"),
    (b'{"id": 9, "command": "detach", "slot": 1.5}\n', "bad_request"),
    (b'{"id": 10, "command": "list", "extra": true}\n', "bad_request"),
    (b'{"id": 11, "command": "attach", "slot": 268, "source": ""}\n', "bad_request"),
    (b'{"id": 12, "command": "detach", "slot": 268}\n', "slot_empty"),
])
def test_bad_requests_get_an_error_and_the_connection_goes_on(daemon: DaemonProcess, payload: bytes,
                                                                 code: str) -> None:
    with daemon.client() as c:
        c.send_raw(payload)
        reply = c.read_reply()  # validated against the response model
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        try:
            sent = json.loads(payload)
        except ValueError:
            sent = None
        if isinstance(sent, dict) and "id" in sent:
            assert reply["id"] == sent["id"]
        assert c.call("ping")["version"]  # same connection still serves


def test_oversized_request_is_refused_and_the_connection_goes_on(daemon: DaemonProcess) -> None:
    big = json.dumps({"id": 1, "command": "attach", "slot": 268, "source": "x" * (1 << 20)}).encode() + b"\n"
    with daemon.client() as c:
        c.send_raw(big)
        reply = c.read_reply()
        assert reply["error"]["code"] == "request_too_large"
        assert c.call("list") == {"slots": []}


def test_many_requests_on_one_connection_are_answered_in_order(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.send_raw(b"".join(json.dumps({"id": i, "command": "ping"}).encode() + b"\n" for i in range(500)))
        ids = [c.read_reply()["id"] for _ in range(500)]
    assert ids == list(range(500))


def test_vanishing_clients_do_not_hurt_the_daemon(daemon: DaemonProcess, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    # Half a request, then gone.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.socket))
        s.sendall(b'{"id": 1, "command": "att')
    # A full attach, then gone before the reply: the attach still completes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.socket))
        s.sendall(json.dumps({"id": 2, "command": "attach", "slot": 268,
                              "source": counting_handler(counter)}).encode() + b"\n")
    with daemon.client() as c:
        for _ in range(600):
            if c.call("list")["slots"]:
                break
            time.sleep(0.05)
        assert [s["slot"] for s in c.call("list")["slots"]] == [268]
    fchmodat(9)
    assert read_counter(counter) == 9
    assert daemon.proc.poll() is None


def test_list_answers_while_a_slow_compile_runs(daemon: DaemonProcess) -> None:
    outcome: dict[str, object] = {}

    def slow_attach() -> None:
        with daemon.client() as c:
            outcome["attach"] = c.call("attach", slot="getppid", source=slow_source(), filename="slow.c")

    t = threading.Thread(target=slow_attach)
    t.start()
    try:
        time.sleep(0.3)  # let the attach reach the compiler
        answered_during_compile = 0
        with daemon.client() as c:
            while t.is_alive():
                c.call("list")
                if t.is_alive():
                    answered_during_compile += 1
                time.sleep(0.05)
    finally:
        t.join()
    assert answered_during_compile >= 3, "list did not answer while the compile ran"
    assert outcome["attach"]["function"] == "slow"


def test_compile_timeout_kills_the_compile_and_keeps_serving(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", compile_timeout=1.5)
    try:
        with d.client() as c:
            with pytest.raises(RemoteError) as err:
                c.call("attach", slot=268, source=slow_source(16))
            assert err.value.code == "compile_timeout"
            assert c.call("list") == {"slots": []}
        assert busy_children_of(d.proc.pid) == [], "the timed-out compile worker is still running"
    finally:
        assert d.stop() == 0


def test_sigterm_exits_0_removes_the_socket_and_keeps_the_pins(tmp_path: Path, pin_root: Path) -> None:
    counter = pin_root / "maps" / "count"
    d = start_daemon(tmp_path, pin_root / "daemon")
    with d.client() as c:
        c.call("attach", slot=268, source=counting_handler(counter))
    assert d.stop() == 0
    assert not d.socket.exists()
    compat = {"compat_slots", "compat_misses"} if platform.machine() == "x86_64" else set()
    assert {p.name for p in d.pin_dir.iterdir()} == {"link", "prog", "prog_array", "staged_array", "staging", "counts",
                                                     "timing", "call", "events", "event_counts", "handlers"} | compat
    fchmodat(11)  # still traced with no daemon running
    assert read_counter(counter) == 11


def test_config_errors_name_the_key(tmp_path: Path, pin_root: Path) -> None:
    cases = {
        "unknown": ({"pin_dir": str(pin_root / "d"), "miss_interval": 3}, "miss_interval"),
        "bad value": ({"pin_dir": str(pin_root / "d"), "miss_log_interval": -1}, "miss_log_interval"),
        "bad watch": ({"pin_dir": str(pin_root / "d"), "socket": str(tmp_path / "s"),
                       "watch_misses": ["fchmodatt"]}, "watch_misses"),
    }
    for name, (settings, key) in cases.items():
        config = write_config(tmp_path / f"{name}.toml", **settings)
        r = run_tailcalld(config)
        assert r.returncode == 78, (name, r.stderr)
        assert key in r.stderr, (name, r.stderr)
    assert not (pin_root / "d" / "link").exists()


def test_replies_always_match_the_response_model(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        for payload in (b'{"command": "status"}\n', b'{"command": "list", "id": "abc"}\n', b"null\n"):
            c.send_raw(payload)
            response_adapter.validate_python(c.read_reply())
    with Client(daemon.socket) as c:
        assert c.call("status")["pin_dir"] == str(daemon.pin_dir)
