"""What real daemons write to the real journal: every entry names its daemon
(TAILCALLD_INSTANCE=), so two daemons are told apart; failed attaches and detaches are audited
with the peer and the error; and journalctl -x explains the entries with the catalog that
`make setup` installs from this checkout (scripts/install.sh catalog)."""

from __future__ import annotations

import grp
import json
import os
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness import (DIRFD_MAGIC, NR_FCHMODAT, VENV_BIN, DaemonProcess, JournalEntry, counting_handler, fchmodat,
                     journal, start_daemon, wait_journal)
from tailcalld.audit import CHANGE_MESSAGE_ID, FAILED_MESSAGE_ID
from tailcalld.client import RemoteError
from tailcalld.events import EVENT_MESSAGE_ID
from tailcalld.journal import MISS_MESSAGE_ID

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "contrib" / "tailcalld.catalog"
INSTALLED_CATALOG = Path("/usr/lib/systemd/catalog/tailcalld.catalog")

EVENTS = r"""
#include "tailcalld.h"
int on_fchmodat(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)TC_ARG(ctx, 0) != %(dirfd)d)
        return 0;
    TC_PRINTF(ctx, "instance test dirfd %%d", (int)TC_ARG(ctx, 0));
    return 0;
}
"""
BROKEN = "int h(struct bpf_raw_tracepoint_args *ctx) { return undeclared; }\n"
REJECTED = "int h(struct bpf_raw_tracepoint_args *ctx) { u64 *p = (u64 *)ctx; return p[100]; }\n"
KPROBE = "#include <uapi/linux/ptrace.h>\nint kprobe__x(struct pt_regs *ctx) { return PT_REGS_PARM1(ctx) == 7; }\n"
TRIVIAL = "int nothing(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


@pytest.fixture(scope="module")
def catalog() -> None:
    """What `make setup` runs (so `make run` and `make test` have it): a no-op when it did."""
    subprocess.run(["bash", str(REPO / "scripts/install.sh"), "catalog"], check=True, timeout=120)
    assert INSTALLED_CATALOG.read_bytes() == CATALOG.read_bytes()


def entries(d: DaemonProcess, **match: str) -> list[JournalEntry]:
    """One daemon's entries; its pid alone could match an older daemon's (pids come round)."""
    return journal(f"--since=@{d.started - 1:.0f}", _PID=str(d.pid), **match)


def since(d: DaemonProcess, **match: str) -> list[JournalEntry]:
    """Every entry since ``d`` started that matches, whichever process wrote it."""
    return journal(f"--since=@{d.started - 1:.0f}", **match)


