"""tailcallctl's tables: tabulate's "plain" format, without importing tabulate when it is not needed.

Importing tabulate costs about twice a bare Python start (it reads its own version with
importlib.metadata, and loads html, dataclasses, textwrap, ...), more than everything else
``tailcallctl list`` does.  The tables tailcallctl prints are the simplest tabulate makes: plain,
no number parsing, every column left-aligned.  For cells that are one line of printable ASCII
this module writes exactly what tabulate writes (tests/test_unit_plain_table.py compares the two
on generated tables); anything else (wide or combining characters, line breaks, a ragged table)
goes to tabulate itself, which knows those cases.
"""

from __future__ import annotations

from collections.abc import Sequence

SEPARATOR = "  "  # tabulate's "plain" column separator
MIN_PADDING = 2  # tabulate's room after a header's text (tabulate.MIN_PADDING)


def _simple(cells: Sequence[object]) -> bool:
    """Cells tabulate would print as str(cell), stripped, one character per column."""
    return all(type(c) in (str, int) and str(c).isascii() and str(c).isprintable() for c in cells)


def plain_table(rows: Sequence[Sequence[object]], headers: Sequence[str] = ()) -> str:
    """``tabulate(rows, headers, tablefmt="plain", disable_numparse=True)``."""
    ncols = len(headers) if headers else len(rows[0]) if rows else 0
    if not rows or any(len(row) != ncols for row in rows) or not all(_simple(row) for row in [headers, *rows]):
        from tabulate import tabulate  # the cases this module leaves to it
        return tabulate(rows, headers=list(headers), tablefmt="plain", disable_numparse=True)
    # tabulate strips a cell's surrounding whitespace, pads it to the column's width and strips
    # the line's end
    cells = [[str(c).strip() for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(ncols)]
    if headers:
        widths = [max(w, len(h) + MIN_PADDING) for w, h in zip(widths, headers, strict=True)]
    lines = [[*headers]] if headers else []
    lines += cells
    return "\n".join(SEPARATOR.join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
