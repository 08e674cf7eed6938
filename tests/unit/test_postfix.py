"""
Tests for the Postfix tcp_table framing over L{StringTransport}: the
PROTOCOLS.md example, %XX decoding, keys that cannot be users, the 400 of an
unavailable or slow backend, bad input, chunking and ordering.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import (
    ManualAuthenticator,
    ProtocolTestMixin,
    TableAuthenticator,
    connect,
)
from xcauth.framing.postfix import (
    FOUND,
    NOT_FOUND,
    TEMPFAIL,
    TOO_LONG,
    UNSUPPORTED,
    Answered,
    Lookup,
    PostfixProtocol,
    decodeKey,
    encodeLookupAnswer,
    parseQuery,
)
from xcauth.framing.registry import FRAMINGS, STDIO_FRAMINGS

# Keyed by canonical identity: exämple.org is xn--exmple-cua.org.
USERS = {"alice@example.org": "pa:ss w", "jörg@xn--exmple-cua.org": "pässwörd"}


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, last = [], 0
    for p in points + [len(data)]:
        chunks.append(data[last:p])
        last = p
    return [c for c in chunks if c]


class DecodeTests(SynchronousTestCase):
    def test_protocolExample(self) -> None:
        self.assertEqual(decodeKey(b"j%C3%B6rg@ex%C3%A4mple.org"), "jörg@exämple.org")

    def test_lowercaseHexAndPercent(self) -> None:
        self.assertEqual(decodeKey(b"a%25b%20c%c3%b6"), "a%b cö")

    def test_plain(self) -> None:
        self.assertEqual(decodeKey(b"alice@example.org"), "alice@example.org")

    def test_invalid(self) -> None:
        for key in (b"a%", b"a%4", b"a%zz", b"a%4g", b"%C3", b"\xff@x", b"%FF@x"):
            self.assertIsNone(decodeKey(key), key)


class ParseTests(SynchronousTestCase):
    def test_get(self) -> None:
        self.assertEqual(parseQuery(b"get alice@example.org"),
                         Lookup("alice", "example.org"))
        self.assertEqual(parseQuery(b"get j%C3%B6rg@ex%C3%A4mple.org"),
                         Lookup("jörg", "xn--exmple-cua.org"))

    def test_canonicalIdentity(self) -> None:
        """
        The key is looked up as its canonical identity: case, a trailing dot
        and an IDNA domain in any form name one user; an impossible one is
        500 without a backend call.
        """
        for key in (b"Bob@Other.Example", b"bob@other.example.", b"BOB@OTHER.EXAMPLE."):
            self.assertEqual(parseQuery(b"get " + key), Lookup("bob", "other.example"))
        for key in (b"bob@a:b", b"b%00b@example.org", b"bob@a..b", b"bob@a%0Ab"):
            parsed = parseQuery(b"get " + key)
            self.assertIsInstance(parsed, Answered)
            assert isinstance(parsed, Answered)
            self.assertEqual(parsed.answer, NOT_FOUND)

    def test_splitAtLastAt(self) -> None:
        self.assertEqual(parseQuery(b"get a%40b@example.org"), Lookup("a@b", "example.org"))

    def test_notAnAddress(self) -> None:
        for line in (b"get @example.org", b"get alice", b"get alice@", b"get ",
                     b"get %zz@example.org", b"get %FF@example.org"):
            parsed = parseQuery(line)
            self.assertEqual(getattr(parsed, "answer", None), NOT_FOUND, line)

    def test_notGet(self) -> None:
        for line in (b"", b"put a@b c", b"GET a@b", b"get", b"getalice@example.org",
                     b"\xff\xfe"):
            parsed = parseQuery(line)
            assert isinstance(parsed, Answered), line
            self.assertEqual(parsed.answer, UNSUPPORTED, line)

    def test_answers(self) -> None:
        self.assertEqual(encodeLookupAnswer(True), b"200 OK\n")
        self.assertEqual(encodeLookupAnswer(False), b"500 No such user\n")
        self.assertEqual(encodeLookupAnswer(None)[:4], b"400 ")
        for reply in (FOUND, NOT_FOUND, TEMPFAIL, UNSUPPORTED, TOO_LONG):
            self.assertTrue(reply.endswith(b"\n") and reply.count(b"\n") == 1)
            self.assertLess(len(reply), 4096)

    def test_registered(self) -> None:
        self.assertIs(FRAMINGS["postfix"], PostfixProtocol)
        self.assertIs(STDIO_FRAMINGS["postfix"], PostfixProtocol)


class ProtocolTests(ProtocolTestMixin, SynchronousTestCase):
    protocolClass = PostfixProtocol

    def test_protocolExample(self) -> None:
        self.send(b"get j%C3%B6rg@ex%C3%A4mple.org\n")
        [(op, args, d)] = self.auth.calls
        self.assertEqual((op, args), ("isuser", ("jörg", "xn--exmple-cua.org")))
        self.assertEqual(self.transport.value(), b"")
        d.callback(True)
        self.assertEqual(self.answers(), b"200 OK\n")
        self.assertFalse(self.transport.disconnecting)

    def test_missingAndUnavailable(self) -> None:
        self.send(b"get bob@example.org\nget carol@example.org\n")
        self.auth.calls[0][2].callback(False)
        self.auth.calls[1][2].callback(None)
        self.assertEqual(self.answers(), NOT_FOUND + TEMPFAIL)

    def test_notAddressesNoBackendCall(self) -> None:
        """
        C{@domain} and other keys that cannot be a user get 500 at once,
        without a backend call.
        """
        self.send(b"get @example.org\nget example.org\n")
        self.assertEqual(self.answers(), NOT_FOUND * 2)
        self.assertEqual(self.auth.calls, [])

    def test_otherRequestsKeepConnection(self) -> None:
        self.send(b"put a@b.c x\n\nhello\r\nget alice@example.org\r\n")
        self.assertEqual(self.answers(), UNSUPPORTED * 3)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org"))
        self.assertEqual(self.answers(), FOUND)
        self.assertFalse(self.transport.disconnecting)

    def test_everyTrailingCarriageReturnStripped(self) -> None:
        """
        C{\\r\\r\\n}: every trailing CR of a line goes, not only the last one,
        so the key is the address and not an address with a CR.
        """
        self.send(b"get alice@example.org\r\r\n")
        self.assertEqual(self.answers(), b"")
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org"))

    def test_invalidUtf8(self) -> None:
        self.send(b"get \xff\xfe@example.org\nget %C3%28@example.org\n")
        self.assertEqual(self.answers(), NOT_FOUND * 2)
        self.assertEqual(self.auth.calls, [])

    def test_answersInRequestOrder(self) -> None:
        self.send(b"get a@x.org\nget @x.org\nget b@x.org\n")
        self.assertEqual(self.transport.value(), b"")
        self.auth.calls[1][2].callback(True)
        self.assertEqual(self.transport.value(), b"")
        self.auth.calls[0][2].callback(False)
        self.assertEqual(self.answers(), NOT_FOUND + NOT_FOUND + FOUND)

    def test_deadlineGives400(self) -> None:
        """
        A backend that misses the deadline gives 400 (mail deferred, not
        bounced), and its work is cancelled.
        """
        self.send(b"get alice@example.org\n")
        self.clock.advance(3.9)
        self.assertEqual(self.transport.value(), b"")
        with capturedLogs():
            self.clock.advance(0.2)
        self.assertEqual(self.answers(), TEMPFAIL)
        self.assertEqual(self.auth.cancelled, [("alice", "example.org")])
        self.assertFalse(self.transport.disconnecting)

    def test_backendErrorGives400(self) -> None:
        self.send(b"get alice@example.org\n")
        with capturedLogs():
            self.auth.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(self.answers(), TEMPFAIL)
        self.flushLoggedErrors(RuntimeError)

    def test_longLineThenUsable(self) -> None:
        """
        A line over the limit gets one 500 and is skipped to its end, in one
        read or many; the next request works.
        """
        with capturedLogs():
            self.send(b"get " + b"a" * 5000 + b"@x.org\nget b@x.org\n")
            self.assertEqual(self.answers(), TOO_LONG)
            self.assertEqual(len(self.auth.calls), 1)
            self.assertEqual(self.auth.calls[0][1], ("b", "x.org"))
            self.auth.calls[0][2].callback(True)
            self.assertEqual(self.answers(), FOUND)
            for _ in range(5):
                self.send(b"x" * 3000)
            self.send(b"yyy\nget c@x.org\n")
        self.assertEqual(self.answers(), TOO_LONG)
        self.assertEqual(self.auth.calls[1][1], ("c", "x.org"))

    def test_eofAnswersThenCloses(self) -> None:
        self.send(b"get alice@example.org\nget bob@exa")
        self.protocol.readConnectionLost()
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), FOUND)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.auth.calls), 1)

    def test_disconnectCancels(self) -> None:
        self.send(b"get alice@example.org\n")
        self.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.auth.cancelled, [("alice", "example.org")])

    def test_hoursIdle(self) -> None:
        """
        Nothing closes an idle connection: Postfix keeps it for hours.
        """
        self.clock.advance(6 * 3600)
        self.send(b"get alice@example.org\n")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), FOUND)
        self.assertFalse(self.transport.disconnecting)

    def test_logLine(self) -> None:
        with capturedLogs() as events:
            self.send(b"get j%C3%B6rg@example.org\n")
            self.auth.calls[0][2].callback(False)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("isuser false for jörg@example.org via postfix", text)


class PropertyTests(SynchronousTestCase):
    @given(st.lists(st.sampled_from([
        b"get alice@example.org\n", b"get j%C3%B6rg@ex%C3%A4mple.org\n",
        b"get bob@example.org\n", b"get @example.org\n", b"get x@down.example\n",
        b"put x\n", b"get %zz@a.b\r\n", b"\n"]), max_size=12),
        st.lists(st.integers(0, 400), max_size=10))
    def test_anyChunking(self, lines: list[bytes], cuts: list[int]) -> None:
        """
        However the requests are cut into reads, the answers are the same, in
        order.
        """
        expected = {
            b"get alice@example.org\n": FOUND,
            b"get j%C3%B6rg@ex%C3%A4mple.org\n": FOUND,
            b"get bob@example.org\n": NOT_FOUND,
            b"get @example.org\n": NOT_FOUND,
            b"get x@down.example\n": TEMPFAIL,
            b"put x\n": UNSUPPORTED,
            b"get %zz@a.b\r\n": NOT_FOUND,
            b"\n": UNSUPPORTED,
        }
        auth = TableAuthenticator(USERS)
        protocol, transport, _ = connect(PostfixProtocol, auth)
        with capturedLogs():
            for chunk in chunked(b"".join(lines), cuts):
                protocol.dataReceived(chunk)
        self.assertEqual(transport.value(), b"".join(expected[line] for line in lines))

    @given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
    def test_anyBytesNeverCrash(self, data: bytes, cuts: list[int]) -> None:
        """
        Any bytes give only well-formed lines of at most one per request line.
        """
        auth = TableAuthenticator(USERS)
        protocol, transport, _ = connect(PostfixProtocol, auth)
        with capturedLogs():
            for chunk in chunked(data, cuts):
                protocol.dataReceived(chunk)
            protocol.readConnectionLost()
        out: bytes = transport.value()
        replies = out.split(b"\n")[:-1]
        self.assertLessEqual(len(replies), data.count(b"\n") + 1)
        for reply in replies:
            self.assertIn(reply + b"\n", (FOUND, NOT_FOUND, TEMPFAIL, UNSUPPORTED, TOO_LONG))

    def test_manyInFlightBounded(self) -> None:
        """
        Past the in-flight bound the connection stops reading, and resumes as
        answers leave, keeping the order.
        """
        auth = ManualAuthenticator()
        protocol, transport, clock = connect(PostfixProtocol, auth, maxInFlight=2)
        protocol.dataReceived(b"".join(b"get u%d@x.org\n" % n for n in range(5)))
        self.assertEqual(len(auth.calls), 2)
        auth.calls[0][2].callback(True)
        clock.advance(0)
        self.assertEqual(len(auth.calls), 3)
        for _, _, d in auth.calls[1:]:
            d.callback(False)
            clock.advance(0)
        for _, _, d in auth.calls[3:]:
            d.callback(True)
            clock.advance(0)
        self.assertEqual(len(auth.calls), 5)
        self.assertEqual(transport.value(), FOUND + NOT_FOUND * 2 + FOUND * 2)
