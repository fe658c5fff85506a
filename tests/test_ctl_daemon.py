"""tailcallctl's habits against a real daemon: show SLOT (maps as the kernel has them, the saved
source, across a restart), exit codes of attach, errors as JSON, --version, the spinner on a
terminal and its absence elsewhere."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import VENV_BIN, DaemonProcess, start_daemon
from tailcalld import __version__
from tailcalld.spinner import ERASE, FRAMES

BCC_WITH_MAP = """\
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits_by_nr, u64, 7);

int count_getppid(struct bpf_raw_tracepoint_args *ctx)
{
    hits_by_nr.increment(0);
    return 0;
}
"""

LIBBPF_WITH_MAP = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u64);
} seen SEC(".maps");

SEC("raw_tp/sys_enter")
int on_getpgid(struct bpf_raw_tracepoint_args *ctx)
{
    u32 key = 0;
    u64 one = 1;
    bpf_map_update_elem(&seen, &key, &one, BPF_ANY);
    return 0;
}
char _license[] SEC("license") = "GPL";
"""

DOES_NOT_COMPILE = "int h(void *ctx) { return undefined_thing; }\n"
REFUSED = "int h(struct bpf_raw_tracepoint_args *ctx) { return *(int *)ctx->args[0]; }\n"


def bpftool(*args: str) -> Any:
    r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def kernel_maps(prog_id: int) -> dict[int, dict[str, Any]]:
    """The program's maps as bpftool (root, by id: what tailcalld itself never does) sees them."""
    ids = bpftool("prog", "show", "id", str(prog_id)).get("map_ids", [])
    return {i: bpftool("map", "show", "id", str(i)) for i in ids}


def attach(d: DaemonProcess, slot: str, path: Path, *options: str) -> int:
    r = d.ctl("attach", slot, str(path), "--json", "-q", *options)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(json.loads(r.stdout)["prog_id"])


