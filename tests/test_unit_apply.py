"""Unit tests of declarative state: the apply file (parse, read, write), the plan an apply makes
and how it is carried out, on the in-memory kernel (tests/fakes.py); tailcallctl's diff."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fakes import NR_SLOTS, FakeKernel, FlakyStore, open_fds, run_on_fake
from test_unit_ctl import one_shot_daemon
from tailcalld import ctl
from tailcalld.apply_cli import diff_lines, place_files, summary
from tailcalld.commands import CommandContext, run_apply
from tailcalld.compiler import Program
from tailcalld.config import LiveSettings, Settings
from tailcalld.dialects import Artifact
from tailcalld.desired import DesiredFileError, entry_text, parse, read_request
from tailcalld.desired_slots import DesiredSlots, signature, trusted_read
from tailcalld.errors import (ApplyIncomplete, BadRequest, CompileError, KernelError, StateUnwritable, UnknownSyscall,
                              UnsafePath)
from tailcalld.peers import Peer
from tailcalld.protocol import ApplyRequest, ApplyResult, SavedFile, SavedSlot, SaveResult, SlotChange, encode_ok
from tailcalld.slots import SlotManager

ME = Peer(pid=1, uid=0, gid=0, comm="test")
FCHMODAT, GETPPID, KILL = 268, 110, 62
BCC = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"
BCC2 = "int h2(struct bpf_raw_tracepoint_args *ctx) { return 1; }\n"


# The apply file ----------------------------------------------------------------------------

def problem(text: str) -> str:
    with pytest.raises(DesiredFileError) as info:
        parse(text, "slots.toml")
    return str(info.value)


def test_parse_takes_every_field() -> None:
    d = parse('[[slot]]\nslot = "fchmodat"\nhook = "exit"\nfile = "a.c"\nfunction = "f"\ndialect = "libbpf"\n'
              'journal = true\nset = { pid = 42, on = true, name = "x" }\ndefine = { N = 3, V = "v" }\n'
              '[[slot]]\nslot = 110\nfile = "b.o"\n', "slots.toml")
    a, b = d.slot
    assert (a.slot, a.hook, a.file, a.function, a.dialect, a.journal) == ("fchmodat", "exit", "a.c", "f", "libbpf", True)
    assert a.variables == {"pid": 42, "on": True, "name": "x"} and a.defines == {"N": 3, "V": "v"}
    assert (b.slot, b.hook, b.function, b.dialect, b.journal, b.variables) == (110, "enter", None, "auto", False, {})


def test_a_file_can_say_it_is_applied_atomically(tmp_path: Path) -> None:
    assert parse('atomic = true\n[[slot]]\nslot = 1\nfile = "a.c"\n', "slots.toml").atomic
    assert not parse('[[slot]]\nslot = 1\nfile = "a.c"\n', "slots.toml").atomic
    assert "an apply file holds `atomic = true|false` and [[slot]] tables only" in problem('atomc = true\n')
    assert "atomic" in problem('atomic = "yes"\n')
    (tmp_path / "a.c").write_text(BCC)
    (tmp_path / "slots.toml").write_text('atomic = true\n[[slot]]\nslot = 1\nfile = "a.c"\n')
    fields, _ = read_request(tmp_path / "slots.toml")
    assert ApplyRequest.model_validate({"command": "apply", **fields}).atomic


def test_an_empty_file_lists_no_slot() -> None:
    assert parse("# nothing\n", "slots.toml").slot == []


def test_parse_errors_name_the_file_the_table_and_the_field() -> None:
    assert "slots.toml is not valid TOML" in problem('[[slot]]\nslot = "a\n')
    said = problem('[[slot]]\nslot = 1\nfile = "a.c"\n[[slot]]\nslot = 2\nfile = "b.c"\nfuncton = "f"\n')
    assert said == "slots.toml: [[slot]] 2: functon: unknown field (did you mean function?)"
    assert problem('[[slot]]\nslot = 1\nfile = "a.c"\nsets = { a = 1 }\n').endswith("sets: unknown field (did you mean set?)")
    assert problem('[[slot]]\nslot = 1\nfile = "a.c"\nxyz = 1\n').endswith(
        "xyz: unknown field; the fields are slot, hook, file, function, dialect, journal, cgroup, priority, set, define")
    assert "[[slot]] 1: file: Field required" in problem('[[slot]]\nslot = 1\n')
    assert "[[slot]] 1: hook: Input should be 'enter' or 'exit'" in problem('[[slot]]\nslot=1\nfile="a"\nhook="in"\n')
    assert "[[slot]] 1: function: String should match pattern" in problem('[[slot]]\nslot=1\nfile="a"\nfunction="a b"\n')
    assert "[[slot]] 1: journal: Input should be a valid boolean" in problem('[[slot]]\nslot=1\nfile="a"\njournal=1\n')
    assert "[[slot]] 1: set" in problem('[[slot]]\nslot=1\nfile="a"\nset = { "not id" = 1 }\n')
    assert "an apply file holds `atomic = true|false` and [[slot]] tables only" in problem('slots = []\n')
    assert "write each slot as a [[slot]] table" in problem('slot = 3\n')


def test_read_request_sends_each_file_once_with_its_headers(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "h.c").write_text('#include "common.h"\n' + BCC)
    (tmp_path / "common.h").write_text("#define X 1\n")
    (tmp_path / "sub" / "o.o").write_bytes(b"\x7fELF" + b"\0" * 60)
    apply = tmp_path / "slots.toml"
    apply.write_text('[[slot]]\nslot = "fchmodat"\nfile = "h.c"\nset = { on = true }\ndefine = { N = 3 }\n'
                     '[[slot]]\nslot = "fchmodat"\nhook = "exit"\nfile = "./h.c"\n'
                     '[[slot]]\nslot = 110\nfile = "sub/o.o"\n')
    fields, used = read_request(apply)
    assert [f["filename"] for f in fields["files"]] == ["h.c", "sub/o.o"]
    assert base64.b64decode(fields["files"][1]["object"]).startswith(b"\x7fELF")
    assert fields["files"][0]["headers"] == {"common.h": "#define X 1\n"}
    assert [s["file"] for s in fields["slots"]] == [0, 0, 1]
    assert fields["slots"][0]["variables"] == {"on": "true"} and fields["slots"][0]["defines"] == {"N": "3"}
    assert set(used) == {apply, tmp_path / "h.c", tmp_path / "common.h", tmp_path / "sub" / "o.o"}
    request = ApplyRequest.model_validate({"command": "apply", **fields})  # the wire accepts it as it is
    assert request.source == str(apply)


def test_read_request_names_a_missing_file_and_its_table(tmp_path: Path) -> None:
    apply = tmp_path / "slots.toml"
    apply.write_text('[[slot]]\nslot = 1\nfile = "gone.c"\n')
    with pytest.raises(DesiredFileError) as info:
        read_request(apply)
    assert str(info.value) == f"{apply}, [[slot]] 1: the handler file {tmp_path / 'gone.c'} does not exist"
    with pytest.raises(DesiredFileError, match="apply file .* does not exist"):
        read_request(tmp_path / "none.toml")


def test_entry_text_is_read_back_as_written() -> None:
    text = "\n".join([
        entry_text("fchmodat", "exit", "dir/a b.c", "f", "libbpf", True, {"name": 'q"uote\\'}, {"N": "1"}),
        entry_text(300, "enter", "x.o", None, "object", False, {}, {})])
    a, b = parse(text, "saved").slot
    assert (a.slot, a.hook, a.file, a.function, a.dialect, a.journal) == ("fchmodat", "exit", "dir/a b.c", "f",
                                                                          "libbpf", True)
    assert a.variables == {"name": 'q"uote\\'} and a.defines == {"N": "1"}
    assert (b.slot, b.file, b.function, b.dialect) == (300, "x.o", None, "auto")


# tailcallctl save: where files go -----------------------------------------------------------

def saved(sha: str, name: str | None, text: str | None = None, headers: dict[str, str] | None = None,
          obj: bytes | None = None) -> SavedFile:
    return SavedFile(sha256=sha, filename=name, source=text, headers=headers or {},
                     object=base64.b64encode(obj).decode() if obj is not None else None)


def slot(nr: int, file: int | None, syscall: str = "x") -> SavedSlot:
    return SavedSlot(slot=nr, syscall=syscall, function="f", dialect="bcc", filename="a.c", prog_id=1, file=file)


def test_save_places_files_and_keeps_apart_what_would_collide() -> None:
    result = SaveResult(slots=[slot(1, 0), slot(2, 1), slot(3, 2, "kill"), slot(4, 3, "getppid")], files=[
        saved("a" * 64, "/home/me/a.c", "A", {"h.h": "1"}),
        saved("b" * 64, "a.c", "B"),  # the same name, other contents
        saved("c" * 64, "c.c", "C", {"h.h": "2"}),  # the same header name, other contents
        saved("d" * 64, "../../evil", obj=b"\x7fELF")])
    where, writes = place_files(result)
    assert where == {0: "a.c", 1: "a-bbbbbbbb/a.c", 2: "c-cccccccc/c.c", 3: "evil.o"}
    assert writes == {"a.c": b"A", "h.h": b"1", "a-bbbbbbbb/a.c": b"B", "c-cccccccc/c.c": b"C",
                      "c-cccccccc/h.h": b"2", "evil.o": b"\x7fELF"}


def test_save_names_a_nameless_file_after_its_slot() -> None:
    where, _ = place_files(SaveResult(slots=[slot(59, 0, "execve")], files=[saved("e" * 64, "<stdin>", "E")]))
    assert where == {0: "execve.c"}


# The plan and its execution, on the in-memory kernel ----------------------------------------

class Node:
    def __init__(self, kernel: FakeKernel, store: FlakyStore, manager: SlotManager) -> None:
        self.kernel, self.store, self.manager = kernel, store, manager
        self.ctx = CommandContext(manager, LiveSettings(Settings()), lambda reason: None)

    async def apply(self, *slots: dict[str, object], files: list[dict[str, object]] | None = None,
                    dry_run: bool = False, atomic: bool = False) -> ApplyResult:
        files = files or [{"filename": "a.c", "source": BCC}, {"filename": "b.c", "source": BCC2}]
        request = ApplyRequest.model_validate({"command": "apply", "files": files, "slots": list(slots),
                                               "dry_run": dry_run, "atomic": atomic, "source": "slots.toml"})
        return await run_apply(self.ctx, request, ME)


def run(tmp_path: Path, scenario: Callable[[Node], Awaitable[None]]) -> None:
    run_on_fake(tmp_path, {"fchmodat": FCHMODAT, "getppid": GETPPID, "kill": KILL},
                lambda k, store, manager: scenario(Node(k, store, manager)))


def actions(result: ApplyResult) -> list[tuple[str, int, str]]:
    return [(c.action, c.slot, c.hook) for c in result.changes]


def test_apply_adds_then_changes_nothing_then_replaces_and_removes(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        dry = await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "getppid", "file": 1}, dry_run=True)
        assert actions(dry) == [("add", GETPPID, "enter"), ("add", FCHMODAT, "enter")]
        assert n.kernel.slots == {} and n.kernel.loads == 0  # a dry run builds nothing
        first = await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "getppid", "file": 1},
                              {"slot": "kill", "file": 0})
        assert actions(first) == [("add", KILL, "enter"), ("add", GETPPID, "enter"), ("add", FCHMODAT, "enter")]
        assert n.kernel.loads == 2  # kill and fchmodat run the same handler: one program
        assert n.kernel.slots[KILL] == n.kernel.slots[FCHMODAT] != n.kernel.slots[GETPPID]
        before, saved = dict(n.kernel.slots), n.store.path.read_bytes()
        again = await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "getppid", "file": 1},
                              {"slot": "kill", "file": 0, "function": "handler"})  # as it resolved
        assert [c.action for c in again.changes] == ["unchanged"] * 3 and not again.changed
        assert [c.prog_id for c in again.changes] == [before[KILL], before[GETPPID], before[FCHMODAT]]
        assert n.kernel.slots == before and n.kernel.loads == 2 and n.store.path.read_bytes() == saved
        dry = await n.apply({"slot": "fchmodat", "file": 1}, {"slot": "getppid", "file": 1, "journal": True},
                            dry_run=True)
        assert actions(dry) == [("replace", GETPPID, "enter"), ("replace", FCHMODAT, "enter"),
                                ("remove", KILL, "enter")]
        assert [c.why for c in dry.changes] == [["journal"], ["source"], []]
        assert n.kernel.slots == before
        done = await n.apply({"slot": "fchmodat", "file": 1}, {"slot": "getppid", "file": 1, "journal": True})
        assert actions(done) == actions(dry)
        assert n.kernel.slots == {GETPPID: before[GETPPID], FCHMODAT: before[GETPPID]}  # reused, not rebuilt
        assert n.kernel.loads == 2
        assert done.changes[2].replaced_prog_id == before[KILL] and done.changes[2].prog_id is None
    run(tmp_path, scenario)


@pytest.mark.parametrize("step", ["state write", "kernel switch"])
def test_an_atomic_apply_that_fails_changes_nothing(tmp_path: Path, step: str) -> None:
    """apply --atomic: the state file and the kernel's slots change together or not at all; a
    refused switch (the kernel's staging, a full disk) leaves every slot as it was, and says so."""
    async def scenario(n: Node) -> None:
        await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "kill", "file": 0})
        before, saved, fds = dict(n.kernel.slots), n.store.path.read_bytes(), open_fds()
        if step == "state write":
            n.store.fail_saves = [True]
        else:
            n.kernel.fail_set = True
        with pytest.raises((KernelError, StateUnwritable)) as info:
            await n.apply({"slot": "fchmodat", "file": 1}, {"slot": "getppid", "file": 1}, atomic=True)
        assert "atomic apply slots.toml: nothing was changed" in info.value.message
        assert n.kernel.slots == before and n.store.path.read_bytes() == saved and open_fds() == fds
        assert {s: h.record.prog_id for s, h in n.manager.registry.handlers.items()} == before
        done = await n.apply({"slot": "fchmodat", "file": 1}, {"slot": "getppid", "file": 1}, atomic=True)
        assert actions(done) == [("add", GETPPID, "enter"), ("replace", FCHMODAT, "enter"), ("remove", KILL, "enter")]
        assert set(n.kernel.slots) == {GETPPID, FCHMODAT} and n.manager.atomic_applies == 1
    run(tmp_path, scenario)


