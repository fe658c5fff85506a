"""tailcallctl's progress line: a spinner on stderr while a slow reply (a compile) is awaited.

Only on a terminal, and only once the wait has lasted ``delay`` seconds, so that a quick reply
draws nothing; the line is erased before the reply's output (or error) is printed, so what
stays on the terminal is what tailcallctl would print without it.  Never in --json mode, and
never when stderr is a pipe or a file: scripts and logs see no carriage returns.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

FRAMES = "|/-\\"
ERASE = "\r\x1b[K"  # back to the line's start, clear to its end
DELAY = 0.3  # a reply quicker than this draws nothing
PERIOD = 0.1


class Spinner:
    """``with Spinner("attach fchmodat.c", enabled=...):`` around the wait for a reply."""

    def __init__(self, what: str, enabled: bool, stream: TextIO | None = None, delay: float = DELAY,
                 period: float = PERIOD) -> None:
        self._what = what
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled and _is_terminal(self._stream)
        self._delay = delay
        self._period = period
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.drawn = False  # whether the line was ever shown (and so erased)

    def __enter__(self) -> Spinner:
        if self._enabled:
            self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.drawn:
            self._write(ERASE)

    def _spin(self) -> None:
        start = time.monotonic()
        if self._done.wait(self._delay):
            return
        frame = 0
        while not self._done.is_set():
            elapsed = time.monotonic() - start
            self._write(f"{ERASE}{FRAMES[frame % len(FRAMES)]} {self._what} ({elapsed:.1f} s)")
            self.drawn = True
            frame += 1
            self._done.wait(self._period)

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a terminal gone away, a closed stream: the spinner is not worth a crash
            pass


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