def explained(d: DaemonProcess, message_id: str) -> str:
    """journalctl -x of the daemon's entries with that id, each with its catalog text (its lines
    marked "░░ "), as one line of words."""
    out = subprocess.run(["journalctl", "--no-pager", "-x", f"--since=@{d.started - 1:.0f}", f"_PID={d.pid}",
                          f"MESSAGE_ID={message_id}"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.replace("░░", " ").split())


def stop_entries(d: DaemonProcess) -> list[JournalEntry]:
    return [e for e in entries(d) if e["MESSAGE"].startswith("stopping;")]


def refused(d: DaemonProcess, command: str, **fields: object) -> RemoteError:
    with d.client() as c, pytest.raises(RemoteError) as err:
        c.call(command, **fields)
    return err.value


def exercise(d: DaemonProcess, dirfd: int) -> None:
    """One entry of each kind: an attach (audit), events written with --journal, a failed
    attach (audit), misses of the watched getppid; the start's and stop's plain lines."""
    d.call("attach", slot=NR_FCHMODAT, source=EVENTS % {"dirfd": dirfd}, filename="events.c", journal=True)
    fchmodat(3, dirfd)
    assert refused(d, "attach", slot=NR_FCHMODAT, source=BROKEN, filename="broken.c").code == "compile_error"
    for _ in range(100):
        os.getppid()


@pytest.mark.usefixtures("journald", "catalog")
def test_every_entry_names_its_daemon_and_two_daemons_are_told_apart(tmp_path: Path, pin_root: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_daemon(tmp_path / "a", pin_root / "a", miss_log_interval=0.5, watch_misses=["getppid"])
    try:
        b = start_daemon(tmp_path / "b", pin_root / "b", miss_log_interval=0.5, watch_misses=["getppid"],
                         instance="node-b")
        try:
            names = {a.pid: str(pin_root / "a"), b.pid: "node-b"}  # unnamed: its pin folder
            for d, dirfd in ((a, DIRFD_MAGIC + 11), (b, DIRFD_MAGIC + 12)):
                exercise(d, dirfd)
                for kind in (CHANGE_MESSAGE_ID, EVENT_MESSAGE_ID, FAILED_MESSAGE_ID, MISS_MESSAGE_ID):
                    got = wait_journal(partial(entries, d, MESSAGE_ID=kind), timeout=30)
                    assert got, f"no entry with MESSAGE_ID={kind} from the daemon of {names[d.pid]}"
                    assert {e["TAILCALLD_INSTANCE"] for e in got} == {names[d.pid]}, got
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0
    for d in (a, b):
        stopped = wait_journal(partial(stop_entries, d))
        assert stopped, f"no stop entry from {names[d.pid]}"
        everything = entries(d)
        assert any(" ready: dispatcher program " in e["MESSAGE"] for e in everything)
        # Every entry, of every kind (plain lines, audit, misses, events), names its daemon...
        assert [e for e in everything if e.get("TAILCALLD_INSTANCE") != names[d.pid]] == []
        # ...and the name alone finds them all, and nothing of the other daemon.
        named = since(d, TAILCALLD_INSTANCE=names[d.pid])
        assert [e["__CURSOR"] for e in named] == [e["__CURSOR"] for e in everything]
    # journalctl -x explains misses and events with the catalog's text, fields filled in.
    misses = explained(a, MISS_MESSAGE_ID)
    assert "Tail-call misses on getppid (110)" in misses and "reached tailcalld's dispatcher" in misses
    events = explained(b, EVENT_MESSAGE_ID)
    assert "Event from the handler of fchmodat" in events and "of the tailcalld daemon node-b sent this event" in events


@pytest.mark.usefixtures("journald", "catalog")
def test_failed_attaches_and_detaches_are_audited(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon", max_source_bytes=4096)
    try:
        counter = pin_root / "maps" / "count"
        attached = d.call("attach", slot=NR_FCHMODAT, source=counting_handler(counter), filename="count.c")
        tries: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
            # (command, request, code, what the entry says of the slot)
            ("attach", {"slot": "fchmodat", "source": BROKEN, "filename": "broken.c"}, "compile_error",
             {"SLOT": "268", "SYSCALL_NAME": "fchmodat"}),
            ("attach", {"slot": NR_FCHMODAT, "source": REJECTED, "filename": "rejected.c"}, "verifier_rejected",
             {"SLOT": "268"}),
            ("attach", {"slot": NR_FCHMODAT, "source": KPROBE, "function": "kprobe__x", "filename": "kprobe.c"},
             "wrong_program_type", {"SLOT": "268", "FUNCTION": "kprobe__x"}),
            ("attach", {"slot": "fchmodatt", "source": TRIVIAL, "filename": "t.c"}, "unknown_syscall",
             {"SLOT_REQUESTED": "fchmodatt"}),
            ("attach", {"slot": 5000, "source": TRIVIAL, "filename": "t.c"}, "slot_out_of_range",
             {"SLOT_REQUESTED": "5000"}),
            ("attach", {"slot": NR_FCHMODAT, "source": "/*" + "x" * 5000 + "*/" + TRIVIAL, "filename": "big.c"},
             "source_too_large", {"SLOT": "268"}),
            ("attach", {"slot": NR_FCHMODAT, "source": TRIVIAL, "filename": "exit.c", "hook": "exit",
                        "variables": {"x": 1}}, "bad_request", {"SLOT": "268", "SLOT_HOOK": "exit"}),
            ("attach", {"slot": NR_FCHMODAT, "filename": "nosource.c"}, "bad_request",  # refused by the protocol
             {"SLOT_REQUESTED": "268"}),
            ("detach", {"slot": 300}, "slot_empty", {"SLOT": "300", "SYSCALL_NAME": "fanotify_init"}),
        ]
        errors = []
        for command, request, code, _ in tries:
            err = refused(d, command, **request)
            assert err.code == code, (request, err)
            errors.append(err)
        # A check changes nothing: a failed one is not audited.
        assert refused(d, "check", source=BROKEN, filename="checked.c").code == "compile_error"
        # Nothing changed: the first handler is still there.
        assert [(s["slot"], s["prog_id"]) for s in d.call("list")["slots"]] == [(NR_FCHMODAT,
                                                                                 attached["prog_id"])]

        failed = wait_journal(lambda: entries(d, MESSAGE_ID=FAILED_MESSAGE_ID), minimum=len(tries), timeout=30)
        assert len(failed) == len(tries), [e["MESSAGE"] for e in failed]  # each once, the check never
        for (command, request, code, slot), err, entry in zip(tries, errors, failed, strict=True):
            assert entry["TAILCALLD_ACTION"] == f"{command}-failed"
            assert (entry["ERROR_CODE"], entry["ERROR_MESSAGE"]) == (code, err.message)
            assert (entry["PEER_UID"], entry["PEER_PID"], entry["PRIORITY"]) == ("0", str(os.getpid()), "4")
            assert entry["PEER_COMM"] and entry["TAILCALLD_INSTANCE"] == str(d.pin_dir)
            assert {k: entry.get(k) for k in slot} == slot, entry
            if command == "attach":
                assert entry["FILENAME"] == request["filename"]
                assert entry["MESSAGE"].startswith(f"attach failed: {request['filename']} in slot ")
            assert entry["MESSAGE"].endswith(f"[{code}] (by uid 0, pid {os.getpid()}, {entry['PEER_COMM']})")

        # The change that happened has its own id, and both are explained by journalctl -x.
        [change] = wait_journal(lambda: entries(d, MESSAGE_ID=CHANGE_MESSAGE_ID))
        assert (change["TAILCALLD_ACTION"], change["FILENAME"], change["PROG_ID"]) == (
            "attach", "count.c", str(attached["prog_id"]))
        text = explained(d, FAILED_MESSAGE_ID)
        assert "tailcalld refused a change: attach-failed (compile_error)" in text
        assert f"uid 0 (pid {os.getpid()}, {failed[0]['PEER_COMM']}) asked the tailcalld daemon {d.pin_dir} for" in text
        assert f"The error was slot_empty: {errors[-1].message}" in text
        assert "tailcalld slot change: attach by uid 0" in explained(d, CHANGE_MESSAGE_ID)
    finally:
        assert d.stop() == 0


@pytest.mark.usefixtures("journald")
def test_a_slot_an_apply_could_not_fill_is_audited(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        (tmp_path / "broken.c").write_text(BROKEN)
        slots = tmp_path / "slots.toml"
        slots.write_text('[[slot]]\nslot = "fchmodat"\nfile = "broken.c"\n')
        ctl = subprocess.Popen([str(VENV_BIN / "tailcallctl"), "--socket", str(d.socket), "apply", str(slots)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = ctl.communicate(timeout=120)
        assert ctl.returncode not in (0, None) and "undeclared identifier" in out + err, (out, err)
        [entry] = wait_journal(lambda: entries(d, MESSAGE_ID=FAILED_MESSAGE_ID), timeout=30)
        assert (entry["TAILCALLD_ACTION"], entry["ERROR_CODE"], entry["SLOT"], entry["FILENAME"]) == (
            "attach-failed", "compile_error", str(NR_FCHMODAT), "broken.c")
        assert entry["TAILCALLD_APPLY"].endswith("slots.toml") and "[[slot]] 1 (broken.c)" in entry["ERROR_MESSAGE"]
        assert (entry["PEER_PID"], entry["PEER_COMM"]) == (str(ctl.pid), "tailcallctl")
        assert d.call("list")["slots"] == []
    finally:
        assert d.stop() == 0


NOBODY = 65534  # in "nogroup" (Debian's name for gid 65534)


# A client of the protocol run by the system's python3: the checkout (and its venv's tailcallctl)
# may sit where an unprivileged user cannot reach it (/root/project on a fresh machine).
ATTACH_SCRIPT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
request = {"id": 1, "command": "attach", "slot": "fchmodat", "filename": sys.argv[2], "source": sys.stdin.read()}
s.sendall(json.dumps(request).encode() + b"\\n")
print(s.makefile().readline().strip())
"""


@pytest.mark.usefixtures("journald")
def test_a_failed_attach_names_the_unprivileged_peer_that_asked(tmp_path: Path, pin_root: Path,
                                                                public_dir: Path) -> None:
    """An attach by a member of allowed_group: a compile error and a verifier rejection each
    reach the user and the journal, with that user's uid and pid."""
    d = start_daemon(tmp_path, pin_root / "daemon", allowed_group=grp.getgrgid(NOBODY).gr_name,
                     socket=public_dir / "s.sock")
    try:
        runs = []
        for name, source, code in (("broken.c", BROKEN, "compile_error"), ("rejected.c", REJECTED,
                                                                           "verifier_rejected")):
            client = subprocess.Popen(["/usr/bin/python3", "-c", ATTACH_SCRIPT, str(d.socket), name], user=NOBODY,
                                      group=NOBODY, extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            out, err = client.communicate(source, timeout=120)
            assert client.returncode == 0, err
            assert json.loads(out)["error"]["code"] == code, out
            runs.append((client.pid, name, code))
        assert d.call("list")["slots"] == []  # nothing attached

        failed = wait_journal(lambda: entries(d, MESSAGE_ID=FAILED_MESSAGE_ID), minimum=len(runs), timeout=30)
        assert [(e["PEER_PID"], e["FILENAME"], e["ERROR_CODE"]) for e in failed] == [
            (str(pid), name, code) for pid, name, code in runs]
        for e in failed:
            assert (e["PEER_UID"], e["PEER_COMM"], e["TAILCALLD_ACTION"], e["SLOT"]) == (
                str(NOBODY), "python3", "attach-failed", str(NR_FCHMODAT))
            assert e["MESSAGE"].endswith(f"(by uid {NOBODY}, pid {e['PEER_PID']}, python3)")
    finally:
        assert d.stop() == 0


@pytest.mark.usefixtures("catalog")
def test_the_catalog_database_lists_every_id() -> None:
    listed = subprocess.run(["journalctl", "--list-catalog", CHANGE_MESSAGE_ID, FAILED_MESSAGE_ID,
                             MISS_MESSAGE_ID, EVENT_MESSAGE_ID], capture_output=True, text=True, check=True).stdout
    subjects = dict(line.split(" ", 1) for line in listed.splitlines())
    assert subjects == {
        CHANGE_MESSAGE_ID: "tailcalld: tailcalld slot change: @TAILCALLD_ACTION@ by uid @PEER_UID@",
        FAILED_MESSAGE_ID: "tailcalld: tailcalld refused a change: @TAILCALLD_ACTION@ (@ERROR_CODE@)",
        MISS_MESSAGE_ID: "tailcalld: Tail-call misses on @SYSCALL_NAME@ (@SYSCALL_NR@)",
        EVENT_MESSAGE_ID: "tailcalld: Event from the handler of @SLOT@",
    }
