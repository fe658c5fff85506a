"""What tailcalld tells Prometheus: every metric, its type and its labels, in one place.

Two kinds of numbers:

- Those the daemon keeps anyway (the dispatcher's per-slot counters, the event counts, the
  handler timing, the slot table) are read when a scrape asks, by ``DaemonCollector``, from
  the same views ``list`` and ``status`` use: no second copy to keep in step.
- Those that exist only as events (an attach and how it ended, how long a compile took) are
  counted as they happen by the ``Recorder``, which the daemon owns and hands to the parts that
  see them (commands.py, the compiler).

Each daemon has a registry of its own (never prometheus_client's global one), so that two
daemons in one process (tests) and a daemon's restart never share counts.
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .errors import TailcalldError

if TYPE_CHECKING:  # commands.py imports this module: the context is only a type here
    from .commands import CommandContext
    from .slots import SlotView

SLOT_LABELS = ("slot", "syscall", "hook")
TIMED_LABELS = ("slot", "syscall")  # handler timing covers enter slots only
# priority: the handler's in a slot that runs several (attach --priority); empty for a slot's only one.
INFO_LABELS = ("slot", "syscall", "hook", "priority", "function", "dialect", "prog_id", "sha256")
# A bcc compile of a small handler takes ~0.5 s here, a libbpf one ~1 s, a prebuilt object's
# load a few ms; compile_timeout is 60 s by default and at most 3600.
COMPILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
GZIP_LEVEL = 1  # a scrape is rendered on the event loop: the fastest level takes most of the gain


class Recorder(Collector):
    """The counts that exist only as events: attaches by result, compile times by dialect.
    Kept here as plain numbers and rendered as metric families, like the live ones (no
    prometheus_client Counter: those add a ``_created`` series each, which only a global
    switch turns off)."""

    def __init__(self) -> None:
        self.attaches: dict[str, int] = {"ok": 0}  # present from the start: rate() needs a first sample
        self._compiles: dict[str, tuple[list[int], float]] = {}  # dialect -> (count per bucket, sum of seconds)

    def attach_result(self, result: str) -> None:
        self.attaches[result] = self.attaches.get(result, 0) + 1

    @contextlib.contextmanager
    def attaching(self) -> Iterator[None]:
        """Count the attach done inside: ok, its error's wire code, or internal (a bug)."""
        try:
            yield
        except TailcalldError as err:
            self.attach_result(err.code)
            raise
        except Exception:
            self.attach_result(TailcalldError.code)
            raise
        self.attach_result("ok")

    def compiled(self, dialect: str, seconds: float) -> None:
        counts, total = self._compiles.get(dialect) or ([0] * (len(COMPILE_BUCKETS) + 1), 0.0)
        counts[bisect.bisect_left(COMPILE_BUCKETS, seconds)] += 1  # le: a value on a bound is in its bucket
        self._compiles[dialect] = (counts, total + seconds)

    def collect(self) -> Iterable[Metric]:
        attaches = CounterMetricFamily("tailcalld_attaches", "Attach requests, by result: ok, or the error code the "
                                       "reply carried (compile_error, verifier_rejected, ...)", labels=["result"])
        for result, count in sorted(self.attaches.items()):
            attaches.add_metric([result], count)
        compiles = HistogramMetricFamily("tailcalld_compile_duration_seconds", "Time of each handler compile and load "
                                         "(attach, check, rebuild at start), failed or not, by dialect (bcc, libbpf, "
                                         "object)", labels=["dialect"])
        for dialect, (counts, total) in sorted(self._compiles.items()):
            cumulative = list(itertools.accumulate(counts))
            bounds = [*(f"{b:g}" for b in COMPILE_BUCKETS), "+Inf"]
            compiles.add_metric([dialect], list(zip(bounds, cumulative, strict=True)), total)
        return [attaches, compiles]


