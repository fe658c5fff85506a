"""Local headers travel with the file (issue #12 item 4), through tailcallctl and the real
daemon: a libbpf and a bcc handler each include a header that sits next to them (which
includes another, in a subfolder, which includes a third beside itself), attach, and count
on the real kernel; the limits name their settings; a forbidden name changes nothing; and a
restart (and a reboot) rebuilds the handler with its headers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness import DIRFD_MAGIC, DaemonProcess, fchmodat, read_counter, remove_pin_tree, start_daemon
from test_libbpf import ProgMap

# counts.h -> sub/filter.h -> sub/magic.h (found beside sub/filter.h, as the compiler looks)
HEADERS = {
    "counts.h": '#ifndef COUNTS_H\n#define COUNTS_H\n#include "sub/filter.h"\n#define COUNT_KEY 0\n#endif\n',
    "sub/filter.h": '#include "magic.h"\n#define OURS(dirfd, tgid) ((int)(dirfd) == MAGIC_DIRFD && (tgid) == OUR_TGID)\n',
    "sub/magic.h": f"#define MAGIC_DIRFD {DIRFD_MAGIC}\n#define OUR_TGID {os.getpid()}\n",
}

LIBBPF_HANDLER = """#include "vmlinux.h"
#include "bpf_helpers.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "counts.h"
#include "not_here.h_is_a_system_header_or_nothing.h"

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
} header_hits SEC(".maps");

