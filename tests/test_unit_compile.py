"""The compiler's pure logic: the include check's spellings, the NUL check, the map budget,
how a worker's death is named, and what the Landlock ruleset lets a compile read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailcalld import confine, mapbudget
from tailcalld.compiler import _died, check_includes, check_text
from tailcalld.errors import BadRequest, CompileOutOfMemory, CompilerCrashed, ForbiddenInclude, MapTooLarge

FN = "int h(struct bpf_raw_tracepoint_args *ctx) { return 0; }\n"

# Each hides `#include "/etc/shadow"` from a line-by-line look (issue #10, item 5).
BYPASSES = {
    "digraph": '%:include "/etc/shadow"\n',
    "comment between # and include": '#/**/include "/etc/shadow"\n',
    "comment before #": '/* x */ #include "/etc/shadow"\n',
    "backslash-newline in the word": '#inc\\\nlude "/etc/shadow"\n',
    "backslash-newline after #": '#\\\ninclude "/etc/shadow"\n',
    "backslash-CRLF": '#\\\r\ninclude "/etc/shadow"\n',
    "multi-line comment": '#/*\n*/include "/etc/shadow"\n',
    "digraph with comment": '%:/**/include </etc/shadow>\n',
}


@pytest.mark.parametrize("spelling", BYPASSES.values(), ids=BYPASSES.keys())
def test_every_include_spelling_is_refused(spelling: str) -> None:
    with pytest.raises(ForbiddenInclude):
        check_includes(spelling + FN)


def test_headers_and_comments_that_look_odd_still_pass() -> None:
    check_includes('#include <linux/bpf.h>\n%:include "vmlinux.h"\n// #include "/etc/shadow"\n'
                   '/* #include "/etc/shadow" */\n' + FN)


def test_a_nul_byte_is_refused_with_its_line() -> None:
    with pytest.raises(BadRequest, match="line 2"):
        check_text(FN + "\0int rest;\n")
    check_text(FN + 'char s[] = "\\0";\n')  # an escaped NUL in a literal is text


def spec(type: int = 2, key: int = 4, value: int = 8, entries: int = 1, name: str = "m") -> mapbudget.MapSpec:
    return mapbudget.MapSpec(name, type, key, value, entries)


def test_map_bytes_counts_per_cpu_values_and_ring_buffers() -> None:
    assert mapbudget.map_bytes(spec(entries=10), possible_cpus=4) == 10 * 12
    assert mapbudget.map_bytes(spec(type=6, entries=10), possible_cpus=4) == 10 * (4 + 8 * 4)
    assert mapbudget.map_bytes(spec(type=27, key=0, value=0, entries=1 << 20), possible_cpus=4) == 1 << 20


def test_map_budget_refuses_the_total_and_names_the_largest() -> None:
    small, big = spec(entries=1000, name="small"), spec(value=4096, entries=1 << 20, name="big")
    mapbudget.check([small], budget=12_000, possible_cpus=2)
    with pytest.raises(MapTooLarge, match="'big'"):
        mapbudget.check([small, big], budget=1 << 30, possible_cpus=2)
    with pytest.raises(MapTooLarge):  # 16 TiB: refused before the kernel is asked
        mapbudget.check([spec(value=4096, entries=0xFFFFFFFF)], budget=256 << 20, possible_cpus=2)


def test_a_dead_worker_is_named_with_its_status() -> None:
    crashed = _died(-11, "Segmentation fault in bcc\n", 1 << 30)
    assert isinstance(crashed, CompilerCrashed) and "SIGSEGV" in crashed.message
    assert crashed.details == {"log": "Segmentation fault in bcc\n", "status": -11}
    assert "status 3" in _died(3, "", 1 << 30).message
    oom = _died(-6, "terminate called after throwing an instance of 'std::bad_alloc'\n", 512 << 20)
    assert isinstance(oom, CompileOutOfMemory) and "512 MiB" in oom.message


def test_the_ruleset_reads_only_compile_folders(tmp_path: Path) -> None:
    rules = confine.compile_ruleset(["/opt/include-me"], tmp_path)
    assert rules.write == (tmp_path,)
    read = {str(p) for p in rules.read}
    assert "/opt/include-me" in read and "/usr/include" in read
    for never in ("/", "/etc", "/root", "/tmp", "/home", "/var", "/usr", "/proc", "/sys"):
        assert never not in read, never
    assert rules.list_dirs == ()


def test_a_load_that_may_reuse_pinned_maps_may_list_folders_only(tmp_path: Path) -> None:
    """libbpf 1.1 opens "/" to reuse a map pinned by name: folders may be opened, no file read."""
    rules = confine.compile_ruleset([], tmp_path, reuses_pins=True)
    assert rules.list_dirs == (Path("/"),)
    assert Path("/") not in rules.read and rules.write == (tmp_path,)
