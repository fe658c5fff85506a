"""Handlers as people write them from libbpf examples: the seed article's own file (vmlinux.h,
SEC, CO-RE, with its own prog array and dispatcher), prebuilt .o objects, program-type
checks, `tailcallctl check`, and persistence of both across restart and reboot."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from harness import (DIRFD_MAGIC, NR_FCHMODAT, DaemonProcess, Workload, counting_handler, fchmodat, map_fd_by_id,
                     map_lookup_u64, read_counter, remove_pin_tree, start_daemon)
from tailcalld import bpfsys
from tailcalld.dialects import clang_command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def libbpf_counter(function: str, map_name: str, dirfd: int | None = DIRFD_MAGIC) -> str:
    """libbpf C counting the calls whose first argument is ``dirfd`` (every call: None)."""
    only = "" if dirfd is None else (f"if ((int)PT_REGS_PARM1_CORE(regs) != {dirfd} || "
                                     f"(bpf_get_current_pid_tgid() >> 32) != {os.getpid()})\n        return 0;")
    return f"""#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

struct {{
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
}} {map_name} SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int {function}(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u32 zero = 0;
    {only}
    u64 *n = bpf_map_lookup_elem(&{map_name}, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}}

char _license[] SEC("license") = "GPL";
"""


class ProgMap:
    """A handler's own (unpinned) map, held open by fd so it can be read after the handler is gone."""

    def __init__(self, prog_id: int, name: str) -> None:
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                                         capture_output=True, text=True, check=True).stdout)
        for map_id in info.get("map_ids", []):
            fd = map_fd_by_id(map_id)
            if bpfsys.map_info(fd).name == name:
                self.fd = fd
                return
            os.close(fd)
        raise AssertionError(f"program {prog_id} has no map {name!r}")

    def value(self) -> int:
        return map_lookup_u64(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)


TRACEFS = Path("/sys/kernel/tracing")


def trace_buffer() -> str:
    """bpf_trace_printk's ring buffer, read without consuming it (unlike trace_pipe)."""
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], check=True)
    return (TRACEFS / "trace").read_text(errors="replace")


def programs_named(prefix: str) -> set[int]:
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    return {p["id"] for p in progs if p.get("name", "").startswith(prefix)}


