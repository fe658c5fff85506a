"""tailcalld: the daemon's life, top to bottom.

start:  read config -> open or load the pinned dispatcher -> bind the socket -> READY=1
run:    serve the socket; every miss_log_interval, log new misses to the journal
stop:   SIGTERM/SIGINT -> stop accepting, finish running commands -> remove the socket

What stays pinned after a stop: the dispatcher link, the prog array with every handler
still in its slot, and the miss counters.  Tracing goes on; the next start adopts them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .compiler import Compiler
from .config import DEFAULT_CONFIG, Settings, load_settings
from .dispatcher import NR_SLOTS, Dispatcher
from .errors import ConfigError, TailcalldError
from .journal import log_misses, setup_logging
from .misses import MissMonitor
from .server import ControlServer, bind_unix_socket
from .slots import SlotManager
from .syscalls import SyscallTable

logger = logging.getLogger("tailcalld")

EX_CONFIG = 78  # sysexits.h; systemd shows it as status=78/CONFIG


def _notify(state: str) -> None:
    """sd_notify when started by systemd (NOTIFY_SOCKET set); a no-op otherwise."""
    try:
        from systemd import daemon  # noqa: PLC0415 - optional outside systemd hosts
    except ImportError:
        return
    daemon.notify(state)


def resolve_watch(settings: Settings, syscalls: SyscallTable) -> tuple[bool, set[int]]:
    if settings.watch_misses == "all":
        return True, set()
    try:
        return False, {syscalls.resolve(s) for s in settings.watch_misses}
    except TailcalldError as err:
        raise ConfigError(f"watch_misses: {err.message}") from None


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()

    async def run(self) -> None:
        s = self.settings
        syscalls = SyscallTable.for_this_machine(NR_SLOTS)
        watch_all, watch = resolve_watch(s, syscalls)
        s.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        compiler = Compiler(timeout=s.compile_timeout)
        dispatcher = await Dispatcher.open_or_load(s.pin_dir, compiler)
        try:
            misses = MissMonitor(dispatcher.miss_totals, syscalls.label, watch_all, watch)
            manager = SlotManager(dispatcher, compiler, syscalls, misses, str(s.socket), s.miss_log_interval)
            try:
                await self._serve(manager)
            finally:
                manager.close()
        finally:
            dispatcher.close()

    async def _serve(self, manager: SlotManager) -> None:
        s = self.settings
        sock = bind_unix_socket(s.socket)
        server = ControlServer(manager, s.max_request_bytes)
        try:
            await server.start(sock)
            d = manager.dispatcher
            logger.info("tailcalld %s ready: dispatcher program %d %s, %d slots in use, listening on %s",
                        __version__, d.prog_id, "adopted from pins" if d.adopted else "loaded and pinned",
                        len(manager.list().slots), s.socket)
            _notify("READY=1")
            reporter = asyncio.create_task(self._report_misses(manager))
            await self.stop.wait()
            _notify("STOPPING=1")
            logger.info("stopping; the dispatcher and handlers stay pinned under %s", s.pin_dir)
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await server.close()
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                s.socket.unlink()

    async def _report_misses(self, manager: SlotManager) -> None:
        while True:
            await asyncio.sleep(self.settings.miss_log_interval)
            try:
                log_misses(manager.misses.poll())
            except OSError:
                logger.exception("could not read the miss counters")


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _main_async(settings: Settings) -> None:
    daemon = Daemon(settings)
    _install_signal_handlers(asyncio.get_running_loop(), daemon.stop.set)
    await daemon.run()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tailcalld", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"TOML configuration file (default: {DEFAULT_CONFIG})")
    p.add_argument("--log-stderr", action="store_true", help="log to stderr even when journald is running")
    p.add_argument("--version", action="version", version=f"tailcalld {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"tailcalld: {err.message}", file=sys.stderr)
        return EX_CONFIG
    targets = setup_logging(settings.log_level, force_stderr=args.log_stderr)
    if loop_factory is None:
        import uvloop  # noqa: PLC0415 - production loop; tests may inject plain asyncio

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_main_async(settings))
    except ConfigError as err:
        return _startup_failure(err.message, EX_CONFIG, targets)
    except TailcalldError as err:
        return _startup_failure(f"cannot start: {err.message}", 1, targets)
    except OSError as err:
        return _startup_failure(f"cannot start: {err}", 1, targets)
    return 0


def _startup_failure(message: str, status: int, log_targets: list[str]) -> int:
    """Whoever started us reads stderr (a terminal, systemctl status, a test): say it there too."""
    logger.error("%s", message)
    if "stderr" not in log_targets:
        print(f"tailcalld: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
