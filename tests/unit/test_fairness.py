"""
No connection takes more than its share (L{xcauth.framing.flow.FlowControl}):
a bounded number of requests per reactor turn, no reading while answers are
not read, invalid requests counted rather than logged one by one, and a
connection sending many of them closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import ManualAuthenticator, TableAuthenticator, connect
from xcauth.framing.ejabberd import EjabberdProtocol
from xcauth.framing.flow import FlowControl
from xcauth.framing.lines import XMPPLineProtocol
from xcauth.framing.postfix import PostfixProtocol
from xcauth.framing.saslauthd import SaslauthdProtocol

USERS = {"alice@example.org": "pa:ss w"}
PER_TURN = FlowControl.MAX_PER_TURN


def turn(clock: Clock) -> None:
    """
    One reactor turn: run the calls that were due when it began (what the
    reactor does; L{Clock.advance} would also run those they schedule).
    """
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        if call.cancelled or call.called:
            continue
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


class PerTurnTests(SynchronousTestCase):
    def test_floodYieldsToOthers(self) -> None:
        """
        A read holding thousands of requests is worked through a share per
        reactor turn; a request on another connection, arriving after it, is
        answered before the flood is.
        """
        clock = Clock()
        auth = TableAuthenticator(USERS)
        flood, floodTransport, _ = connect(XMPPLineProtocol, auth, clock=clock)
        other, otherTransport, _ = connect(XMPPLineProtocol, auth, clock=clock)
        count = 10 * PER_TURN
        flood.dataReceived(b"isuser:alice:example.org\n" * count)
        self.assertEqual(floodTransport.value(), b"1\n" * PER_TURN)
        self.assertEqual(floodTransport.producerState, "paused")
        other.dataReceived(b"auth:alice:example.org:pa:ss w\n")
        self.assertEqual(otherTransport.value(), b"1\n")
        turns = 0
        while len(floodTransport.value()) < 2 * count:
            turn(clock)
            turns += 1
            self.assertLess(turns, 100)
        self.assertEqual(floodTransport.value(), b"1\n" * count)
        self.assertEqual(turns, 9)
        turn(clock)
        self.assertEqual(floodTransport.producerState, "producing")

    def test_binaryFramingToo(self) -> None:
        clock = Clock()
        flood, transport, _ = connect(EjabberdProtocol, TableAuthenticator(USERS), clock=clock)
        frame = b"isuser:alice:example.org"
        flood.dataReceived((len(frame).to_bytes(2, "big") + frame) * (3 * PER_TURN))
        self.assertEqual(len(transport.value()), 4 * PER_TURN)
        turn(clock)
        self.assertEqual(len(transport.value()), 4 * 2 * PER_TURN)
        turn(clock)
        self.assertEqual(len(transport.value()), 4 * 3 * PER_TURN)

    def test_postfixToo(self) -> None:
        clock = Clock()
        flood, transport, _ = connect(PostfixProtocol, TableAuthenticator(USERS), clock=clock)
        flood.dataReceived(b"get alice@example.org\n" * (2 * PER_TURN))
        self.assertEqual(transport.value(), b"200 OK\n" * PER_TURN)
        clock.advance(0)
        self.assertEqual(transport.value(), b"200 OK\n" * (2 * PER_TURN))

    def test_heldForLoadStaysHeld(self) -> None:
        """
        The end of a turn does not resume a connection held for its requests
        in flight.
        """
        clock = Clock()
        auth = ManualAuthenticator()
        protocol, transport, _ = connect(XMPPLineProtocol, auth, clock=clock, maxInFlight=4)
        protocol.dataReceived(b"isuser:a:b\n" * 40)
        self.assertEqual(len(auth.calls), 4)
        clock.advance(0)
        self.assertEqual(len(auth.calls), 4)
        self.assertEqual(transport.producerState, "paused")
        for _, _, d in auth.calls[:4]:
            d.callback(True)
        clock.advance(0)
        self.assertEqual(len(auth.calls), 8)


class UnsentAnswersTests(SynchronousTestCase):
    def test_notReadWhileAnswersAreNotRead(self) -> None:
        """
        When the transport says its buffer of unsent answers is full, the
        connection parses nothing more until the answers have left.
        """
        clock = Clock()
        auth = ManualAuthenticator()
        protocol, transport, _ = connect(XMPPLineProtocol, auth, clock=clock)
        producer = transport.producer
        self.assertIsNotNone(producer)
        self.assertTrue(transport.streaming)
        producer.pauseProducing()  # what a full write buffer does
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"isuser:a:b\n" * 3)
        self.assertEqual(auth.calls, [])
        producer.resumeProducing()
        clock.advance(0)
        self.assertEqual(len(auth.calls), 3)
        self.assertEqual(transport.producerState, "producing")

    def test_saslauthdRegistersToo(self) -> None:
        protocol, transport, _ = connect(SaslauthdProtocol, TableAuthenticator(USERS))
        self.assertIsNotNone(transport.producer)


class InvalidRequestTests(SynchronousTestCase):
    def flood(self, protocolClass: Any, request: bytes, count: int) -> tuple[Any, Any, list[Any]]:
        clock = Clock()
        protocol, transport, _ = connect(protocolClass, TableAuthenticator(USERS), clock=clock)
        with capturedLogs() as events:
            for _ in range(count):
                protocol.dataReceived(request)
                clock.advance(0)
        return protocol, transport, list(events)

    def test_countedNotLoggedEach(self) -> None:
        """
        500 invalid requests make one log line, all answered false.
        """
        protocol, transport, events = self.flood(XMPPLineProtocol, b"\n", 500)
        self.assertEqual(transport.value(), b"0\n" * 500)
        infos = [e for e in events if e["log_level"] >= LogLevel.info]
        self.assertEqual(len(infos), 1)
        self.assertEqual(infos[0]["count"], 1)

    def test_oneLinePerIntervalForAll(self) -> None:
        """
        Invalid requests of every connection (a flood that reconnects) make
        one summary line a minute, not one per connection.
        """
        from xcauth.framing.base import InvalidRequestLog, ServerContext, XcauthFactory

        clock = Clock()
        context = ServerContext(authenticator=TableAuthenticator(USERS), clock=clock)
        factory = XcauthFactory(XMPPLineProtocol, context)
        with capturedLogs() as events:
            for _ in range(50):
                p = factory.buildProtocol(None)
                p.makeConnection(StringTransport())
                p.dataReceived(b"\n\nbogus\n")
                p.connectionLost(None)
            clock.advance(InvalidRequestLog.INTERVAL)
        self.assertEqual([e["count"] for e in events], [1, 149])
        self.assertIn("unknown operation", events[1]["reason"])

    def test_floodClosed(self) -> None:
        """
        Past L{FlowControl.MAX_INVALID} invalid requests the connection is
        answered and closed, with one warning.
        """
        limit = FlowControl.MAX_INVALID
        protocol, transport, events = self.flood(
            EjabberdProtocol, b"\x00\x01x", limit + 10
        )
        self.assertEqual(transport.value(), b"\x00\x02\x00\x00" * limit)
        self.assertTrue(transport.disconnecting)
        with capturedLogs() as later:
            protocol.context.noteInvalid("ejabberd", "x")  # counted in the next line
            protocol.context._invalid.flush()
        warnings = [e for e in list(events) + list(later) if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["count"] for e in warnings], [1])

    def test_postfixDomainLookupsAreValid(self) -> None:
        """
        Postfix's C{@domain} lookups are ordinary requests: never counted
        against the connection.
        """
        limit = FlowControl.MAX_INVALID
        protocol, transport, events = self.flood(
            PostfixProtocol, b"get @example.org\n", limit + 10
        )
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"500 No such user\n" * (limit + 10))
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])


class ConnectionLimitTests(SynchronousTestCase):
    def test_limit(self) -> None:
        """
        Past C{maxConnections} open connections a listener closes new ones
        at once (one warning a minute); once one closes, it accepts again.
        """
        from xcauth.framing.base import ServerContext, XcauthFactory

        clock = Clock()
        context = ServerContext(authenticator=TableAuthenticator(USERS), clock=clock)
        factory = XcauthFactory(XMPPLineProtocol, context, maxConnections=2)
        connections = []
        with capturedLogs() as events:
            for _ in range(2):
                p = factory.buildProtocol(None)
                t = StringTransport()
                p.makeConnection(t)
                connections.append((p, t))
            self.assertIsNone(factory.buildProtocol(None))
            self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 1)
        connections[0][1].disconnected = True
        self.assertIsNotNone(factory.buildProtocol(None))

    def test_automaticLimit(self) -> None:
        """
        With C{max-connections=auto} the listeners share what the descriptor
        limit leaves after the backend's requests and a reserve.
        """
        from xcauth.daemon.listen import (
            RESERVED_DESCRIPTORS,
            backendRequestLimit,
            connectionLimit,
        )

        self.assertEqual(connectionLimit(100, 3, 1024), 100)
        self.assertEqual(backendRequestLimit(1024), 256)
        self.assertEqual(connectionLimit(None, 2, 1024), (1024 - 256 - RESERVED_DESCRIPTORS) // 2)
        self.assertEqual(backendRequestLimit(65536), 512)
        self.assertGreater(connectionLimit(None, 12, 65536), 5000)
