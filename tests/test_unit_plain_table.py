"""plain_table writes what tabulate's "plain" format writes (it stands in for tabulate so that
tailcallctl need not import it: issue 14), on generated tables and on the awkward cases it hands
to tabulate."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st
from tabulate import tabulate

from tailcalld.plain_table import plain_table

CELL = st.one_of(st.text(string.printable.strip() + " ", max_size=12), st.integers(-10**12, 10**12))
ANY_CELL = st.one_of(CELL, st.text(max_size=6), st.none(), st.booleans(), st.floats(allow_nan=False))


def _expected(rows: list[list[object]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True)


@st.composite
def tables(draw: st.DrawFn, cell: st.SearchStrategy[object] = CELL) -> tuple[list[list[object]], list[str]]:
    ncols = draw(st.integers(1, 6))
    rows = draw(st.lists(st.lists(cell, min_size=ncols, max_size=ncols), min_size=1, max_size=6))
    headers = draw(st.one_of(st.just([]), st.lists(st.text(string.ascii_uppercase + " ", min_size=1, max_size=10)
                                                    .map(str.strip).filter(bool), min_size=ncols, max_size=ncols)))
    return rows, headers


@settings(max_examples=400, deadline=None)
@given(tables())
def test_same_as_tabulate_on_ascii_tables(table: tuple[list[list[object]], list[str]]) -> None:
    rows, headers = table
    assert plain_table(rows, headers) == _expected(rows, headers)


@settings(max_examples=200, deadline=None)
@given(tables(ANY_CELL))
def test_same_as_tabulate_on_any_cells(table: tuple[list[list[object]], list[str]]) -> None:
    """Unicode, None, booleans and floats: handed to tabulate, or the same anyway."""
    rows, headers = table
    assert plain_table(rows, headers) == _expected(rows, headers)


def test_awkward_tables_are_tabulates() -> None:
    cases: list[tuple[list[list[object]], list[str]]] = [
        ([["a\nb", "c"]], ["X", "Y"]),  # a line break: tabulate's multi-line cells
        ([["日本語", "x"]], ["NAME", "Y"]),  # wide characters
        ([["a", "b"], ["c"]], []),  # ragged
        ([], ["X", "Y"]),  # no rows: the header alone
        ([["  padded  ", 7]], ["A", "B"]),
    ]
    for rows, headers in cases:
        assert plain_table(rows, headers) == _expected(rows, headers)


def test_a_list_table() -> None:
    rows = [[268, "fchmodat", "enter", "enter_fchmodat_v2", "bcc", "135", "fchmodat_v2.c", "2026-11-25 05:46:49", 1, 0]]
    headers = ["SLOT", "SYSCALL", "HOOK", "FUNCTION", "DIALECT", "PROG", "SOURCE", "SINCE", "HITS", "MISSES"]
    assert plain_table(rows, headers).splitlines() == [
        "SLOT    SYSCALL    HOOK    FUNCTION           DIALECT    PROG    SOURCE         SINCE                "
        "HITS    MISSES",
        "268     fchmodat   enter   enter_fchmodat_v2  bcc        135     fchmodat_v2.c  2026-11-25 05:46:49  "
        "1       0"]
