"""Hostile handler sources against the real daemon and compile worker (issue #10, items 5, 6, 8,
18, 19): no include spelling reads a file outside the headers, libbpf's pinned maps stay in
the handler's own folder, oversized maps and map errors are named, a NUL byte is refused, and
a worker that crashes or answers at length gets a clear reply."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import (NR_FCHMODAT, DaemonProcess, busy_children_of, kernel_slots, libbpf_pinned_handler, own_daemon,
                     pin_foreign_map)
from tailcalld.client import Client, RemoteError
from tailcalld.compile_worker import RESULT_FILE

GOOD_FN = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
LIBBPF_HEAD = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
LIBBPF_FN = 'SEC("raw_tracepoint/sys_enter")\nint h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n' \
            'char _license[] SEC("license") = "GPL";\n'
SECRET = f"SECRET_{secrets.token_hex(6)} = root only;"


@pytest.fixture(scope="module")
def served(machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with own_daemon(tmp_path_factory.mktemp("hostile")) as d:
        yield d


@pytest.fixture
def secret_files(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A root-only file outside every include folder, and one reachable by a path relative to
    the daemon's working folder (the tests' own, inherited), which clang searches for
    `#include "..."` in a source read from stdin."""
    absolute = tmp_path / "shadow"
    absolute.write_text(SECRET + "\n")
    absolute.chmod(0o600)
    relative = Path(f".tailcalld-leak-{secrets.token_hex(4)}.h")
    relative.write_text(SECRET + "\n")
    relative.chmod(0o600)
    try:
        yield absolute, str(relative)
    finally:
        relative.unlink()


def reply(d: DaemonProcess, command: str, **fields: Any) -> dict[str, Any]:
    """The daemon's whole reply, success or error."""
    with d.client() as c:
        c.send_raw(json.dumps({"id": 1, "command": command, **fields}).encode() + b"\n")
        answer: dict[str, Any] = c.read_reply()
        return answer


def spellings(absolute: Path, relative: str) -> dict[str, str]:
    return {"plain": f'#include "{absolute}"', "digraph": f'%:include "{absolute}"',
            "comment": f'#/**/include "{absolute}"', "backslash-newline": f'#\\\ninclude "{absolute}"',
            "angle brackets": f"#include <{absolute}>", "relative to the working folder": f'#include "{relative}"'}


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_no_include_spelling_leaks_a_root_only_file(served: DaemonProcess, secret_files: tuple[Path, str],
                                                    dialect: str) -> None:
    absolute, relative = secret_files
    head, body = ("", GOOD_FN) if dialect == "bcc" else (LIBBPF_HEAD, LIBBPF_FN)
    for name, include in spellings(absolute, relative).items():
        for command in ("check", "attach"):
            fields = {"slot": 300} if command == "attach" else {}
            answer = reply(served, command, source=f"{head}{include}\n{body}", dialect=dialect, **fields)
            assert SECRET not in json.dumps(answer), (name, command)
            assert not answer["ok"], (name, command, answer)
    assert kernel_slots(served.pin_dir / "prog_array") == {}


