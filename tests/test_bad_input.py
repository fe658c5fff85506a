"""Bad input, against the real daemon: every case gets a clear error, changes nothing (state
file and kernel slots byte for byte), and the daemon keeps serving.  Then generated requests
(hypothesis), and 50 concurrent clients changing distinct slots."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import (NR_FCHMODAT, DaemonProcess, counting_handler, fchmodat, kernel_slots, new_pin_root, read_counter,
                     remove_pin_tree, start_daemon)
from tailcalld.client import Client
from tailcalld.protocol import COMMANDS, response_adapter

MAX_SOURCE = 64 * 1024
GOOD_FN = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"


@dataclass(frozen=True)
class Served:
    """The module's daemon, and what no bad input may change: its state file, its kernel
    slots, and the steady handler in slot 268 that counts into ``counter``."""

    daemon: DaemonProcess
    counter: Path
    state_file: Path

    def snapshot(self) -> tuple[bytes, dict[int, int]]:
        return self.state_file.read_bytes(), kernel_slots(self.daemon.pin_dir / "prog_array")


@pytest.fixture(scope="module")
def served(machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the module, with a counting handler in slot 268 that no case may disturb."""
    pin_root = new_pin_root()
    tmp = tmp_path_factory.mktemp("bad-input")
    try:
        d = start_daemon(tmp, pin_root / "daemon", max_source_bytes=MAX_SOURCE)
        try:
            with d.client() as c:
                c.call("attach", slot=NR_FCHMODAT, source=counting_handler(pin_root / "maps" / "count"))
            yield Served(d, pin_root / "maps" / "count", tmp / "state" / "state.json")
        finally:
            d.stop()
    finally:
        remove_pin_tree(pin_root)


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def attach(**fields: object) -> bytes:
    return line({"id": "a", "command": "attach", **fields})


def detach(slot: object) -> bytes:
    return line({"id": "d", "command": "detach", "slot": slot})


KPROBE_STYLE = ("#include <uapi/linux/ptrace.h>\n"
                "int kprobe__x(struct pt_regs *ctx) { return PT_REGS_PARM1(ctx) == 7; }\n")
CASES: dict[str, tuple[bytes, str]] = {
    # framing and JSON
    "not json": (b"{not json\n", "bad_request"),
    "truncated object": (b'{"id": 1, "command": "list"\n', "bad_request"),
    "lone brace": (b"{\n", "bad_request"),
    "invalid utf-8": (b'{"id": 1, "command": "\xff\xfe"}\n', "bad_request"),
    "nul bytes": (b"\x00\x00\x00\n", "bad_request"),
    "raw nul in a string": (b'{"id": 1, "command": "list\x00"}\n', "bad_request"),
    "null": (b"null\n", "bad_request"),
    "array": (b"[1, 2]\n", "bad_request"),
    "number": (b"42\n", "bad_request"),
    "string": (b'"list"\n', "bad_request"),
    "5000-digit number": (b'{"id": ' + b"9" * 5000 + b', "command": "list"}\n', "bad_request"),
    "deep nesting": (b"[" * 100_000 + b"\n", "bad_request"),
    "oversized line": (b'{"command": "list", "x": "' + b"y" * (1 << 20) + b'"}\n', "request_too_large"),
    # commands
    "unknown command": (line({"id": 1, "command": "explode"}), "unknown_command"),
    "command is a number": (line({"id": 1, "command": 5}), "unknown_command"),
    "command in capitals": (line({"id": 1, "command": "LIST"}), "unknown_command"),
    "no command": (line({"id": 1, "slot": 268}), "bad_request"),
    "unknown field": (line({"id": 1, "command": "list", "verbose": True}), "bad_request"),
    "id is an object": (line({"id": {"a": 1}, "command": "list"}), "bad_request"),
    "id is a bool": (line({"id": True, "command": "ping"}), "bad_request"),
    # slots
    "slot -1": (detach(-1), "slot_out_of_range"),
    "slot 1e9": (detach(1_000_000_000), "slot_out_of_range"),
    "slot 1e9 as float": (detach(1e9), "bad_request"),
    "slot 1.5": (detach(1.5), "bad_request"),
    "slot true": (detach(True), "bad_request"),
    "slot null": (detach(None), "bad_request"),
    "slot list": (detach([268]), "bad_request"),
    "slot misspelt": (detach("fchmodatt"), "unknown_syscall"),
    "slot empty string": (detach(""), "unknown_syscall"),
    "slot fullwidth digits": (detach("２６８"), "unknown_syscall"),
    "slot with nul": (detach("fchmodat\u0000"), "unknown_syscall"),
    "slot emoji": (detach("💥"), "unknown_syscall"),
    "detach an empty slot": (detach(300), "slot_empty"),
    # attach: all aimed at slot 268, which must keep its handler
    "empty source": (attach(slot=268, source=""), "bad_request"),
    "source is a number": (attach(slot=268, source=1), "bad_request"),
    "no source": (attach(slot=268), "bad_request"),
    "no slot": (attach(source=GOOD_FN), "bad_request"),
    "source over max_source_bytes": (attach(slot=268, source="/*" + "x" * MAX_SOURCE + "*/"), "source_too_large"),
    "include /etc/shadow": (attach(slot=268, source='#include "/etc/shadow"\n' + GOOD_FN), "forbidden_include"),
    "include with ..": (attach(slot=268, source='#include "../../../etc/shadow"\n' + GOOD_FN), "forbidden_include"),
    "computed include": (attach(slot=268, source='#define F "/etc/shadow"\n#include F\n' + GOOD_FN),
                         "forbidden_include"),
    "function that does not exist": (attach(slot=268, source=GOOD_FN, function="nope"), "function_not_found"),
    "function name not an identifier": (attach(slot=268, source=GOOD_FN, function="a-b; rm"), "bad_request"),
    "compile error": (attach(slot=268, source="int h(struct bpf_raw_tracepoint_args *ctx) { return x; }"),
                      "compile_error"),
    "unicode identifiers": (attach(slot=268, source="int h(struct bpf_raw_tracepoint_args *ctx) { return ü€; }"),
                            "compile_error"),
    "verifier rejection": (attach(slot=268, source="int h(struct bpf_raw_tracepoint_args *ctx) "
                                                   "{ u64 *p = (u64 *)ctx; return p[100]; }"), "verifier_rejected"),
    "kprobe-style handler": (attach(slot=268, source=KPROBE_STYLE, function="kprobe__x"), "wrong_program_type"),
    "no raw_tp function": (attach(slot=268, source="static int helper(void) { return 0; }\n"),
                           "function_not_found"),
    "two raw_tp functions": (attach(slot=268, source=GOOD_FN + GOOD_FN.replace(" h(", " g(")),
                             "function_ambiguous"),
    "valid source, slot out of range": (attach(slot=4096, source=GOOD_FN), "slot_out_of_range"),
}


