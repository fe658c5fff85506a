"""What each protocol command does, in terms of the core (no framing, no socket)."""

from __future__ import annotations

import os

from pydantic import BaseModel

from . import __version__
from .protocol import (AttachRequest, DetachRequest, ListRequest, PingRequest, PingResult, Request,
                       StatusRequest)
from .slots import SlotManager


async def execute(manager: SlotManager, request: Request) -> BaseModel:
    match request:
        case PingRequest():
            return PingResult(version=__version__, pid=os.getpid())
        case AttachRequest():
            return await manager.attach(request)
        case DetachRequest():
            return await manager.detach(request.slot)
        case ListRequest():
            return manager.list()
        case StatusRequest():
            return manager.status()
    raise AssertionError(f"unhandled request type {type(request).__name__}")
