"""The metrics on the real kernel: a daemon with handlers attached, syscalls made, and the
scrape's counters against list's, exactly; promtool's check of the real output; the sockets'
access and the start's refusals; and a real Prometheus server that scrapes the daemon and
answers a query for one of its counters."""

from __future__ import annotations

import ctypes
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import bpftool_empty, run_tailcalld, start_daemon, wait_until, write_config
from prometheus import free_port, running_prometheus
from tailcalld.metrics_http import fetch

# Past every syscall table (ENOSYS), and past those other tests use (1000, 1001, 1007):
# nobody else calls them, so every count is this test's own.
ENTER_NR, PROM_NR = 1013, 1014
CALLS = 500
NOBODY = 65534
Samples = dict[str, list[tuple[dict[str, str], float]]]

EVENT_HANDLER = r"""
#include "tailcalld.h"
int on_call(struct bpf_raw_tracepoint_args *ctx)
{
    TC_PRINTF(ctx, "arg %lu", TC_ARG(ctx, 0));
    return 0;
}
"""
TRIVIAL = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }"


def raw_syscall(nr: int, n: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for i in range(n):
        libc.syscall(nr, i)


def samples(text: bytes) -> Samples:
    """sample name -> [(labels, value)], as a scraper parses the text."""
    found: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    matching = [v for have, v in found.get(name, []) if labels.items() <= have.items()]
    assert len(matching) == 1, f"{name}{labels}: {matching}"
    return matching[0]


def test_a_scrape_agrees_with_list_exactly_and_passes_promtool(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", miss_log_interval=0.5)
    slow = socket.socket(socket.AF_UNIX)
    try:
        with d.client() as c:
            c.call("attach", slot=ENTER_NR, source=EVENT_HANDLER, filename="events.c")
            c.call("attach", slot=ENTER_NR, hook="exit", source=TRIVIAL, filename="ret.c")
            with pytest.raises(Exception, match="compile_error"):
                c.call("attach", slot=ENTER_NR + 1, source="int h(", filename="broken.c")
            with pytest.raises(Exception, match="slot_out_of_range"):
                c.call("attach", slot=5000, source=TRIVIAL, filename="far.c")
        raw_syscall(ENTER_NR, CALLS)
        wait_until(lambda: d.call("list")["slots"][0]["events_delivered"] == CALLS)
        # A client that starts a request and never ends it does not hold anyone else up.
        slow.connect(str(tmp_path / "metrics.sock"))
        slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")

        time.sleep(0.2)  # past the counters' snapshot age: list and the scrape read the same counts
        listed = d.call("list")["slots"]
        text = fetch(tmp_path / "metrics.sock")
        found = samples(text)
        assert [(s["slot"], s["hook"]) for s in listed] == [(ENTER_NR, "enter"), (ENTER_NR, "exit")]
        for s in listed:
            where = {"slot": str(s["slot"]), "syscall": s["syscall"], "hook": s["hook"]}
            assert value(found, "tailcalld_slot_hits_total", **where) == s["hits"] == CALLS
            assert value(found, "tailcalld_slot_misses_total", **where) == s["misses"] == 0
            assert value(found, "tailcalld_slot_events_emitted_total", **where) == s["events_emitted"]
            assert value(found, "tailcalld_slot_events_delivered_total", **where) == s["events_delivered"]
            assert value(found, "tailcalld_slot_events_lost_total", **where) == s["events_lost"] == 0
            assert value(found, "tailcalld_slot_info", **where, function=s["function"], prog_id=str(s["prog_id"]),
                         sha256=s["source_sha256"], dialect="bcc") == 1
        assert listed[0]["events_emitted"] == CALLS and listed[1]["events_emitted"] == 0
        assert value(found, "tailcalld_slots_used") == 2
        assert value(found, "tailcalld_attaches_total", result="ok") == 2
        assert value(found, "tailcalld_attaches_total", result="compile_error") == 1
        assert value(found, "tailcalld_attaches_total", result="slot_out_of_range") == 1
        assert value(found, "tailcalld_compile_duration_seconds_count", dialect="bcc") == 3  # the failed one too
        assert value(found, "tailcalld_handler_timing_enabled") == 0
        assert "tailcalld_slot_handler_seconds_total" not in found
        assert value(found, "tailcalld_build_info", version=d.call("ping")["version"]) == 1
        assert value(found, "tailcalld_reconcile_corrections_total") == 0

        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        ctl = d.ctl("metrics")
        assert ctl.returncode == 0, ctl.stderr
        assert value(samples(ctl.stdout.encode()), "tailcalld_slot_hits_total", slot=str(ENTER_NR), hook="enter") == CALLS

        # Handler time, while timing is on.
        d.call("timing", seconds=30)
        raw_syscall(ENTER_NR, 100)
        time.sleep(0.2)
        listed = d.call("list")["slots"]
        found = samples(fetch(tmp_path / "metrics.sock"))
        where = {"slot": str(ENTER_NR), "syscall": listed[0]["syscall"]}
        assert value(found, "tailcalld_handler_timing_enabled") == 1
        assert value(found, "tailcalld_slot_handler_timed_runs_total", **where) == listed[0]["timed_runs"] == 100
        assert value(found, "tailcalld_slot_handler_seconds_total", **where) == listed[0]["timed_ns"] / 1e9

        # A slot emptied behind tailcalld's back is put right, and counted.
        bpftool_empty(d.pin_dir / "prog_array", ENTER_NR)
        wait_until(lambda: len(d.call("status")["corrections"]) >= 1)
        found = samples(fetch(tmp_path / "metrics.sock"))
        assert value(found, "tailcalld_reconcile_corrections_total") == len(d.call("status")["corrections"])

        slow.settimeout(30)
        assert slow.recv(100).startswith(b"HTTP/1.1 408 ")  # and the slow one was timed out in the end
    finally:
        slow.close()
        d.stop()
    assert not (tmp_path / "metrics.sock").exists()  # a stop removes it, as the control socket


NOBODY_SCRIPT = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
c = C("localhost", timeout=30)
try:
    c.request("GET", "/metrics")
except OSError as e:
    print(json.dumps({"errno": e.errno})); sys.exit(0)
r = c.getresponse()
print(json.dumps({"status": r.status}))
"""


def as_user(path: Path, uid: int, gid: int) -> dict[str, Any]:
    r = subprocess.run(["/usr/bin/python3", "-c", NOBODY_SCRIPT, str(path)], capture_output=True, text=True,
                       user=uid, group=gid, extra_groups=[], timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_the_metrics_socket_is_root_s_and_the_allowed_group_s(tmp_path: Path, pin_root: Path,
                                                              public_dir: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name
    v6 = free_port()
    d = start_daemon(tmp_path, pin_root / "daemon", socket=public_dir / "s.sock", metrics_listen=f"[::1]:{v6}")
    path = public_dir / "metrics.sock"
    try:
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
        assert as_user(path, NOBODY, NOBODY) == {"errno": 13}  # the file's mode
        os.chmod(path, 0o666)  # an admin's mistake: the peer check still refuses
        assert as_user(path, NOBODY, NOBODY) == {"status": 403}
        with urllib.request.urlopen(f"http://[::1]:{v6}/metrics", timeout=30) as reply:  # IPv6, TCP
            assert b"tailcalld_build_info" in reply.read()
        # allowed_group, applied by a reload to the metrics socket as to the control socket
        write_config(d.config, pin_dir=d.pin_dir, state_dir=tmp_path / "state", socket=d.socket,
                     metrics_listen=f"[::1]:{v6}", allowed_group=group)
        os.kill(d.pid, signal.SIGHUP)
        wait_until(lambda: stat.S_IMODE(os.stat(path).st_mode) == 0o660)
        assert os.stat(path).st_gid == NOBODY
        assert as_user(path, NOBODY, NOBODY) == {"status": 200}
        assert as_user(path, NOBODY, 4242) == {"errno": 13}  # not in the group
    finally:
        d.stop()


def test_metrics_socket_off_and_the_start_s_refusals(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", metrics_socket="")
    try:
        assert not (tmp_path / "metrics.sock").exists()
        assert d.ctl("metrics").returncode == 1
    finally:
        d.stop()
    elsewhere = pin_root / "never"
    config = write_config(tmp_path / "bad.toml", pin_dir=elsewhere, state_dir=tmp_path / "state2",
                          socket=tmp_path / "other.sock", metrics_listen="localhost:9479")
    r = run_tailcalld(config)
    assert r.returncode == 78 and "metrics_listen" in r.stderr and "not a name" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(config, pin_dir=elsewhere, state_dir=tmp_path / "state2", socket=tmp_path / "other.sock",
                     metrics_listen=f"127.0.0.1:{port}")
        r = run_tailcalld(config)
    assert r.returncode == 1 and f"metrics_listen 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr
    assert not elsewhere.exists()  # refused before anything was loaded or pinned


def test_a_real_prometheus_scrapes_the_daemon(tmp_path: Path, pin_root: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    d = start_daemon(tmp_path, pin_root / "daemon", metrics_listen=listen)
    try:
        d.call("attach", slot=PROM_NR, source=TRIVIAL, filename="trivial.c")
        raw_syscall(PROM_NR, 321)
        with running_prometheus(tmp_path, [listen]) as prom:
            hits = f'tailcalld_slot_hits_total{{job="tailcalld",slot="{PROM_NR}",hook="enter"}}'
            wait_until(lambda: [r["value"][1] for r in prom.query(hits)] == ["321"], timeout=90, period=0.5)
            [up] = prom.query('up{job="tailcalld"}')
            assert up["value"][1] == "1"
            [attaches] = prom.query('tailcalld_attaches_total{result="ok"}')
            assert attaches["value"][1] == "1"
    finally:
        d.stop()
