"""Unit tests for the journal's fields: the instance every entry carries (config and logging
handler), the audit entries of failed attaches and detaches (on the in-memory kernel of
tests/fakes.py, read from the records the logger gets), and the catalog that explains the ids."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import NR_SLOTS, FakeKernel, FlakyStore
from test_unit_apply import BCC2, GETPPID, KILL, Node
from test_unit_apply import run as run_apply_node
from tailcalld import audit
from tailcalld.compiler import Program
from tailcalld.config import LiveSettings, Settings
from tailcalld.dialects import Artifact
from tailcalld.errors import ApplyIncomplete, BadRequest, CompileError, KernelError, SlotEmpty, SlotOutOfRange, UnknownSyscall
from tailcalld.events import EVENT_MESSAGE_ID
from tailcalld.journal import MISS_MESSAGE_ID, Resend, entry_fields
from tailcalld.misses import MissMonitor
from tailcalld.peers import Peer
from tailcalld.slots import SlotManager
from tailcalld.syscalls import SyscallTable

CATALOG = Path(__file__).resolve().parent.parent / "contrib" / "tailcalld.catalog"
ME = Peer(pid=4242, uid=0, gid=0, comm="tester")
FCHMODAT = 268
V1 = Artifact("bcc", b"int v1(struct bpf_raw_tracepoint_args *ctx) { return 0; }", "v1.c")


# -- the instance --------------------------------------------------------------------------------

def test_the_instance_is_the_pin_folder_unless_named() -> None:
    assert Settings(pin_dir=Path("/sys/fs/bpf/node-a")).instance_name == "/sys/fs/bpf/node-a"
    assert Settings(pin_dir=Path("/sys/fs/bpf/node-a"), instance="edge-7").instance_name == "edge-7"


@pytest.mark.parametrize("bad, says", [("two\nlines", "one line of printable characters"),
                                       ("nul\x00", "one line of printable characters"),
                                       ("x" * 257, "at most 256 characters"),
                                       (7, "valid string")])
def test_an_instance_that_is_no_journal_value_is_refused(bad: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings.model_validate({"instance": bad})


def test_a_new_instance_waits_for_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    live = LiveSettings(Settings(instance="old"))
    assert live.reload(Settings(instance="new"), Path("t.toml")) == frozenset()
    assert live.current.instance == "old"
    assert "instance changed in t.toml; it takes effect at the next restart" in caplog.text


def test_entries_sent_past_the_handler_carry_the_instance_too() -> None:
    """The one entry Resend writes itself (how many went to stderr only) has the handler's fields."""
    sent: list[tuple[str, dict[str, Any]]] = []
    up = False

    def send(message: str, /, **fields: Any) -> None:
        if not up:
            raise ConnectionRefusedError(111, "Connection refused")
        sent.append((message, fields))

    resend = Resend(send, None, backlog=1, fields=entry_fields("node-b"))
    resend("first", TAILCALLD_INSTANCE="node-b")
    resend("second", TAILCALLD_INSTANCE="node-b")  # the backlog holds one: "first" is dropped
    up = True
    resend.resend()
    assert [m for m, _ in sent] == ["1 log entries went to stderr only while the journal was away", "second"]
    assert all(f["TAILCALLD_INSTANCE"] == "node-b" for _, f in sent)
    assert sent[0][1]["SYSLOG_IDENTIFIER"] == "tailcalld"


# -- audit entries of failed changes -------------------------------------------------------------

def test_error_fields_are_what_the_client_got() -> None:
    assert audit.error_fields(CompileError("x.c:1: error")) == {"ERROR_CODE": "compile_error",
                                                               "ERROR_MESSAGE": "x.c:1: error"}
    bug = audit.error_fields(KeyError("slot"))
    assert bug == {"ERROR_CODE": "internal", "ERROR_MESSAGE": "internal error: KeyError: 'slot'"}
    long = audit.error_fields(CompileError("e" * 5000))["ERROR_MESSAGE"]
    assert isinstance(long, str) and len(long) == audit.MAX_ERROR_CHARS + 3 and long.endswith("...")


def test_a_requested_slot_is_kept_printable_and_short() -> None:
    assert audit.requested_slot("fchmodat\x00") == {"SLOT_REQUESTED": "fchmodat\\x00"}
    assert audit.requested_slot(5000) == {"SLOT_REQUESTED": "5000"}
    assert audit.requested_slot("y" * 500)["SLOT_REQUESTED"] == "y" * audit.MAX_SLOT_CHARS + "..."


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    caplog.set_level(logging.INFO, logger="tailcalld")
    yield lambda: [r for r in caplog.records if hasattr(r, "TAILCALLD_ACTION")]


