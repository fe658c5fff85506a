"""Unit tests of `tailcallctl show SLOT` for people: the key/value block, the maps' table with
and without its legend, the source and its headers, a handler saved as an object."""

from __future__ import annotations

import pytest

from tailcalld import ctl
from tailcalld.protocol import MapEntry, ShowResult, SlotInfo
from tailcalld.state import SlotRecord

SOURCE = '#include "common.h"\nint h(void *ctx) { return X; }\n'
HEADER = "#define X 0\n"
SHOWN = ShowResult(
    slot=SlotInfo(slot=268, syscall="fchmodat", hook="exit", function="h", dialect="bcc", prog_id=91, filename="h.c",
                  source_sha256="ab" * 32, attached_at=None, hits=9, misses=3, journal=True,
                  variables={"debug": "1"}, defines={"VERBOSE": "1"}),
    maps=[MapEntry(id=12, name="hits", type="array", key_size=4, value_size=8, max_entries=7), MapEntry(id=13)],
    source=SOURCE, headers={"common.h": HEADER})


def show(result: ShowResult, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[str, str]:
    ctl.show_show(result, ctl.build_parser().parse_args(["show", "fchmodat", "--exit", *options]))
    out, err = capsys.readouterr()
    return out, err


def test_the_whole_slot(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = show(SHOWN, capsys)
    assert err == ""
    block, maps, footer, source, header = out.split("\n\n")
    assert block.splitlines()[0] == "Slot      fchmodat exit (268)"
    assert "Events    0 emitted, 0 lost, 0 delivered, to the journal too" in block
    assert block.splitlines()[-1] == "Settings  debug=1 -DVERBOSE=1"
    assert maps.splitlines() == ["MAP ID    NAME    TYPE    KEY    VALUE    MAX ENTRIES",
                                 "12        hits    array   4      8        7",
                                 "13        ?       ?       ?      ?        ?"]  # known by its id alone
    assert footer == "2 maps listed."
    assert source == "# h.c\n" + SOURCE.rstrip("\n")
    assert header == "# common.h\n" + HEADER


def test_no_legend_drops_the_maps_header_and_footer(capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = show(SHOWN, capsys, "--no-legend", "--no-source")
    assert out.endswith("\n\n12  hits  array  4  8  7\n13  ?     ?      ?  ?  ?\n")
    assert "MAP ID" not in out and "listed" not in out and "# h.c" not in out


def test_source_alone_is_the_text_as_saved(capsys: pytest.CaptureFixture[str]) -> None:
    alone = SHOWN.model_copy(update={"headers": {}, "source": "int h(void *ctx) { return 0; }\t// \x1b\n"})
    assert show(alone, capsys, "--source") == ("int h(void *ctx) { return 0; }\t// \x1b\n", "")  # a pipe: raw
    out, _ = show(SHOWN, capsys, "--source")  # with its headers: each after a marker line
    assert out == f"# h.c\n{SOURCE}\n# common.h\n{HEADER}"


def test_control_characters_are_escaped_in_the_full_view(capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = show(SHOWN.model_copy(update={"source": "int h;\x1b[2J\n", "headers": {}}), capsys)
    assert out.endswith("# h.c\nint h;\\x1b[2J\n") and "\x1b" not in out


def test_an_object_has_no_source(capsys: pytest.CaptureFixture[str]) -> None:
    obj = SHOWN.model_copy(update={"source": None, "headers": {}, "object_bytes": 1234, "maps": [],
                                   "maps_note": "as recorded when the program was loaded"})
    out, _ = show(obj, capsys)
    assert out.endswith("\n0 maps listed (as recorded when the program was loaded).\n\n"
                        "# a BPF object of 1234 bytes: no source was saved\n")
    assert show(obj, capsys, "--source") == ("", "# a BPF object of 1234 bytes: no source was saved\n")


def test_source_and_no_source_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["show", "268", "--source", "--no-source"]) == ctl.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_record_from_before_show_has_no_maps() -> None:
    """State written before records kept their maps still loads (no maps: shown by id)."""
    record = SlotRecord.model_validate({"slot": 268, "prog_id": 91, "function": "h", "source_sha256": None,
                                        "filename": None, "attached_by_uid": None, "attached_at": None})
    assert record.maps == []
