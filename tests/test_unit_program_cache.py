"""The compile cache's own logic (no kernel): keys, integrity, bounds, a disk that refuses;
and how products rewrite the map fds in instructions."""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from tailcalld import products
from tailcalld.errors import MapError
from tailcalld.program_cache import Entry, ProgramCache

HANDLER = {"dialect": "bcc", "source": "int f(void *ctx) { return 0; }", "cflags": [], "function": None}


def cache(tmp_path: Path, max_bytes: int = 1 << 20) -> ProgramCache:
    return ProgramCache(tmp_path / "programs", lambda: max_bytes)


def entry(size: int = 10, function: str = "f") -> Entry:
    return Entry({"kind": "bcc", "insns_b64": "A" * size, "license": "GPL", "maps": []}, function, "a warning")


def test_a_stored_entry_comes_back_whole(tmp_path: Path) -> None:
    c = cache(tmp_path)
    key = c.key(HANDLER)
    assert c.get(key) is None
    c.put(key, entry())
    assert c.get(key) == entry()
    assert oct((tmp_path / "programs").stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "programs").iterdir())


def test_the_key_changes_with_the_handler_and_with_tailcalld_and_the_kernel(tmp_path: Path) -> None:
    c = cache(tmp_path)
    key = c.key(HANDLER)
    assert c.key(dict(HANDLER)) == key  # stable
    assert c.key(HANDLER | {"source": HANDLER["source"] + " "}) != key
    assert c.key(HANDLER | {"cflags": ["-DX=1"]}) != key
    assert c.key(HANDLER | {"function": "f"}) != key
    other = cache(tmp_path)
    other.identity.update(btf="another kernel's BTF")  # cached_property: the kernel this cache was made for
    assert other.key(HANDLER) != key
    newer = cache(tmp_path)
    newer.identity.update(tailcalld="99.0")
    assert newer.key(HANDLER) != key
    assert set(c.identity) >= {"tailcalld", "bpf_headers", "release", "build", "btf"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other-key", "not-json"])
def test_a_corrupt_entry_is_removed_and_never_returned(tmp_path: Path, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    c = cache(tmp_path)
    key = c.key(HANDLER)
    c.put(key, entry(200))
    path = tmp_path / "programs" / f"{key}.entry"
    raw = path.read_bytes()
    if damage == "flip":  # one byte of the product, the SHA-256 left as it was
        at = raw.index(b"AAAA")
        raw = raw[:at] + b"B" + raw[at + 1:]
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "empty":
        raw = b""
    elif damage == "other-key":
        raw = raw.replace(key.encode(), b"0" * 64)
    else:
        raw = b"\x00\xff" * 10
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="tailcalld"):
        assert c.get(key) is None
    assert not path.exists()
    assert "corrupt" in caplog.text and key[:16] in caplog.text


def test_the_cache_is_bounded_and_keeps_the_entries_used_last(tmp_path: Path) -> None:
    c = cache(tmp_path, max_bytes=5000)
    keys = [c.key(HANDLER | {"source": str(i)}) for i in range(8)]
    for i, key in enumerate(keys):
        c.put(key, entry(900))
        os.utime(tmp_path / "programs" / f"{key}.entry", ns=(i * 10**9, i * 10**9))  # put in this order
        if i == 2:
            assert c.get(keys[0]) is not None  # used again: now the newest of the three
    sizes = [p.stat().st_size for p in (tmp_path / "programs").glob("*.entry")]
    assert sum(sizes) <= 5000
    assert c.get(keys[-1]) is not None
    assert c.get(keys[1]) is None  # the oldest unused went first


def test_an_entry_larger_than_the_bound_and_a_cache_of_size_0_keep_nothing(tmp_path: Path) -> None:
    small = cache(tmp_path, max_bytes=100)
    small.put(small.key(HANDLER), entry(1000))
    off = cache(tmp_path, max_bytes=0)
    assert not off.enabled
    off.put(off.key(HANDLER), entry())
    assert not list((tmp_path / "programs").glob("*.entry"))
    assert small.get(small.key(HANDLER)) is None


def test_a_disk_that_refuses_costs_the_entry_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "programs").write_text("a file where the folder should be")
    c = cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tailcalld"):
        c.put(c.key(HANDLER), entry())
        c.put(c.key(HANDLER | {"source": "x"}), entry())
    assert caplog.text.count("cannot write") == 1  # said once, not at every compile
    assert c.get(c.key(HANDLER)) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def _ld_map(fd: int, src: int = 1, dst: int = 1) -> bytes:
    """BPF_LD_IMM64 of a map by fd: two instruction slots."""
    return struct.pack("<BBhi", 0x18, (src << 4) | dst, 0, fd) + struct.pack("<BBhi", 0, 0, 0, 0)


def test_map_fds_in_instructions_are_found_and_rewritten() -> None:
    mov = struct.pack("<BBhi", 0xb7, 0, 0, 7)  # r0 = 7
    plain_imm64 = struct.pack("<BBhi", 0x18, 0x02, 0, 5) + bytes(8)  # src_reg 0: a number, not a map
    exit_ = struct.pack("<BBhi", 0x95, 0, 0, 0)
    insns = mov + _ld_map(12) + plain_imm64 + _ld_map(900) + _ld_map(13, src=2) + exit_
    assert products.map_refs(insns) == [(1, 12), (5, 900), (7, 13)]
    out = products.patched(insns, {12: 40, 13: 41})
    assert products.map_refs(out) == [(1, 40), (5, 900), (7, 41)]
    assert len(out) == len(insns) and out[:8] == mov and out[-8:] == exit_
    assert out[24:40] == plain_imm64  # the number 5 is no map: untouched


def test_a_product_describes_its_maps_for_the_budget_check() -> None:
    product = {"maps": [{"fd": 5, "type": 1, "name": "seen", "key_size": 4, "value_size": 8, "max_entries": 128,
                         "flags": 0}, {"fd": 6, "frozen_b64": "AAAA"}]}
    assert products.map_specs(product) == [("seen", 1, 4, 8, 128)]
    assert json.loads(json.dumps(product)) == product  # what the cache stores is plain JSON


def test_instructions_naming_an_fd_nothing_provides_are_refused_before_any_load() -> None:
    """A product made with the event channel, loaded where there is none: fd 900 of this process
    (whatever it is) must never be written into a program."""
    exit_ = struct.pack("<BBhi", 0x95, 0, 0, 0)
    product = {"insns_b64": base64.b64encode(_ld_map(products.CHANNEL_FDS["events"]) + exit_).decode(),
               "license": "GPL", "maps": []}
    with pytest.raises(MapError, match=r"fds \[900\]"):
        products.load_insns(product, "f", None, 1 << 20, 4096)
