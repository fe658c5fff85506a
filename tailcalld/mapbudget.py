"""How much memory a handler's maps take, held against ``max_map_bytes``.

The kernel allocates most maps up front (arrays, preallocated hashes), so a handler that
declares a 4 GiB array takes 4 GiB of kernel memory the moment it is loaded.  The estimate is
entries x (key + value), with one value per possible CPU for per-CPU maps and max_entries as
the size in bytes for ring buffers: close enough to refuse the handlers that would hurt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import MapTooLarge

PERCPU_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
SIZE_IN_BYTES_TYPES = frozenset({27, 31})  # RINGBUF, USER_RINGBUF: max_entries is the buffer size


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


def map_bytes(spec: MapSpec, possible_cpus: int) -> int:
    if spec.type in SIZE_IN_BYTES_TYPES:
        return spec.max_entries
    value = spec.value_size * (possible_cpus if spec.type in PERCPU_TYPES else 1)
    return spec.max_entries * (spec.key_size + value)


def check(specs: Iterable[MapSpec], budget: int, possible_cpus: int) -> None:
    """Raise MapTooLarge when the maps together would take more than ``budget`` bytes."""
    sizes = {spec.name: map_bytes(spec, possible_cpus) for spec in specs}
    total = sum(sizes.values())
    if total > budget:
        largest = max(sizes, key=lambda name: sizes[name])
        raise MapTooLarge(f"the handler's maps would take {_human(total)}, more than max_map_bytes "
                          f"({_human(budget)}); the largest is {largest!r} ({_human(sizes[largest])})",
                          {"maps": sizes, "max_map_bytes": budget})


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
