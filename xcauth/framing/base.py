"""
What every framing shares: the server context, ordered answers for pipelined
requests with a bound on the work in flight, a deadline per request,
cancellation when the client goes away, and one log line per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar
from weakref import WeakSet

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

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


class _Slot:
    __slots__ = ("answer", "done", "deferred")

    def __init__(self) -> None:
        self.answer: bytes | None = None
        self.done = False
        self.deferred: Deferred[Any] | None = None


@implementer(IPushProducer)
class _UnsentAnswers:
    """
    Registered with a connection's transport as its producer: when answers pile
    up unsent (the client does not read them), the transport pauses it, and
    the connection stops reading requests until they have left.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: OrderedAnswers) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        self.connection._hold("unsent")

    def resumeProducing(self) -> None:
        self.connection._release("unsent")

    def stopProducing(self) -> None:
        pass


class OrderedAnswers:
    """
    Mixin for receivers: answers leave in request order however the work
    completes, at most C{context.maxInFlight} requests are worked on at once, each
    is answered within C{context.deadline}, and pending work is cancelled when the
    connection is lost.  No connection takes more than its share: at most
    L{MAX_PER_TURN} requests are parsed from it per reactor turn, it is not read
    while its answers are not read, and one that sends L{MAX_INVALID} invalid
    requests is closed.  Invalid requests are logged as one line per
    connection and L{INVALID_LOG_INTERVAL}, not one line each.

    The receiver provides C{transport}, C{pauseProducing} and C{resumeProducing}
    (Twisted's L{LineReceiver} and L{IntNStringReceiver} do: their parsing
    loops stop while paused), passes each read through L{dataReceived}, and
    calls L{startRequest} or L{startAnswered} for every request and
    L{closeWhenAnswered} to finish.
    """

    #: Requests parsed from one connection in one reactor turn; the rest of
    #: what it sent waits for the next turn, after the other connections.
    MAX_PER_TURN = 32
    #: Invalid requests after which a connection is closed (no real client
    #: sends any: a connection sending this many is broken or hostile).
    MAX_INVALID = 1000

    context: ServerContext
    transport: Any
    framing: str = "?"
    # Provided by the receiver this is mixed into (declared, not defined here).
    pauseProducing: Callable[[], None]
    resumeProducing: Callable[[], None]

    _closing = False
    _lost = False
    _turnRequests = 0
    _resuming = False
    _invalid = 0

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self._slots: deque[_Slot] = deque()
        # Why the connection is not read now ("load", "turn", "unsent").
        self._holds: set[str] = set()

    def connectionMade(self) -> None:
        self.transport.registerProducer(_UnsentAnswers(self), True)

    def dataReceived(self, data: bytes) -> None:
        """
        One read from the connection: a new turn.
        """
        self._turnRequests = 0
        super().dataReceived(data)  # type: ignore[misc]

    def _hold(self, reason: str) -> None:
        if not self._holds and not self._closing:
            self.pauseProducing()
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        self._holds.discard(reason)
        if not self._holds and not self._resuming:
            # Resume on a later turn: resuming parses buffered input, and this
            # may run inside the receiver's own parsing loop.
            self._resuming = True
            self.context.clock.callLater(0, self._resumeReading)

    def _resumeReading(self) -> None:
        self._resuming = False
        if not (self._lost or self._closing or self._holds):
            self._turnRequests = 0
            self.resumeProducing()

    def _counted(self) -> None:
        self._turnRequests += 1
        if self._turnRequests >= self.MAX_PER_TURN and "turn" not in self._holds:
            self._hold("turn")
            self._release("turn")

    def noteInvalid(self, reason: str) -> None:
        """
        A request answered without any work because it is not valid: counted
        (and logged in one line a minute for the whole daemon, see
        L{ServerContext.noteInvalid}); the connection is closed at
        L{MAX_INVALID}.
        """
        self._invalid += 1
        if self._invalid == self.MAX_INVALID:
            self.context.noteInvalid(self.framing, reason, closed=True)
            self.closeWhenAnswered()
        else:
            self.context.noteInvalid(self.framing, reason)

    def startRequest(
        self, work: Deferred[T], encode: Callable[[T], bytes], fallback: bytes
    ) -> None:
        """
        Queue the answer to one request.

        @param work: fires with the result of the request.
        @param encode: turns the result into the bytes to send.
        @param fallback: what to send if the work fails or misses the deadline.
        """
        self._counted()
        slot = _Slot()
        self._slots.append(slot)
        slot.deferred = work
        if not work.called or work.paused:
            # Work answered at once (a token) needs no deadline timer.
            self.context.watchDeadline(work)
        # One callback pair with arguments instead of three closures: at
        # hundreds of requests in flight, every object that lives as long as
        # a request makes the garbage collector's work grow.
        work.addCallbacks(
            self._requestDone,
            self._requestFailed,
            callbackArgs=(slot, encode, fallback),
            errbackArgs=(slot, fallback),
        )
        if not slot.done and len(self._slots) >= self.context.maxInFlight:
            self._hold("load")

    def _requestDone(
        self, result: T, slot: _Slot, encode: Callable[[T], bytes], fallback: bytes
    ) -> None:
        try:
            answer = encode(result)
        except BaseException:
            self._requestFailed(Failure(), slot, fallback)
            return
        self._fillSlot(slot, answer)

    def _requestFailed(self, f: Failure, slot: _Slot, fallback: bytes) -> None:
        if not self._lost and f.check(CancelledError, TimeoutError):
            self.context.metrics.deadlineMissed(self.framing)  # metrics
        if not (self._lost and f.check(CancelledError, TimeoutError)):
            logRequestFailure(f, self.framing, self.context.deadline)
        self._fillSlot(slot, fallback)

    def _fillSlot(self, slot: _Slot, answer: bytes) -> None:
        slot.answer = answer
        slot.done = True
        slot.deferred = None
        self._flush()

    def startAnswered(self, answer: bytes) -> None:
        """
        Queue an answer that is already known (it still waits for its turn).
        """
        self._counted()
        if not self._slots:
            self.transport.write(answer)
            return
        slot = _Slot()
        slot.answer = answer
        slot.done = True
        self._slots.append(slot)

    def closeWhenAnswered(self) -> None:
        """
        Read nothing more; close the connection once every answer has left.
        """
        self._closing = True
        self.pauseProducing()
        self._flush()

    def _flush(self) -> None:
        if self._lost:
            return
        slots = self._slots
        out = []
        while slots and slots[0].done:
            answer = slots.popleft().answer
            if answer:
                out.append(answer)
        if out:
            self.transport.write(b"".join(out))
        if self._closing:
            if not slots:
                self.transport.loseConnection()
        elif "load" in self._holds and len(slots) < self.context.maxInFlight:
            self._release("load")

    def readConnectionLost(self) -> None:
        """
        The client closed its side (EOF after its last request): answer what it
        asked, then close.  A request cut short by the EOF gets no answer.
        """
        self.closeWhenAnswered()

    def writeConnectionLost(self) -> None:
        """
        Nobody reads the answers any more: give up.
        """
        self.cancelPending()
        self.transport.loseConnection()

    def cancelPending(self) -> None:
        """
        The connection is gone: cancel all work still pending for it.
        """
        self._lost = True
        pending = [s.deferred for s in self._slots if s.deferred is not None]
        self._slots.clear()
        for d in pending:
            d.cancel()


def logRequestFailure(f: Failure, framing: str, deadline: float) -> None:
    """
    Log why a request got its fallback answer: the deadline, or an error.
    """
    if f.check(CancelledError, TimeoutError):
        log.warn(
            "{framing} request got no answer within {deadline} s",
            framing=framing,
            deadline=deadline,
        )
    else:
        log.failure("{framing} request failed", f, framing=framing)


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
        log.info(
            "{operation} {result} for {user}@{domain} via {framing} in {ms} ms",
            operation=self.operation,
            result=_describeResult(result),
            user=self.user,
            domain=self.domain,
            framing=self.framing,
            ms=round(seconds * 1000, 1),
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
