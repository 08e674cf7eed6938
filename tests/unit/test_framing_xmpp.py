"""
Tests for the XMPP framings (prosody/generic, ejabberd binary, ejabberd-line and
the auto-detecting ejabberd listener) over L{StringTransport}.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import ManualAuthenticator, TableAuthenticator, connect
from xcauth.framing.ejabberd import EjabberdAutoProtocol, EjabberdProtocol
from xcauth.framing.lines import EjabberdLineProtocol, XMPPLineProtocol
from xcauth.framing.xmpp import Close, Invalid, Request, parseRequest

TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"


def wholeAnswers(data: bytes) -> bool:
    """
    Whether C{data} is nothing but whole answers: ejabberd's 4-byte frames, or
    lines C{0}, C{1} or a roster (JSON) of the line framings.
    """
    if len(data) % 4 == 0 and all(data[i:i + 4] in (TRUE, FALSE)
                                   for i in range(0, len(data), 4)):
        return True
    if not data.endswith(b"\n"):
        return False
    return all(line in (b"0", b"1") or line[:1] in (b"{", b"[")
               for line in data[:-1].split(b"\n"))
USERS = {"alice@example.org": "pa:ss w", "admin@example.org": "good_password",
         "jörg@example.org": "pässwörd"}


def frame(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


class ParseTests(SynchronousTestCase):
    def test_passwordKeepsColons(self) -> None:
        self.assertEqual(
            parseRequest(b"auth:alice:example.org:pa:ss:w"),
            Request("auth", "alice", "example.org", "pa:ss:w"),
        )

    def test_emptyPasswordAllowed(self) -> None:
        self.assertEqual(parseRequest(b"auth:a:b:"), Request("auth", "a", "b", ""))

    def test_isuser(self) -> None:
        self.assertEqual(parseRequest(b"isuser:alice:example.org"),
                         Request("isuser", "alice", "example.org"))

    def test_close(self) -> None:
        for text in (b"quit", b"exit", b"quit:x"):
            self.assertIsInstance(parseRequest(text), Close)

    def test_invalid(self) -> None:
        for text in (b"", b"\xff\xfe", b"auth:a:b", b"isuser:a:b:c", b"isuser:a",
                     b"setpass:a:b:c", b"tryregister:a:b:c", b"removeuser:a:b",
                     b"removeuser3:a:b:c", b"register:a:b:c", b"frobnicate:a:b",
                     b"auth::b:c", b"isuser:a:", b"AUTH:a:b:c"):
            self.assertIsInstance(parseRequest(text), Invalid, text)

    def test_invalidReasonHasNoPassword(self) -> None:
        result = parseRequest(b"setpass:alice:example.org:hunter2")
        assert isinstance(result, Invalid)
        self.assertNotIn("hunter2", result.reason)


class LineFramingTests(SynchronousTestCase):
    protocolClass: Any = XMPPLineProtocol

    def setUp(self) -> None:
        self.auth = ManualAuthenticator()
        self.protocol, self.transport, self.clock = connect(self.protocolClass, self.auth)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def test_protocolExample(self) -> None:
        self.send(b"auth:alice:example.org:pa:ss\n")
        op, args, d = self.auth.calls[0]
        self.assertEqual((op, args), ("auth", ("alice", "example.org", "pa:ss")))
        self.assertEqual(self.transport.value(), b"")
        d.callback(True)
        self.assertEqual(self.transport.value(), b"1\n")

    def test_crlf(self) -> None:
        self.send(b"isuser:alice:example.org\r\n")
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org"))

    def test_everyTrailingCarriageReturnStripped(self) -> None:
        """
        A scripted telnet session whose lines end in C{\\r\\n} reaches the
        daemon as C{\\r\\r\\n}: every trailing CR goes, as the replaced program
        did, so none stays in the password; a CR inside the line stays.
        """
        self.send(b"auth:alice:example.org:pa:ss\r\r\n")
        self.send(b"isuser:alice:example.org\r\r\r\n")
        self.send(b"auth:alice:example.org:a\rb\r\r\n")
        self.assertEqual(
            [args for _, args, _ in self.auth.calls],
            [("alice", "example.org", "pa:ss"), ("alice", "example.org"),
             ("alice", "example.org", "a\rb")],
        )

    def test_isUserUnavailableIsFalse(self) -> None:
        self.send(b"isuser:alice:example.org\n")
        self.auth.calls[0][2].callback(None)
        self.assertEqual(self.transport.value(), b"0\n")

    def test_pipelinedAnswersInRequestOrder(self) -> None:
        """
        Requests are worked on at once; answers leave in request order even when
        the backend answers in reverse.
        """
        self.send(b"auth:a:d:1\nisuser:b:d\nauth:c:d:3\n")
        self.assertEqual(len(self.auth.calls), 3)
        self.auth.calls[2][2].callback(True)
        self.auth.calls[1][2].callback(False)
        self.assertEqual(self.transport.value(), b"")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), b"1\n0\n1\n")

    def test_invalidAnswersInOrderToo(self) -> None:
        self.send(b"auth:a:d:1\nbogus\n")
        self.assertEqual(self.transport.value(), b"")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), b"1\n0\n")

    def test_badInputAnswersFalseAndStaysUsable(self) -> None:
        self.send(b"\xff\xfe:x:y\n\nsetpass:a:b:c\nfoo:bar\nauth:a:b\n")
        self.assertEqual(self.transport.value(), b"0\n" * 5)
        self.assertEqual(self.auth.calls, [])
        self.send(b"isuser:alice:example.org\n")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), b"0\n" * 5 + b"1\n")
        self.assertFalse(self.transport.disconnecting)

    def test_quitClosesWithoutAnswer(self) -> None:
        self.send(b"quit\n")
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_exitAfterPendingAnswersThem(self) -> None:
        """
        C{exit} after a pending request: the answer is sent, then the
        connection closes; requests after C{exit} are ignored.
        """
        self.send(b"isuser:a:b\nexit\nisuser:c:d\n")
        self.assertEqual(len(self.auth.calls), 1)
        self.assertFalse(self.transport.disconnecting)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), b"1\n")
        self.assertTrue(self.transport.disconnecting)

    def test_deadline(self) -> None:
        """
        A backend that hangs gets the request answered false at the deadline,
        and the backend work is cancelled.
        """
        self.send(b"auth:alice:example.org:pw\n")
        self.clock.advance(3.9)
        self.assertEqual(self.transport.value(), b"")
        with capturedLogs() as events:
            self.clock.advance(0.2)
        self.assertEqual(self.transport.value(), b"0\n")
        self.assertEqual(self.auth.cancelled, [("alice", "example.org", "pw")])
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))

    def test_disconnectCancelsPending(self) -> None:
        self.send(b"auth:alice:example.org:pw\nisuser:bob:example.org\n")
        self.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(len(self.auth.cancelled), 2)
        self.assertEqual(self.transport.value(), b"")

    def test_backendErrorAnswersFalse(self) -> None:
        self.send(b"auth:alice:example.org:pw\n")
        with capturedLogs() as events:
            self.auth.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(self.transport.value(), b"0\n")
        self.assertTrue(any("log_failure" in e for e in events))
        self.flushLoggedErrors(RuntimeError)

    def test_boundedInFlight(self) -> None:
        """
        Past C{maxInFlight} pending requests the connection stops reading; it
        resumes once answers have left.
        """
        self.protocol, self.transport, self.clock = connect(
            self.protocolClass, self.auth, maxInFlight=2
        )
        self.send(b"isuser:a:d\nisuser:b:d\nisuser:c:d\n")
        self.assertEqual(len(self.auth.calls), 2)
        self.assertEqual(self.transport.producerState, "paused")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(len(self.auth.calls), 2)
        self.clock.advance(0)
        # Reading resumed: the third request is being worked on, which fills
        # the bound again.
        self.assertEqual(len(self.auth.calls), 3)
        self.auth.calls[1][2].callback(False)
        self.auth.calls[2][2].callback(True)
        self.clock.advance(0)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.transport.value(), b"1\n0\n1\n")

    def test_overlongLineCloses(self) -> None:
        with capturedLogs() as events:
            self.send(b"auth:alice:example.org:" + b"x" * 5000)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))
        self.assertEqual(self.auth.calls, [])

    def test_halfCloseAnswersThenCloses(self) -> None:
        self.send(b"isuser:a:d\n")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), b"1\n")
        self.assertTrue(self.transport.disconnecting)

    def test_roster(self) -> None:
        self.send(b"roster:alice:example.org\n")
        self.auth.calls[0][2].callback(b'{"result":"success"}')
        self.assertEqual(self.transport.value(), b'{"result":"success"}\n')

    def test_passwordNeverLogged(self) -> None:
        with capturedLogs() as events:
            self.send(b"auth:alice:example.org:hunter2:secret\n")
            self.auth.calls[0][2].callback(True)
            self.send(b"setpass:alice:example.org:hunter2:secret\n")
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("alice@example.org", text)
        self.assertNotIn("hunter2", text)

    def test_requestLogLine(self) -> None:
        with capturedLogs() as events:
            self.send(b"auth:alice:example.org:pw\n")
            self.auth.calls[0][2].callback(True)
        lines = [formatEvent(e) for e in events]
        self.assertTrue(
            any(line.startswith("auth true for alice@example.org via") and " ms" in line
                for line in lines), lines)

    def test_userNameCannotForgeLogLines(self) -> None:
        with capturedLogs() as events:
            self.send(b"isuser:ev\til\x1b:example.org\n")
            # A user name with control characters is refused unasked.
            self.assertEqual(self.auth.calls, [])
        text = "".join(formatEvent(e) for e in events)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\t", text)


class EjabberdLineFramingTests(LineFramingTests):
    protocolClass = EjabberdLineProtocol


class EjabberdBinaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = ManualAuthenticator()
        self.protocol, self.transport, self.clock = connect(EjabberdProtocol, self.auth)

    def test_protocolExamples(self) -> None:
        request = bytes.fromhex("001e") + b"auth:alice:example.org:pa:ss w"
        self.protocol.dataReceived(request)
        self.assertEqual(self.auth.calls[0][:2], ("auth", ("alice", "example.org", "pa:ss w")))
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), bytes.fromhex("00020001"))
        self.transport.clear()
        self.protocol.dataReceived(bytes.fromhex("0018") + b"isuser:alice:example.org")
        self.auth.calls[1][2].callback(False)
        self.assertEqual(self.transport.value(), bytes.fromhex("00020000"))

    def test_unavailableIsFalse(self) -> None:
        self.protocol.dataReceived(frame("isuser:alice:example.org"))
        self.auth.calls[0][2].callback(None)
        self.assertEqual(self.transport.value(), FALSE)

    def test_unsignedLength(self) -> None:
        """
        The length is unsigned: 0x8000 and more are lengths, not negatives (and
        over the limit, so the connection closes).
        """
        self.protocol.dataReceived(b"\x80\x00" + b"a" * 10)
        self.assertTrue(self.transport.disconnecting)

    def test_zeroLengthCloses(self) -> None:
        self.protocol.dataReceived(b"\x00\x00")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_zeroLengthAfterPendingAnswersFirst(self) -> None:
        self.protocol.dataReceived(frame("isuser:a:b") + b"\x00\x00")
        self.assertFalse(self.transport.disconnecting)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.transport.value(), TRUE)
        self.assertTrue(self.transport.disconnecting)

    def test_frameCutShortGetsNoAnswer(self) -> None:
        self.protocol.dataReceived(b"\x00\x20auth:alice")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.auth.calls, [])
        self.assertTrue(self.transport.disconnecting)

    def test_unsupportedAndInvalid(self) -> None:
        for text in (b"setpass:a:b:c", b"tryregister:a:b:c", b"removeuser:a:b",
                     b"removeuser3:a:b:c", b"\xc3\x28:a:b", b"roster:a:b", b"auth:a"):
            self.protocol.dataReceived(frame(text))
        self.assertEqual(self.transport.value(), FALSE * 7)
        self.assertEqual(self.auth.calls, [])
        self.assertFalse(self.transport.disconnecting)

    def test_oversizeFrameCloses(self) -> None:
        with capturedLogs() as events:
            self.protocol.dataReceived(struct.pack(">H", 5000) + b"x" * 100)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))

    def test_pipelinedOrder(self) -> None:
        self.protocol.dataReceived(frame("isuser:a:d") + frame("isuser:b:d"))
        self.auth.calls[1][2].callback(True)
        self.assertEqual(self.transport.value(), b"")
        self.auth.calls[0][2].callback(False)
        self.assertEqual(self.transport.value(), FALSE + TRUE)

    def test_deadline(self) -> None:
        self.protocol.dataReceived(frame("auth:a:d:p"))
        self.clock.advance(4.01)
        self.assertEqual(self.transport.value(), FALSE)
        self.assertEqual(len(self.auth.cancelled), 1)


class AutoDetectTests(SynchronousTestCase):
    def test_telnetSession(self) -> None:
        """
        The telnet session of PROTOCOLS.md on an C{ejabberd} listener.
        """
        protocol, transport, _ = connect(EjabberdAutoProtocol, TableAuthenticator(USERS))
        protocol.dataReceived(b"isuser:admin:example.org\r\n")
        self.assertEqual(transport.value(), b"1\n")
        protocol.dataReceived(b"auth:admin:example.org:good_password\r\n")
        protocol.dataReceived(b"auth:admin:example.org:incorrect_password\r\n")
        self.assertEqual(transport.value(), b"1\n1\n0\n")
        protocol.dataReceived(b"quit\r\n")
        self.assertTrue(transport.disconnecting)

    def test_telnetSessionExtraCarriageReturns(self) -> None:
        """
        The same session with lines ending in C{\\r\\r\\n} (a script that
        writes C{\\r\\n} through telnet): the right password is accepted.
        """
        protocol, transport, _ = connect(EjabberdAutoProtocol, TableAuthenticator(USERS))
        protocol.dataReceived(b"auth:admin:example.org:good_password\r\r\n")
        protocol.dataReceived(b"auth:admin:example.org:incorrect_password\r\r\n")
        protocol.dataReceived(b"isuser:admin:example.org\r\r\n")
        self.assertEqual(transport.value(), b"1\n0\n1\n")
        protocol.dataReceived(b"quit\r\r\n")
        self.assertTrue(transport.disconnecting)

    def test_binaryClient(self) -> None:
        protocol, transport, _ = connect(EjabberdAutoProtocol, TableAuthenticator(USERS))
        protocol.dataReceived(frame("auth:alice:example.org:pa:ss w")[:1])
        protocol.dataReceived(frame("auth:alice:example.org:pa:ss w")[1:])
        self.assertEqual(transport.value(), TRUE)

    def test_disconnectBeforeData(self) -> None:
        protocol, transport, _ = connect(EjabberdAutoProtocol, TableAuthenticator(USERS))
        protocol.connectionLost(Failure(Exception("gone")))
        protocol.readConnectionLost()


# Requests with their answers in each framing, for the properties below.
SCRIPT = [
    ("auth:alice:example.org:pa:ss w", True),
    ("isuser:alice:example.org", True),
    ("auth:alice:example.org:wrong", False),
    ("isuser:nobody:example.org", False),
    ("auth:jörg:example.org:pässwörd", True),
    ("setpass:alice:example.org:x", False),
    ("isuser:alice:down.example", False),
]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


class PropertyTests(SynchronousTestCase):
    cases = [
        (XMPPLineProtocol, b"".join(r.encode() + b"\n" for r, _ in SCRIPT),
         b"".join(b"1\n" if a else b"0\n" for _, a in SCRIPT)),
        (EjabberdLineProtocol, b"".join(r.encode() + b"\r\n" for r, _ in SCRIPT),
         b"".join(b"1\n" if a else b"0\n" for _, a in SCRIPT)),
        (EjabberdProtocol, b"".join(frame(r) for r, _ in SCRIPT),
         b"".join(TRUE if a else FALSE for _, a in SCRIPT)),
        (EjabberdAutoProtocol, b"".join(frame(r) for r, _ in SCRIPT),
         b"".join(TRUE if a else FALSE for _, a in SCRIPT)),
    ]

    @given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
    def test_anyChunkingSameReplies(self, cuts: list[int]) -> None:
        for protocolClass, data, expected in self.cases:
            protocol, transport, _ = connect(protocolClass, TableAuthenticator(USERS))
            for piece in chunked(data, cuts):
                protocol.dataReceived(piece)
            self.assertEqual(transport.value(), expected, protocolClass)

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
    def test_arbitraryBytesNeverRaise(self, data: bytes, cuts: list[int]) -> None:
        for protocolClass in (XMPPLineProtocol, EjabberdLineProtocol, EjabberdProtocol,
                              EjabberdAutoProtocol):
            with capturedLogs() as events:
                protocol, transport, clock = connect(protocolClass, TableAuthenticator(USERS))
                for piece in chunked(data, cuts):
                    protocol.dataReceived(piece)
                clock.advance(10)
                protocol.connectionLost(Failure(Exception("done")))
            self.assertEqual([e for e in events if "log_failure" in e], [])
            self.assertTrue(wholeAnswers(transport.value()), (protocolClass, transport.value()))
