"""
Tests for the saslauthd framing over L{StringTransport}: the PROTOCOLS.md
example, realms, the optional fifth field, bad input, chunking, deadlines and
that no password reaches the log.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import (
    ManualAuthenticator,
    ProtocolTestMixin,
    TableAuthenticator,
    connect,
)
from xcauth.framing.registry import FRAMINGS, STDIO_FRAMINGS
from xcauth.framing.saslauthd import (
    MAX_FIELD,
    NO,
    NO_INVALID,
    OK,
    FieldReader,
    InvalidMuxRequest,
    Oversize,
    SaslauthdProtocol,
    SaslRequest,
    parseFields,
    splitSaslauthdLogin,
)

USERS = {"alice@example.org": "pa:ss w", "jörg@example.org": "pässwörd"}
SECRET = "S3cret-Pa55word"


def counted(data: str | bytes) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return struct.pack(">H", len(raw)) + raw


def request(login: Any, password: Any, service: Any = "smtp", realm: Any = "",
            fifth: Any = None) -> bytes:
    data = counted(login) + counted(password) + counted(service) + counted(realm)
    if fifth is not None:
        data += counted(fifth)
    return data


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, last = [], 0
    for p in points + [len(data)]:
        chunks.append(data[last:p])
        last = p
    return [c for c in chunks if c]


def allText(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) + repr(e) for e in events)


class AnswerBytesTests(SynchronousTestCase):
    def test_answers(self) -> None:
        """
        Answers are counted strings beginning OK / NO, as PROTOCOLS.md shows.
        """
        self.assertEqual(OK, b"\x00\x0aOK success")
        self.assertEqual(NO, counted("NO xcauth authentication failure"))
        self.assertTrue(NO_INVALID[2:].startswith(b"NO "))


class SplitLoginTests(SynchronousTestCase):
    def test_realmIsDomain(self) -> None:
        self.assertEqual(splitSaslauthdLogin("alice", "example.org"), ("alice", "example.org"))

    def test_emptyRealmSplitsAtLastAt(self) -> None:
        self.assertEqual(splitSaslauthdLogin("alice@example.org", ""), ("alice", "example.org"))
        self.assertEqual(splitSaslauthdLogin("a@b@example.org", ""), ("a@b", "example.org"))

    def test_noDomain(self) -> None:
        for login in ("alice", "alice@", "@example.org", "@"):
            self.assertIsNone(splitSaslauthdLogin(login, ""), login)


class FieldReaderTests(SynchronousTestCase):
    def test_fields(self) -> None:
        reader = FieldReader()
        reader.feed(counted("ab") + counted("") + b"\x00")
        self.assertEqual(reader.next(), b"ab")
        self.assertEqual(reader.next(), b"")
        self.assertIsNone(reader.next())
        self.assertTrue(reader.pending)
        reader.feed(b"\x01c")
        self.assertEqual(reader.next(), b"c")
        self.assertFalse(reader.pending)

    def test_oversizeSkippedWithoutBuffering(self) -> None:
        """
        A field over the limit is skipped as it arrives: the buffer never holds
        more than one chunk of it.
        """
        reader = FieldReader(maxLength=10)
        reader.feed(struct.pack(">H", 60000))
        self.assertIsNone(reader.next())
        for _ in range(599):
            reader.feed(b"x" * 100)
            self.assertIsNone(reader.next())
            self.assertLessEqual(len(reader._buffer), 100)
        reader.feed(b"x" * 100 + counted("next"))
        item = reader.next()
        assert isinstance(item, Oversize)
        self.assertEqual(item.length, 60000)
        self.assertEqual(reader.next(), b"next")


class ParseFieldsTests(SynchronousTestCase):
    def test_protocolExample(self) -> None:
        self.assertEqual(
            parseFields([b"alice", b"pa:ss w", b"smtp", b"example.org"]),
            SaslRequest("alice", "example.org", "pa:ss w"),
        )

    def test_serviceIgnored(self) -> None:
        """
        The service is not even decoded.
        """
        self.assertEqual(
            parseFields([b"alice@example.org", b"pw", b"\xff\xfe", b""]),
            SaslRequest("alice", "example.org", "pw"),
        )

    def test_invalid(self) -> None:
        for fields in (
            [b"", b"pw", b"smtp", b"example.org"],
            [b"alice", b"", b"smtp", b"example.org"],
            [b"alice", b"pw", b"smtp", b""],
            [b"\xffalice", b"pw", b"smtp", b"example.org"],
            [b"alice", b"p\xc3w", b"smtp", b"example.org"],
            [b"alice", b"pw", b"smtp", b"ex\x80ample.org"],
            [Oversize(5000), b"pw", b"smtp", b"example.org"],
            [b"alice", Oversize(5000), b"smtp", b"example.org"],
        ):
            self.assertIsInstance(parseFields(fields), InvalidMuxRequest, fields)  # type: ignore[arg-type]

    def test_reasonHasNoPassword(self) -> None:
        for fields in ([b"alice", SECRET.encode(), b"smtp", b""],
                       [b"alice", SECRET.encode() + b"\xff", b"smtp", b"x"]):
            result = parseFields(fields)  # type: ignore[arg-type]
            assert isinstance(result, InvalidMuxRequest)
            self.assertNotIn(SECRET, result.reason)

    def test_requestReprHasNoPassword(self) -> None:
        self.assertNotIn(SECRET, repr(SaslRequest("a", "b", SECRET)))


class RegistryTests(SynchronousTestCase):
    def test_registered(self) -> None:
        self.assertIs(FRAMINGS["saslauthd"], SaslauthdProtocol)
        self.assertIs(STDIO_FRAMINGS["saslauthd"], SaslauthdProtocol)


class ProtocolTests(ProtocolTestMixin, SynchronousTestCase):
    protocolClass = SaslauthdProtocol

    def test_protocolExample(self) -> None:
        """
        The capture of C{testsaslauthd -u alice -p 'pa:ss w' -s smtp -r
        example.org} gets C{OK success} once the backend says yes, and the
        connection stays open.
        """
        self.send(bytes.fromhex(
            "0005616c696365000770613a737320770004736d7470000b6578616d706c652e6f7267"
        ))
        [(op, args, d)] = self.auth.calls
        self.assertEqual((op, args), ("auth", ("alice", "example.org", "pa:ss w")))
        self.assertEqual(self.transport.value(), b"")
        d.callback(True)
        self.assertEqual(self.answers(), b"\x00\x0aOK success")
        self.assertFalse(self.transport.disconnecting)

    def test_wrongPassword(self) -> None:
        self.send(request("alice", "nope", realm="example.org"))
        self.auth.calls[0][2].callback(False)
        self.assertEqual(self.answers(), NO)

    def test_userAtRealmLogin(self) -> None:
        """
        The Debian capture of C{testsaslauthd -u alice@example.org -p x}: empty
        realm, login split at its last C{@}.
        """
        self.send(bytes.fromhex(
            "0011616c696365406578616d706c652e6f72670001780004696d61700000"
        ))
        self.assertEqual(self.auth.calls[0][:2], ("auth", ("alice", "example.org", "x")))

    def test_nonAsciiPassword(self) -> None:
        self.send(request("jörg@example.org", "pässwörd"))
        self.assertEqual(self.auth.calls[0][:2],
                         ("auth", ("jörg", "example.org", "pässwörd")))

    def test_invalidAnsweredAtOnceAndUsable(self) -> None:
        """
        Invalid UTF-8, empty fields and a login without a domain get C{NO} at
        once, without a backend call, and the connection keeps working.
        """
        for bad in (request(b"\xffx", "pw", realm="example.org"),
                    request("alice", b"\xc3", realm="example.org"),
                    request("alice", "pw", realm=b"\x80"),
                    request("", "pw", realm="example.org"),
                    request("alice", "", realm="example.org"),
                    request("alice", "pw")):
            self.send(bad)
            self.assertEqual(self.answers(), NO_INVALID, bad)
        self.assertEqual(self.auth.calls, [])
        self.send(request("alice", "pa:ss w", realm="example.org"))
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.assertFalse(self.transport.disconnecting)

    def test_oversizeField(self) -> None:
        """
        A field over the limit fails its request, without buffering it; the
        connection stays usable.  A field of exactly the limit is fine.
        """
        self.send(request("alice", "p" * (MAX_FIELD + 1), realm="example.org"))
        self.assertEqual(self.answers(), NO_INVALID)
        self.send(request("alice", "p" * MAX_FIELD, realm="example.org"))
        self.assertEqual(self.auth.calls[0][1][2], "p" * MAX_FIELD)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.send(request("x" * 65535, "pw"))
        self.assertEqual(self.answers(), NO_INVALID)
        self.assertEqual(len(self.auth.calls), 1)

    def test_fifthFieldSameRead(self) -> None:
        """
        A fifth field sent with the request is ignored.
        """
        self.send(request("alice", "pa:ss w", realm="example.org", fifth="192.0.2.1"))
        self.assertEqual(len(self.auth.calls), 1)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.assertFalse(self.transport.disconnecting)

    def test_fifthFieldLaterRead(self) -> None:
        """
        A fifth field that arrives after the fourth but before the answer left
        belongs to the request, however it is cut.
        """
        self.send(request("alice", "pw", realm="example.org"))
        self.send(b"\x00")
        self.send(b"\x09192.0")
        self.send(b".2.1")
        self.assertEqual(len(self.auth.calls), 1)
        self.auth.calls[0][2].callback(False)
        self.assertEqual(self.answers(), NO)
        self.assertFalse(self.transport.disconnecting)

    def test_fifthFieldBegunBeforeAnswer(self) -> None:
        """
        A fifth field whose first byte came before the answer left is the fifth
        field even if the rest comes after.
        """
        self.send(request("alice", "pw", realm="example.org") + b"\x00")
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.send(b"\x03::1")
        self.send(request("bob", "x", realm="example.org"))
        self.assertEqual([c[1][0] for c in self.auth.calls], ["alice", "bob"])

    def test_fifthFieldWithSynchronousAnswer(self) -> None:
        """
        A token is answered without waiting: a fifth field in the same read is
        still the request's, not a new request.
        """
        auth = TableAuthenticator(USERS)
        protocol, transport, _ = connect(SaslauthdProtocol, auth)
        protocol.dataReceived(
            request("alice", "pa:ss w", realm="example.org", fifth="192.0.2.1")
        )
        self.assertEqual(transport.value(), OK)
        self.assertEqual(auth.calls, [("auth", "alice", "example.org")])
        protocol.dataReceived(request("jörg@example.org", "pässwörd", fifth="::1"))
        self.assertEqual(transport.value(), OK + OK)
        self.assertEqual(len(auth.calls), 2)
        self.assertFalse(transport.disconnecting)

    def test_sequentialRequests(self) -> None:
        """
        A client that waits for each answer may send several requests.
        """
        for n in range(3):
            self.send(request(f"u{n}", "pw", realm="example.org"))
            self.assertEqual(len(self.auth.calls), n + 1)
            self.auth.calls[n][2].callback(n % 2 == 0)
        self.assertEqual(self.answers(), OK + NO + OK)

    def test_pipeliningClosesAfterAnswer(self) -> None:
        """
        Two requests without waiting for the answer are not taken apart by
        guesswork: the first is answered, the rest dropped, the connection
        closed; the second request's password is never used or logged.
        """
        with capturedLogs() as events:
            self.send(request("alice", "pw", realm="example.org")
                      + request("bob", SECRET, realm="example.org"))
            self.assertEqual(len(self.auth.calls), 1)
            self.assertFalse(self.transport.disconnecting)
            self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.auth.calls), 1)
        self.assertNotIn(SECRET, allText(events))
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))

    def test_deadline(self) -> None:
        """
        A backend that does not answer within the deadline gives C{NO}, and its
        work is cancelled.
        """
        self.send(request("alice", "pw", realm="example.org"))
        self.clock.advance(3.9)
        self.assertEqual(self.transport.value(), b"")
        with capturedLogs():
            self.clock.advance(0.2)
        self.assertEqual(self.answers(), NO)
        self.assertEqual(self.auth.cancelled, [("alice", "example.org", "pw")])
        self.send(request("alice", "pw2", realm="example.org"))
        self.assertEqual(len(self.auth.calls), 2)

    def test_backendError(self) -> None:
        self.send(request("alice", "pw", realm="example.org"))
        with capturedLogs():
            self.auth.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(self.answers(), NO)
        self.flushLoggedErrors(RuntimeError)

    def test_eofAnswersThenCloses(self) -> None:
        self.send(request("alice", "pw", realm="example.org"))
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.auth.calls[0][2].callback(True)
        self.assertEqual(self.answers(), OK)
        self.assertTrue(self.transport.disconnecting)

    def test_eofMidRequest(self) -> None:
        """
        A request cut short by EOF gets no answer.
        """
        self.send(request("alice", "pw", realm="example.org")[:-3])
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.auth.calls, [])

    def test_disconnectCancels(self) -> None:
        self.send(request("alice", "pw", realm="example.org"))
        self.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.auth.cancelled, [("alice", "example.org", "pw")])
        self.assertEqual(self.transport.value(), b"")

    def test_noPasswordInLogs(self) -> None:
        """
        No log event of any kind carries a password: not for a right or wrong
        one, an invalid request, a timeout or a backend error.
        """
        with capturedLogs() as events:
            self.send(request("alice", SECRET, realm="example.org"))
            self.auth.calls[-1][2].callback(True)
            self.send(request("alice", SECRET, realm="example.org", fifth="x"))
            self.auth.calls[-1][2].callback(False)
            self.send(request("alice", SECRET))
            self.send(request("alice", SECRET.encode() + b"\xff", realm="example.org"))
            self.send(request("alice", SECRET * 100, realm="example.org"))
            self.send(request(b"\xff", SECRET, realm="example.org"))
            self.send(request("alice", SECRET, realm="example.org"))
            self.clock.advance(10)
            self.send(request("alice", SECRET, realm="example.org"))
            self.auth.calls[-1][2].errback(RuntimeError("boom"))
        self.flushLoggedErrors(RuntimeError)
        text = allText(events)
        self.assertIn("alice", text)
        self.assertNotIn(SECRET, text)


def transcript(requests: list[tuple[bytes, bool]], cuts: list[list[int]],
               fifths: list[bool]) -> bytes:
    """
    Run requests one after the other (each waits for its answer), each sent in
    the given chunks with an optional fifth field; return everything answered.
    """
    auth = ManualAuthenticator()
    protocol, transport, _ = connect(SaslauthdProtocol, auth)
    for n, ((login, right), cut, fifth) in enumerate(zip(requests, cuts, fifths, strict=True)):
        data = request(login, "right" if right else "wrong", realm="example.org",
                       fifth="192.0.2.1" if fifth else None)
        for chunk in chunked(data, cut):
            protocol.dataReceived(chunk)
        assert len(auth.calls) == n + 1, (n, auth.calls)
        auth.calls[n][2].callback(auth.calls[n][1][2] == "right")
    assert not transport.disconnecting
    value: bytes = transport.value()
    return value


class PropertyTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.booleans()),
                    min_size=1, max_size=4),
           st.data())
    def test_anyChunking(self, requests: list[tuple[bytes, bool]], data: Any) -> None:
        """
        However each request (with or without a fifth field) is cut into reads,
        a client that waits for each answer gets the same answers.
        """
        cuts = [data.draw(st.lists(st.integers(0, 200), max_size=8)) for _ in requests]
        fifths = [data.draw(st.booleans()) for _ in requests]
        expected = b"".join(OK if right else NO for _, right in requests)
        # Any login bytes, made a valid user name (invalid ones get
        # NO_INVALID without a call, see the other tests).
        requests = [(login.hex().encode("ascii"), right) for login, right in requests]
        self.assertEqual(transcript(requests, cuts, fifths), expected)

    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
    def test_anyBytesNeverCrash(self, data: bytes, cuts: list[int]) -> None:
        """
        Any bytes, cut anywhere, give only well-formed answers.
        """
        auth = TableAuthenticator(USERS)
        protocol, transport, _ = connect(SaslauthdProtocol, auth)
        with capturedLogs():
            for chunk in chunked(data, cuts):
                protocol.dataReceived(chunk)
            protocol.readConnectionLost()
        out = transport.value()
        while out:
            self.assertIn(out[:2 + struct.unpack(">H", out[:2])[0]], (OK, NO, NO_INVALID))
            out = out[2 + struct.unpack(">H", out[:2])[0]:]

    def test_synchronousBackend(self) -> None:
        """
        An authenticator that answers at once works like a slow one.
        """
        auth = TableAuthenticator(USERS)
        auth.authenticate = lambda u, d, p: succeed(p == "pa:ss w")  # type: ignore[method-assign]
        protocol, transport, _ = connect(SaslauthdProtocol, auth)
        protocol.dataReceived(request("alice", "pa:ss w", realm="example.org"))
        protocol.dataReceived(request("alice", "bad", realm="example.org"))
        self.assertEqual(transport.value(), OK + NO)