def run(tmp_path: Path, scenario: Callable[[SlotManager, FakeKernel], Awaitable[None]]) -> None:
    async def main() -> None:
        kernel = FakeKernel()
        syscalls = SyscallTable(NR_SLOTS, {"fchmodat": FCHMODAT})
        manager = SlotManager(kernel, FlakyStore(tmp_path / "state"), syscalls,
                              MissMonitor(kernel.miss_totals, syscalls.label))
        await manager.restore()
        try:
            await scenario(manager, kernel)
        finally:
            manager.close()
    asyncio.run(main())


def test_failed_attaches_and_detaches_are_audited_once_each(
        tmp_path: Path, records: Callable[[], list[logging.LogRecord]]) -> None:
    async def scenario(m: SlotManager, kernel: FakeKernel) -> None:
        kernel.fail_load = CompileError("v1.c:1:10: error: use of undeclared identifier 'x'")
        with pytest.raises(CompileError):
            await m.attach("fchmodat", V1, "v1", "v1.c", ME)
        kernel.fail_set = True
        with pytest.raises(KernelError):
            await m.attach(FCHMODAT, V1, None, "v1.c", ME, hook="exit")
        with pytest.raises(UnknownSyscall):
            await m.attach("fchmodatt", V1, None, "v1.c", ME)
        with pytest.raises(SlotOutOfRange):
            await m.detach(5000, ME)
        with pytest.raises(SlotEmpty):
            await m.detach("fchmodat", ME)
        await m.check(V1, None)  # a check changes nothing: not audited

    run(tmp_path, scenario)
    entries = records()
    assert [(r.TAILCALLD_ACTION, r.ERROR_CODE) for r in entries] == [  # type: ignore[attr-defined]
        ("attach-failed", "compile_error"), ("attach-failed", "kernel_error"), ("attach-failed", "unknown_syscall"),
        ("detach-failed", "slot_out_of_range"), ("detach-failed", "slot_empty")]
    assert all(r.levelno == logging.WARNING and r.MESSAGE_ID == audit.FAILED_MESSAGE_ID  # type: ignore[attr-defined]
               and (r.PEER_UID, r.PEER_PID, r.PEER_COMM) == (0, 4242, "tester")  # type: ignore[attr-defined]
               for r in entries)
    compile_error, exit_slot, unknown, out_of_range, empty = (vars(r) for r in entries)
    assert (compile_error["SLOT"], compile_error["SLOT_HOOK"], compile_error["SYSCALL_NAME"]) == (
        FCHMODAT, "enter", "fchmodat")
    assert (compile_error["FILENAME"], compile_error["FUNCTION"], compile_error["SOURCE_SHA256"]) == (
        "v1.c", "v1", V1.sha256)
    assert compile_error["ERROR_MESSAGE"] == "v1.c:1:10: error: use of undeclared identifier 'x'"
    assert entries[0].getMessage() == (
        "attach failed: v1.c in slot fchmodat (268): v1.c:1:10: error: use of undeclared identifier 'x' "
        "[compile_error] (by uid 0, pid 4242, tester)")
    assert exit_slot["SLOT_HOOK"] == "exit" and "FUNCTION" not in exit_slot
    assert unknown["SLOT_REQUESTED"] == "fchmodatt" and "SLOT" not in unknown
    assert out_of_range["SLOT_REQUESTED"] == "5000"
    assert empty["SLOT"] == FCHMODAT and "FILENAME" not in empty


def test_a_change_that_happened_has_its_own_id_and_fields(
        tmp_path: Path, records: Callable[[], list[logging.LogRecord]]) -> None:
    async def scenario(m: SlotManager, kernel: FakeKernel) -> None:
        await m.attach("fchmodat", V1, None, "v1.c", ME)
        await m.detach("fchmodat", ME)

    run(tmp_path, scenario)
    attach, detach = (vars(r) for r in records())
    assert (attach["TAILCALLD_ACTION"], detach["TAILCALLD_ACTION"]) == ("attach", "detach")
    assert attach["MESSAGE_ID"] == detach["MESSAGE_ID"] == audit.CHANGE_MESSAGE_ID
    assert (attach["FILENAME"], attach["FUNCTION"], attach["SOURCE_SHA256"]) == ("v1.c", "handler", V1.sha256)


