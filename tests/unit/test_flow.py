"""
L{xcauth.framing.flow.FlowControl} on its own: a fake reader and a
L{StringTransport} stand for the protocol and the connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl
from xcauth.interfaces import NoMetrics


class Reader:
    """
    Stands for the protocol's parsing: records whether it is paused.
    """

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1


class Metrics(NoMetrics):
    def __init__(self) -> None:
        self.missed: list[str] = []

    def deadlineMissed(self, framing: str) -> None:
        self.missed.append(framing)


def encode(result: Any) -> bytes:
    return b"%s\n" % str(result).encode()


class FlowControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.context = ServerContext(
            authenticator=None,  # type: ignore[arg-type]
            clock=self.clock,
            deadline=4.0,
            maxInFlight=3,
            metrics=self.metrics,
        )
        self.reader = Reader()
        self.flow = FlowControl(self.context, "test", self.reader)
        self.transport = StringTransport()
        self.flow.connect(self.transport)

    def request(self, fallback: bytes = b"fallback\n") -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.flow.startRequest(d, encode, fallback)
        return d

    def test_producer(self) -> None:
        """
        The component is the transport's streaming producer.
        """
        self.assertTrue(verifyObject(IPushProducer, self.flow))
        self.assertIs(self.transport.producer, self.flow)
        self.assertTrue(self.transport.streaming)

    def test_orderWithOutOfOrderCompletion(self) -> None:
        """
        Answers leave in request order, each as soon as those before it have.
        """
        first, second, third = self.request(), self.request(), self.request()
        third.callback(3)
        second.callback(2)
        self.assertEqual(self.transport.value(), b"")
        first.callback(1)
        self.assertEqual(self.transport.value(), b"1\n2\n3\n")

    def test_knownAnswerWaitsItsTurn(self) -> None:
        """
        An answer known at once leaves after the answers before it; with none
        pending it leaves at once.
        """
        self.flow.startAnswered(b"a\n")
        self.assertEqual(self.transport.value(), b"a\n")
        d = self.request()
        self.flow.startAnswered(b"b\n")
        self.assertEqual(self.transport.value(), b"a\n")
        d.callback(1)
        self.assertEqual(self.transport.value(), b"a\n1\nb\n")

    def test_inFlightBound(self) -> None:
        """
        At C{maxInFlight} requests the reader is paused; it resumes on a
        later turn once answers have left.
        """
        pending = [self.request(), self.request()]
        self.assertFalse(self.reader.paused)
        pending.append(self.request())
        self.assertTrue(self.reader.paused)
        self.assertEqual(self.flow.inFlight(), 3)
        # Done but behind the first: still holding its place.
        pending[2].callback(3)
        self.clock.advance(0)
        self.assertTrue(self.reader.paused)
        pending[0].callback(1)
        self.assertTrue(self.reader.paused)  # resumed on a later turn only
        self.clock.advance(0)
        self.assertFalse(self.reader.paused)
        self.assertEqual(self.transport.value(), b"1\n")

    def test_trackedBound(self) -> None:
        """
        Tracked work (answers that name their request) holds a place until it
        fires, whatever the order.
        """
        works: list[Deferred[Any]] = [Deferred() for _ in range(3)]
        for d in works:
            self.assertIs(self.flow.track(d), d)
        self.assertTrue(self.reader.paused)
        works[1].callback(True)
        self.assertEqual(self.flow.inFlight(), 2)
        self.clock.advance(0)
        self.assertFalse(self.reader.paused)
        self.flow.track(succeed(True))
        self.assertEqual(self.flow.inFlight(), 2)
        self.assertFalse(self.reader.paused)

    def test_fairnessPerTurn(self) -> None:
        """
        At L{FlowControl.MAX_PER_TURN} requests in one turn the reader is
        paused and resumed on the next turn; a new read starts the count
        again.
        """
        for _ in range(FlowControl.MAX_PER_TURN - 1):
            self.flow.count()
        self.assertFalse(self.reader.paused)
        self.flow.newTurn()
        for _ in range(FlowControl.MAX_PER_TURN - 1):
            self.flow.count()
        self.assertFalse(self.reader.paused)
        self.flow.count()
        self.assertTrue(self.reader.paused)
        self.clock.advance(0)
        self.assertFalse(self.reader.paused)
        self.assertEqual(self.reader.resumes, 1)
        # The resumed turn has its full share again.
        for _ in range(FlowControl.MAX_PER_TURN - 1):
            self.flow.count()
        self.assertFalse(self.reader.paused)

    def test_requestsCountTowardsTheTurn(self) -> None:
        for _ in range(FlowControl.MAX_PER_TURN):
            self.flow.startAnswered(b"x")
        self.assertTrue(self.reader.paused)

    def test_pausedByTransport(self) -> None:
        """
        The transport pausing its producer (answers not read) pauses the
        reader; resuming it resumes the reader on a later turn, unless
        another reason still holds it.
        """
        self.transport.producer.pauseProducing()
        self.assertTrue(self.reader.paused)
        for _ in range(3):
            self.request()
        self.transport.producer.resumeProducing()
        self.clock.advance(0)
        self.assertTrue(self.reader.paused)  # still held by the in-flight bound
        self.transport.producer.pauseProducing()
        self.flow.cancelPending()
        self.clock.advance(0)
        self.assertTrue(self.reader.paused)

    def test_pauseResume(self) -> None:
        self.flow.pauseProducing()
        self.assertTrue(self.reader.paused)
        self.flow.resumeProducing()
        self.assertTrue(self.reader.paused)
        self.clock.advance(0)
        self.assertFalse(self.reader.paused)

    def test_deadlineFallback(self) -> None:
        """
        Work that misses the deadline is cancelled and answered with the
        fallback, counted in the metrics.
        """
        cancelled: list[object] = []
        d: Deferred[Any] = Deferred(cancelled.append)
        self.flow.startRequest(d, encode, b"late\n")
        self.clock.advance(4)
        self.assertEqual(self.transport.value(), b"late\n")
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.metrics.missed, ["test"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_failureFallback(self) -> None:
        d = self.request()
        d.errback(RuntimeError("boom"))
        self.assertEqual(self.transport.value(), b"fallback\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.metrics.missed, [])

    def test_cancelOnConnectionLost(self) -> None:
        """
        Losing the connection cancels every pending request, tracked work
        too; nothing is written, no deadline counted, no timer left.
        """
        cancelled: list[object] = []
        ordered: Deferred[Any] = Deferred(cancelled.append)
        tracked: Deferred[Any] = Deferred(cancelled.append)
        self.flow.startRequest(ordered, encode, b"fallback\n")
        self.flow.track(tracked).addErrback(lambda f: None)
        self.flow.cancelPending()
        self.assertEqual(cancelled, [ordered, tracked])
        self.assertTrue(self.flow.lost)
        self.assertEqual(self.flow.inFlight(), 0)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.metrics.missed, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeWhenAnswered(self) -> None:
        """
        Closing waits for the queued answers, reading nothing more.
        """
        d = self.request()
        self.flow.closeWhenAnswered()
        self.assertTrue(self.reader.paused)
        self.assertTrue(self.flow.closing)
        self.assertFalse(self.transport.disconnecting)
        d.callback(1)
        self.assertEqual(self.transport.value(), b"1\n")
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(0)
        self.assertTrue(self.reader.paused)

    def test_writeConnectionLost(self) -> None:
        cancelled: list[object] = []
        self.flow.startRequest(Deferred(cancelled.append), encode, b"x")
        self.flow.writeConnectionLost()
        self.assertEqual(len(cancelled), 1)
        self.assertTrue(self.transport.disconnecting)

    def test_invalidFlood(self) -> None:
        """
        At L{FlowControl.MAX_INVALID} invalid requests the connection is
        closed once answered.
        """
        for _ in range(FlowControl.MAX_INVALID - 1):
            self.flow.noteInvalid("bad")
        self.assertFalse(self.flow.closing)
        self.flow.noteInvalid("bad")
        self.assertTrue(self.flow.closing)
        self.assertTrue(self.transport.disconnecting)
