"""
Flow control for one connection, held by every framing's protocol.

L{FlowControl} decides when the connection is read and when its answers
leave: answers to pipelined requests leave in request order however the work
completes (or, for a framing whose answers name their request, as the work
completes), at most C{context.maxInFlight} requests are worked on at once,
each is answered within C{context.deadline} (with a fallback answer past it),
pending work is cancelled when the connection is lost, and a connection can
be closed once it is answered.  No connection takes more than its share: at
most L{FlowControl.MAX_PER_TURN} requests are parsed from it per reactor
turn, it is not read while its answers are not read (it is the transport's
producer), and one that sends L{FlowControl.MAX_INVALID} invalid requests is
closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.framing.base import ServerContext

log = Logger()

T = TypeVar("T")


class Reader(Protocol):
    """
    What L{FlowControl} pauses and resumes: the protocol's parsing of what it
    receives (Twisted's L{LineReceiver} and L{IntNStringReceiver} stop their
    parsing loops while paused, and pause their transport).
    """

    def pauseProducing(self) -> None:
        """
        Parse nothing more and stop reading from the transport.
        """

    def resumeProducing(self) -> None:
        """
        Read and parse again, starting with what is buffered.
        """


class _Slot:
    __slots__ = ("answer", "done", "deferred")

    def __init__(self) -> None:
        self.answer: bytes | None = None
        self.done = False
        self.deferred: Deferred[Any] | None = None


@implementer(IPushProducer)
class FlowControl:
    """
    The flow of one connection: its reading, its requests in flight and its
    answers.

    Registered with the transport as its producer (L{connect}): when answers
    pile up unsent (the client does not read them), the transport pauses it
    and the connection reads no more requests until they have left.

    The protocol holding it calls L{connect} when connected, L{newTurn} for
    every read, L{startRequest} or L{startAnswered} for every request in an
    ordered framing (L{track} and L{count} in a framing whose answers name
    their request), and L{cancelPending} when the connection is lost.

    @ivar context: the server context (limits, clock, metrics).
    @ivar framing: the framing's name, for log lines and metrics.
    @ivar transport: the connection's transport, once connected.
    """

    #: Requests parsed from one connection in one reactor turn; the rest of
    #: what it sent waits for the next turn, after the other connections.
    MAX_PER_TURN = 32
    #: Invalid requests after which a connection is closed (no real client
    #: sends any: a connection sending this many is broken or hostile).
    MAX_INVALID = 1000

    transport: Any = None

    def __init__(self, context: ServerContext, framing: str, reader: Reader) -> None:
        self.context = context
        self.framing = framing
        self._reader = reader
        # Answers in request order (ordered framings).
        self._slots: deque[_Slot] = deque()
        # Work whose answer the framing writes itself (L{track}).
        self._tracked: set[Deferred[Any]] = set()
        # Why the connection is not read now ("load", "turn", "unsent").
        self._holds: set[str] = set()
        self._closing = False
        self._lost = False
        self._turnRequests = 0
        self._resuming = False
        self._invalid = 0

    @property
    def closing(self) -> bool:
        """
        Whether the connection reads nothing more (it is being closed).
        """
        return self._closing

    @property
    def lost(self) -> bool:
        """
        Whether the connection is gone (its pending work cancelled).
        """
        return self._lost

    @property
    def stopped(self) -> bool:
        """
        Whether the connection is closing or gone: nothing more is read.
        """
        return self._closing or self._lost

    def inFlight(self) -> int:
        """
        The requests holding a place now: worked on, or answered and waiting
        for an earlier answer to leave.
        """
        return len(self._slots) + len(self._tracked)

    def connect(self, transport: Any) -> None:
        """
        The connection is made: register as C{transport}'s producer.
        """
        self.transport = transport
        transport.registerProducer(self, True)

    # -- IPushProducer: the transport's buffer of unsent answers -------------
    def pauseProducing(self) -> None:
        """
        The answers are not read: read no more requests.
        """
        self._hold("unsent")

    def resumeProducing(self) -> None:
        """
        The answers have left: read again (on a later turn).
        """
        self._release("unsent")

    def stopProducing(self) -> None:
        """
        The transport is gone; L{cancelPending} does what is to be done.
        """

    # -- reading ---------------------------------------------------------------
    def newTurn(self) -> None:
        """
        One read from the connection: a new reactor turn.
        """
        self._turnRequests = 0

    def count(self) -> None:
        """
        One request parsed in this turn; at L{MAX_PER_TURN} the rest waits
        for the next turn.
        """
        self._turnRequests += 1
        if self._turnRequests >= self.MAX_PER_TURN and "turn" not in self._holds:
            self._hold("turn")
            self._release("turn")

    def _hold(self, reason: str) -> None:
        if not self._holds and not self._closing:
            self._reader.pauseProducing()
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
            self._reader.resumeProducing()

    def _loadEased(self) -> None:
        if (
            "load" in self._holds
            and not (self._closing or self._lost)
            and self.inFlight() < self.context.maxInFlight
        ):
            self._release("load")

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

    # -- work ------------------------------------------------------------------
    def _watch(self, work: Deferred[Any]) -> None:
        if not work.called or work.paused:
            # Work answered at once (a token) needs no deadline timer.
            self.context.watchDeadline(work)

    def _bound(self) -> None:
        if self.inFlight() >= self.context.maxInFlight:
            self._hold("load")

    def noteFailure(self, f: Failure) -> None:
        """
        Count and log why a request gets its fallback answer: the deadline
        (not counted once the connection is lost), or an error.
        """
        timedOut = f.check(CancelledError, TimeoutError)
        if not self._lost and timedOut:
            self.context.metrics.deadlineMissed(self.framing)  # metrics
        if not (self._lost and timedOut):
            logRequestFailure(f, self.framing, self.context.deadline)

    def track(self, work: Deferred[T]) -> Deferred[T]:
        """
        Work whose answer the framing writes itself, when it completes (the
        answers name their request): it holds a place among the requests in
        flight until it fires, gets the deadline, and is cancelled with
        L{cancelPending}.  Callbacks added to the result see the deadline as
        a L{TimeoutError} (or a L{CancelledError}).

        @return: C{work}
        """
        self._tracked.add(work)
        self._watch(work)
        work.addBoth(self._untrack, work)
        if work in self._tracked:
            self._bound()
        return work

    def _untrack(self, result: T, work: Deferred[Any]) -> T:
        self._tracked.discard(work)
        self._loadEased()
        return result

    def startRequest(
        self, work: Deferred[T], encode: Callable[[T], bytes], fallback: bytes
    ) -> None:
        """
        Queue the answer to one request: it leaves after the answers to the
        requests before it.

        @param work: fires with the result of the request.
        @param encode: turns the result into the bytes to send.
        @param fallback: what to send if the work fails or misses the deadline.
        """
        self.count()
        slot = _Slot()
        self._slots.append(slot)
        slot.deferred = work
        self._watch(work)
        # One callback pair with arguments instead of three closures: at
        # hundreds of requests in flight, every object that lives as long as
        # a request makes the garbage collector's work grow.
        work.addCallbacks(
            self._requestDone,
            self._requestFailed,
            callbackArgs=(slot, encode, fallback),
            errbackArgs=(slot, fallback),
        )
        if not slot.done:
            self._bound()

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
        self.noteFailure(f)
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
        self.count()
        if not self._slots:
            self.transport.write(answer)
            return
        slot = _Slot()
        slot.answer = answer
        slot.done = True
        self._slots.append(slot)

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
        else:
            self._loadEased()

    # -- the end ---------------------------------------------------------------
    def stopReading(self) -> None:
        """
        Read nothing more (the connection is being closed).
        """
        self._closing = True
        self._reader.pauseProducing()

    def closeWhenAnswered(self) -> None:
        """
        Read nothing more; close the connection once every queued answer has
        left.
        """
        self.stopReading()
        self._flush()

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
        pending += self._tracked
        self._slots.clear()
        self._tracked.clear()
        for d in pending:
            d.cancel()


@implementer(IHalfCloseableProtocol)
class FlowEvents:
    """
    The connection events of a protocol that holds a L{FlowControl} as
    C{flow}, passed on to it: a client closing its side is answered, then
    the connection closes; one that reads no more is given up; a lost
    connection cancels its pending work.
    """

    flow: FlowControl
    transport: Any

    def connectionMade(self) -> None:
        self.flow.connect(self.transport)

    def closeWhenAnswered(self) -> None:
        """
        Read nothing more; close the connection once every answer has left.
        """
        self.flow.closeWhenAnswered()

    def readConnectionLost(self) -> None:
        """
        The client closed its side (EOF after its last request): answer what it
        asked, then close.  A request cut short by the EOF gets no answer.
        """
        self.flow.closeWhenAnswered()

    def writeConnectionLost(self) -> None:
        """
        Nobody reads the answers any more: give up.
        """
        self.flow.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        self.flow.cancelPending()


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
