"""
What every framing shares: the server context (with the rate-limited log of
invalid requests), the connection factory and one log line per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar
from weakref import WeakSet

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.deadlines import Deadlines
from xcauth.interfaces import IAuthenticator, NoMetrics, resultLabel
from xcauth.text import printable

log = Logger()

T = TypeVar("T")


@attr.s(auto_attribs=True)
class ServerContext:
    """
    Everything a connection needs, shared by all connections of a daemon.

    @ivar authenticator: the shared backend.
    @ivar clock: the clock for request deadlines.
    @ivar deadline: seconds within which every request gets an answer.
    @ivar maxInFlight: requests worked on at once per connection; past it the
        connection stops reading until answers have left.
    @ivar debug: log every request's details at debug level too.
    @ivar logRequests: which requests get their info line: C{all},
        C{failures} (every answer but a yes) or C{none}.
    @ivar defaultDomain: the domain of logins that name none (the C{dovecot}
        framing's C{dovecot-default-domain}); C{None}: such logins fail.
    @ivar metrics: counts requests (L{xcauth.daemon.metrics}); by default nothing.
    """

    authenticator: IAuthenticator
    clock: IReactorTime
    deadline: float = 4.0
    maxInFlight: int = 64
    debug: bool = False
    logRequests: str = "all"
    defaultDomain: str | None = None
    metrics: NoMetrics = attr.Factory(NoMetrics)  # metrics
    _deadlines: Deadlines | None = attr.ib(default=None, init=False, repr=False, eq=False)
    _invalid: InvalidRequestLog | None = attr.ib(default=None, init=False, repr=False, eq=False)

    def noteInvalid(self, framing: str, reason: str, closed: bool = False) -> None:
        """
        Count an invalid request (or, with C{closed}, a connection closed for
        sending too many): one log line per L{InvalidRequestLog.INTERVAL} for
        the whole daemon, however many connections send them.
        """
        self.metrics.invalid(framing)  # metrics
        if self._invalid is None:
            self._invalid = InvalidRequestLog(self.clock)
        self._invalid.note(framing, reason, closed)

    def watchDeadline(self, d: Deferred[T]) -> Deferred[T]:
        """
        Limit C{d} to C{deadline} seconds (like C{d.addTimeout(deadline,
        clock)}, on one timer for every request: see L{xcauth.deadlines}).
        """
        deadlines = self._deadlines
        if deadlines is None or deadlines.timeout != self.deadline:
            deadlines = self._deadlines = Deadlines(self.clock, self.deadline)
        return deadlines.watch(d)

    def timer(self, framing: str, operation: str, user: str, domain: str) -> RequestTimer[Any]:
        """
        A L{RequestTimer} for one request, on this context's clock.
        """
        return RequestTimer(
            self.clock, framing, operation, user, domain, self.logRequests, self.metrics
        )


class InvalidRequestLog:
    """
    Invalid requests of every connection, logged as they come for the first
    one, then as one summary line per L{INTERVAL} (a flood, even one that
    reconnects again and again, writes a few lines a minute).
    """

    #: Seconds between two summary lines.
    INTERVAL = 60.0

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._closed: dict[str, int] = {}
        self._last: dict[str, str] = {}
        self._timer: Any = None
        self._started = False

    def note(self, framing: str, reason: str, closed: bool = False) -> None:
        """
        Count one invalid request via C{framing} (and a connection closed).
        """
        self._counts[framing] = self._counts.get(framing, 0) + 1
        if closed:
            self._closed[framing] = self._closed.get(framing, 0) + 1
        self._last[framing] = reason
        if not self._started:
            self._started = True
            self.flush()
        if self._timer is None and (self._counts or self._closed):
            self._timer = self._clock.callLater(self.INTERVAL, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """
        Log what was counted since the last line.
        """
        for framing, count in self._counts.items():
            log.info(
                "{count} invalid request(s) via {framing} answered false; last: "
                "{reason}",
                count=count,
                framing=framing,
                reason=self._last.get(framing, ""),
            )
        for framing, count in self._closed.items():
            log.warn(
                "{count} {framing} connection(s) closed for invalid requests; last: "
                "{reason}",
                count=count,
                framing=framing,
                reason=self._last.get(framing, ""),
            )
        self._counts.clear()
        self._closed.clear()
        if not self._counts and self._timer is not None and not self._timer.active():
            self._timer = None


class XcauthFactory(Factory):
    """
    A factory for one framing's protocol, carrying the shared L{ServerContext}.
    """

    noisy = False
    # Factory declares it optional; here it is always given.
    protocol: Callable[[ServerContext], Any]

    #: Seconds between two log lines saying that the connection limit is reached.
    LIMIT_LOG_INTERVAL = 60.0

    def __init__(
        self,
        protocol: Callable[[ServerContext], Any],
        context: ServerContext,
        maxConnections: int | None = None,
    ) -> None:
        self.protocol = protocol
        self.context = context
        #: Open connections at most (below the process's file descriptor
        #: limit, so that the backend's connections and the database still
        #: get theirs); past it new connections are closed at once.
        self.maxConnections = maxConnections
        #: The connections built here (weakly held: closed ones drop out), for
        #: answering what is in flight at a stop (L{xcauth.daemon.drain}).
        self.connections: WeakSet[Any] = WeakSet()
        self._limitLoggedAt: float | None = None

    def buildProtocol(self, addr: Any) -> Any:
        limit = self.maxConnections
        if limit is not None and len(self.connections) >= limit and self._full(limit):
            return None
        p = self.protocol(self.context)
        p.factory = self
        self.connections.add(p)
        return p

    def openConnections(self) -> int:
        """
        The connections open now.  Closed connections may linger in the
        weak set until the garbage collector frees them: count the open ones.
        """
        return sum(1 for c in list(self.connections) if not _closed(c))

    def _full(self, limit: int) -> bool:
        if self.openConnections() < limit:
            return False
        now = self.context.clock.seconds()
        if self._limitLoggedAt is None or now - self._limitLoggedAt >= self.LIMIT_LOG_INTERVAL:
            self._limitLoggedAt = now
            log.warn(
                "{limit} connections open on this listener (max-connections): new "
                "connections are closed until some close",
                limit=limit,
            )
        return True


class RequestTimer(Generic[T]):
    """
    Logs one line per request when its result is known: framing, operation,
    user@domain, result and latency.  Never the password.  With C{which}
    C{failures}, a yes (C{True}, a roster) is not logged; with C{none}, nothing.
    Every request is counted in C{metrics} (in flight from its start to its
    result, then by result and latency), whatever is logged.
    """

    # One per request, alive as long as the request: no instance dict.
    __slots__ = (
        "clock", "framing", "operation", "user", "domain", "started", "which", "metrics",
    )

    def __init__(
        self, clock: IReactorTime, framing: str, operation: str, user: str, domain: str,
        which: str = "all", metrics: NoMetrics | None = None,
    ) -> None:
        self.metrics = metrics = metrics if metrics is not None else NoMetrics()  # metrics
        metrics.started()  # metrics
        self.which = which
        self.clock = clock
        self.framing = framing
        self.operation = operation
        self.user = printable(user)
        self.domain = printable(domain)
        self.started = clock.seconds()

    def __call__(self, result: T) -> T:
        seconds = self.clock.seconds() - self.started
        metrics = self.metrics  # metrics
        metrics.finished()  # metrics
        metrics.request(self.framing, self.operation, resultLabel(result), seconds)  # metrics
        if self.which != "all" and (
            self.which == "none" or result is True or isinstance(result, bytes)
        ):
            return result
        described = _describeResult(result)
        ms = round(seconds * 1000, 1)
        # The line is made here, with one f-string: twisted.logger's format
        # of a six-field string costs about twice as much (a line per request
        # is a quarter of the daemon's work for token logins).  The fields
        # stay in the event for observers that read them.
        log.info(
            "{line}",
            line=f"{self.operation} {described} for {self.user}@{self.domain} "
                 f"via {self.framing} in {ms} ms",
            operation=self.operation,
            result=described,
            user=self.user,
            domain=self.domain,
            framing=self.framing,
            ms=ms,
        )
        return result

    def observe(self, d: Deferred[T]) -> Deferred[T]:
        """
        Log the outcome of C{d} when it fires (errors are passed on unchanged).
        """
        return d.addCallbacks(self, self._failed)

    def _failed(self, f: Failure) -> Failure:
        reason = "cancelled" if f.check(CancelledError) else "error"
        self(reason)  # type: ignore[arg-type]
        return f


def _describeResult(result: object) -> str:
    if result is None:
        return "unavailable"
    if isinstance(result, bool):
        return "true" if result else "false"
    if isinstance(result, bytes):
        return f"{len(result)} bytes"
    return str(result)


def _closed(connection: Any) -> bool:
    transport = getattr(connection, "transport", None)
    return transport is not None and bool(getattr(transport, "disconnected", False))