def test_the_articles_file_attaches_unmodified(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Its own prog array and its own raw_tracepoint__sys_enter dispatcher come along; only
    enter_fchmodat is loaded, and it runs on chmod."""
    own_dispatchers = programs_named("raw_tracepoint_")
    r = daemon.ctl("attach", "268", str(EXAMPLES / "fchmodat_libbpf.bpf.c"), "--function", "enter_fchmodat")
    assert r.returncode == 0, r.stderr
    [slot] = json.loads(daemon.ctl("list", "--json").stdout)["slots"]
    assert (slot["function"], slot["dialect"]) == ("enter_fchmodat", "libbpf")
    target = tmp_path / f"tailcalld-article-{os.getpid()}"
    target.write_text("x")
    subprocess.run(["chmod", "640", str(target)], check=True)
    assert f"fchmodat @dirname={target} @mode=416" in trace_buffer()  # 416 == 0o640
    assert programs_named("raw_tracepoint_") == own_dispatchers  # the file's dispatcher never loaded

    r = daemon.ctl("attach", "268", str(EXAMPLES / "fchmodat_libbpf.bpf.c"))
    assert r.returncode == 4 and "[function_ambiguous]" in r.stderr
    assert "enter_fchmodat" in r.stderr and "raw_tracepoint__sys_enter" in r.stderr


def test_hot_swap_bcc_libbpf_bcc_under_load(daemon: DaemonProcess, pin_root: Path) -> None:
    c1, c3 = pin_root / "maps" / "c1", pin_root / "maps" / "c3"
    with daemon.client() as c:
        c.call("attach", slot=NR_FCHMODAT, source=counting_handler(c1, "first_bcc"))
        with Workload() as work:
            while read_counter(c1) < 5000:
                time.sleep(0.01)
            second = c.call("attach", slot=NR_FCHMODAT, source=libbpf_counter("second_libbpf", "second_hits"))
            middle = ProgMap(second["prog_id"], "second_hits")
            while middle.value() < 5000:
                time.sleep(0.01)
            c.call("attach", slot=NR_FCHMODAT, source=counting_handler(c3, "third_bcc"))
            while read_counter(c3) < 5000:
                time.sleep(0.01)
    try:
        counts = read_counter(c1), middle.value(), read_counter(c3)
    finally:
        middle.close()
    assert sum(counts) == work.made, (counts, work.made)


def build_object(source: str, tmp: Path, daemon: DaemonProcess) -> Path:
    """A prebuilt .bpf.o, made the way libbpf-tools make theirs (vmlinux.h from the daemon's cache)."""
    [vmlinux] = (daemon.config.parent / "state" / "cache").glob("vmlinux-*")
    out = tmp / "handler.bpf.o"
    cmd = clang_command([str(vmlinux)], str(out))
    subprocess.run(cmd, input=source.encode(), check=True)
    return out


def test_prebuilt_object_attach_and_detach(daemon: DaemonProcess, tmp_path: Path) -> None:
    source = libbpf_counter("from_object", "object_hits")
    assert daemon.ctl("check", "-", input=source).returncode == 0  # fills the vmlinux.h cache
    obj = build_object(source, tmp_path, daemon)
    r = daemon.ctl("attach", "fchmodat", str(obj))
    assert r.returncode == 0, r.stderr
    [slot] = json.loads(daemon.ctl("list", "--json").stdout)["slots"]
    assert (slot["function"], slot["dialect"], slot["filename"]) == ("from_object", "object", "handler.bpf.o")
    hits = ProgMap(slot["prog_id"], "object_hits")
    try:
        fchmodat(21)
        assert hits.value() == 21
        assert daemon.ctl("detach", "fchmodat").returncode == 0
        fchmodat(5)
        assert hits.value() == 21
    finally:
        hits.close()


KPROBE = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
SEC("kprobe/do_sys_openat2")
int probe_open(void *ctx) { return 0; }
SEC("tp_btf/sys_enter")
int btf_enter(void *ctx) { return 0; }
char _license[] SEC("license") = "GPL";
"""


def test_wrong_program_types_are_refused_by_name(daemon: DaemonProcess) -> None:
    for function, found in (("probe_open", "kprobe"), ("btf_enter", "tracing")):
        with daemon.client() as c:
            c.send_raw(json.dumps({"id": 1, "command": "attach", "slot": 268, "source": KPROBE,
                                   "function": function}).encode() + b"\n")
            error = c.read_reply()["error"]
        assert error["code"] == "wrong_program_type"
        assert f"is a {found} program" in error["message"] and "raw_tracepoint" in error["message"]
    assert json.loads(daemon.ctl("list", "--json").stdout)["slots"] == []


def test_libbpf_errors_and_check(daemon: DaemonProcess, tmp_path: Path) -> None:
    good = tmp_path / "good.bpf.c"
    good.write_text(libbpf_counter("checked", "checked_hits"))
    r = daemon.ctl("check", str(good))
    assert r.returncode == 0, r.stderr
    assert "checked (libbpf) verified: raw_tracepoint program" in r.stdout and "instructions" in r.stdout

    broken = tmp_path / "broken.bpf.c"
    broken.write_text(libbpf_counter("broken", "m").replace("return 0;\n}}", "return nope;\n}", 1)
                      .replace("u32 zero = 0;", "u32 zero = 0 +;"))
    r = daemon.ctl("check", str(broken))
    assert r.returncode == 3 and "[compile_error]" in r.stderr and "error:" in r.stderr

    rejected = tmp_path / "rejected.bpf.c"
    rejected.write_text('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
                        'SEC("raw_tracepoint/sys_enter")\n'
                        "int reject(struct bpf_raw_tracepoint_args *ctx) { u64 *p = (u64 *)ctx; return p[100]; }\n"
                        'char _license[] SEC("license") = "GPL";\n')
    r = daemon.ctl("check", str(rejected))
    assert r.returncode == 4 and "[verifier_rejected]" in r.stderr
    assert "invalid bpf_context access" in r.stderr  # the verifier's own words, through libbpf's log
    r = daemon.ctl("attach", "268", str(rejected))
    assert r.returncode == 4 and "invalid bpf_context access" in r.stderr

    bcc_bad = tmp_path / "bcc.c"
    bcc_bad.write_text("int h(struct bpf_raw_tracepoint_args *ctx) { return nope; }\n")
    assert daemon.ctl("check", str(bcc_bad)).returncode == 3
    assert daemon.ctl("check", str(EXAMPLES / "fchmodat.c")).returncode == 0
    assert json.loads(daemon.ctl("list", "--json").stdout)["slots"] == []  # check attaches nothing


def test_libbpf_source_and_object_survive_restart_and_reboot(tmp_path: Path, pin_root: Path) -> None:
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        r = d.ctl("attach", "268", str(EXAMPLES / "fchmodat_libbpf.bpf.c"), "--function", "enter_fchmodat")
        assert r.returncode == 0, r.stderr
        obj = build_object(libbpf_counter("from_object", "object_hits", dirfd=None), tmp_path, d)
        assert d.ctl("attach", "getppid", str(obj)).returncode == 0
    finally:
        assert d.stop() == 0
    for reboot in (False, True):
        if reboot:
            remove_pin_tree(pin_root / "daemon")
        d = start_daemon(tmp_path, pin_root / "daemon")
        try:
            slots = {s["slot"]: s for s in json.loads(d.ctl("list", "--json").stdout)["slots"]}
            assert {s: (v["function"], v["dialect"]) for s, v in slots.items()} == {
                268: ("enter_fchmodat", "libbpf"), 110: ("from_object", "object")}
            corrections = json.loads(d.ctl("status", "--json").stdout)["corrections"]
            assert len(corrections) == (2 if reboot else 0), corrections
            hits = ProgMap(slots[110]["prog_id"], "object_hits")
            try:
                before = hits.value()
                os.getppid()
                assert hits.value() > before
            finally:
                hits.close()
        finally:
            d.stop()
