"""The dispatcher object's maps against the pinned maps it is loaded on (no kernel needed)."""

from __future__ import annotations

import pytest

from tailcalld.dispatcher import ALL_MAPS, COMPAT_SLOTS, COUNTS, PROG_ARRAY, check_declared_maps, dispatcher_cflags
from tailcalld.errors import ObjectError

FDS = {spec.pin: 100 + i for i, spec in enumerate(ALL_MAPS)}
Declared = tuple[str, tuple[int, int, int, int]]


def declared(*extra: Declared) -> list[Declared]:
    return [(spec.pin, spec.shape) for spec in ALL_MAPS] + list(extra)


def test_the_specs_as_declared_are_accepted() -> None:
    check_declared_maps(declared(), FDS)
    check_declared_maps([(s.pin, s.shape) for s in (PROG_ARRAY, COUNTS)], {PROG_ARRAY.pin: 3, COUNTS.pin: 4})


@pytest.mark.parametrize("changed", [
    [(COUNTS.pin, (COUNTS.type, 4, 24, COUNTS.entries))],  # a third counter on one side only
    [(COMPAT_SLOTS.pin, (COMPAT_SLOTS.type, 4, 4, COMPAT_SLOTS.entries - 1))],
])
def test_a_map_declared_otherwise_is_refused(changed: list[Declared]) -> None:
    names = {name for name, _ in changed}
    with pytest.raises(ObjectError, match="declares its maps"):
        check_declared_maps([d for d in declared() if d[0] not in names] + changed, FDS)


def test_a_map_of_its_own_is_refused() -> None:
    """It would be created unpinned, and gone with the next upgrade."""
    with pytest.raises(ObjectError):
        check_declared_maps(declared(("scratch", (2, 4, 8, 1))), FDS)


def test_the_compat_flags_only_with_a_compat_table() -> None:
    assert not any("COMPAT" in f for f in dispatcher_cflags(False))
    assert any(f.startswith("-DTAILCALLD_COMPAT_NR=") for f in dispatcher_cflags(True))
