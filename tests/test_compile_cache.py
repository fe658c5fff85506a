"""The compile cache on the real kernel: a hit loads the very program the compile loads (the
kernel's tag of its instructions, its maps), without a compile; an entry that is corrupt or no
longer loads is never used, and the handler is compiled anew."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, counting_handler
from tailcalld import bpfsys
from tailcalld.compiler import Compiler, Program
from tailcalld.config import LiveSettings, Settings

pytestmark = pytest.mark.usefixtures("machine")

BCC_HANDLER = """
BPF_HASH(seen, u32, u64, 128);
BPF_PERCPU_ARRAY(runs, u64, 4);
int count_runs(struct bpf_raw_tracepoint_args *ctx)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32, zero = 0;
    u64 one = 1;
    seen.update(&pid, &one);
    u64 *n = runs.lookup(&zero);
    if (n)
        (*n)++;
    return 0;
}
"""
LIBBPF_HANDLER = (REPO / "examples" / "fchmodat_libbpf.bpf.c").read_text()


@asynccontextmanager
async def compiler(cache_dir: Path, **settings: object) -> AsyncIterator[Compiler]:
    c = Compiler(LiveSettings(Settings(**settings)), cache_dir=cache_dir)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        await c.aclose()  # no worker's pipe left for the garbage collector after the loop


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "programs").glob("*.entry"))


def tag(p: Program) -> tuple[str, int, list[str]]:
    """What the kernel says the program is: the tag (a hash of its instructions, map fds left
    out), its length, and its maps by name."""
    info = bpfsys.prog_info(p.fd)
    return info.tag, info.xlated_insns, sorted(m.name for m in p.maps)


async def load(c: Compiler, dialect: str) -> Program:
    if dialect == "bcc":
        return await c.load(BCC_HANDLER, "count_runs", dialect="bcc", filename="runs.c")
    return await c.load(LIBBPF_HANDLER, "enter_fchmodat", dialect="libbpf", filename="fchmodat.bpf.c")


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_a_hit_loads_the_program_the_compile_loads(tmp_path: Path, dialect: str) -> None:
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            first = await load(c, dialect)
            assert not first.from_cache and len(entries(tmp_path)) == 1
            second = await load(c, dialect)
            try:
                assert second.from_cache
                assert "compile" not in second.steps  # no clang ran
                assert not any(step.startswith("worker") for step in second.steps)  # loaded by the daemon itself
                if dialect == "bcc":
                    assert tag(second) == tag(first)
                else:  # libbpf binds a .rodata to every program it loads: the instructions do not use it here
                    assert tag(second)[:2] == tag(first)[:2]
                assert second.id != first.id and second.function == first.function
                assert second.log == first.log  # it says what the compile said
                if dialect == "bcc":  # maps of its own, made anew: not the first program's
                    assert {m.id for m in second.maps}.isdisjoint(m.id for m in first.maps)
            finally:
                first.close()
                second.close()
    run(scenario)


def test_a_new_compiler_finds_the_entries_of_an_earlier_one(tmp_path: Path) -> None:
    """What a restart (or a reboot) sees: a new process, the same state_dir."""
    async def once() -> tuple[bool, tuple[str, int, list[str]]]:
        async with compiler(tmp_path) as c:
            p = await load(c, "bcc")
            try:
                return p.from_cache, tag(p)
            finally:
                p.close()

    first, second = asyncio.run(once()), asyncio.run(once())
    assert (first[0], second[0]) == (False, True) and first[1] == second[1]


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_a_corrupt_entry_is_never_loaded(tmp_path: Path, dialect: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            (await load(c, dialect)).close()
            [path] = entries(tmp_path)
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x01  # one bit, somewhere in the product
            path.write_bytes(bytes(raw))
            with caplog.at_level(logging.WARNING, logger="tailcalld"):
                p = await load(c, dialect)
            try:
                assert not p.from_cache
            finally:
                p.close()
            assert "corrupt" in caplog.text
            [again] = entries(tmp_path)  # the compile wrote a good one back
            assert again.read_bytes() != bytes(raw)
            p = await load(c, dialect)
            assert p.from_cache
            p.close()
    run(scenario)


def _rewrite(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Change an entry's product and give it a matching SHA-256: whole, but no longer right."""
    outer = json.loads(path.read_text())
    body = json.loads(outer["body"])
    edit(body["product"])
    outer["body"] = json.dumps(body, sort_keys=True)
    outer["sha256"] = hashlib.sha256(outer["body"].encode()).hexdigest()
    path.write_text(json.dumps(outer))


