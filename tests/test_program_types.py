"""bcc handlers of another program type are refused (#12 item 7): bcc's kprobe__, TRACEPOINT_PROBE,
KFUNC_PROBE... functions would run tail-called from sys_enter with a context they do not expect."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import DaemonProcess
from tailcalld.compile_worker import bcc_program_type, other_type_macro, raw_tp_candidates

SETUID_MONITOR = """
TRACEPOINT_PROBE(syscalls, sys_enter_setuid) {
    bpf_trace_printk("setuid %d\\n", args->uid);
    return 0;
}
"""


@pytest.mark.parametrize(("function", "kind"), [
    ("kprobe__do_sys_openat2", "kprobe"), ("kretprobe__do_sys_openat2", "kretprobe"),
    ("tracepoint__syscalls__sys_enter_setuid", "tracepoint"), ("kfunc__vmlinux__do_unlinkat", "fentry (KFUNC_PROBE)"),
    ("raw_tracepoint__sys_enter", None), ("count_calls", None)])
def test_bcc_names_tell_the_program_type(function: str, kind: str | None) -> None:
    assert bcc_program_type(function) == kind


def test_void_ctx_is_a_candidate_and_other_types_are_not() -> None:
    source = ("int kprobe__do_sys_openat2(struct pt_regs *ctx) { return 0; }\n"
              "int h(void *ctx) { return 0; }\nint g(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n")
    assert raw_tp_candidates(source, ["kprobe__do_sys_openat2", "h", "g"]) == ["h", "g"]


def test_macros_of_other_types_are_found_with_their_line() -> None:
    err = other_type_macro("// KFUNC_PROBE(x) in a comment is not it\n\nKFUNC_PROBE(do_unlinkat, int dfd)\n{ return 0; }")
    assert err is not None and err.details == {"line": 3} and "declares a fentry program" in err.message
    assert other_type_macro("RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }") is None


def attach(d: DaemonProcess, tmp_path: Path, source: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "h.c"
    path.write_text(source)
    r = d.ctl("attach", "268", str(path), *args)
    return r.returncode, r.stderr


def test_a_tracepoint_probe_is_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    code, err = attach(daemon, tmp_path, SETUID_MONITOR)
    assert code == 4 and "[wrong_program_type]" in err, err
    assert "line 2: TRACEPOINT_PROBE(syscalls, sys_enter_setuid) declares a tracepoint program" in err
    assert daemon.call("list")["slots"] == []


def test_a_kprobe_alone_is_refused_and_named_with_its_type(daemon: DaemonProcess, tmp_path: Path) -> None:
    code, err = attach(daemon, tmp_path, "int kprobe__do_sys_openat2(struct pt_regs *ctx) { return 0; }\n")
    assert code == 4 and "[function_not_found]" in err and "kprobe__do_sys_openat2 (kprobe)" in err, err
    code, err = attach(daemon, tmp_path, "int kprobe__do_sys_openat2(struct pt_regs *ctx) { return 0; }\n",
                       "--function", "kprobe__do_sys_openat2")
    assert code == 4 and "[wrong_program_type]" in err and "is a kprobe program" in err, err
    assert daemon.call("list")["slots"] == []


def test_beside_a_kprobe_the_raw_tp_function_is_chosen_and_void_ctx_works(daemon: DaemonProcess,
                                                                           tmp_path: Path) -> None:
    source = "int kprobe__do_sys_openat2(struct pt_regs *ctx) { return 0; }\nint h(void *ctx) { return 0; }\n"
    code, err = attach(daemon, tmp_path, source)
    assert code == 0, err
    assert [s["function"] for s in daemon.call("list")["slots"]] == ["h"]