@pytest.mark.parametrize("payload, code", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_and_changes_nothing(served: Served, payload: bytes, code: str) -> None:
    before = served.snapshot()
    with served.daemon.client() as c:
        c.send_raw(payload)
        reply = c.read_reply()  # validated against the response model
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        assert c.call("ping")["version"]  # the same connection goes on
    assert served.snapshot() == before
    calls = read_counter(served.counter)
    fchmodat(3)
    assert read_counter(served.counter) == calls + 3


def test_thousands_of_requests_on_one_connection(served: Served) -> None:
    n = 5000
    with served.daemon.client() as c:
        c.send_raw(b"".join(line({"id": i, "command": "ping" if i % 2 else "list"}) for i in range(n)))
        replies = [c.read_reply() for _ in range(n)]
    assert [r["id"] for r in replies] == list(range(n)) and all(r["ok"] for r in replies)


def test_half_a_request_then_gone(served: Served) -> None:
    before = served.snapshot()
    for cut in (1, 10, 30):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(served.daemon.socket))
            s.sendall(attach(slot=268, source=GOOD_FN)[:cut])
    with served.daemon.client() as c:
        assert c.call("ping")["version"]
    assert served.snapshot() == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
requests = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"command": st.sampled_from([c for c in COMMANDS if c != "unload-all"] + ["bogus", "", "Attach"])},
        optional={"id": json_values,
                  # never 268: the module's steady handler lives there
                  "slot": st.integers(-3, 1100).filter(lambda n: n != NR_FCHMODAT) | st.text(max_size=10) | json_values,
                  "source": st.text(max_size=40) | json_values, "function": st.text(max_size=10) | json_values,
                  "filename": st.text(max_size=10) | json_values, "extra": json_values}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=requests, raw=st.binary(max_size=40))
def test_generated_requests_always_get_a_valid_reply(served: Served, request: object, raw: bytes) -> None:
    with served.daemon.client() as c:
        for payload in (json.dumps(request).encode() + b"\n", raw.replace(b"\n", b" ") + b"\n"):
            if not payload.strip():
                continue
            c.send_raw(payload)
            response_adapter.validate_python(c.read_reply())
        assert c.call("ping")["version"]
    assert served.daemon.proc.poll() is None


def test_50_concurrent_clients_get_exactly_what_they_asked_for(served: Served) -> None:
    slots = list(range(500, 550))  # unused numbers: 50 distinct slots
    errors: list[BaseException] = []

    def client(slot: int) -> None:
        try:
            with Client(served.daemon.socket) as c:
                c.call("list")
                c.call("attach", slot=slot, source=GOOD_FN.replace(" h(", f" h{slot}("), filename=f"{slot}.c")
                c.call("list")
                if slot % 2:
                    c.call("detach", slot=slot)
                c.call("list")
        except BaseException as exc:  # reported below, with the slot
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(slot,)) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with served.daemon.client() as c:
        listed = {s["slot"]: s["function"] for s in c.call("list")["slots"] if s["slot"] >= 500}
    assert listed == {slot: f"h{slot}" for slot in slots if slot % 2 == 0}
    kernel = kernel_slots(served.daemon.pin_dir / "prog_array")
    assert {s for s in kernel if s >= 500} == set(listed)
    with served.daemon.client() as c:
        for slot in listed:
            c.call("detach", slot=slot)
