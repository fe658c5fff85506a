"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) from Python, through mmap.

The kernel maps a ring buffer as three parts: a consumer page the reader writes its position
to, a producer page with the writers' position, and the data pages, mapped twice in a row so
that a record that wraps around the end reads as one piece.  Each record starts with an
8-byte header: its length, with a busy bit while the writer fills it and a discard bit when
it gave it up.  That is all libbpf's ring_buffer__consume() does; doing it here avoids a
ctypes callback per record, which costs more than the record's whole handling.

The fd is pollable: it is readable when records are waiting, which is how the daemon's event
loop wakes up (no busy polling).  Positions are read and written as plain 64-bit words:
ordered enough on x86 (total store order); a weakly ordered CPU would need the acquire/release
pairs libbpf uses, which Python cannot express.
"""

from __future__ import annotations

import mmap
import struct

BPF_MAP_TYPE_RINGBUF = 27
_BUSY = 1 << 31
_DISCARD = 1 << 30
_RECORD_HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingReader:
    """The reading end of one ring buffer of ``size`` bytes (a power of two) behind ``fd``."""

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._page = page
        self._mask = size - 1
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._data = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise

    def pending(self) -> int:
        """Bytes written and not read yet."""
        return _U64.unpack_from(self._data, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` records, oldest first, each consumed (its space given back to the writers)."""
        consumer = _U64.unpack_from(self._consumer, 0)[0]
        producer = _U64.unpack_from(self._data, 0)[0]
        records: list[bytes] = []
        data, page, mask = self._data, self._page, self._mask
        while consumer < producer and len(records) < limit:
            at = page + (consumer & mask)
            header = _U32.unpack_from(data, at)[0]
            if header & _BUSY:
                break  # the writer is still filling it: later records wait behind it
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                records.append(data[at + _RECORD_HEADER:at + _RECORD_HEADER + length])
            consumer += (length + _RECORD_HEADER + 7) & ~7
        _U64.pack_into(self._consumer, 0, consumer)
        return records

    def close(self) -> None:
        self._data.close()
        self._consumer.close()
