"""The socket server and the commands, in-process, over a real Unix socket, on the fake kernel:
the wire layer's own behaviour (errors as values, live settings, unload-all's stop reason)
without compiling anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes import NR_SLOTS, FakeKernel, FlakyStore
from tailcalld.commands import CommandContext, StopReason
from tailcalld.config import LiveSettings, Settings
from tailcalld.misses import MissMonitor
from tailcalld.protocol import ListResult, StatusResult, response_adapter
from tailcalld.server import ControlServer, SocketPlace
from tailcalld.slots import SlotManager
from tailcalld.syscalls import SyscallTable

SOURCE = "int f(struct bpf_raw_tracepoint_args *ctx) { return 0; }"


@dataclass
class Served:
    kernel: FakeKernel
    live: LiveSettings
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    stops: list[StopReason] = field(default_factory=list)
    _ids: int = 0

    async def send(self, line: bytes) -> dict[str, Any]:
        self.writer.write(line)
        await self.writer.drain()
        reply = json.loads(await self.reader.readline())
        response_adapter.validate_python(reply)  # every reply is a valid response
        return reply

    async def call(self, command: str, **fields: object) -> dict[str, Any]:
        self._ids += 1
        return await self.send(json.dumps({"id": self._ids, "command": command, **fields}).encode() + b"\n")


def serve(tmp_path: Path, scenario: Callable[[Served], Awaitable[None]], **settings: Any) -> None:
    async def main() -> None:
        kernel = FakeKernel()
        syscalls = SyscallTable(NR_SLOTS, {"fchmodat": 268})
        manager = SlotManager(kernel, FlakyStore(tmp_path / "state"), syscalls,
                              MissMonitor(kernel.miss_totals, syscalls.label))
        await manager.restore()
        live = LiveSettings(Settings(socket=tmp_path / "s.sock", state_dir=tmp_path / "state", **settings))
        stops: list[StopReason] = []
        server = ControlServer(CommandContext(manager, live, stops.append, str(live.current.socket)))
        place = SocketPlace(live.current.socket)
        sock = place.bind(None)
        await server.start(sock)
        reader, writer = await asyncio.open_unix_connection(str(live.current.socket))
        try:
            await scenario(Served(kernel, live, reader, writer, stops))
        finally:
            writer.close()
            await server.close()
            sock.close()
            place.close()
            manager.close()
    asyncio.run(main())


def test_attach_list_status_detach_over_the_socket(tmp_path: Path) -> None:
    async def scenario(s: Served) -> None:
        attached = await s.call("attach", slot="fchmodat", source=SOURCE, filename="f.c")
        assert attached["ok"] and s.kernel.slots == {268: attached["result"]["prog_id"]}
        listed = ListResult.model_validate((await s.call("list"))["result"])
        assert [(i.slot, i.syscall, i.function, i.filename) for i in listed.slots] == [(268, "fchmodat", "handler", "f.c")]
        status = StatusResult.model_validate((await s.call("status"))["result"])
        assert (status.slots_used, status.connections, status.socket) == (1, 1, str(tmp_path / "s.sock"))
        assert (await s.call("detach", slot=268))["ok"] and s.kernel.slots == {}

    serve(tmp_path, scenario)


def test_errors_are_values_and_the_connection_goes_on(tmp_path: Path) -> None:
    async def scenario(s: Served) -> None:
        bad = await s.send(b'{"id": 7, "command": "attach", "slot": 268}\n')
        assert (bad["id"], bad["error"]["code"]) == (7, "bad_request")
        assert (await s.send(b"{nope\n"))["error"]["code"] == "bad_request"
        s.kernel.fail_set = True
        refused = await s.call("attach", slot=268, source=SOURCE)
        assert refused["error"]["code"] == "kernel_error" and s.kernel.slots == {}
        assert (await s.call("detach", slot=268))["error"]["code"] == "slot_empty"
        assert (await s.call("ping"))["ok"]

    serve(tmp_path, scenario)


def test_timing_where_it_cannot_be_had_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario(s: Served) -> None:
        reply = await s.call("timing", seconds=5)
        assert reply["error"]["code"] == "timing_unavailable"
        assert (await s.call("status"))["result"]["timing_seconds_left"] == 0

    serve(tmp_path, scenario)


def test_a_reload_reaches_the_commands_at_once(tmp_path: Path) -> None:
    async def scenario(s: Served) -> None:
        too_big = await s.call("attach", slot=268, source=SOURCE)
        assert too_big["error"]["code"] == "source_too_large"
        changed = s.live.reload(s.live.current.model_copy(update={"max_source_bytes": 4096}), tmp_path / "t.toml")
        assert changed == {"max_source_bytes"}
        assert (await s.call("attach", slot=268, source=SOURCE))["ok"]

    serve(tmp_path, scenario, max_source_bytes=16)


def test_unload_all_says_why_the_daemon_stops(tmp_path: Path) -> None:
    async def scenario(s: Served) -> None:
        await s.call("attach", slot=268, source=SOURCE)
        unloaded = await s.call("unload-all")
        assert unloaded["result"]["slots_emptied"] == [268] and len(unloaded["result"]["pins_removed"]) == 3
        assert s.stops == [StopReason.UNLOADED] and s.kernel.slots == {} and s.kernel.pins == []
        assert (await s.call("attach", slot=268, source=SOURCE))["error"]["code"] == "unloading"

    serve(tmp_path, scenario)
