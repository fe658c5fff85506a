"""What each protocol command does, in terms of the core (no framing, no socket)."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from . import __version__
from .dispatcher import remove_pins
from .dialects import Artifact, detect
from .errors import BadRequest, SourceTooLarge
from .peers import Peer
from .protocol import (AttachRequest, CheckRequest, DetachRequest, ListRequest, PingRequest, PingResult, Request,
                       StatusRequest, UnloadAllRequest, UnloadResult)
from .slots import SlotManager


@dataclass
class CommandContext:
    manager: SlotManager
    max_source_bytes: int
    request_stop: Callable[[], None]  # unload-all ends the daemon: there is nothing left to serve
    connections: Callable[[], int] = lambda: 0


def artifact_of(spec: AttachRequest | CheckRequest, max_bytes: int) -> Artifact:
    """The wire's source/object/dialect fields, as the core's Artifact."""
    if spec.object is not None:
        try:
            artifact = Artifact("object", base64.b64decode(spec.object, validate=True))
        except binascii.Error as exc:
            raise BadRequest(f"object is not valid base64: {exc}") from None
    else:
        assert spec.source is not None
        dialect = detect(spec.source) if spec.dialect == "auto" else spec.dialect
        artifact = Artifact(dialect, spec.source.encode())
    if len(artifact.data) > max_bytes:
        raise SourceTooLarge(f"the {'object' if spec.object else 'source'} is {len(artifact.data)} bytes; "
                             f"the limit is {max_bytes}", {"size": len(artifact.data), "limit": max_bytes})
    return artifact


async def execute(ctx: CommandContext, request: Request, peer: Peer) -> BaseModel | bytes:
    """The command's result: a result model, or (for list, the hot one) its JSON."""
    m = ctx.manager
    match request:
        case PingRequest():
            return PingResult(version=__version__, pid=os.getpid())
        case AttachRequest():
            artifact = artifact_of(request, ctx.max_source_bytes)
            return await m.attach(request.slot, artifact, request.function, request.filename, peer, request.fresh)
        case CheckRequest():
            return await m.check(artifact_of(request, ctx.max_source_bytes), request.function)
        case DetachRequest():
            return await m.detach(request.slot, peer)
        case ListRequest():
            return m.list_json()
        case StatusRequest():
            return m.status().model_copy(update={"connections": ctx.connections()})
        case UnloadAllRequest():
            slots = await m.unload_all(peer)
            pins = remove_pins(m.dispatcher.pin_dir)
            ctx.request_stop()
            return UnloadResult(slots_emptied=slots, pins_removed=pins)
    raise AssertionError(f"unhandled request type {type(request).__name__}")
