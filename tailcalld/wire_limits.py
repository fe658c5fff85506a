"""The protocol's bounds on a handler, in a module of their own: protocol.py (the models) and
tailcallctl (which refuses an oversized file before it connects) both read them, and
tailcallctl must not import pydantic to know them (its start-up: issue 14)."""

from __future__ import annotations

MAX_SOURCE_CHARS = 1 << 20
MAX_OBJECT_CHARS = 2 * MAX_SOURCE_CHARS  # base64: 1.5 MiB of object
# The protocol's bounds on a source's local headers; the daemon's max_headers and
# max_headers_bytes are within them.
MAX_HEADERS = 256
MAX_HEADERS_BYTES = 8 << 20
MAX_PRIORITY = 999  # a chained slot's handlers have priorities 0..999, lowest first (chain.py)
MAX_LINKS = 16  # handlers per chained slot: each takes one of the kernel's 33 tail calls per syscall
