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
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__, events, metrics, metrics_http, notify, timing
from .commands import CommandContext, StopReason, run_apply
from .compiler import Compiler
from .config import DEFAULT_CONFIG, LiveSettings, Settings, bounds, load_settings
from .desired_slots import DesiredSlots
from .dispatcher import CALL, NR_SLOTS, remove_pins
from .pins import PinDirLock
from .errors import ConfigError, TailcalldError, UnsafePath
from .journal import log_misses, set_log_level, setup_logging, stderr_is_journal
from .kernel import BpfKernel
from .misses import MissMonitor, MissReport
from .paths import open_trusted_dir
from .peers import Peer
from .reconcile import Restore
from .server import ROOT_RESERVE, ControlServer, SocketPlace
from .slots import SlotManager
from .state import StateFile, StateStore
from .syscalls import SyscallTable
from .timing import OnDemandTiming

logger = logging.getLogger("tailcalld")

EX_CONFIG = 78  # sysexits.h; systemd shows it as status=78/CONFIG
# Open files the daemon may need at once: a program fd per slot, twice over (a replacement
# holds the old and the new program; a compile brings its own), every connection max_connections
# can allow, and room for the rest (sockets, compile workers' pipes, libraries).  The usual
# soft limit of 1024 ran out at ~1000 filled slots (issue #10); contrib/tailcalld.service's
# LimitNOFILE= matches this.
NOFILE_NEEDED = 2 * NR_SLOTS + int(bounds("max_connections")[1]) + ROOT_RESERVE + 256


def resolve_watch(settings: Settings, syscalls: SyscallTable) -> tuple[bool, set[int]]:
    if settings.watch_misses == "all":
        return True, set()
    try:
        return False, {syscalls.resolve_key(s) for s in settings.watch_misses}
    except TailcalldError as err:
        raise ConfigError(f"watch_misses: {err.message}") from None