def show(d: DaemonProcess, *args: str) -> dict[str, Any]:
    r = d.ctl("show", *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def assert_maps_are_the_kernel_s(shown: dict[str, Any], prog_id: int) -> None:
    kernel = kernel_maps(prog_id)
    assert {m["id"] for m in shown["maps"]} == set(kernel)
    for m in shown["maps"]:
        k = kernel[m["id"]]
        assert (m["name"], m["type"], m["key_size"], m["value_size"], m["max_entries"]) == (
            k["name"], k["type"], k["bytes_key"], k["bytes_value"], k["max_entries"]), (m, k)


def test_show_names_the_maps_and_prints_the_source(daemon: DaemonProcess, tmp_path: Path) -> None:
    bcc, libbpf = tmp_path / "count.c", tmp_path / "seen.bpf.c"
    bcc.write_text(BCC_WITH_MAP)
    libbpf.write_text(LIBBPF_WITH_MAP)
    bcc_prog = attach(daemon, "getppid", bcc)
    libbpf_prog = attach(daemon, "getpgid", libbpf, "--exit")

    shown = show(daemon, "getppid")
    assert (shown["slot"]["slot"], shown["slot"]["function"], shown["slot"]["prog_id"]) == (110, "count_getppid",
                                                                                           bcc_prog)
    assert shown["source"] == BCC_WITH_MAP
    assert shown["maps_note"] is None
    assert [(m["name"], m["type"], m["max_entries"]) for m in shown["maps"] if m["name"] == "hits_by_nr"] == [
        ("hits_by_nr", "array", 7)]
    assert_maps_are_the_kernel_s(shown, bcc_prog)

    exit_shown = show(daemon, "getpgid", "--exit")
    assert (exit_shown["slot"]["hook"], exit_shown["slot"]["prog_id"]) == ("exit", libbpf_prog)
    assert ("seen", "hash", 4, 8, 64) in [(m["name"], m["type"], m["key_size"], m["value_size"], m["max_entries"])
                                          for m in exit_shown["maps"]]
    assert_maps_are_the_kernel_s(exit_shown, libbpf_prog)

    # For people: the key/value block, the maps' table, the source; --no-source, --source alone.
    text = daemon.ctl("show", "110").stdout
    assert text.startswith("Slot      getppid (110)\n")
    assert "MAP ID" in text and "hits_by_nr" in text and "# count.c\n" + BCC_WITH_MAP in text
    no_source = daemon.ctl("show", "getppid", "--no-source").stdout
    assert "hits_by_nr" in no_source and "BPF_ARRAY" not in no_source
    assert daemon.ctl("show", "getppid", "--source").stdout == BCC_WITH_MAP
    bare = daemon.ctl("show", "getppid", "--no-source", "--no-legend").stdout
    assert "MAP ID" not in bare and "listed" not in bare and "hits_by_nr" in bare


def test_show_knows_the_maps_after_a_restart(tmp_path: Path, pin_root: Path) -> None:
    """The restarted daemon adopts the program through its pin: the kernel's map ids, named from
    the slot's record (nothing is opened by id)."""
    handler = tmp_path / "count.c"
    handler.write_text(BCC_WITH_MAP)
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        prog_id = attach(d, "getppid", handler)
        before = show(d, "getppid")
    finally:
        d.stop()
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        after = show(d, "getppid")
        assert after["slot"]["prog_id"] == prog_id
        assert after["maps"] == before["maps"]
        assert after["source"] == BCC_WITH_MAP
        assert_maps_are_the_kernel_s(after, prog_id)
    finally:
        d.stop()


def test_show_of_an_object_names_its_maps_and_says_it_has_no_source(daemon: DaemonProcess, tmp_path: Path) -> None:
    from test_libbpf import build_object
    source = tmp_path / "seen.bpf.c"
    source.write_text(LIBBPF_WITH_MAP)
    attach(daemon, "getpgid", source)  # a libbpf compile first: it leaves vmlinux.h in the daemon's cache
    obj = build_object(LIBBPF_WITH_MAP.replace("on_getpgid", "from_object"), tmp_path, daemon)
    prog_id = attach(daemon, "getppid", obj)

    shown = show(daemon, "getppid")
    assert (shown["slot"]["function"], shown["slot"]["dialect"], shown["source"]) == ("from_object", "object", None)
    assert shown["object_bytes"] > 0 and shown["headers"] == {}
    assert "seen" in [m["name"] for m in shown["maps"]]
    assert_maps_are_the_kernel_s(shown, prog_id)
    text = daemon.ctl("show", "getppid").stdout
    assert text.endswith(f"\n# a BPF object of {shown['object_bytes']} bytes: no source was saved\n")
    r = daemon.ctl("show", "getppid", "--source")
    assert (r.returncode, r.stdout) == (0, "") and "no source was saved" in r.stderr


def test_show_of_an_empty_slot_is_slot_empty(daemon: DaemonProcess) -> None:
    r = daemon.ctl("show", "getppid")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "tailcallctl: slot getppid (110) holds no handler [slot_empty]\n"
    r = daemon.ctl("show", "getppid", "--exit", "--json")
    assert (r.returncode, r.stderr) == (1, "")
    assert json.loads(r.stdout)["error"]["code"] == "slot_empty"
    r = daemon.ctl("--json", "show", "no_such_syscall")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "unknown_syscall"


@pytest.mark.parametrize(("source", "exit_code", "code"), [
    (DOES_NOT_COMPILE, 3, "compile_error"), (REFUSED, 4, "verifier_rejected")])
def test_attach_exit_codes_are_check_s(daemon: DaemonProcess, tmp_path: Path, source: str, exit_code: int,
                                       code: str) -> None:
    handler = tmp_path / "h.c"
    handler.write_text(source)
    for verb in (["attach", "getppid"], ["check"]):
        r = daemon.ctl(*verb, str(handler))
        assert r.returncode == exit_code, (verb, r.stderr)
        assert f"[{code}]" in r.stderr and r.stdout == ""
        r = daemon.ctl(*verb, str(handler), "--json")
        assert (r.returncode, r.stderr) == (exit_code, "")
        error = json.loads(r.stdout)["error"]
        assert error["code"] == code and "h.c" in error["details"]["log"]
    assert json.loads(daemon.ctl("list", "--json").stdout)["slots"] == []  # nothing was attached


def test_version_names_the_daemon(daemon: DaemonProcess) -> None:
    r = daemon.ctl("--version")
    assert r.returncode == 0
    assert r.stdout == f"tailcallctl {__version__}\ntailcalld {__version__} (pid {daemon.pid}) at {daemon.socket}\n"
    r = daemon.ctl("--version", "--json")
    assert json.loads(r.stdout) == {"tailcallctl": __version__, "tailcalld": {
        "version": __version__, "pid": daemon.pid, "socket": str(daemon.socket)}}


def test_daemon_errors_as_json_on_stdout(daemon: DaemonProcess) -> None:
    r = daemon.ctl("detach", "getppid", "--json")
    assert (r.returncode, r.stderr) == (1, "")
    assert json.loads(r.stdout) == {"error": {"code": "slot_empty", "message": "slot getppid (110) holds no handler",
                                              "details": {"slot": 110}}}


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """argv with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, what the terminal got."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, "tailcallctl wrote nothing for 120 s"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                break
            if not chunk:
                break
            seen += chunk
        out = proc.stdout.read() if proc.stdout else b""
        return proc.wait(60), out.decode(), seen.decode()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


# Seconds of clang on any machine: 2^14 additions of a volatile, each an instruction.
SLOW_LIBBPF = LIBBPF_WITH_MAP.replace("u32 key = 0;", "volatile int x = 1; u32 key = A14 & 0;").replace(
    '#include "vmlinux.h"', '#include "vmlinux.h"\n#define A0 (x + 1)\n'
    + "".join(f"#define A{i} (A{i - 1} + A{i - 1})\n" for i in range(1, 15)))


def test_spinner_on_a_terminal_is_erased_and_absent_elsewhere(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A compile of seconds keeps tailcallctl waiting well past the spinner's 0.3 s (a plain
    libbpf handler compiles in less on an idle machine, and a second time comes from the cache)."""
    handler = tmp_path / "seen.bpf.c"
    handler.write_text(SLOW_LIBBPF)
    ctl = [str(VENV_BIN / "tailcallctl"), "--socket", str(daemon.socket)]
    code, out, terminal = _run_on_a_terminal([*ctl, "attach", "getpgid", str(handler), "--fresh", "-q"])
    assert code == 0, terminal
    assert out.startswith("attached on_getpgid to getpgid (121): program ")
    assert f"{FRAMES[0]} attach {handler}: compiling and loading (" in terminal
    assert terminal.endswith(ERASE)  # the line is left empty: nothing of the spinner stays

    r = daemon.ctl("attach", "getpgid", str(handler), "--fresh", "-q")  # stderr a pipe: no spinner
    assert (r.returncode, r.stderr) == (0, "")
    code, out, terminal = _run_on_a_terminal([*ctl, "attach", "getpgid", str(handler), "--fresh", "-q", "--json"])
    assert code == 0 and json.loads(out)["function"] == "on_getpgid"
    assert terminal == ""  # --json: never
