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


def _texts(cells: Sequence[object]) -> list[str] | None:
    """The cells as tabulate prints them (str(cell), stripped), when each is one line of
    printable ASCII (one character per column); None otherwise.  Checked once per row, joined:
    a table of hundreds of rows (300 slots) is printed in a few milliseconds."""
    if not all(type(c) is str or type(c) is int for c in cells):
        return None
    texts = [str(c) for c in cells]
    joined = "".join(texts)
    return [t.strip() for t in texts] if joined.isascii() and joined.isprintable() else None


def plain_table(rows: Sequence[Sequence[object]], headers: Sequence[str] = ()) -> str:
    """``tabulate(rows, headers, tablefmt="plain", disable_numparse=True)``."""
    ncols = len(headers) if headers else len(rows[0]) if rows else 0
    cells = [_texts(row) for row in rows] if rows and all(len(row) == ncols for row in rows) else [None]
    if any(c is None for c in cells) or _texts(headers) is None:
        from tabulate import tabulate  # the cases this module leaves to it
        return tabulate(rows, headers=list(headers), tablefmt="plain", disable_numparse=True)
    # tabulate strips a cell's surrounding whitespace, pads it to the column's width and strips
    # the line's end
    table = [c for c in cells if c is not None]
    widths = [max(len(row[i]) for row in table) for i in range(ncols)]
    if headers:
        widths = [max(w, len(h) + MIN_PADDING) for w, h in zip(widths, headers, strict=True)]
    lines = [[*headers]] if headers else []
    lines += table
    return "\n".join(SEPARATOR.join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
