"""
Prometheus metrics (C{--metrics ENDPOINT}): what the daemon counts and the
web listener that serves it in Prometheus' text format.

L{Metrics} owns its own L{CollectorRegistry} (never the global one of
C{prometheus_client}), so several can live in one process (tests build many
hubs).  Callers that do not count anything get a L{NoMetrics}, whose methods
do nothing; L{Metrics} is a L{NoMetrics} that counts, so every collaborator
takes a L{NoMetrics}.

C{prometheus_client} is imported only when a L{Metrics} is built.
Counting is on the request path: each method is a few dictionary
operations on plain numbers, turned into Prometheus' metric families only
when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.application.strports import service as strportsService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import IResource

from xcauth.interfaces import NoMetrics

if TYPE_CHECKING:
    from twisted.web.server import Site

    from xcauth.interfaces import Outcome

log = Logger()

#: Bounds (seconds) of the latency histograms: 1 ms to 5 s, the deadline's
#: range (a request past 5 s is in the C{+Inf} bucket).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)

#: The C{result} values of requests, and (without C{error}) of backend answers.
RESULTS = ("true", "false", "unavailable", "error")

#: The C{outcome} label of a backend answer (L{Outcome}'s value): the words of
#: the requests' C{result} label.
BACKEND_OUTCOMES = {"yes": "true", "no": "false", "unavailable": "unavailable"}

#: The operations each framing's requests can have (for the zero series);
#: the XMPP framings' C{roster} and C{invalid} appear when they happen.
OPERATIONS = {"postfix": ("isuser",), "dovecot": ("auth",), "saslauthd": ("auth",)}
XMPP_OPERATIONS = ("auth", "isuser")

#: The label values known in advance: each series exists from the start at 0.
CACHE_RESULTS = ("hit", "miss", "stale", "fallback")
PENALTY_REASONS = ("refused", "delayed")
BRUTE_FORCE_EVENTS = ("user-budget", "backend-budget", "known-let-through")


#: The counters: C{(name, help, label names)}; C{prometheus_client} adds
#: C{_total} to the names.
COUNTERS = (
    ("xcauth_requests", "Requests answered, by framing, operation and result.",
     ("framing", "operation", "result")),
    ("xcauth_backend_requests", "Backend answers, by backend and outcome (true, false, "
     "unavailable).", ("backend", "outcome")),
    ("xcauth_cache_decisions", "Credential cache decisions on logins: hit, miss, stale, "
     "fallback.", ("result",)),
    ("xcauth_deadline_missed", "Requests that got no answer within the deadline.",
     ("framing",)),
    ("xcauth_penalized", "Logins refused or delayed by the penalty box.", ("reason",)),
    ("xcauth_bruteforce", "Brute-force budget decisions: user-budget, backend-budget "
     "(checks refused), known-let-through (known passwords accepted during a limit).",
     ("event",)),
)

#: The histograms (buckets L{LATENCY_BUCKETS}): C{(name, help, label names)}.
HISTOGRAMS = (
    ("xcauth_request_seconds", "Seconds from a request to its result.",
     ("framing", "operation")),
    ("xcauth_backend_seconds", "Seconds a backend took to answer.", ("backend",)),
)


class Metrics(NoMetrics):
    """
    The daemon's metrics, in a registry of their own.

    The counts are plain integers and lists in dictionaries keyed by label
    values, turned into metric families only when scraped (L{_Collector}):
    counting a request costs a few dictionary operations, a fraction of
    what C{prometheus_client}'s lock-protected metric objects cost on every
    request.  Scrapes read them from the reactor's thread pool; copying a
    dictionary or list is atomic in CPython, and only the reactor thread
    writes.

    @param clock: measures backend durations.
    @param process: also register the process, platform and garbage
        collector collectors of C{prometheus_client} (the daemon does).
    @param backends: the backends in use (C{jsxc}, C{nextcloud}), whose
        series exist from the start.
    @ivar registry: what the metrics listener serves.
    """

    def __init__(self, clock: IReactorTime, process: bool = True,
                 backends: tuple[str, ...] = ()) -> None:
        # Imported here: a daemon without --metrics never loads prometheus_client.
        from prometheus_client import CollectorRegistry
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        self._clock = clock
        self._inFlight = 0
        # Counter values by label values, one dictionary per COUNTERS entry.
        self._requests: dict[tuple[str, ...], int] = {}
        self._backend: dict[tuple[str, ...], int] = {}
        self._cache: dict[tuple[str, ...], int] = {}
        self._deadline: dict[tuple[str, ...], int] = {}
        self._penalized: dict[tuple[str, ...], int] = {}
        self._bruteForce: dict[tuple[str, ...], int] = {}
        # Histogram rows by label values, one per HISTOGRAMS entry: the count
        # of each bucket (not cumulative; the last one +Inf), then the sum.
        self._requestSeconds: dict[tuple[str, ...], list[float]] = {}
        self._backendSeconds: dict[tuple[str, ...], list[float]] = {}
        # Open connections by listener, and the throttle state by Nextcloud.
        self._listeners: list[tuple[str, Callable[[], int]]] = []
        self._throttle: dict[str, tuple[float, bool | None]] = {}
        # Every series whose label values are known now exists at 0.
        for result in CACHE_RESULTS:
            self._cache[(result,)] = 0
        for reason in PENALTY_REASONS:
            self._penalized[(reason,)] = 0
        for event in BRUTE_FORCE_EVENTS:
            self._bruteForce[(event,)] = 0
        for backend in backends:
            for outcome in BACKEND_OUTCOMES.values():
                self._backend[(backend, outcome)] = 0
            self._backendSeconds[(backend,)] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def counters(self) -> tuple[dict[tuple[str, ...], int], ...]:
        """
        The counts of each of L{COUNTERS}, in its order.
        """
        return (self._requests, self._backend, self._cache, self._deadline, self._penalized,
                self._bruteForce)

    def histograms(self) -> tuple[dict[tuple[str, ...], list[float]], ...]:
        """
        The rows of each of L{HISTOGRAMS}, in its order.
        """
        return (self._requestSeconds, self._backendSeconds)

    def inFlight(self) -> int:
        """
        Requests being worked on now.
        """
        return self._inFlight

    def now(self) -> float:
        return self._clock.seconds()

    def started(self) -> None:
        self._inFlight += 1

    def finished(self) -> None:
        self._inFlight -= 1

    def request(self, framing: str, operation: str, result: str, seconds: float) -> None:
        # On every request: _count and _observe inlined.
        counts = self._requests
        key = (framing, operation, result)
        counts[key] = counts.get(key, 0) + 1
        row = self._requestSeconds.get(key[:2])
        if row is None:
            row = self._requestSeconds[key[:2]] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def invalid(self, framing: str) -> None:
        _count(self._requests, (framing, "invalid", "false"))

    def backend(self, outcome: Outcome, backend: str, started: float) -> Outcome:
        _count(self._backend, (backend, BACKEND_OUTCOMES[outcome.value]))
        _observe(self._backendSeconds, (backend,), max(self._clock.seconds() - started, 0.0))
        return outcome

    def cache(self, result: str) -> None:
        _count(self._cache, (result,))

    def deadlineMissed(self, framing: str) -> None:
        _count(self._deadline, (framing,))

    def penalized(self, reason: str) -> None:
        _count(self._penalized, (reason,))

    def bruteForce(self, event: str) -> None:
        _count(self._bruteForce, (event,))

    def serving(self, framing: str, connections: Callable[[], int]) -> None:
        self._listeners.append((framing, connections))
        for operation in OPERATIONS.get(framing, XMPP_OPERATIONS):
            for result in RESULTS:
                self._requests.setdefault((framing, operation, result), 0)
            self._requestSeconds.setdefault(
                (framing, operation), [0.0] * (len(LATENCY_BUCKETS) + 2))
        self._deadline.setdefault((framing,), 0)

    def throttle(self, nextcloud: str, delay: float, allowListed: bool | None) -> None:
        self._throttle[nextcloud] = (delay, allowListed)

    def throttleStates(self) -> dict[str, tuple[float, bool | None]]:
        """
        The last throttle state of each Nextcloud watched.
        """
        return dict(self._throttle)

    def openConnections(self, timeout: float = 2.0) -> dict[str, int] | None:
        """
        Open connections by framing, counted in the reactor thread (the
        listeners' connection sets change there); C{None} if the reactor did
        not answer within C{timeout} seconds (it is stopping, or busy).
        """
        from twisted.python.threadable import isInIOThread

        def count() -> dict[str, int]:
            counts: dict[str, int] = {}
            for framing, connections in self._listeners:
                counts[framing] = counts.get(framing, 0) + connections()
            return counts

        if isInIOThread() or not getattr(self._clock, "running", False):
            # The reactor's thread, or no reactor running (a test's clock).
            return count()
        import queue

        answer: queue.Queue[dict[str, int]] = queue.Queue(1)
        self._clock.callFromThread(lambda: answer.put(count()))  # type: ignore[attr-defined]
        try:
            return answer.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- the shared state database (PostgreSQL) ---------------------------

    #: See L{NoMetrics.storeInUse} and the following methods; collected by
    #: L{_collectStore}.
    _storeInUse = 0
    _storeDown = 0
    _storeReconnects = 0

    def storeInUse(self, calls: int) -> None:
        self._storeInUse = calls

    def storeQuery(self, outcome: str, seconds: float) -> None:
        rows = self.__dict__.setdefault("_storeSeconds", {})
        _observe(rows, (outcome,), max(seconds, 0.0))

    def storeDown(self, down: bool) -> None:
        self._storeDown = int(down)

    def storeReconnect(self) -> None:
        self._storeReconnects += 1

    def storeFallback(self, what: str) -> None:
        _count(self.__dict__.setdefault("_storeFallbacks", {}), (what,))


def _count(counts: dict[tuple[str, ...], int], key: tuple[str, ...]) -> None:
    counts[key] = counts.get(key, 0) + 1


def _observe(rows: dict[tuple[str, ...], list[float]], key: tuple[str, ...],
             seconds: float) -> None:
    row = rows.get(key)
    if row is None:
        row = rows[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
    # The first bucket whose bound is >= seconds (+Inf past the last).
    row[bisect_left(LATENCY_BUCKETS, seconds)] += 1
    row[-1] += seconds


class _Collector:
    """
    Turns the counts of a L{Metrics} into metric families when the registry
    is collected (at every scrape).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        m = self._metrics
        for (name, text, labels), counts in zip(COUNTERS, m.counters(), strict=True):
            counter = CounterMetricFamily(name, text, labels=labels)
            for key, count in sorted(dict(counts).items()):
                counter.add_metric(key, count)
            yield counter
        for (name, text, labels), rows in zip(HISTOGRAMS, m.histograms(), strict=True):
            yield latencyHistogram(name, text, labels,
                                   {key: list(row) for key, row in dict(rows).items()})
        yield GaugeMetricFamily("xcauth_in_flight", "Requests being worked on.",
                                value=m.inFlight())
        build = GaugeMetricFamily(
            "xcauth_build_info", "xcauth's version and what it runs on (always 1).",
            labels=("version", "python", "twisted"))
        build.add_metric(buildLabels(), 1)
        yield build
        connections = m.openConnections()
        if connections is not None:
            gauge = GaugeMetricFamily(
                "xcauth_open_connections", "Client connections open, by framing.",
                labels=("framing",))
            for framing, count in sorted(connections.items()):
                gauge.add_metric((framing,), count)
            yield gauge
        delays = GaugeMetricFamily(
            "xcauth_nextcloud_throttle_delay_seconds",
            "The brute-force delay Nextcloud puts on every login from xcauth's address "
            "(its capabilities, read every throttle-check-interval).",
            labels=("nextcloud",))
        listed = GaugeMetricFamily(
            "xcauth_nextcloud_allow_listed",
            "1 if xcauth's address is on Nextcloud's brute-force allow-list, 0 if not "
            "(absent when Nextcloud does not say).",
            labels=("nextcloud",))
        for nextcloud, (delay, allowListed) in sorted(m.throttleStates().items()):
            delays.add_metric((nextcloud,), delay)
            if allowListed is not None:
                listed.add_metric((nextcloud,), 1 if allowListed else 0)
        yield delays
        yield listed
        yield from _collectStore(m)


def buildLabels() -> tuple[str, str, str]:
    """
    The labels of C{xcauth_build_info}: xcauth's, Python's and Twisted's
    versions.
    """
    import platform

    import twisted
    from xcauth import __version__

    return (__version__, platform.python_version(), twisted.__version__)


def quietSite(resource: IResource, reactor: Any) -> Site:
    """
    A L{Site} serving C{resource} that logs neither its start and stop
    (C{noisy}) nor any request: Twisted's default, even with C{logPath=None},
    writes an access line per request to the daemon's log, and a scrape every
    few seconds would drown it.
    """
    # Imported here: twisted.web.server is not otherwise needed by a daemon.
    from twisted.web.server import Site

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:
            pass

    return QuietSite(resource, reactor=reactor)


#: Connections the metrics listener accepts at once (a scraper or two, with
#: room for a person's curl); past it new connections are closed at once.
METRICS_MAX_CONNECTIONS = 8


class LimitedFactory(WrappingFactory):
    """
    C{wrappedFactory} with at most C{limit} connections open at once; past it
    a new connection is closed at once (logged at most once a minute).
    """

    noisy = False
    LOG_INTERVAL = 60.0

    def __init__(self, wrappedFactory: Any, limit: int, clock: IReactorTime) -> None:
        super().__init__(wrappedFactory)
        self.limit = limit
        self._clock = clock
        self._loggedAt: float | None = None

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.limit:
            now = self._clock.seconds()
            if self._loggedAt is None or now - self._loggedAt >= self.LOG_INTERVAL:
                self._loggedAt = now
                log.warn(
                    "{limit} connections open on the metrics listener: new ones are "
                    "closed until some close",
                    limit=self.limit,
                )
            return None
        return super().buildProtocol(addr)


def metricsService(
    metrics: Metrics, endpoint: str, reactor: Any, resource: IResource | None = None,
    maxConnections: int = METRICS_MAX_CONNECTIONS,
) -> IService:
    """
    The web listener serving C{metrics} on C{endpoint} (a Twisted server
    endpoint, C{tcp:9464:interface=127.0.0.1}), at C{/metrics} and every
    other path.  It raises when the endpoint cannot listen, which stops the
    daemon's start.

    @param resource: what to serve (tests); by default
        C{prometheus_client}'s L{MetricsResource} of C{metrics.registry}, which
        collects in the reactor's thread pool (a WSGI application), off the
        reactor thread.
    """
    if resource is None:
        # Imports the global reactor: only once the daemon has installed it.
        from prometheus_client.twisted import MetricsResource

        resource = MetricsResource(metrics.registry)
    site = LimitedFactory(quietSite(resource, reactor), maxConnections, reactor)
    svc = strportsService(endpoint, site, reactor=reactor)
    svc.setName(f"metrics={endpoint}")
    return svc


def _collectStore(m: Metrics) -> Iterator[Any]:
    """
    The metric families of the state database (L{NoMetrics.storeInUse}...),
    present once PostgreSQL is used.
    """
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    rows: dict[tuple[str, ...], list[float]] = dict(m.__dict__.get("_storeSeconds", {}))
    fallbacks: dict[tuple[str, ...], int] = dict(m.__dict__.get("_storeFallbacks", {}))
    yield GaugeMetricFamily(
        "xcauth_store_in_use", "Calls to the state database in its pool, not answered yet.",
        value=m._storeInUse,
    )
    yield GaugeMetricFamily(
        "xcauth_store_down", "1 while the state database (PostgreSQL) is unavailable.",
        value=m._storeDown,
    )
    reconnects = CounterMetricFamily(
        "xcauth_store_reconnects", "Times the state database was reached again after "
        "being unavailable.",
    )
    reconnects.add_metric([], m._storeReconnects)
    yield reconnects
    counter = CounterMetricFamily(
        "xcauth_store_fallbacks", "Cache reads and writes done in this node's memory "
        "because the state database was unavailable.", labels=("what",),
    )
    for key, count in sorted(fallbacks.items()):
        counter.add_metric(key, count)
    yield counter
    yield latencyHistogram(
        "xcauth_store_query_seconds", "Seconds a call to the state database took, by "
        "outcome (ok, error, timeout).", ("outcome",), rows,
    )


def latencyHistogram(name: str, text: str, labels: Sequence[str],
                     rows: Mapping[tuple[str, ...], list[float]]) -> Any:
    """
    A histogram over L{LATENCY_BUCKETS} from rows of per-bucket counts (the
    last item of a row: the sum of the seconds), one row per label values.
    """
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    histogram = HistogramMetricFamily(name, text, labels=labels)
    for key, row in sorted(rows.items()):
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, inBucket in zip(bounds, row, strict=False):
            cumulative += inBucket
            buckets.append((bound, cumulative))
        histogram.add_metric(key, buckets, row[-1])
    return histogram
