"""`show SLOT`: one slot's record, the maps its program uses, and the handler's saved source.

The map ids are the kernel's, read through the program fd the daemon holds
(BPF_OBJ_GET_INFO_BY_FD: a program's info lists its map ids).  What each map is (name, type,
sizes) cannot be asked of the kernel by id, since opening a map by id needs CAP_SYS_ADMIN
and tailcalld never does it (README, "Privileges"; tests/test_static.py).  It comes instead
from the maps the daemon holds itself (the dispatcher's, the event channel's, which handlers
share), and from what the compile worker saw when it loaded the program (it held every map's
fd), kept in the slot's record so that a restart that adopts the program still knows them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import bpfsys
from .errors import SlotEmpty
from .registry import Handler
from .slots import SlotManager, SlotView
from .state import MapRecord, SlotRecord
from .syscalls import Hook

logger = logging.getLogger("tailcalld")


@dataclass(frozen=True)
class MapDetail:
    id: int
    name: str | None = None  # None (and the rest): the map is known by its id alone
    type: str | None = None
    key_size: int | None = None
    value_size: int | None = None
    max_entries: int | None = None


@dataclass(frozen=True)
class SlotDetails:
    view: SlotView
    maps: list[MapDetail]
    maps_note: str | None  # where the list comes from, when it is not the kernel's word now
    source: str | None  # the C source as saved (None: an object, or a program of unknown source)
    object_bytes: int | None = None  # the size of the saved object (.o), when the handler is one
    headers: dict[str, str] = field(default_factory=dict)  # its local headers, by the name it includes them
    priorities: list[int] = field(default_factory=list)  # those of the slot's handlers, when they have any


def slot_details(manager: SlotManager, slot_spec: int | str, hook: Hook, priority: int | None = None) -> SlotDetails:
    """Raises SlotEmpty when tailcalld keeps no handler in the slot (at ``priority``; None: the
    slot's handler without one, else its first in order)."""
    syscalls = manager.syscalls
    base = syscalls.key(syscalls.resolve(slot_spec), hook)
    priorities = sorted(manager.links_of(base))
    if priority is None and base not in manager.registry.wanted() and priorities:
        priority = priorities[0]
    key = syscalls.link_key(base, priority)
    view = next((v for v in manager.list_slots() if v.record.slot == base and v.record.priority == priority), None)
    if view is None:
        raise SlotEmpty(f"slot {syscalls.slot_label(key)} holds no handler", {"slot": syscalls.split(key)[0],
                                                                               "hook": hook, "priority": priority})
    maps, note = _maps(view.record, manager.registry.handlers.get(key))
    source, size, headers = _source(manager, view.record)
    return SlotDetails(view, maps, note, source, size, headers, priorities=priorities)


def _detail(record: MapRecord | bpfsys.MapInfo) -> MapDetail:
    return MapDetail(record.id, record.name, bpfsys.MAP_TYPE_NAMES.get(record.type, str(record.type)),
                     record.key_size, record.value_size, record.max_entries)


def _maps(record: SlotRecord, handler: Handler | None) -> tuple[list[MapDetail], str | None]:
    recorded: dict[int, MapRecord | bpfsys.MapInfo] = {m.id: m for m in record.maps}
    prog = handler.prog if handler is not None else None
    if prog is None or prog.closed:
        return ([_detail(m) for m in recorded.values()],
                "as recorded when the program was loaded: tailcalld holds no handle on it (adopted by id alone)")
    try:
        ids = bpfsys.prog_map_ids(prog.fd)
        known = {**recorded, **bpfsys.held_maps()}  # the daemon's own fds say what they are now
    except OSError as exc:
        logger.warning("the maps of program %d could not be read: %s", prog.id, exc)
        return [_detail(m) for m in recorded.values()], f"as recorded when the program was loaded (the kernel: {exc})"
    return [_detail(known[i]) if i in known else MapDetail(i) for i in ids], None


def _source(manager: SlotManager, record: SlotRecord) -> tuple[str | None, int | None, dict[str, str]]:
    if record.source_sha256 is None:
        return None, None, {}
    try:
        artifact = manager.registry.store.artifact(record.source_sha256, record.dialect, record.headers)
    except (OSError, ValueError) as exc:
        logger.warning("the saved source %s could not be read: %s", record.source_sha256[:16], exc)
        return None, None, {}
    if artifact.dialect == "object":
        return None, len(artifact.data), {}
    return artifact.data.decode(errors="replace"), None, dict(artifact.headers)
