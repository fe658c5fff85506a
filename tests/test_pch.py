"""The precompiled vmlinux.h (tailcalld/pch.py) with the real clang and kernel: a handler
compiled with it is the same object and loads the same program; clang says the same of a broken
source, naming the user's file and lines; a stale, damaged or others-writable PCH is not used
and is made again; one clang refuses all the same is dropped, and the compile goes on without."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tailcalld.compiler import Compiler, Program, bpf_include_dir
from tailcalld.config import LiveSettings, Settings
from tailcalld.dispatcher import dispatcher_cflags
from tailcalld.dialects import clang_command, clang_options, pch_command, vmlinux_header
from tailcalld.errors import CompileError
from tailcalld.pch import Precompiled, file_sha256

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARTICLE = (EXAMPLES / "fchmodat_libbpf.bpf.c").read_text()
BROKEN = """#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("raw_tracepoint/sys_enter")
int h(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    int unused;
    return t->no_such_member + undefind;
}
"""


def made(cache: Path) -> tuple[Path, Path]:
    """A vmlinux.h folder under ``cache`` and its PCH."""
    async def make() -> tuple[Path, Path | None]:
        folder = await vmlinux_header(cache, 120)
        return folder, await Precompiled(lambda: 120.0).build(folder)

    folder, pch = asyncio.run(make())
    assert pch is not None and pch.is_file() and pch.parent == folder
    return folder, pch


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "cache"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One folder and PCH for the tests that leave them as they are."""
    cache = tmp_path_factory.mktemp("pch-shared")
    try:
        yield made(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def clang(folder: Path, source: str, out: Path, pch: Path | None,
          cflags: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    cmd = clang_command([str(folder), bpf_include_dir()], str(out), cflags, str(pch) if pch else None)
    return subprocess.run(cmd, input=source, capture_output=True, text=True, cwd=out.parent)


def ready(folder: Path) -> tuple[Path | None, Path | None]:
    """What a fresh Precompiled says of ``folder`` now, and then, once the build it started (if
    any) is over."""
    async def ask() -> tuple[Path | None, Path | None]:
        p = Precompiled(lambda: 120.0)
        first = await p.ready(folder)
        if first is None:
            await p.start_build(folder)
        return first, await p.ready(folder)

    return asyncio.run(ask())


# -- clang -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["article", "dispatcher"])
def test_the_pch_makes_the_same_object_as_the_header(shared: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    folder, pch = shared
    source = ARTICLE if name == "article" else (Path(bpf_include_dir()) / "dispatcher.bpf.c").read_text()
    cflags = dispatcher_cflags(compat=True) if name == "dispatcher" else []  # ours: the PCH serves it too
    with_pch = clang(folder, source, tmp_path / "a.o", pch, cflags)
    without = clang(folder, source, tmp_path / "b.o", None, cflags)
    assert with_pch.returncode == 0 and without.returncode == 0, with_pch.stderr + without.stderr
    assert (tmp_path / "a.o").read_bytes() == (tmp_path / "b.o").read_bytes()


def test_clang_says_the_same_of_a_broken_source_with_the_pch(shared: tuple[Path, Path], tmp_path: Path) -> None:
    folder, pch = shared
    with_pch, without = clang(folder, BROKEN, tmp_path / "a.o", pch), clang(folder, BROKEN, tmp_path / "b.o", None)
    assert with_pch.returncode != 0 and with_pch.stderr == without.stderr
    said = with_pch.stderr
    assert "<stdin>:9:15: error: no member named 'no_such_member' in 'struct task_struct'" in said
    assert "<stdin>:9:32: error: use of undeclared identifier 'undefind'" in said
    assert f"{folder}/vmlinux.h:" in said  # clang's note on what it meant points into the header, as without


# -- what is trusted -------------------------------------------------------------------------

def test_a_pch_is_used_when_it_is_current_and_intact(shared: tuple[Path, Path]) -> None:
    folder, pch = shared
    assert ready(folder) == (pch, pch)
    record = json.loads(pch.with_name(pch.name + ".json").read_text())
    assert record["sha256"] == file_sha256(pch) and oct(pch.stat().st_mode & 0o777) == "0o600"


def test_a_stale_pch_is_made_again(cache: Path, tmp_path: Path) -> None:
    folder, pch = made(cache)
    header = folder / "vmlinux.h"
    os.utime(header, ns=(header.stat().st_atime_ns, header.stat().st_mtime_ns + 10**9))  # "another" vmlinux.h
    stale = clang(folder, ARTICLE, tmp_path / "a.o", pch)
    assert stale.returncode != 0 and "has been modified since the precompiled header" in stale.stderr
    first, then = ready(folder)
    assert first is None and then is not None and then != pch and not pch.exists()
    assert json.loads(then.with_name(then.name + ".json").read_text())["made_from"]["header_mtime_ns"] == (
        header.stat().st_mtime_ns)
    assert clang(folder, ARTICLE, tmp_path / "b.o", then).returncode == 0


@pytest.mark.parametrize("damage", ["bytes", "record", "others may write", "others may write its record"])
def test_a_damaged_or_unsafe_pch_is_not_used_and_is_made_again(cache: Path, damage: str) -> None:
    folder, pch = made(cache)
    record = pch.with_name(pch.name + ".json")
    if damage == "bytes":
        with pch.open("r+b") as f:  # same size: only the content says it
            f.seek(pch.stat().st_size // 2)
            f.write(b"\xde\xad\xbe\xef" * 16)
    elif damage == "record":
        record.write_text("{not json")
    elif damage == "others may write":
        pch.chmod(0o666)
    else:
        record.chmod(0o666)
    (folder / ".vmlinux.h.0123.pch.4242.tmp").write_bytes(b"half")  # as a daemon killed mid-build leaves it
    damaged_inode = pch.stat().st_ino
    first, then = ready(folder)
    assert first is None and then == pch
    assert pch.stat().st_ino != damaged_inode and oct(pch.stat().st_mode & 0o777) == "0o600"
    assert json.loads(record.read_text())["sha256"] == file_sha256(pch) and oct(record.stat().st_mode & 0o777) == "0o600"
    assert not list(folder.glob(".*.tmp"))


# -- through the compile worker and the kernel ----------------------------------------------

def tag_of(program: Program) -> str:
    shown = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(program.id)], capture_output=True, text=True,
                           check=True)
    return str(json.loads(shown.stdout)["tag"])


def load(cache: Path, source: str, function: str | None = "enter_fchmodat") -> Program:
    """One libbpf load by a Compiler of its own on ``cache`` (its background work stopped after)."""
    async def go() -> Program:
        compiler = Compiler(LiveSettings(Settings()), cache_dir=cache)
        try:
            return await compiler.load(source, function, dialect="libbpf", filename="article.bpf.c")
        finally:
            await compiler.aclose()

    return asyncio.run(go())


def test_a_handler_compiled_with_the_pch_loads_the_same_program(machine: None, shared: tuple[Path, Path],
                                                                  cache: Path) -> None:
    with_pch = load(shared[0].parent, ARTICLE)  # the shared folder has its PCH
    without = load(cache, ARTICLE)  # a cache with none yet: this compile reads vmlinux.h
    try:
        assert "compile (clang with PCH)" in with_pch.steps and "compile" in without.steps
        assert tag_of(with_pch) == tag_of(without) and with_pch.insns == without.insns
    finally:
        with_pch.close()
        without.close()


def test_a_pch_clang_refuses_is_dropped_and_the_compile_goes_on(machine: None, cache: Path) -> None:
    folder, pch = made(cache)
    # One made with other options (-O0), its record saying the truth of its bytes: nothing of
    # ours finds fault with it, clang does.
    options = clang_options()
    other = [*options[:options.index("-O2")], "-O0", *options[options.index("-O2") + 1:]]
    cmd = pch_command(folder, str(pch))
    subprocess.run([*other, *cmd[len(options):]], check=True)
    record = pch.with_name(pch.name + ".json")
    record.write_text(json.dumps(json.loads(record.read_text()) | {"sha256": file_sha256(pch)}))
    program = load(cache, ARTICLE)
    try:
        assert program.function == "enter_fchmodat" and "compile (clang with PCH)" in program.steps
        assert not pch.exists() and not record.exists()
    finally:
        program.close()


def test_compile_errors_name_the_users_file_and_lines_with_the_pch(machine: None, shared: tuple[Path, Path],
                                                                    cache: Path) -> None:
    logs = []
    for where in (shared[0].parent, cache):  # with the PCH, then without
        with pytest.raises(CompileError) as err:
            load(where, BROKEN, "h")
        assert isinstance(err.value.details, dict)
        logs.append(err.value.details["log"].replace(str(where), "CACHE"))  # notes name the header's own path
    assert logs[0] == logs[1]
    assert "article.bpf.c:9:15: error: no member named 'no_such_member'" in logs[0] and "<stdin>" not in logs[0]
