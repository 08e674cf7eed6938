"""
Prometheus metrics (C{--metrics ENDPOINT}): what the daemon counts and the
web listener that serves it in Prometheus' text format.

L{Metrics} owns its own L{CollectorRegistry} (never the global one of
C{prometheus_client}), so several can live in one process (tests build many
hubs).  Callers that do not count anything get a L{NoMetrics}, whose methods
do nothing; L{Metrics} is a L{NoMetrics} that counts, so every collaborator
takes a L{NoMetrics}.

C{prometheus_client} is imported only when a L{Metrics} is built.
Counting is on the request path: each method is a few dictionary look-ups
and lock-protected additions (the labelled children are looked up once and
kept), and the in-flight gauge is a plain integer read when scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.application.strports import service as strportsService
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

if TYPE_CHECKING:
    from prometheus_client import Counter
    from twisted.web.server import Site

    from xcauth.interfaces import Outcome

#: Bounds (seconds) of the latency histograms: 1 ms to 5 s, the deadline's
#: range (a request past 5 s is in the C{+Inf} bucket).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)

def resultLabel(result: object) -> str:
    """
    The C{result} label of a request's result: C{true} (C{True} or a roster),
    C{false}, C{unavailable} (C{None}: the backend was unavailable; or
    C{"cancelled"}, the reason L{xcauth.framing.base.RequestTimer} gives for a
    request answered without a decision: deadline missed, client gone), and
    C{error} for anything else (the work failed).
    """
    if result is True or isinstance(result, bytes):
        return "true"
    if result is False:
        return "false"
    if result is None or result == "cancelled":
        return "unavailable"
    return "error"


class NoMetrics:
    """
    Counts nothing: the default of every collaborator that can count (unit
    tests, the C{xcauth} command).  L{Metrics} overrides every method.
    """

    def now(self) -> float:
        """
        The time to measure a duration from (C{0.0}: nothing is measured).
        """
        return 0.0

    def started(self) -> None:
        """
        A request is being worked on (until L{finished}).
        """

    def finished(self) -> None:
        """
        A request L{started} has its result.
        """

    def request(self, framing: str, operation: str, result: str, seconds: float) -> None:
        """
        One request's outcome (C{result}: C{true}, C{false}, C{unavailable},
        C{error}) after C{seconds}.
        """

    def invalid(self, framing: str) -> None:
        """
        An invalid request (answered C{false} without any work).
        """

    def backend(self, outcome: Outcome, backend: str, started: float) -> Outcome:
        """
        Count C{backend}'s answer (C{yes}, C{no}, C{unavailable}) to a request
        sent at C{started} (a L{now}), and return it (a callback).
        """
        return outcome

    def cache(self, result: str) -> None:
        """
        A credential cache decision: C{hit}, C{miss}, C{stale}, C{fallback}.
        """

    def deadlineMissed(self, framing: str) -> None:
        """
        A request got no answer within the deadline.
        """

    def penalized(self, reason: str) -> None:
        """
        A login refused or delayed by the penalty box (C{reason}: C{refused},
        C{locked-out}, C{delayed}).
        """


class Metrics(NoMetrics):
    """
    The daemon's metrics, in a registry of their own.

    @param clock: measures backend durations.
    @param process: also register the process, platform and garbage
        collector collectors of C{prometheus_client} (the daemon does).
    @ivar registry: what the metrics listener serves.
    """

    def __init__(self, clock: IReactorTime, process: bool = True) -> None:
        # Imported here: a daemon without --metrics never loads prometheus_client.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        self._clock = clock
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "xcauth_requests", "Requests answered, by framing, operation and result.",
            ["framing", "operation", "result"], registry=registry,
        )
        self._requestSeconds = Histogram(
            "xcauth_request_seconds", "Seconds from a request to its result.",
            ["framing", "operation"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._backend = Counter(
            "xcauth_backend_requests", "Backend answers, by backend and outcome.",
            ["backend", "outcome"], registry=registry,
        )
        self._backendSeconds = Histogram(
            "xcauth_backend_seconds", "Seconds a backend took to answer.",
            ["backend"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._cache = Counter(
            "xcauth_cache", "Credential cache decisions: hit, miss, stale, fallback.",
            ["result"], registry=registry,
        )
        self._deadline = Counter(
            "xcauth_deadline_missed", "Requests that got no answer within the deadline.",
            ["framing"], registry=registry,
        )
        self._penalized = Counter(
            "xcauth_penalized", "Logins refused or delayed by the penalty box.",
            ["reason"], registry=registry,
        )
        self._inFlight = 0
        inFlight = Gauge(
            "xcauth_in_flight", "Requests being worked on.", registry=registry
        )
        inFlight.set_function(lambda: self._inFlight)
        # Labelled children, looked up once: labels() takes a lock and
        # validates its arguments on every call.
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._simple: dict[tuple[str, str], Any] = {}
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def now(self) -> float:
        return self._clock.seconds()

    def started(self) -> None:
        self._inFlight += 1

    def finished(self) -> None:
        self._inFlight -= 1

    def request(self, framing: str, operation: str, result: str, seconds: float) -> None:
        key = (framing, operation, result)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                self._requests.labels(framing, operation, result),
                self._requestSeconds.labels(framing, operation),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def invalid(self, framing: str) -> None:
        self._one(self._requests, "invalid", framing, "invalid", "false")

    def backend(self, outcome: Outcome, backend: str, started: float) -> Outcome:
        key = ("backend", backend, outcome.value)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                self._backend.labels(backend, outcome.value),
                self._backendSeconds.labels(backend),
            )
        pair[0].inc()
        pair[1].observe(max(self._clock.seconds() - started, 0.0))
        return outcome

    def cache(self, result: str) -> None:
        self._one(self._cache, "cache", result)

    def deadlineMissed(self, framing: str) -> None:
        self._one(self._deadline, "deadline", framing)

    def penalized(self, reason: str) -> None:
        self._one(self._penalized, "penalized", reason)

    def _one(self, counter: Counter, kind: str, *labels: str) -> None:
        key = (kind, "\0".join(labels))
        child = self._simple.get(key)
        if child is None:
            child = self._simple[key] = counter.labels(*labels)
        child.inc()


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


def metricsService(
    metrics: Metrics, endpoint: str, reactor: Any, resource: IResource | None = None
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
    site = quietSite(resource, reactor)
    svc = strportsService(endpoint, site, reactor=reactor)
    svc.setName(f"metrics={endpoint}")
    return svc
