"""bcc handlers that read kernel structs through headers of another kernel are warned (this
machine: a 6.18 kernel, Debian's 6.1 headers linked as its build/source), in the reply, by
tailcallctl unless --quiet, and in the journal; handlers that read only their context are not."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import pytest

from harness import DaemonProcess, journal, wait_journal
from test_unit_headers import SIMPLE, TASK


def _headers_release() -> str | None:
    """The release the headers bcc uses say they are of, read here without tailcalld's code."""
    build = Path("/lib/modules") / platform.release() / "build" / "include" / "generated" / "utsrelease.h"
    found = re.search(r'UTS_RELEASE\s+"([^"]+)"', build.read_text()) if build.exists() else None
    return found[1] if found else None


pytestmark = pytest.mark.skipif(_headers_release() in (None, platform.release()),
                                reason="needs kernel headers of another kernel than the running one")


def test_task_struct_reads_are_warned(journald: None, daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = tmp_path / "ppid.c"
    handler.write_text(TASK)
    r = daemon.ctl("check", str(handler))
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    for words in ("ppid.c reads kernel structs (struct task_struct, bpf_get_current_task())",
                  str(_headers_release()), platform.release(), "libbpf dialect"):
        assert words in line, line

    reply = json.loads(daemon.ctl("attach", "execve", str(handler), "--json").stdout)
    assert len(reply["warnings"]) == 1 and "CO-RE" in reply["warnings"][0]
    again = daemon.ctl("attach", "execveat", str(handler), "--quiet")  # a reuse: warned again, unless --quiet
    assert again.returncode == 0 and again.stderr == ""
    assert "warning: " in daemon.ctl("attach", "execveat", str(handler)).stderr

    entries = wait_journal(lambda: journal(SYSLOG_IDENTIFIER="tailcalld", _PID=str(daemon.pid),
                                           TAILCALLD_WARNING="kernel_headers"), minimum=2)
    assert len(entries) >= 2 and "ppid.c reads kernel structs" in entries[0]["MESSAGE"]


def test_context_only_handlers_are_not_warned(daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = tmp_path / "simple.c"
    handler.write_text(SIMPLE)
    r = daemon.ctl("check", str(handler), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["warnings"] == [] and "warning: " not in r.stderr
    r = daemon.ctl("attach", "openat", str(handler))
    assert r.returncode == 0 and "warning: " not in r.stderr