def test_a_failing_build_changes_nothing_and_names_its_entry(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        await n.apply({"slot": "fchmodat", "file": 0})
        before, saved, fds = dict(n.kernel.slots), n.store.path.read_bytes(), open_fds()
        original = n.kernel.load

        async def load(artifact: Artifact, function: str | None) -> Program:
            if artifact.data == BCC2.encode():  # b.c does not compile
                raise CompileError("broken.c:1:1: error: expected identifier")
            return await original(artifact, function)
        n.kernel.load = load  # type: ignore[method-assign]
        with pytest.raises(CompileError) as info:
            await n.apply({"slot": "getppid", "file": 0}, {"slot": "kill", "file": 1}, {"slot": "fchmodat", "file": 1})
        n.kernel.load = original  # type: ignore[method-assign]
        assert info.value.message.startswith("slots.toml, [[slot]] 2 (b.c): broken.c:1:1")
        assert info.value.details["index"] == 1 and info.value.details["file"] == "b.c"
        assert n.kernel.slots == before and n.store.path.read_bytes() == saved and open_fds() == fds
    run(tmp_path, scenario)


def test_a_kernel_failure_half_way_says_what_was_applied(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "kill", "file": 0})
        old_kill = n.kernel.slots[KILL]
        real_set = n.kernel.set_slot

        def set_slot(slot: int, prog: object, cgroup: str | None = None) -> None:
            if slot == FCHMODAT:
                n.kernel.fail_set = True
            real_set(slot, prog, cgroup)  # type: ignore[arg-type]
        n.kernel.set_slot = set_slot  # type: ignore[method-assign]
        with pytest.raises(ApplyIncomplete) as info:
            await n.apply({"slot": "getppid", "file": 1}, {"slot": "fchmodat", "file": 1})
        details = info.value.details
        assert details["applied"] == ["add getppid (110)"]
        assert details["failed"] == "replace fchmodat (268)" and details["not_applied"] == ["remove kill (62)"]
        assert GETPPID in n.kernel.slots and n.kernel.slots[KILL] == old_kill  # fchmodat kept its old one too
        saved = json.loads(n.store.path.read_text())["slots"]
        assert set(saved) == {str(GETPPID), str(FCHMODAT), str(KILL)}
        n.kernel.set_slot = real_set  # type: ignore[method-assign]
        finish = await n.apply({"slot": "getppid", "file": 1}, {"slot": "fchmodat", "file": 1})
        assert actions(finish) == [("unchanged", GETPPID, "enter"), ("replace", FCHMODAT, "enter"),
                                   ("remove", KILL, "enter")]
    run(tmp_path, scenario)


