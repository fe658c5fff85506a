"""Local headers (issue #12 item 4), the parts that need no kernel: what tailcallctl finds next
to a source and sends, the names the protocol takes, a handler's identity with its headers,
and the state store keeping them by content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailcalld import ctl
from tailcalld.dialects import Artifact, header_name_problem
from tailcalld.errors import RequestError
from tailcalld.local_headers import HeaderError, find_local_headers
from tailcalld.protocol import parse_request
from tailcalld.state import SlotRecord, StateFile, StateStore


def tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_quoted_includes_next_to_the_file_are_found_recursively(tmp_path: Path) -> None:
    tree(tmp_path, {"a.h": '#include "sub/b.h"\n', "sub/b.h": '#include "c.h"\n#include "d.h"\n',
                    "sub/c.h": "// beside b.h\n", "d.h": "// in the source's folder\n", "vmlinux.h": "huge",
                    "unused.h": "", "sub/e.h": '#include "../a.h"\n'})
    source = ('#include "vmlinux.h"\n#include "a.h"\n#include <linux/bpf.h>\n#include "bpf_helpers.h"\n'
              '/* #include "unused.h" */\n#include "./a.h"\n#include "../outside.h"\n#include "/etc/passwd"\n')
    found = find_local_headers(tmp_path / "h.c", source, 32, 1 << 20)
    assert found == {"a.h": '#include "sub/b.h"\n', "sub/b.h": '#include "c.h"\n#include "d.h"\n',
                     "sub/c.h": "// beside b.h\n", "d.h": "// in the source's folder\n"}


def test_the_protocols_bounds_are_kept(tmp_path: Path) -> None:
    tree(tmp_path, {f"h{i}.h": "x" * 100 for i in range(3)})
    source = "".join(f'#include "h{i}.h"\n' for i in range(3))
    assert len(find_local_headers(tmp_path / "s.c", source, 3, 300)) == 3
    with pytest.raises(HeaderError, match="more than 2 local headers.*max_headers"):
        find_local_headers(tmp_path / "s.c", source, 2, 1 << 20)
    with pytest.raises(HeaderError, match="more than 250 bytes.*max_headers_bytes"):
        find_local_headers(tmp_path / "s.c", source, 32, 250)
    (tmp_path / "bad.h").write_bytes(b"\xff\xfe")
    with pytest.raises(HeaderError, match="not UTF-8"):
        find_local_headers(tmp_path / "s.c", '#include "bad.h"\n', 32, 1 << 20)


def test_tailcallctl_sends_the_headers_of_a_file_but_not_of_stdin(tmp_path: Path) -> None:
    tree(tmp_path, {"a.h": "#define A 1\n", "h.c": '#include "a.h"\nint h(void *ctx) { return A; }\n'})
    args = ctl.build_parser().parse_args(["attach", "268", str(tmp_path / "h.c")])
    assert ctl.attach_request(args)["headers"] == {"a.h": "#define A 1\n"}
    (tmp_path / "a.h").unlink()
    assert ctl.attach_request(args)["headers"] is None  # not found: not sent (the daemon says if it is missing)


@pytest.mark.parametrize("name", ["../a.h", "/a.h", "a/../../b.h", "a//b.h", "./a.h", "a\0.h", "", "x" * 256])
def test_names_the_protocol_refuses(name: str) -> None:
    assert header_name_problem(name) is not None
    line = json.dumps({"command": "check", "source": "x", "headers": {name: "y"}}).encode()
    with pytest.raises(RequestError) as caught:
        parse_request(line)
    assert caught.value.error.code == "bad_request"


def test_names_the_protocol_takes() -> None:
    _, request = parse_request(json.dumps({"command": "check", "source": "x",
                                           "headers": {"a.h": "1", "sub/dir/b.h": "2", ".hidden.h": ""}}).encode())
    assert request.headers == {"a.h": "1", "sub/dir/b.h": "2", ".hidden.h": ""}  # type: ignore[union-attr]
    with pytest.raises(RequestError, match="headers go with a source"):
        parse_request(json.dumps({"command": "check", "object": "f0VMRg==", "headers": {"a.h": ""}}).encode())


def test_a_handlers_identity_includes_its_headers() -> None:
    plain = Artifact("libbpf", b"source")
    assert plain.sha256 == Artifact("libbpf", b"source", headers={}).sha256  # as saved before headers existed
    with_a = Artifact("libbpf", b"source", headers={"a.h": "1"})
    assert with_a.sha256 != plain.sha256
    assert with_a.sha256 != Artifact("libbpf", b"source", headers={"a.h": "2"}).sha256
    assert with_a.sha256 != Artifact("libbpf", b"source", headers={"b.h": "1"}).sha256
    both = {"a.h": "1", "b.h": "2"}
    assert Artifact("bcc", b"s", headers=both).sha256 == Artifact("bcc", b"s", headers=dict(reversed(both.items()))).sha256


def test_the_store_keeps_headers_by_content_and_collects_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.prepare()
    artifact = Artifact("libbpf", b"int x;", headers={"a.h": "#define A 1\n", "sub/b.h": "#define B 2\n"})
    sha = store.put_artifact(artifact)
    record = SlotRecord(slot=268, function="h", prog_id=1, source_sha256=sha, dialect="libbpf", filename="h.c",
                        attached_by_uid=0, attached_at=None, headers=artifact.header_sha256s)
    store.save(StateFile(slots={268: record}))
    assert len(list(store.sources.glob("*.h"))) == 2
    loaded = store.load()
    assert loaded.found and loaded.state.slots[268].headers == artifact.header_sha256s
    assert store.artifact(sha, "libbpf", record.headers) == artifact
    with pytest.raises(ValueError, match="does not match"):  # a header changed on disk
        (store.sources / f"{record.headers['a.h']}.h").write_text("#define A 2\n")
        store.artifact(sha, "libbpf", record.headers)
    (store.sources / f"{record.headers['sub/b.h']}.h").unlink()
    assert not store.load().found  # a state naming a missing header is set aside, as one naming a missing source
    store.save(StateFile())
    assert list(store.sources.glob("*.h")) == []
    store.close()