def run_worker(request: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The compile worker run by hand, as the daemon runs it, with no check of the source first."""
    work = Path(tempfile.mkdtemp(prefix="tailcalld-test-worker-"))
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        request |= {"work_dir": str(work), "memory_max": 2 << 30, "cpu_seconds": 60, "max_map_bytes": 1 << 28}
        with child:
            r = subprocess.run([sys.executable, "-m", "tailcalld.compile_worker", str(child.fileno()), str(os.getpid())],
                               input=json.dumps(request).encode(), capture_output=True, pass_fds=(child.fileno(),),
                               cwd=work, timeout=120, start_new_session=True)
        return json.loads((work / RESULT_FILE).read_text()), (r.stdout + r.stderr).decode(errors="replace")
    finally:
        parent.close()
        shutil.rmtree(work)


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_the_confined_worker_cannot_open_the_file_at_all(machine: None, secret_files: tuple[Path, str],
                                                         dialect: str) -> None:
    """Past the include check (the worker alone): the kernel itself refuses the open."""
    absolute, _ = secret_files
    result, output = run_worker({"dialect": dialect, "source": f'#include "{absolute}"\n{GOOD_FN}', "function": None})
    assert result["code"] == "compile_error", output
    assert SECRET not in output
    assert "Permission denied" in output, output


def map_ids_of(prog_id: int) -> list[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                         check=True).stdout
    ids: list[int] = json.loads(out).get("map_ids", [])
    return ids


def pinned_map_id(pin: Path) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin)], capture_output=True, text=True,
                         check=True).stdout
    map_id: int = json.loads(out)["id"]
    return map_id


def test_pinned_by_name_maps_live_in_the_handlers_folder_and_leave_with_it(served: DaemonProcess) -> None:
    name = f"tcdpin{secrets.token_hex(3)}"
    foreign = Path("/sys/fs/bpf") / name  # where libbpf pins by default: someone else's map is there
    pin_foreign_map(foreign)
    try:
        attached = served.call("attach", slot=301, source=libbpf_pinned_handler(name), dialect="libbpf")
        handlers = served.pin_dir / "handlers"
        [pin] = list(handlers.glob(f"*/{name}"))
        assert pinned_map_id(pin) in map_ids_of(attached["prog_id"])
        assert pinned_map_id(foreign) not in map_ids_of(attached["prog_id"]), "a foreign map was reused"
        served.call("attach", slot=302, source=libbpf_pinned_handler(name), dialect="libbpf")  # shares the handler
        served.call("detach", slot=301)
        assert pin.exists(), "the handler still runs in slot 302"
        served.call("detach", slot=302)
        assert not pin.parent.exists(), "the handler left its last slot, its pins stay"
    finally:
        foreign.unlink()


def test_two_functions_of_one_file_share_its_pinned_map(served: DaemonProcess) -> None:
    """Each --function is a load of its own, and the second reuses the map the first pinned:
    libbpf opens "/" to do so, which the compile's Landlock ruleset must allow (it did not:
    map_error, "error reusing pinned map", EACCES)."""
    name = f"tcdtwo{secrets.token_hex(3)}"
    source = libbpf_pinned_handler(name).replace(
        'char _license[]', 'SEC("raw_tracepoint/sys_exit")\nint h2(struct bpf_raw_tracepoint_args *ctx) '
        f'{{ u32 k = 1; u32 *v = bpf_map_lookup_elem(&{name}, &k); return v ? 0 : 1; }}\nchar _license[]')
    first = served.call("attach", slot=301, source=source, dialect="libbpf", function="h")
    try:
        second = served.call("attach", slot=301, hook="exit", source=source, dialect="libbpf", function="h2")
        try:
            [pin] = list((served.pin_dir / "handlers").glob(f"*/{name}"))
            assert first["prog_id"] != second["prog_id"]
            assert pinned_map_id(pin) in map_ids_of(first["prog_id"])
            assert pinned_map_id(pin) in map_ids_of(second["prog_id"])
        finally:
            served.call("detach", slot=301, hook="exit")
    finally:
        served.call("detach", slot=301)


MAP_CASES = {
    "bcc 1 GiB array": ("bcc", "struct v { char b[1024]; };\nBPF_ARRAY(big, struct v, 1048576);\n", "map_too_large"),
    "bcc 16 TiB array": ("bcc", "struct v { char b[4096]; };\nBPF_ARRAY(big, struct v, 0xffffffff);\n", "map_error"),
    "bcc map the kernel refuses": ("bcc", "BPF_HASH(empty, u32, u64, 0);\n", "map_error"),
    "libbpf 16 TiB array": ("libbpf", "struct v { char b[4096]; };\nstruct { __uint(type, BPF_MAP_TYPE_ARRAY); "
                            "__uint(max_entries, 0xffffffff); __type(key, u32); __type(value, struct v); } big "
                            'SEC(".maps");\n', "map_too_large"),
    "libbpf map the kernel refuses": ("libbpf", "struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 0); "
                                      '__type(key, u32); __type(value, u64); } empty SEC(".maps");\n', "map_error"),
}


@pytest.mark.parametrize("dialect, maps, code", MAP_CASES.values(), ids=MAP_CASES.keys())
def test_map_sizes_and_map_errors_are_named(served: DaemonProcess, dialect: str, maps: str, code: str) -> None:
    source = maps + GOOD_FN if dialect == "bcc" else LIBBPF_HEAD + maps + LIBBPF_FN
    with pytest.raises(RemoteError) as err:
        served.call("attach", slot=303, source=source, dialect=dialect)
    assert err.value.code == code, err.value
    assert NR_FCHMODAT not in kernel_slots(served.pin_dir / "prog_array") and 303 not in kernel_slots(
        served.pin_dir / "prog_array")


def test_a_nul_byte_in_the_source_is_refused(served: DaemonProcess) -> None:
    source = GOOD_FN + "\0" + "this is not C and would be dropped silently\n"
    for command, fields in (("attach", {"slot": 304}), ("check", {})):
        with pytest.raises(RemoteError) as err:
            served.call(command, source=source, **fields)
        assert err.value.code == "bad_request" and "NUL" in err.value.message
    assert 304 not in kernel_slots(served.pin_dir / "prog_array")


def test_a_result_of_any_size_arrives(served: DaemonProcess) -> None:
    n = 1500  # ~100 KiB of candidate names: more than one datagram of the old protocol
    source = "".join(f"int candidate_function_with_a_rather_long_name_number_{i:05d}(struct bpf_raw_tracepoint_args *ctx) {{ return {i}; }}\n"
                     for i in range(n))
    with pytest.raises(RemoteError) as err:
        served.call("check", source=source)
    assert err.value.code == "function_ambiguous"
    assert len(err.value.details["candidates"]) == n


def slow_source(depth: int = 16) -> str:
    """A compile of seconds within any memory limit: 2^depth additions of a volatile, each one
    an instruction (a macro nest that runs out of memory first may end before it is seen)."""
    macros = "#define A0 (x + 1)\n" + "".join(f"#define A{i} (A{i - 1} + A{i - 1})\n" for i in range(1, depth + 1))
    return macros + f"int slow(struct bpf_raw_tracepoint_args *ctx) {{ volatile int x = 1; return A{depth} & 0; }}\n"


def test_a_crashed_worker_is_named_with_its_status(served: DaemonProcess) -> None:
    outcome: dict[str, BaseException] = {}

    def attach() -> None:
        try:
            with Client(served.socket, timeout=120) as c:
                c.call("attach", slot=305, source=slow_source())
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    t = threading.Thread(target=attach)
    t.start()
    try:
        worker = wait_for_worker(served.pid, t)
        assert worker is not None, f"the attach ended before its compile worker was seen: {outcome}"
        os.kill(worker, signal.SIGSEGV)  # as a crash in bcc would
    finally:
        t.join()
    error = outcome["error"]
    assert isinstance(error, RemoteError) and error.code == "compiler_crashed", error
    assert "SIGSEGV" in error.message and error.details["status"] == -signal.SIGSEGV
    assert served.call("ping")["version"]


def wait_for_worker(daemon_pid: int, request: threading.Thread) -> int | None:
    """The compile worker, once it runs a compile (not one started ahead, idle: tailcalld/spares.py;
    no deadline decides the test: pytest's timeout does); None if ``request`` ended first."""
    while request.is_alive():
        for pid in busy_children_of(daemon_pid):
            try:
                if b"tailcalld.compile_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        threading.Event().wait(0.01)
    return None