class Daemon:
    def __init__(self, settings: Settings, config_path: Path) -> None:
        self.live = LiveSettings(settings)
        self.live.on_reload(self._react_to_reload)
        self.config_path = config_path
        self.syscalls = SyscallTable.for_this_machine(NR_SLOTS)
        self.stop_reason = StopReason.SIGNAL
        self._stopping = asyncio.Event()
        self._manager: SlotManager | None = None
        self._place: SocketPlace | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._event_notices_task: asyncio.Task[None] | None = None
        self._expiries: asyncio.Task[None] | None = None
        self._compat_misses: MissMonitor | None = None
        self._misses_per_min = 0.0
        self._timing: OnDemandTiming | None = None
        self._events: events.EventHub | None = None
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self.metrics = metrics.Metrics()
        self._metrics_endpoints: metrics_http.Endpoints | None = None
        self._desired: DesiredSlots | None = None

    def request_stop(self, reason: StopReason = StopReason.SIGNAL) -> None:
        self.stop_reason = reason
        self._stopping.set()

    async def run(self) -> None:
        s = self.live.current
        watch_all, watch = resolve_watch(s, self.syscalls)
        passed = notify.passed_socket()
        with contextlib.ExitStack() as held:  # closed in reverse: kernel handles, then the locks
            if passed is not None:
                held.callback(passed.close)
            # Every folder checked and every lock taken (socket, state_dir, pin_dir) before
            # anything is loaded or written: a start that cannot own all three leaves the kernel
            # and the disk as it found them.
            place = SocketPlace(Path(passed.getsockname()) if passed is not None else s.socket)
            held.callback(place.close)
            if passed is None:
                place.ensure_free()
            self._metrics_endpoints = metrics_http.Endpoints(s, place.path)
            held.callback(self._metrics_endpoints.release)
            store = StateStore(s.state_dir)
            held.callback(store.close)
            store.lock()
            pin_lock = PinDirLock(s.pin_dir)
            held.callback(pin_lock.release)
            # Compile folders live with the socket, on the runtime tmpfs, not in state_dir: a compile
            # leaves the state_dir file system unable to go read-only for a while (Landlock keeps
            # the removed folder referenced), and a full state_dir must not stop compiles.
            compiler = Compiler(self.live, cache_dir=s.state_dir / "cache", work_root=place.path.parent / "compile",
                                observe=self.metrics.recorder.compiled)
            held.callback(compiler.close)  # its workers started ahead, a precompile under way
            compat = self.syscalls.compat_table()
            kernel = await BpfKernel.open(s.pin_dir, compiler, compat, pin_lock)
            held.callback(kernel.close)
            timing_target = kernel.timing_target()
            timing.switch_off(timing_target)  # left on by a daemon killed while someone timed handlers
            self._timing = OnDemandTiming(lambda cflags: compiler.build_own_object(timing.SOURCE, cflags), timing_target)
            held.callback(self._timing.stop)  # before the kernel's handles close (ExitStack: reverse order)
            compiler.remove_leftovers()  # the pins are ours now, so are the compile folders
            misses = MissMonitor(kernel.miss_totals, self.syscalls.label, watch_all, watch,
                                 split=self.syscalls.split)
            if compat is not None:
                # ia32-only syscalls can never hold a handler: all of them are logged, the
                # volume stays one entry per syscall per interval.
                self._compat_misses = MissMonitor(kernel.compat_miss_totals, self.syscalls.ia32_label,
                                                  watch_all=True, abi="ia32")
            channel = events.ChannelMaps.open(s.pin_dir, s.events_buffer_bytes, 2 * NR_SLOTS)
            held.callback(channel.close)
            compiler.channel = {"events": str(s.pin_dir / events.EVENTS_PIN), "counts": str(s.pin_dir / events.COUNTS_PIN),
                                "call": str(s.pin_dir / CALL.pin)}
            decoder = events.Decoder(lambda tag: manager.registry.btf_of(tag))

            def changed() -> None:
                decoder.forget()  # a tag's handler may have come or gone
                self._publish_status()

            manager = SlotManager(kernel, store, self.syscalls, misses, on_change=changed)
            self._manager = manager
            held.callback(manager.close)
            self._events = events.EventHub(
                channel, decoder, self._event_label, manager.registry.journaled,
                lambda: self.live.current.events_journal_rate, lambda: self.live.current.events_backlog,
                lambda: self.live.current.events_client_bytes)
            held.callback(self._events.stop)
            # What needs no compile, before the socket is served; the slots to rebuild (after a
            # reboot) are rebuilt behind it, and list shows them as restoring meanwhile.
            restore = await manager.begin_restore()
            await self._watch_exit_misses(watch)
            await self._serve(manager, place, passed, restore)

    async def _serve(self, manager: SlotManager, place: SocketPlace, passed: socket.socket | None,
                     restore: Restore) -> None:
        s = self.live.current
        if passed is None:
            sock = place.bind(s.allowed_gid)
        else:
            sock = passed
            place.set_access(s.allowed_gid)
        self._place = place
        ctx = CommandContext(manager, self.live, self.request_stop, str(place.path), timing=self._timing,
                             events=self._events, recorder=self.metrics.recorder)
        server = ControlServer(ctx)
        self.metrics.watch(ctx)
        itself = Peer.this_process()  # who the journal says made desired_slots' changes
        self._desired = DesiredSlots(self.live, lambda request: run_apply(ctx, request, itself))
        watchdog = _start_watchdog()
        startup: asyncio.Task[None] | None = None
        try:
            await server.start(sock)
            if self._metrics_endpoints is not None:
                await self._metrics_endpoints.start(self.metrics.render, lambda: self.live.current.allowed_gid)
            startup = asyncio.create_task(self._finish_start(manager, place, passed, restore))
            startup.add_done_callback(self._start_ended)
            await self._stopping.wait()
            # A stop during the restore cancels it: the slots not rebuilt yet stay recorded.
            failed = await _cancel_start(startup)
            await _cancel(self._event_notices_task)
            await _cancel(self._expiries)
            notify.notify("STOPPING=1")
            if self.stop_reason is StopReason.UNLOADED:
                logger.info("stopping after unload-all; nothing of tailcalld is left in the kernel")
            else:
                logger.info("stopping; the dispatcher and handlers stay pinned under %s", s.pin_dir)
            await _cancel(self._maintenance)
            if self._metrics_endpoints is not None:
                await self._metrics_endpoints.stop()
            await server.close()
            if failed is not None:
                raise failed
        finally:
            await _cancel(watchdog)
            if passed is None:  # systemd owns an activated socket and its file; they outlive us
                sock.close()
                with contextlib.suppress(OSError):
                    place.remove()

    async def _finish_start(self, manager: SlotManager, place: SocketPlace, passed: socket.socket | None,
                            restore: Restore) -> None:
        """Behind the served socket: the rebuilds of the restore, desired_slots, then READY=1."""
        await manager.finish_restore(restore)
        logger.info("%s", restore.summary, extra=restore.fields)
        assert self._events is not None and self._desired is not None
        # After the restore: what waits in the ring is decoded by the BTF of the handlers it put back.
        self._events.start(asyncio.get_running_loop())
        await self._desired.reconcile("start")  # served meanwhile; ready once the slots match it
        d = manager.kernel.info
        state = (f"upgraded from program {d.upgraded_from}" if d.upgraded_from
                 else "adopted from pins" if d.adopted else "loaded and pinned")
        metrics_at = self._metrics_endpoints.where if self._metrics_endpoints is not None else []
        logger.info("tailcalld %s ready: dispatcher program %d %s, %d slots in use, listening on %s%s%s",
                    __version__, d.prog_id, state, manager.slots_in_use, place.path,
                    " (socket activation)" if passed is not None else "",
                    f"; metrics on {', '.join(metrics_at)}" if metrics_at else "")
        notify.notify("READY=1", self._status_line())
        self._maintenance = asyncio.create_task(self._maintain(manager))
        self._event_notices_task = asyncio.create_task(self._event_notices())
        # Attaches --for/--until: a deadline passed while the daemon was stopped ends at once.
        self._expiries = asyncio.create_task(manager.expire_due(Peer.this_process()))

    def _start_ended(self, task: asyncio.Task[None]) -> None:
        """A start that failed half-way behind the socket stops the daemon (``_serve`` raises it)."""
        if not task.cancelled() and task.exception() is not None:
            self._stopping.set()

    async def _maintain(self, manager: SlotManager) -> None:
        """Every miss_log_interval: the new misses to the journal, pins and drift repaired, STATUS= refreshed."""
        while True:
            await asyncio.sleep(self.live.current.miss_log_interval)
            reports = await self._log_misses(manager)
            try:
                manager.restore_pins()
            except TailcalldError as err:
                logger.error("could not restore the dispatcher's pins: %s", err.message)
            if not manager.unloading:  # unload-all removes every pin: none is put back meanwhile
                self._restore_event_pins()
            try:
                await manager.repair_drift()
            except (OSError, TailcalldError):
                logger.exception("could not check the slots against the kernel")
            if self._desired is not None:
                try:
                    await self._desired.check()
                except (OSError, TailcalldError):
                    logger.exception("could not reconcile the slots to desired_slots")
            seconds = reports[0].seconds if reports else 0.0
            self._misses_per_min = sum(r.misses for r in reports) * 60 / seconds if seconds > 0 else 0.0
            self._publish_status()

    def _restore_event_pins(self) -> None:
        if self._events is None:
            return
        try:
            made = self._events.maps.restore_pins(self.live.current.pin_dir)
        except TailcalldError as err:
            logger.error("could not pin the event channel again: %s", err.message)
            return
        if made:
            logger.warning("pins removed while tailcalld runs were pinned again: %s", ", ".join(made))

    async def _event_notices(self) -> None:
        """Every second: kernel losses told to the event subscribers, journal suppressions logged."""
        while self._events is not None:
            await asyncio.sleep(1.0)
            try:
                self._events.tell_losses()
            except OSError as exc:
                logger.error("could not read the event counters: %s", exc)
            self._events.log_suppressed()

    def _event_label(self, key: int) -> tuple[int, str, str]:
        nr, hook = self.syscalls.split(key)
        return nr, self.syscalls.label(key), hook

    async def _log_misses(self, manager: SlotManager) -> list[MissReport]:
        """The slots' misses (returned, for STATUS=) and the ia32-only calls, to the journal."""
        reports = await _poll(manager.misses)
        log_misses(reports)
        if self._compat_misses is not None:
            log_misses(await _poll(self._compat_misses))
        return reports

    async def _watch_exit_misses(self, watch: set[int]) -> None:
        """Misses of an exit slot are counted only while the exit dispatcher is attached: a
        watched exit slot keeps it attached (and its cost on every syscall's exit)."""
        if self._manager is None:
            return
        try:
            await self._manager.kernel.watch_exit(any(self.syscalls.split(key)[1] == "exit" for key in watch))
        except (OSError, TailcalldError) as err:
            logger.error("watch_misses: could not attach the exit dispatcher for the watched exit slots: %s", err)

    def _status_line(self) -> str:
        used = self._manager.slots_in_use if self._manager else 0
        restoring = self._manager.restoring if self._manager else 0
        return (f"STATUS={used} slot{'s' if used != 1 else ''} in use"
                + (f", {restoring} being restored" if restoring else "") + f", {self._misses_per_min:.0f} misses/min")

    def _publish_status(self) -> None:
        notify.notify(self._status_line())

    async def reload(self) -> None:
        """SIGHUP: apply what can change live; a bad new config changes nothing."""
        notify.reloading()
        try:
            new = load_settings(self.config_path)
            resolve_watch(new, self.syscalls)
            self._check_paths()
        except (ConfigError, UnsafePath) as err:
            logger.error("reload refused, the running configuration stays in force: %s", err.message)
        else:
            live = self.live.reload(new, self.config_path)
            logger.info("reloaded %s: %s", self.config_path,
                        ", ".join(f"{k}={getattr(self.live.current, k)!r}" for k in sorted(live))
                        if live else "no live change")
            if self._desired is not None:
                await self._desired.reconcile("reload")
        notify.notify("READY=1", self._status_line())

    def _check_paths(self) -> None:
        """The folders in use are still root's alone (someone may have chowned or chmodded one
        since the start).  Raises UnsafePath, and the reload changes nothing."""
        s = self.live.current
        socket_dir = self._place.path.parent if self._place is not None else s.socket.parent
        for path, role in ((s.state_dir, "state_dir"), (socket_dir, "socket"), (s.pin_dir, "pin_dir")):
            open_trusted_dir(path, role).close()

    def _react_to_reload(self, old: Settings, new: Settings, changed: frozenset[str]) -> None:
        """The live changes that need more than a new value read at the next use."""
        if "log_level" in changed:
            set_log_level(new.log_level)
        if "allowed_group" in changed and self._place is not None:
            try:
                self._place.set_access(new.allowed_gid)
            except (OSError, TailcalldError) as exc:
                logger.error("reload: could not give %s to group %s: %s", self._place.path, new.allowed_group, exc)
            if self._metrics_endpoints is not None:
                try:
                    self._metrics_endpoints.set_access(new.allowed_gid)
                except (OSError, TailcalldError) as exc:
                    logger.error("reload: could not give the metrics socket to group %s: %s", new.allowed_group, exc)
        if self._manager is not None:
            if "watch_misses" in changed:
                watch_all, watch = resolve_watch(new, self.syscalls)
                self._manager.misses.configure(watch_all, watch)
                self._reload_tasks.add(task := asyncio.get_running_loop().create_task(self._watch_exit_misses(watch)))
                task.add_done_callback(self._reload_tasks.discard)
            if "miss_log_interval" in changed and self._maintenance is not None:
                self._maintenance.cancel()  # the next summary comes one new interval from now
                self._maintenance = asyncio.create_task(self._maintain(self._manager))