SEC("raw_tracepoint/sys_enter")
int with_headers(struct bpf_raw_tracepoint_args *ctx)
{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u32 key = COUNT_KEY;
    if (!OURS(PT_REGS_PARM1_CORE(regs), bpf_get_current_pid_tgid() >> 32))
        return 0;
    u64 *n = bpf_map_lookup_elem(&header_hits, &key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
""".replace('#include "not_here.h_is_a_system_header_or_nothing.h"\n', "")


def bcc_handler(counter: Path) -> str:
    return f"""#include <uapi/linux/ptrace.h>
#include "counts.h"
BPF_TABLE_PINNED("array", u32, u64, counter, 1, "{counter}");

int with_headers(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long dirfd = 0;
    u32 key = COUNT_KEY;
    bpf_probe_read_kernel(&dirfd, sizeof(dirfd), &PT_REGS_PARM1(regs));
    if (!OURS(dirfd, bpf_get_current_pid_tgid() >> 32))
        return 0;
    u64 *n = counter.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}}
"""


def write_tree(folder: Path, name: str, source: str, headers: dict[str, str] = HEADERS) -> Path:
    for header, text in headers.items():
        (folder / header).parent.mkdir(parents=True, exist_ok=True)
        (folder / header).write_text(text)
    (folder / name).write_text(source)
    return folder / name


def slots(d: DaemonProcess) -> dict[int, dict[str, Any]]:
    return {s["slot"]: s for s in json.loads(d.ctl("list", "--json").stdout)["slots"]}


def wire_error(d: DaemonProcess, **fields: Any) -> dict[str, Any]:
    with d.client() as c:
        c.send_raw(json.dumps({"id": 1, **fields}).encode() + b"\n")
        reply = c.read_reply()
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    return error


def test_a_libbpf_handler_with_local_headers_attaches_and_counts(daemon: DaemonProcess, tmp_path: Path) -> None:
    handler = write_tree(tmp_path, "with_headers.bpf.c", LIBBPF_HANDLER)
    r = daemon.ctl("attach", "fchmodat", str(handler))
    assert r.returncode == 0, r.stderr
    hits = ProgMap(slots(daemon)[268]["prog_id"], "header_hits")
    try:
        fchmodat(17)
        fchmodat(5, dirfd=DIRFD_MAGIC + 1)  # not OURS: the header's filter is the one compiled
        assert hits.value() == 17
    finally:
        hits.close()


def test_a_bcc_handler_with_local_headers_attaches_and_counts(daemon: DaemonProcess, tmp_path: Path,
                                                             pin_root: Path) -> None:
    counter = pin_root / "maps" / "with_headers"
    counter.parent.mkdir(parents=True, exist_ok=True)
    handler = write_tree(tmp_path, "with_headers.c", bcc_handler(counter))
    r = daemon.ctl("attach", "fchmodat", str(handler))
    assert r.returncode == 0, r.stderr
    assert slots(daemon)[268]["dialect"] == "bcc"
    fchmodat(23)
    fchmodat(5, dirfd=DIRFD_MAGIC + 1)
    assert read_counter(counter) == 23


def test_diagnostics_name_the_header_by_its_name(daemon: DaemonProcess, tmp_path: Path) -> None:
    broken = {**HEADERS, "sub/magic.h": "#define MAGIC_DIRFD nope_undeclared\n#define OUR_TGID 1\n"}
    for name, source in (("h.bpf.c", LIBBPF_HANDLER), ("h.c", bcc_handler(tmp_path / "unused"))):
        handler = write_tree(tmp_path, name, source, broken)
        r = daemon.ctl("check", str(handler))
        assert r.returncode == 3 and "[compile_error]" in r.stderr, r.stderr
        assert "sub/magic.h:1:21: note: expanded from macro 'MAGIC_DIRFD'" in r.stderr, r.stderr
        assert "tailcalld-compile-" not in r.stderr and "local-headers" not in r.stderr


def test_the_same_source_with_other_headers_is_another_handler(daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = write_tree(tmp_path / "a", "h.bpf.c", LIBBPF_HANDLER)
    assert daemon.ctl("attach", "fchmodat", str(first)).returncode == 0
    assert daemon.ctl("attach", "getppid", str(first)).returncode == 0
    other = {**HEADERS, "sub/magic.h": HEADERS["sub/magic.h"].replace(str(DIRFD_MAGIC), str(DIRFD_MAGIC + 1))}
    (tmp_path / "b").mkdir()
    second = write_tree(tmp_path / "b", "h.bpf.c", LIBBPF_HANDLER, other)
    assert daemon.ctl("attach", "getpid", str(second)).returncode == 0
    progs = {nr: s["prog_id"] for nr, s in slots(daemon).items()}
    assert progs[268] == progs[110] != progs[39]  # same headers: reused; other headers: compiled anew
    hashes = {nr: s["source_sha256"] for nr, s in slots(daemon).items()}
    assert hashes[268] == hashes[110] != hashes[39]


def test_header_limits_name_their_settings_and_change_nothing(tmp_path: Path, pin_root: Path) -> None:
    handler = write_tree(tmp_path, "h.bpf.c", LIBBPF_HANDLER)
    for setting, value in (("max_headers", 2), ("max_headers_bytes", 100)):
        d = start_daemon(tmp_path, pin_root / setting, **{setting: value})
        try:
            r = d.ctl("attach", "fchmodat", str(handler))
            assert r.returncode == 1 and "[source_too_large]" in r.stderr, r.stderr
            assert f"the limit is {value} ({setting})" in r.stderr, r.stderr
            assert slots(d) == {}
        finally:
            d.stop()


def test_forbidden_header_names_are_refused_and_change_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    for name in ("../counts.h", "/etc/counts.h", "sub/../../counts.h", "a\0b.h", ""):
        error = wire_error(daemon, command="attach", slot=268, source=LIBBPF_HANDLER,
                           headers={**HEADERS, name: "#define X 1\n"})
        assert error["code"] == "bad_request", error
        assert "is not allowed" in error["message"] or "at least 1 character" in error["message"], error
    error = wire_error(daemon, command="attach", slot=268, source=LIBBPF_HANDLER,
                       headers={**HEADERS, "sub/magic.h": '#include "../../secret.h"\n'})
    assert error["code"] == "forbidden_include" and "in the local header sub/magic.h" in error["message"], error
    # Through tailcallctl: a '..' include is not followed, and the daemon says why.
    (tmp_path / "inner").mkdir()
    handler = write_tree(tmp_path / "inner", "h.bpf.c", LIBBPF_HANDLER.replace('"counts.h"', '"../counts.h"'))
    write_tree(tmp_path, "counts.h", HEADERS["counts.h"], {})
    r = daemon.ctl("attach", "268", str(handler))
    assert r.returncode == 3 and "[forbidden_include]" in r.stderr and "'..'" in r.stderr, r.stderr
    assert slots(daemon) == {}


def test_restart_and_reboot_rebuild_the_handler_with_its_headers(tmp_path: Path, pin_root: Path) -> None:
    handler = write_tree(tmp_path, "with_headers.bpf.c", LIBBPF_HANDLER)
    d = start_daemon(tmp_path, pin_root / "daemon")
    try:
        assert d.ctl("attach", "fchmodat", str(handler)).returncode == 0
        recorded = json.loads((tmp_path / "state" / "state.json").read_text())["slots"]["268"]
        assert sorted(recorded["headers"]) == sorted(HEADERS)
    finally:
        assert d.stop() == 0
    assert len(list((tmp_path / "state" / "sources").glob("*.h"))) == len(HEADERS)
    for name in HEADERS:  # the client's files are gone: the daemon has its own copies
        (tmp_path / name).unlink()
    for reboot in (False, True):
        if reboot:
            remove_pin_tree(pin_root / "daemon")
        d = start_daemon(tmp_path, pin_root / "daemon")
        try:
            [slot] = slots(d).values()
            assert (slot["function"], slot["state"]) == ("with_headers", "in-sync"), slot
            corrections = json.loads(d.ctl("status", "--json").stdout)["corrections"]
            assert len(corrections) == (1 if reboot else 0), corrections
            hits = ProgMap(slot["prog_id"], "header_hits")
            try:
                before = hits.value()
                fchmodat(9)
                assert hits.value() == before + 9
            finally:
                hits.close()
        finally:
            d.stop()
    assert d.ctl("list").returncode == 1  # stopped


def test_bare_name_bpf_headers_resolve_for_bcc_and_libbpf(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Old samples include libbpf's headers as if they sat next to them (-idirafter /usr/include/bpf)."""
    bcc = tmp_path / "endian.c"
    bcc.write_text('#include "bpf_endian.h"\nint h(struct bpf_raw_tracepoint_args *ctx) '
                   "{ return bpf_ntohs(ctx->args[1]) == 1; }\n")
    libbpf = tmp_path / "bare.bpf.c"
    libbpf.write_text('#include "vmlinux.h"\n#include "bpf_helpers.h"\n#include "bpf_endian.h"\n'
                      'SEC("raw_tp/sys_enter")\nint h(struct bpf_raw_tracepoint_args *ctx) '
                      "{ return bpf_ntohs(ctx->args[1]) == 1; }\n" 'char LICENSE[] SEC("license") = "GPL";\n')
    for handler in (bcc, libbpf):
        r = daemon.ctl("check", str(handler))
        assert r.returncode == 0, r.stderr