def test_an_attach_or_detach_the_protocol_refused_is_audited(
        records: Callable[[], list[logging.LogRecord]]) -> None:
    bad = BadRequest("invalid attach request: hook: Input should be 'enter' or 'exit'")
    audit.invalid_request(b'{"command": "attach", "slot": 268, "source": "x", "filename": "a\\u0000.c", '
                          b'"hook": "sideways"}', ME, bad)
    audit.invalid_request(b'{"command": "detach", "slot": [1]}', ME, BadRequest("invalid detach request"))
    # Not audited: no command named (malformed JSON, not an object), or one that changes nothing.
    for line in (b'{"command": "attach", "slot": 26', b'["attach"]', b'{"command": "list", "slot": "x"}',
                 b'{"command": "check", "filename": "a.c"}'):
        audit.invalid_request(line, ME, BadRequest("invalid"))
    attach, detach = (vars(r) for r in records())
    assert (attach["TAILCALLD_ACTION"], attach["SLOT_REQUESTED"], attach["FILENAME"], attach["ERROR_CODE"]) == (
        "attach-failed", "268", "a\\x00.c", "bad_request")
    assert attach["MESSAGE_ID"] == audit.FAILED_MESSAGE_ID and attach["PEER_PID"] == ME.pid
    assert records()[0].getMessage() == (
        "attach failed: a\\x00.c in slot '268': invalid attach request: hook: Input should be 'enter' or 'exit' "
        "[bad_request] (by uid 0, pid 4242, tester)")
    assert detach["TAILCALLD_ACTION"] == "detach-failed" and "SLOT_REQUESTED" not in detach
    assert records()[1].getMessage().startswith("detach failed: no slot: invalid detach request")


def test_the_slots_an_apply_could_not_change_are_audited(
        tmp_path: Path, records: Callable[[], list[logging.LogRecord]]) -> None:
    """A build that fails (nothing changes) and a kernel refusal half-way: each its slot's entry,
    as the attach that failed, naming the apply; the slots it did change are audited as changed."""
    async def scenario(n: Node) -> None:
        original = n.kernel.load

        async def load(artifact: Artifact, function: str | None) -> Program:
            if artifact.data == BCC2.encode():
                raise CompileError("b.c:1:1: error: expected identifier")
            return await original(artifact, function)
        n.kernel.load = load  # type: ignore[method-assign]
        with pytest.raises(CompileError):
            await n.apply({"slot": "getppid", "file": 0}, {"slot": "kill", "file": 1})
        n.kernel.load = original  # type: ignore[method-assign]
        real_set = n.kernel.set_slot

        def set_slot(slot: int, prog: object, cgroup: str | None = None) -> None:
            n.kernel.fail_set = slot == FCHMODAT
            real_set(slot, prog, cgroup)  # type: ignore[arg-type]
        n.kernel.set_slot = set_slot  # type: ignore[method-assign]
        with pytest.raises(ApplyIncomplete):
            await n.apply({"slot": "getppid", "file": 1}, {"slot": "fchmodat", "file": 1})

    run_apply_node(tmp_path, scenario)
    built, added, refused = (vars(r) for r in records())
    assert (built["TAILCALLD_ACTION"], built["ERROR_CODE"], built["SLOT"], built["FILENAME"], built["TAILCALLD_APPLY"]) \
        == ("attach-failed", "compile_error", KILL, "b.c", "slots.toml")
    assert built["ERROR_MESSAGE"] == "slots.toml, [[slot]] 2 (b.c): b.c:1:1: error: expected identifier"  # as told
    assert (added["TAILCALLD_ACTION"], added["SLOT"]) == ("attach", GETPPID)
    assert (refused["TAILCALLD_ACTION"], refused["ERROR_CODE"], refused["SLOT"], refused["TAILCALLD_APPLY"]) == (
        "attach-failed", "kernel_error", FCHMODAT, "slots.toml")
    assert refused["PEER_COMM"] == "test" and refused["MESSAGE_ID"] == audit.FAILED_MESSAGE_ID


# -- the catalog ---------------------------------------------------------------------------------

def catalog_entries() -> dict[str, str]:
    """The catalog's entries by MESSAGE_ID, each its text (header lines and body)."""
    parts = re.split(r"^-- ([0-9a-f]{32})\n", CATALOG.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_catalog_explains_every_id_the_daemon_writes() -> None:
    entries = catalog_entries()
    assert set(entries) == {MISS_MESSAGE_ID, EVENT_MESSAGE_ID, audit.CHANGE_MESSAGE_ID, audit.FAILED_MESSAGE_ID}
    for text in entries.values():
        assert re.match(r"Subject: .+\nDefined-By: tailcalld\n", text), text
    failed = entries[audit.FAILED_MESSAGE_ID]
    assert "@ERROR_CODE@" in failed and "@ERROR_MESSAGE@" in failed and "@TAILCALLD_INSTANCE@" in failed