async def _poll(monitor: MissMonitor) -> list[MissReport]:
    try:
        totals = await asyncio.to_thread(monitor.read)  # one batch read of a map: off the loop
    except OSError:
        logger.exception("could not read the miss counters")
        return []
    return monitor.poll(totals)


def _start_watchdog() -> asyncio.Task[None] | None:
    interval = notify.watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        # Pinged from the event loop itself: if the loop is stuck, the pings stop.
        while True:
            notify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.create_task(ping())


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _cancel_start(task: asyncio.Task[None]) -> BaseException | None:
    """Cancel the start's rest if it still runs; the exception it failed with, if it did."""
    if not task.done():
        await _cancel(task)
        return None
    return None if task.cancelled() else task.exception()


async def _main_async(settings: Settings, config_path: Path) -> None:
    daemon = Daemon(settings, config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await daemon.run()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tailcalld", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"TOML configuration file (default: {DEFAULT_CONFIG})")
    p.add_argument("--log-stderr", action="store_true", help="log to stderr even when journald is running")
    p.add_argument("--purge", action="store_true",
                   help="remove the pinned dispatcher, every handler and the saved state, then exit "
                        "(refused while a daemon runs: use `tailcallctl unload-all` then)")
    p.add_argument("--version", action="version", version=f"tailcalld {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"tailcalld: {err.message}", file=sys.stderr)
        return EX_CONFIG
    targets = setup_logging(settings.log_level, force_stderr=args.log_stderr, instance=settings.instance_name)
    raise_fd_limit(NOFILE_NEEDED)
    if args.purge:
        try:
            return purge(settings)
        except TailcalldError as err:
            return _startup_failure(f"cannot purge: {err.message}", 1, targets)
    if loop_factory is None:
        import uvloop  # noqa: PLC0415 - production loop; tests may inject plain asyncio

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_main_async(settings, args.config))
    except ConfigError as err:
        return _startup_failure(err.message, EX_CONFIG, targets)
    except TailcalldError as err:
        log = err.details.get("log") if isinstance(err.details, dict) else None
        return _startup_failure(f"cannot start: {err.message}" + (f"\n{log.rstrip()}" if log else ""), 1, targets)
    except OSError as err:
        return _startup_failure(f"cannot start: {err}", 1, targets)
    return 0


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (never lower it), as far as the hard limit
    allows, and return the soft limit in force; a hard limit too low for a full slot table is
    logged, since the start can still serve a smaller one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("the open-file limit is %d (hard limit); filling every slot needs %d: "
                       "raise LimitNOFILE= or ulimit -Hn", soft, needed)
    return soft


def purge(settings: Settings) -> int:
    """Offline teardown: everything ``unload-all`` does, for when no daemon runs.  It takes the
    locks of state_dir and pin_dir first, so a daemon that uses either refuses it (AlreadyRunning)
    before anything is removed, even one started with another config that shares a folder."""
    with contextlib.ExitStack() as held:
        store = None
        if settings.state_dir.exists() or settings.state_dir.is_symlink():
            store = StateStore(settings.state_dir)
            held.callback(store.close)
            store.lock()
        if settings.pin_dir.exists() or settings.pin_dir.is_symlink():
            lock = PinDirLock(settings.pin_dir, create=False)
            held.callback(lock.release)
            removed = remove_pins(settings.pin_dir)
        else:
            removed = []
        if store is not None and (settings.state_dir / "state.json").exists():
            store.save(StateFile())
    logger.info("purged: removed %s; the saved state is empty", ", ".join(removed) or "no pins",
                extra={"TAILCALLD_ACTION": "purge"})
    return 0


def _startup_failure(message: str, status: int, log_targets: list[str]) -> int:
    """Whoever started us reads stderr (a terminal, systemctl status, a test): say it there too."""
    logger.error("%s", message)
    if "stderr" not in log_targets and not stderr_is_journal():
        print(f"tailcalld: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