class DaemonCollector(Collector):
    """The live numbers, read at each scrape from the daemon's own views (``CommandContext``:
    the slot manager, the event hub, the timing, the connection count)."""

    def __init__(self, ctx: CommandContext) -> None:
        self._ctx = ctx

    def collect(self) -> Iterable[Metric]:
        views = self._ctx.manager.list_slots()  # one read of the slot table for the whole scrape
        yield from self._slots(views)
        yield from self._timing(views)
        yield from self._events(views)
        yield from self._daemon()

    def _labels(self, key: int) -> list[str]:
        syscalls = self._ctx.manager.syscalls
        nr, hook = syscalls.split(key)
        return [str(nr), syscalls.label(key), hook]

    def _slots(self, views: list[SlotView]) -> Iterable[Metric]:
        m = self._ctx.manager
        hits = CounterMetricFamily("tailcalld_slot_hits", "Times the slot's handler ran since the daemon started",
                                   labels=SLOT_LABELS)
        misses = CounterMetricFamily("tailcalld_slot_misses", "Calls that fell through the slot (empty) since the "
                                     "daemon started; slots that hold or held a handler, and watched ones",
                                     labels=SLOT_LABELS)
        for key, hit, missed in m.counted_slots():
            labels = self._labels(key)
            hits.add_metric(labels, hit)
            misses.add_metric(labels, missed)
        info = GaugeMetricFamily("tailcalld_slot_info", "The handler a slot should run (1): its priority (when the "
                                 "slot runs several), function, dialect (empty: source unknown), program id and "
                                 "source SHA-256", labels=INFO_LABELS)
        for view in views:
            r = view.record
            priority = "" if r.priority is None else str(r.priority)
            info.add_metric([str(view.nr), view.syscall, view.hook, priority, r.function or "",
                             (r.dialect or "") if r.source_sha256 else "", str(r.prog_id), r.source_sha256 or ""], 1)
        ending = GaugeMetricFamily("tailcalld_slot_expiry_timestamp_seconds", "When an attach --for/--until ends "
                                   "and the slot goes back to what it held before (Unix time); only such slots "
                                   "(priority: of the handler, in a slot that runs several)",
                                   labels=[*SLOT_LABELS, "priority"])
        restoring = GaugeMetricFamily("tailcalld_slots_restoring", "Recorded slots the start is still rebuilding",
                                      value=m.restoring)
        scope = CounterMetricFamily("tailcalld_slot_scope_misses", "Calls of tasks outside the cgroup a slot's handler "
                                    "is scoped to (attach --cgroup) since the daemon started; only such slots",
                                    labels=[*SLOT_LABELS, "cgroup"])
        for view in views:
            if view.record.expires_at is not None:
                ending.add_metric([str(view.nr), view.syscall, view.hook,
                                   "" if view.record.priority is None else str(view.record.priority)],
                                  view.record.expires_at.timestamp())
            if view.record.cgroup is not None:
                scope.add_metric([str(view.nr), view.syscall, view.hook, view.record.cgroup], view.scope_misses)
        status = m.status()
        total = CounterMetricFamily("tailcalld_misses", "Tail-call misses of every slot, filled or not, since the "
                                    "daemon started", value=status.misses_total)
        used = GaugeMetricFamily("tailcalld_slots_used", "Handlers in slots (a slot that runs several in order counts "
                                 "each)", value=status.slots_used)
        chained = GaugeMetricFamily("tailcalld_slots_chained", "Slots that run several handlers in order of priority "
                                    "(attach --priority)", value=status.chained)
        corrections = CounterMetricFamily("tailcalld_reconcile_corrections", "Corrections made to bring the kernel's "
                                          "slots and the saved state together (see status)",
                                          value=m.registry.corrections_total)
        atomic = CounterMetricFamily("tailcalld_atomic_applies", "apply --atomic changes made since the daemon started "
                                     "(every slot of each switched at one instant)", value=status.atomic_applies)
        return [hits, misses, info, ending, scope, restoring, total, used, chained, corrections, atomic]

    def _timing(self, views: list[SlotView]) -> Iterable[Metric]:
        timing = self._ctx.timing
        on = timing is not None and timing.on
        yield GaugeMetricFamily("tailcalld_handler_timing_enabled", "1 while handler timing is on (tailcallctl "
                                "timing, top); the handler time series exist only then", value=int(on))
        times = timing.read() if timing is not None and on else None
        if times is None:
            return
        seconds = CounterMetricFamily("tailcalld_slot_handler_seconds", "Time spent in the slot's handler since "
                                      "timing was last switched on", labels=TIMED_LABELS)
        runs = CounterMetricFamily("tailcalld_slot_handler_timed_runs", "Handler runs timed since timing was last "
                                   "switched on", labels=TIMED_LABELS)
        timed = set()
        for view in views:
            key = view.record.slot  # a chained slot's handlers are timed together, as the slot
            if view.hook == "enter" and key < len(times.hits) and key not in timed:
                timed.add(key)
                labels = [str(view.nr), view.syscall]
                seconds.add_metric(labels, times.hit_ns[key] / 1e9)
                runs.add_metric(labels, times.hits[key])
        yield seconds
        yield runs

    def _events(self, views: list[SlotView]) -> Iterable[Metric]:
        hub = self._ctx.events
        if hub is None:
            return
        stats = hub.stats()
        families = {
            "emitted": CounterMetricFamily("tailcalld_slot_events_emitted", "Events the slot's handlers emitted "
                                           "(TC_PRINTF, TC_EMIT), as counted in the kernel", labels=SLOT_LABELS),
            "lost": CounterMetricFamily("tailcalld_slot_events_lost", "Events the slot's handlers could not emit: "
                                        "the ring buffer was full (events_buffer_bytes)", labels=SLOT_LABELS),
            "delivered": CounterMetricFamily("tailcalld_slot_events_delivered", "Events of the slot this daemon "
                                             "read from the ring buffer", labels=SLOT_LABELS),
            "suppressed": CounterMetricFamily("tailcalld_slot_events_journal_suppressed", "Events of a --journal "
                                              "slot not written to the journal (over events_journal_rate)",
                                              labels=SLOT_LABELS),
        }
        listed = {view.record.slot for view in views}
        keys = listed | {k for k, n in enumerate(stats.emitted) if n} | set(stats.delivered) | set(hub.suppressed_total)
        for key in sorted(keys):
            labels = self._labels(key)
            emitted, lost, delivered = stats.of(key)
            families["emitted"].add_metric(labels, emitted)
            families["lost"].add_metric(labels, lost)
            families["delivered"].add_metric(labels, delivered)
            families["suppressed"].add_metric(labels, hub.suppressed_total.get(key, 0))
        yield from families.values()
        yield CounterMetricFamily("tailcalld_events_dropped", "Events not sent to an `events -f` follower that did "
                                  "not keep up (events_client_bytes), over all followers", value=hub.dropped_total)
        yield GaugeMetricFamily("tailcalld_event_followers", "Connections following events (tailcallctl events -f)",
                                value=hub.subscribers)

    def _daemon(self) -> Iterable[Metric]:
        build = GaugeMetricFamily("tailcalld_build_info", "The running tailcalld (1)", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily("tailcalld_start_time_seconds", "When the daemon started, in seconds since the epoch",
                                value=self._ctx.manager.started_at.timestamp())
        yield GaugeMetricFamily("tailcalld_control_connections", "Connections to the control socket",
                                value=self._ctx.connections())


class Metrics:
    """A daemon's metrics: its registry, its recorder, and the text a scrape gets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recorder = Recorder()
        self.registry.register(self.recorder)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._collector: DaemonCollector | None = None

    def watch(self, ctx: CommandContext) -> None:
        """Read the live numbers from ``ctx`` from now on (once the daemon serves)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = DaemonCollector(ctx)
        self.registry.register(self._collector)

    def render(self, compress: bool = False) -> bytes:
        """The Prometheus text exposition of every metric (gzip-compressed if ``compress``)."""
        text = generate_latest(self.registry)
        return gzip.compress(text, GZIP_LEVEL, mtime=0) if compress else text