BAD_INSNS = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0)).decode()  # exit, r0 never written: "R0 !read_ok"


def _verifier_refuses(product: dict[str, Any]) -> None:
    if product["kind"] == "bcc":
        product["insns_b64"] = BAD_INSNS
    else:  # the instructions the daemon loads itself, and the object a worker loads after them
        product["insns"]["insns_b64"] = BAD_INSNS
        product["object_b64"] = base64.b64encode(b"\x7fELF" + bytes(60)).decode()


def test_libbpf_instructions_that_no_longer_load_leave_the_object_to_libbpf(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            first = await load(c, "libbpf")
            [path] = entries(tmp_path)
            _rewrite(path, lambda product: product["insns"].update(insns_b64=BAD_INSNS))
            second = await load(c, "libbpf")
            try:
                assert second.from_cache and tag(second) == tag(first)
                assert any(step.startswith("worker start") for step in second.steps)  # libbpf loaded the object
            finally:
                first.close()
                second.close()
            assert entries(tmp_path) == [path]  # kept: its object loads
    run(scenario)


@pytest.mark.parametrize("dialect", ["bcc", "libbpf"])
def test_an_entry_that_no_longer_loads_is_dropped_and_the_handler_compiled(
        tmp_path: Path, dialect: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            first = await load(c, dialect)
            [path] = entries(tmp_path)
            _rewrite(path, _verifier_refuses)
            with caplog.at_level(logging.WARNING, logger="tailcalld"):
                p = await load(c, dialect)
            try:
                assert not p.from_cache and tag(p) == tag(first)
            finally:
                p.close()
                first.close()
            assert "no longer loads" in caplog.text or "loading it failed" in caplog.text
            p = await load(c, dialect)  # the compile's entry replaced the bad one
            assert p.from_cache
            p.close()
    run(scenario)


def test_a_bcc_handler_loaded_as_the_only_function_is_found_by_its_name(tmp_path: Path) -> None:
    """An attach names no function (the only raw_tp one); a restart asks for the one it got."""
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            first = await c.load(BCC_HANDLER, None, dialect="bcc", filename="runs.c")
            named = await c.load(BCC_HANDLER, "count_runs", dialect="bcc", filename="runs.c")
            unnamed = await c.load(BCC_HANDLER, None, dialect="bcc", filename="runs.c")
            try:
                assert (first.from_cache, named.from_cache, unnamed.from_cache) == (False, True, True)
                assert tag(named) == tag(unnamed) == tag(first)
            finally:
                for p in (first, named, unnamed):
                    p.close()
    run(scenario)


def test_a_handler_fault_from_a_hit_is_the_compiles_error(tmp_path: Path) -> None:
    """A function the object does not have: the entry is fine, the request is not."""
    async def scenario() -> None:
        async with compiler(tmp_path) as c:
            (await load(c, "libbpf")).close()
            with pytest.raises(Exception) as raised:
                await c.load(LIBBPF_HANDLER, "no_such_function", dialect="libbpf", filename="fchmodat.bpf.c")
            assert getattr(raised.value, "code", None) == "function_not_found"
            assert len(entries(tmp_path)) == 1  # kept
    run(scenario)


def test_handlers_with_pinned_tables_and_a_cache_of_0_bytes_are_compiled_each_time(tmp_path: Path,
                                                                                   pin_root: Path) -> None:
    """A table shared through a pin must be opened at each load, never made anew from an entry."""
    async def scenario() -> None:
        async with compiler(tmp_path / "a") as c:
            for _ in range(2):
                p = await c.load(counting_handler(pin_root / "maps" / "shared"), None, dialect="bcc",
                                 filename="pinned.c")
                assert not p.from_cache
                p.close()
        assert not entries(tmp_path / "a")
        async with compiler(tmp_path / "b", compile_cache_bytes=0) as c:
            for _ in range(2):
                p = await load(c, "bcc")
                assert not p.from_cache
                p.close()
        assert not entries(tmp_path / "b")
    run(scenario)
