"""What each protocol command does, in terms of the core (no framing, no socket)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from . import __version__
from .dispatcher import remove_pins
from .errors import SourceTooLarge
from .peers import Peer
from .protocol import (AttachRequest, DetachRequest, ListRequest, PingRequest, PingResult, Request,
                       StatusRequest, UnloadAllRequest, UnloadResult)
from .slots import SlotManager


@dataclass
class CommandContext:
    manager: SlotManager
    max_source_bytes: int
    request_stop: Callable[[], None]  # unload-all ends the daemon: there is nothing left to serve
    connections: Callable[[], int] = lambda: 0


async def execute(ctx: CommandContext, request: Request, peer: Peer) -> BaseModel:
    m = ctx.manager
    match request:
        case PingRequest():
            return PingResult(version=__version__, pid=os.getpid())
        case AttachRequest():
            size = len(request.source.encode())
            if size > ctx.max_source_bytes:
                raise SourceTooLarge(f"the source is {size} bytes; the limit is {ctx.max_source_bytes}",
                                     {"size": size, "limit": ctx.max_source_bytes})
            return await m.attach(request, peer)
        case DetachRequest():
            return await m.detach(request.slot, peer)
        case ListRequest():
            return m.list()
        case StatusRequest():
            return m.status().model_copy(update={"connections": ctx.connections()})
        case UnloadAllRequest():
            slots = await m.unload_all(peer)
            pins = remove_pins(m.dispatcher.pin_dir)
            ctx.request_stop()
            return UnloadResult(slots_emptied=slots, pins_removed=pins)
    raise AssertionError(f"unhandled request type {type(request).__name__}")