def test_bad_entries_are_refused_before_anything_changes(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        with pytest.raises(UnknownSyscall) as unknown:
            await n.apply({"slot": "fchmodat", "file": 0}, {"slot": "no_such_call", "file": 1})
        assert unknown.value.message.startswith("slots.toml, [[slot]] 2 (b.c): ")
        with pytest.raises(BadRequest, match=r"\[\[slot\]\] 1 and 2 both fill fchmodat \(268\)"):
            await n.apply({"slot": "fchmodat", "file": 0}, {"slot": 268, "file": 1})
        with pytest.raises(BadRequest, match=r"\[\[slot\]\] 1 \(a.c\): --set writes global variables"):
            await n.apply({"slot": "fchmodat", "file": 0, "variables": {"x": "1"}})
        assert n.kernel.slots == {} and n.kernel.loads == 0
    run(tmp_path, scenario)


def test_exit_slots_and_not_restored_records(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        r = await n.apply({"slot": "fchmodat", "file": 0, "hook": "exit"})
        assert actions(r) == [("add", FCHMODAT, "exit")] and n.kernel.exit_attached
        key = NR_SLOTS + FCHMODAT
        record = n.manager.registry.handlers.pop(key).record
        n.manager.registry.unrestored[key] = record  # a start could not rebuild it
        r = await n.apply({"slot": "fchmodat", "file": 0, "hook": "exit"})
        assert actions(r) == [("replace", FCHMODAT, "exit")] and r.changes[0].why == ["not restored"]
        r = await n.apply()
        assert actions(r) == [("remove", FCHMODAT, "exit")] and not n.kernel.exit_attached
    run(tmp_path, scenario)


def test_exit_slots_are_filled_first_and_emptied_last(tmp_path: Path) -> None:
    """An exit handler often takes what its enter handler noted: it is there before, and stays after."""
    async def scenario(n: Node) -> None:
        r = await n.apply({"slot": "getppid", "file": 0}, {"slot": "kill", "file": 0, "hook": "exit"},
                          {"slot": "fchmodat", "file": 0, "hook": "exit"}, {"slot": "fchmodat", "file": 1})
        assert actions(r) == [("add", KILL, "exit"), ("add", FCHMODAT, "exit"), ("add", GETPPID, "enter"),
                              ("add", FCHMODAT, "enter")]
        r = await n.apply()
        assert actions(r) == [("remove", GETPPID, "enter"), ("remove", FCHMODAT, "enter"),
                              ("remove", KILL, "exit"), ("remove", FCHMODAT, "exit")]
        assert n.kernel.slots == {} and not n.kernel.exit_attached
    run(tmp_path, scenario)


def test_a_slot_emptied_behind_our_back_is_put_right(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        await n.apply({"slot": "fchmodat", "file": 0})
        n.kernel.slots.clear()
        r = await n.apply({"slot": "fchmodat", "file": 0})
        assert actions(r) == [("replace", FCHMODAT, "enter")] and r.changes[0].why == ["kernel"]
        assert FCHMODAT in n.kernel.slots
    run(tmp_path, scenario)


def test_attach_of_the_very_same_handler_is_unchanged(tmp_path: Path) -> None:
    async def scenario(n: Node) -> None:
        m = n.manager
        first = await m.attach("fchmodat", Artifact("bcc", BCC.encode()), None, "a.c", ME)
        same = await m.attach(FCHMODAT, Artifact("bcc", BCC.encode()), "handler", "renamed.c", ME)
        assert same.unchanged and same.prog_id == first.prog_id and same.replaced_prog_id is None
        assert n.kernel.loads == 1
        journal = await m.attach(FCHMODAT, Artifact("bcc", BCC.encode()), None, "a.c", ME, journal=True)
        assert not journal.unchanged and journal.replaced_prog_id == first.prog_id
        fresh = await m.attach(FCHMODAT, Artifact("bcc", BCC.encode()), None, "a.c", ME, fresh=True, journal=True)
        assert not fresh.unchanged and n.kernel.loads == 2
    run(tmp_path, scenario)


# tailcallctl apply: the diff ----------------------------------------------------------------

def change(action: str, **fields: object) -> SlotChange:
    base: dict[str, object] = {"action": action, "slot": 268, "syscall": "fchmodat", "index": 0,
                               "function": "enter_fchmodat", "filename": "fchmodat.c", "prog_id": None}
    return SlotChange.model_validate({**base, **fields})


def test_the_diff_has_one_line_per_slot() -> None:
    dry = ApplyResult(dry_run=True, changes=[
        change("add", function=None),
        change("replace", slot=257, syscall="openat", replaced_prog_id=41, why=["source"]),
        change("remove", slot=62, syscall="kill", index=None, replaced_prog_id=55),
        change("unchanged", slot=110, syscall="getppid", prog_id=9)])
    lines = diff_lines(dry, verbose=False, printable=str)
    assert [line.split()[:3] for line in lines] == [["+", "fchmodat", "(268)"], ["~", "openat", "(257)"],
                                                    ["-", "kill", "(62)"]]
    assert "(auto)" in lines[0] and lines[1].endswith("(was program 41: source)") and lines[2].endswith("(was program 55)")
    assert len(diff_lines(dry, verbose=True, printable=str)) == 4
    assert summary(dry) == "dry run: would add 1, replace 1, empty 1; 1 unchanged; nothing was changed."
    done = ApplyResult(dry_run=False, changes=[change("add", prog_id=7), change("unchanged", slot=110, prog_id=9)])
    assert diff_lines(done, False, str)[0].endswith("program 7") and summary(done) == "1 added, 1 unchanged."
    idle = ApplyResult(dry_run=False, changes=[change("unchanged", prog_id=9)])
    assert diff_lines(idle, False, str) == [] and summary(idle) == "nothing to change (1 slot as listed)."


# The daemon's own reading --------------------------------------------------------------------

def test_trusted_read_refuses_what_others_can_change(tmp_path: Path) -> None:
    folder = tmp_path / "desired"
    folder.mkdir(mode=0o755)
    good = folder / "slots.toml"
    good.write_text("# none\n")
    good.chmod(0o644)
    assert trusted_read(good, 100) == b"# none\n"
    good.chmod(0o666)
    with pytest.raises(UnsafePath, match="not writable by group or others"):
        trusted_read(good, 100)
    good.chmod(0o644)
    folder.chmod(0o777)
    with pytest.raises(UnsafePath, match="writable by group and others"):
        trusted_read(good, 100)
    folder.chmod(0o755)
    # A ConfigMap's layout: the name is a link through ..data to a timestamped folder.
    (folder / "..v1").mkdir(mode=0o755)
    (folder / "..v1" / "slots.toml").write_text("# v1\n")
    (folder / "..data").symlink_to("..v1")
    (folder / "cm.toml").symlink_to("..data/slots.toml")
    assert trusted_read(folder / "cm.toml", 100) == b"# v1\n"
    before = signature([folder / "cm.toml"])
    (folder / "..v2").mkdir(mode=0o755)
    (folder / "..v2" / "slots.toml").write_text("# v2\n")
    (folder / "..tmp").symlink_to("..v2")
    os.replace(folder / "..tmp", folder / "..data")  # the swap kubelet makes
    assert signature([folder / "cm.toml"]) != before
    assert trusted_read(folder / "cm.toml", 100) == b"# v2\n"
    assert signature([folder / "gone.toml"]) == ((str(folder / "gone.toml"), None),)


def test_saved_toml_parses_with_tomllib_as_is() -> None:
    text = entry_text("openat", "enter", "openat.bpf.c", "enter_openat", "libbpf", False, {"s": "\x1b\n"}, {})
    assert tomllib.loads(text)["slot"][0]["set"] == {"s": "\x1b\n"}


# tailcallctl apply and save against a stand-in daemon -----------------------------------------

def test_ctl_apply_sends_the_files_once_and_prints_the_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.c").write_text(BCC)
    apply = tmp_path / "slots.toml"
    apply.write_text('[[slot]]\nslot = "fchmodat"\nfile = "a.c"\n[[slot]]\nslot = "kill"\nfile = "a.c"\n')
    reply = ApplyResult(dry_run=True, changes=[change("add", slot=62, syscall="kill", filename="a.c"),
                                               change("add", filename="a.c")])
    with one_shot_daemon(tmp_path / "d.sock", lambda rid: encode_ok(rid, reply)) as daemon:
        code = ctl.main(["--socket", str(daemon.path), "apply", "--dry-run", str(apply)])
    assert isinstance(daemon.request, ApplyRequest) and daemon.request.dry_run
    assert [f.source for f in daemon.request.files] == [BCC] and [s.file for s in daemon.request.slots] == [0, 0]
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert out.out.splitlines()[-1] == "dry run: would add 2; 0 unchanged; nothing was changed."
    assert [line.split()[:2] for line in out.out.splitlines()[:2]] == [["+", "kill"], ["+", "fchmodat"]]


def test_ctl_apply_of_a_bad_file_sends_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    apply = tmp_path / "slots.toml"
    apply.write_text('[[slot]]\nslot = "fchmodat"\nfile = "a.c"\nfunc = "x"\n')
    assert ctl.main(["--socket", str(tmp_path / "none.sock"), "apply", str(apply)]) == 2
    assert capsys.readouterr().err == f"tailcallctl: {apply}: [[slot]] 1: func: unknown field (did you mean function?)\n"


def test_ctl_save_writes_the_files_and_never_overwrites_other_contents(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    reply = SaveResult(slots=[SavedSlot(slot=268, syscall="fchmodat", function="h", dialect="bcc", filename="a.c",
                                        prog_id=7, file=0, defines={"N": "2"})],
                       files=[saved("a" * 64, "/home/me/a.c", BCC, {"h.h": "#define X\n"})])
    out = tmp_path / "saved" / "slots.toml"
    with one_shot_daemon(tmp_path / "d.sock", lambda rid: encode_ok(rid, reply)) as daemon:
        assert ctl.main(["--socket", str(daemon.path), "save", "-o", str(out)]) == 0
    assert (tmp_path / "saved" / "a.c").read_text() == BCC and (tmp_path / "saved" / "h.h").read_text() == "#define X\n"
    [entry] = parse(out.read_text(), "saved").slot
    assert (entry.slot, entry.file, entry.function, entry.dialect, entry.defines) == ("fchmodat", "a.c", "h", "bcc",
                                                                                      {"N": "2"})
    (tmp_path / "saved" / "a.c").write_text("changed by hand\n")
    with one_shot_daemon(tmp_path / "d2.sock", lambda rid: encode_ok(rid, reply)) as daemon:
        assert ctl.main(["--socket", str(daemon.path), "save", "-o", str(out)]) == 1
    assert "would be overwritten" in capsys.readouterr().err
    assert (tmp_path / "saved" / "a.c").read_text() == "changed by hand\n"


def test_desired_slots_tries_again_once_a_missing_handler_file_appears(tmp_path: Path) -> None:
    folder = tmp_path / "desired"
    folder.mkdir(mode=0o755)
    apply = folder / "slots.toml"
    apply.write_text('[[slot]]\nslot = 268\nfile = "a.c"\n')
    sent: list[ApplyRequest] = []

    async def run_it(request: ApplyRequest) -> ApplyResult:
        sent.append(request)
        return ApplyResult(dry_run=False, changes=[])

    async def main() -> None:
        desired = DesiredSlots(LiveSettings(Settings(desired_slots=apply)), run_it)
        assert await desired.reconcile("start") is None and sent == []  # a.c is missing: logged, nothing sent
        await desired.check()
        assert sent == []  # no file changed: not read again
        (folder / "a.c").write_text(BCC)
        await desired.check()
        assert [r.files[0].source for r in sent] == [BCC]
        await desired.check()
        apply.write_text(apply.read_text() + "# a comment changes the file, not what it asks\n")
        await desired.check()
        assert len(sent) == 1
        (folder / "a.c").write_text(BCC2)
        await desired.check()
        assert [r.files[0].source for r in sent] == [BCC, BCC2]
    asyncio.run(main())
