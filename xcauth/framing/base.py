"""
What every framing shares: the server context, ordered answers for pipelined
requests with a bound on the work in flight, a deadline per request,
cancellation when the client goes away, and one log line per request.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.deadlines import Deadlines
from xcauth.interfaces import IAuthenticator

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
    @ivar defaultDomain: the domain of logins that name none (the C{dovecot}
        framing's C{dovecot-default-domain}); C{None}: such logins fail.
    """

    authenticator: IAuthenticator
    clock: IReactorTime
    deadline: float = 4.0
    maxInFlight: int = 64
    debug: bool = False
    defaultDomain: str | None = None
    _deadlines: Deadlines | None = attr.ib(default=None, init=False, repr=False, eq=False)

    def watchDeadline(self, d: Deferred[T]) -> Deferred[T]:
        """
        Limit C{d} to C{deadline} seconds (like C{d.addTimeout(deadline,
        clock)}, on one timer for every request: see L{xcauth.deadlines}).
        """
        deadlines = self._deadlines
        if deadlines is None or deadlines.timeout != self.deadline:
            deadlines = self._deadlines = Deadlines(self.clock, self.deadline)
        return deadlines.watch(d)


class XcauthFactory(Factory):
    """
    A factory for one framing's protocol, carrying the shared L{ServerContext}.
    """

    noisy = False
    # Factory declares it optional; here it is always given.
    protocol: Callable[[], Any]

    def __init__(self, protocol: Callable[[], Any], context: ServerContext) -> None:
        self.protocol = protocol
        self.context = context

    def buildProtocol(self, addr: Any) -> Any:
        p = self.protocol()
        p.factory = self
        p.context = self.context
        return p


class _Slot:
    __slots__ = ("answer", "done", "deferred")

    def __init__(self) -> None:
        self.answer: bytes | None = None
        self.done = False
        self.deferred: Deferred[Any] | None = None


class OrderedAnswers:
    """
    Mixin for receivers: answers leave in request order however the work
    completes, at most C{context.maxInFlight} requests are worked on at once, each
    is answered within C{context.deadline}, and pending work is cancelled when the
    connection is lost.

    The receiver provides C{transport}, C{pauseProducing} and C{resumeProducing}
    (Twisted's L{LineReceiver} and L{IntNStringReceiver} do), and calls
    L{startRequest} for every request and L{closeWhenAnswered} to finish.
    """

    context: ServerContext
    transport: Any
    framing: str = "?"
    # Provided by the receiver this is mixed into (declared, not defined here).
    pauseProducing: Callable[[], None]
    resumeProducing: Callable[[], None]

    _slots: deque[_Slot]
    _closing = False
    _lost = False
    _pausedForLoad = False

    def _initAnswers(self) -> None:
        if not hasattr(self, "_slots"):
            self._slots = deque()

    def startRequest(
        self, work: Deferred[T], encode: Callable[[T], bytes], fallback: bytes
    ) -> None:
        """
        Queue the answer to one request.

        @param work: fires with the result of the request.
        @param encode: turns the result into the bytes to send.
        @param fallback: what to send if the work fails or misses the deadline.
        """
        self._initAnswers()
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
            self._pausedForLoad = True
            self.pauseProducing()

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
        if f.check(CancelledError, TimeoutError):
            if not self._lost:
                log.warn(
                    "{framing} request got no answer within {deadline} s",
                    framing=self.framing,
                    deadline=self.context.deadline,
                )
        else:
            log.failure("{framing} request failed", f, framing=self.framing)
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
        self._initAnswers()
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
        self._initAnswers()
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
        elif self._pausedForLoad and len(slots) < self.context.maxInFlight:
            self._pausedForLoad = False
            # Resume on a later turn: resuming parses buffered input, and this may
            # run inside the receiver's own parsing loop.
            self.context.clock.callLater(0, self._resumeReading)

    def _resumeReading(self) -> None:
        if not (self._lost or self._closing or self._pausedForLoad):
            self.resumeProducing()

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
        self._initAnswers()
        self._lost = True
        pending = [s.deferred for s in self._slots if s.deferred is not None]
        self._slots.clear()
        for d in pending:
            d.cancel()


class RequestTimer(Generic[T]):
    """
    Logs one line per request when its result is known: framing, operation,
    user@domain, result and latency.  Never the password.
    """

    # One per request, alive as long as the request: no instance dict.
    __slots__ = ("framing", "operation", "user", "domain", "started")

    def __init__(
        self, framing: str, operation: str, user: str, domain: str
    ) -> None:
        self.framing = framing
        self.operation = operation
        self.user = printable(user)
        self.domain = printable(domain)
        self.started = time.monotonic()

    def __call__(self, result: T) -> T:
        log.info(
            "{operation} {result} for {user}@{domain} via {framing} in {ms} ms",
            operation=self.operation,
            result=_describeResult(result),
            user=self.user,
            domain=self.domain,
            framing=self.framing,
            ms=round((time.monotonic() - self.started) * 1000, 1),
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


def printable(text: str) -> str:
    """
    C{text} safe for a log line: control characters (a newline in a user name
    could forge a log line) are escaped, and it is cut at 200 characters.
    """
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:200]
