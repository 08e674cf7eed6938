"""
Robustness of L{xcauth.httpclient}'s answer parser against hostile or broken
servers: scripted and generated answers (Hypothesis) fed to a pooled
connection over an in-memory transport, in any split.

The properties: the request's L{Deferred} always fires once the connection is
gone (with the right status and body for a valid answer, with one of the
client's errors otherwise); nothing is raised out of C{dataReceived}; a
connection is reused only after one complete, well-formed, keep-alive answer
and nothing more; and L{NextcloudClient} maps every malformed answer to
L{Outcome.UNAVAILABLE}.  Generated answers are checked against L{reference},
a small, strict, independent reading of RFC 9112's message framing.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from xcauth.httpclient import (
    MAX_HEAD,
    AnswerTooLarge,
    ConnectionLostBeforeAnswer,
    HTTPClientPool,
    HTTPProtocolError,
    Origin,
    _Connection,
)
from xcauth.nextcloud import NextcloudClient, Outcome

URL = "http://127.0.0.1:8080/index.php/apps/ojsxc/ajax/externalApi.php"
MAX_BODY = 1000
CLIENT_ERRORS = (HTTPProtocolError, AnswerTooLarge, ConnectionLostBeforeAnswer)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """
    Connects every factory at once to a new L{StringTransport}.
    """

    def __init__(self) -> None:
        self.connections: list[tuple[StringTransport, _Connection]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((transport, protocol))
        return succeed(protocol)


def _origin() -> tuple[Origin, _Endpoint, HTTPClientPool]:
    pool = HTTPClientPool(Clock())
    origin = pool.origin(URL)
    endpoint = _Endpoint()
    origin.endpoint = lambda: endpoint  # type: ignore[method-assign,assignment,return-value]
    return origin, endpoint, pool


class Exchange:
    """
    One request on a new connection, answered with C{pieces}; then, unless
    the client closed it, the server closes the connection (C{reason}).
    """

    def __init__(
        self,
        pieces: list[bytes],
        reason: Exception | None = None,
        maxBody: int = MAX_BODY,
        close: bool = True,
    ) -> None:
        self.origin, self.endpoint, _ = _origin()
        d = self.origin.post(b"X-JSXC-SIGNATURE: sha1=00\r\n", b"operation=auth", maxBody)
        self.results: list[Any] = []
        d.addBoth(self.results.append)
        [(self.transport, self.conn)] = self.endpoint.connections
        for piece in pieces:
            if self.transport.disconnecting:
                # A closing transport stops reading.
                break
            if not piece:
                # A transport never delivers nothing.
                continue
            # Raises if the parser lets an exception out.
            self.conn.dataReceived(piece)
        self.reused = self.conn in self.origin.idle
        self.closedByClient = self.transport.disconnecting
        if close or self.closedByClient:
            self.conn.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def result(self) -> Any:
        assert len(self.results) == 1, self.results
        return self.results[0]

    @property
    def failed(self) -> bool:
        return isinstance(self.result, Failure)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points + [len(data)]:
        pieces.append(data[start:p])
        start = p
    return [p for p in pieces if p]


# A strict reference: the answer framing of RFC 9112 that this client promises.

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_CHUNK = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(;[^\r\n]*)?")


class Bad(Exception):
    pass


def reference(wire: bytes, maxBody: int = MAX_BODY) -> tuple[int, bytes, bool, bytes] | None:
    """
    How a strict client reads C{wire} followed by a clean close:
    C{(status, body, reusable, rest)}, or C{None} for an answer that must
    fail.  C{rest} is what follows the answer (nothing, for reuse).
    """
    try:
        return _reference(wire, maxBody)
    except Bad:
        return None


def _reference(data: bytes, maxBody: int) -> tuple[int, bytes, bool, bytes]:
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            raise Bad("head")
        lines = data[:end].split(b"\r\n")
        data = data[end + 4 :]
        if any(b"\r" in line or b"\n" in line for line in lines):
            raise Bad("bare CR or LF")
        m = _STATUS.fullmatch(lines[0])
        if not m:
            raise Bad("status")
        code = int(m.group(2))
        if code == 101:
            raise Bad("101")
        if 100 <= code < 200:
            continue
        break
    close = m.group(1) == b"0"
    lengths, codings = set(), []
    for line in lines[1:]:
        # Lenient where it cannot change the framing: any name before the
        # first colon, surrounding whitespace ignored; but no folding.
        name, colon, value = line.partition(b":")
        if not colon or name[:1].isspace():
            raise Bad("field")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise Bad("length")
            lengths.add(int(value))
        elif name == b"transfer-encoding":
            line_codings = [c.strip().lower() for c in value.split(b",")]
            if line_codings[-1] != b"chunked":
                raise Bad("coding")
            codings += line_codings
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens:
                close = False
    if len(lengths) > 1:
        raise Bad("lengths")
    if code in (204, 304):
        return code, b"", not close and not data, data
    if codings:
        if lengths:
            # Both: the length is ignored and the connection not trusted.
            close = True
        body = b""
        while True:
            end = data.find(b"\r\n")
            if end < 0 or end > MAX_HEAD:
                raise Bad("chunk line")
            c = _CHUNK.fullmatch(data[:end])
            if not c:
                raise Bad("chunk size")
            size = int(c.group(1), 16)
            data = data[end + 2 :]
            if size == 0:
                break
            if len(data) < size + 2 or len(body) + size > maxBody:
                raise Bad("chunk")
            body += data[:size]
            if data[size : size + 2] != b"\r\n":
                raise Bad("chunk end")
            data = data[size + 2 :]
        if data.startswith(b"\r\n"):
            data = data[2:]
        else:
            end = data.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                raise Bad("trailers")
            if any(b"\r" in t or b"\n" in t for t in data[:end].split(b"\r\n")):
                raise Bad("bare CR or LF in trailers")
            data = data[end + 4 :]
        return code, body, not close and not data, data
    if lengths:
        (n,) = lengths
        if n > maxBody or len(data) < n:
            raise Bad("length")
        return code, data[:n], not close and not data[n:], data[n:]
    if len(data) > maxBody:
        raise Bad("too large")
    return code, data, False, b""


# Generated answers.

_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
_VALUE = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if 0x21 <= c < 0x7F)
)


@st.composite
def answers(draw: Any) -> bytes:
    """
    Well-formed answers: interim answers, any status, any framing, any
    harmless extra fields, in any letter case.
    """
    out = b""
    for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        out += b"HTTP/1.1 %d Interim\r\n" % code
        if draw(st.booleans()):
            out += b"Link: </style.css>; rel=preload\r\n"
        out += b"\r\n"
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    code = draw(st.sampled_from([200, 200, 204, 302, 304, 404, 500, 503]) | st.integers(200, 599))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Some Reason"]))
    body = draw(st.binary(max_size=60))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    fields = [
        (draw(_TOKEN).encode(), draw(_VALUE))
        for _ in range(draw(st.integers(0, 3)))
    ]
    fields = [
        (n, v) for n, v in fields
        if n.lower() not in (b"content-length", b"transfer-encoding", b"connection")
    ]
    if code in (204, 304):
        body = b""
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted({min(c, len(body)) for c in draw(st.lists(st.integers(1, 60), max_size=3))})
        payload, start = b"", 0
        for end in cuts + [len(body)]:
            if end > start:
                ext = draw(st.sampled_from([b"", b";x=1", b" ;name"]))
                payload += b"%x%s\r\n%s\r\n" % (end - start, ext, body[start:end])
                start = end
        payload += b"0\r\n"
        if draw(st.booleans()):
            payload += b"X-Trailer: y\r\n"
        payload += b"\r\n"
    else:
        payload = body
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, TE"]))
    if connection is not None:
        fields.append((b"Connection", connection))
    fields = draw(st.permutations(fields))
    out += b"HTTP/%s %d%s\r\n" % (version, code, reason)
    for name, value in fields:
        name = draw(st.sampled_from([name, name.lower(), name.upper()]))
        out += name + b":" + draw(st.sampled_from([b" ", b"", b"  "])) + value + b"\r\n"
    return out + b"\r\n" + (payload if code not in (204, 304) else b"")


@st.composite
def mutated(draw: Any) -> bytes:
    """
    A well-formed answer with a few bytes replaced, inserted or deleted.
    """
    data = bytearray(draw(answers()))
    interesting = st.sampled_from(list(b"\r\n :;0123456789abcdefxX+-_\t\x00\xff,"))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "insert" or i == len(data):
            data[i:i] = bytes([draw(interesting | st.integers(0, 255))])
        elif action == "replace":
            data[i] = draw(interesting | st.integers(0, 255))
        else:
            del data[i]
    return bytes(data)


class ReferenceTests(SynchronousTestCase):
    """
    The reference agrees with hand-made examples (so that it can judge the
    client).
    """

    def test_examples(self) -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.assertEqual(reference(ok), (200, b"ok", True, b""))
        self.assertEqual(reference(ok + b"x"), (200, b"ok", False, b"x"))
        self.assertIsNone(reference(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"))
        self.assertEqual(
            reference(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
            (200, b"ok", True, b""),
        )
        self.assertEqual(reference(b"HTTP/1.0 200 OK\r\n\r\nabc"), (200, b"abc", False, b""))


class GeneratedAnswerTests(SynchronousTestCase):
    """
    Any answer, in any split, against the reference.
    """

    def check(self, wire: bytes, cuts: list[int]) -> None:
        expected = reference(wire)
        x = Exchange(_split(wire, cuts))
        if x.reused:
            self.assertIsNotNone(expected, "reused after a malformed answer")
            assert expected is not None
            self.assertTrue(expected[2], "reused a connection that may not be")
        if expected is None:
            self.assertTrue(x.failed, f"accepted {wire!r}: {x.result!r}")
            x.result.trap(*CLIENT_ERRORS)
            self.assertFalse(x.reused)
            self.assertTrue(x.closedByClient or not x.reused)
            return
        code, body, reusable, _ = expected
        if x.failed:
            self.fail(f"refused {wire!r}: {x.result.value!r}")
        self.assertEqual(x.result, (code, body))
        self.assertEqual(x.reused, reusable)
        if not reusable:
            self.assertNotIn(x.conn, x.origin.idle)

    @given(answers(), st.lists(st.integers(0, 10000), max_size=5))
    def test_valid(self, wire: bytes, cuts: list[int]) -> None:
        """
        A valid answer in any pieces gives its status and body.
        """
        self.assertIsNotNone(reference(wire))
        self.check(wire, cuts)

    @given(mutated(), st.lists(st.integers(0, 10000), max_size=3))
    def test_mutated(self, wire: bytes, cuts: list[int]) -> None:
        """
        A damaged answer is read as the reference reads it.
        """
        self.check(wire, cuts)

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
    def test_anyBytes(self, wire: bytes, cuts: list[int]) -> None:
        """
        Any bytes: the request fires, nothing escapes C{dataReceived}.
        """
        self.check(wire, cuts)

    @given(answers(), st.binary(min_size=1, max_size=40))
    def test_extraBytes(self, wire: bytes, extra: bytes) -> None:
        """
        Bytes after a complete answer (in the same piece or later): the
        connection is never reused.
        """
        whole = Exchange([wire + extra], close=False)
        later = Exchange([wire, extra], close=False)
        for x in (whole, later):
            self.assertFalse(x.reused)
            if x.results and not x.failed:
                self.assertTrue(x.transport.disconnecting)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
)
CLOSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"


class ScriptedTests(SynchronousTestCase):
    """
    Hand-written hostile answers.
    """

    def assertFails(
        self, pieces: list[bytes], error: type | tuple[type, ...] = HTTPProtocolError, **kw: Any
    ) -> Exchange:
        x = Exchange(pieces, **kw)
        self.assertTrue(x.failed, f"accepted: {x.result!r}")
        x.result.trap(*(error if isinstance(error, tuple) else (error,)))
        self.assertFalse(x.reused)
        return x

    def test_everySplit(self) -> None:
        """
        Valid answers split at every byte boundary, and byte by byte, give the
        same result.
        """
        for wire, code, body, reusable in [
            (OK, 200, b"ok", True),
            (CHUNKED, 200, b"abcde", True),
            (CLOSE, 200, b"until close", False),
            (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"ok", True),
            (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", 204, b"", True),
        ]:
            for i in range(len(wire) + 1):
                x = Exchange([wire[:i], wire[i:]])
                self.assertEqual(x.result, (code, body), (wire, i))
                self.assertEqual(x.reused, reusable, (wire, i))
            x = Exchange([wire[i : i + 1] for i in range(len(wire))])
            self.assertEqual(x.result, (code, body))
            self.assertEqual(x.reused, reusable)

    def test_brokenStatusLines(self) -> None:
        for line in [
            b"", b"HTTP/1.1", b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK",
            b"http/1.1 200 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1 +20 OK", b"HTTP/1.1 2_0 OK",
            b"HTTP/1.1 -20 OK", b"ICY 200 OK", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ]:
            self.assertFails([line + b"\r\nContent-Length: 2\r\n\r\nok"])

    def test_giantHead(self) -> None:
        """
        A head longer than L{MAX_HEAD} fails, whether it arrives in one
        piece or many, with or without its end.
        """
        field = b"X-Big: " + b"a" * (MAX_HEAD + 10) + b"\r\n"
        head = b"HTTP/1.1 200 OK\r\n" + field + b"Content-Length: 2\r\n\r\nok"
        self.assertFails([head])
        self.assertFails([head[: MAX_HEAD], head[MAX_HEAD:]])
        self.assertFails([head[:-20]])
        self.assertFails([b"HTTP/1.1 200 OK\r\n" + b"a" * (MAX_HEAD + 10)])

    def test_giantChunkLine(self) -> None:
        """
        Chunk size lines and trailers are limited like the head.
        """
        start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assertFails([start + b"2;" + b"x" * (MAX_HEAD + 10) + b"\r\nok\r\n0\r\n\r\n"])
        self.assertFails([start + b"0\r\nX: " + b"y" * (MAX_HEAD + 10) + b"\r\n\r\n"])
        self.assertFails([start + b"0" * (MAX_HEAD + 10)])

    def test_badContentLength(self) -> None:
        for value in [b"-1", b"abc", b"", b"+2", b"2_0", b"0x2", b"2, 2", b"2 2", b"1e1",
                      b"9" * 5000]:
            self.assertFails(
                [b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nok"]
            )

    def test_conflictingContentLength(self) -> None:
        self.assertFails([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk"])
        x = Exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"])
        self.assertEqual(x.result, (200, b"ok"))

    def test_contentLengthAndChunked(self) -> None:
        """
        Both Content-Length and chunked: the body is chunked, and the
        connection is not trusted afterwards.
        """
        for fields in [
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n",
        ]:
            x = Exchange(
                [b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n2\r\nok\r\n0\r\n\r\n"], close=False
            )
            self.assertEqual(x.result, (200, b"ok"))
            self.assertFalse(x.reused)
            self.assertTrue(x.transport.disconnecting)

    def test_badChunks(self) -> None:
        start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for chunks in [
            b"g\r\n", b"-1\r\nx\r\n0\r\n\r\n", b"\r\nok\r\n0\r\n\r\n", b"+2\r\nok\r\n0\r\n\r\n",
            b"0x2\r\nok\r\n0\r\n\r\n", b"2_0\r\n", b"2\r\nokX\r\n0\r\n\r\n",
            b"2\r\nok", b"ffffffffffffffffffffffff\r\nok",
        ]:
            self.assertFails([start + chunks], (HTTPProtocolError, ConnectionLostBeforeAnswer))
        self.assertFails([start + b"7d0\r\n" + b"x" * 2000], AnswerTooLarge)
        self.assertFails([start], ConnectionLostBeforeAnswer)

    def test_bareLineEndsInChunks(self) -> None:
        start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for chunks in [
            b"1\r\nx\r\n\n0\r\n\r\n", b"1;a\n=b\r\nx\r\n0\r\n\r\n",
            b" 1\r\nx\r\n0\r\n\r\n", b"0\r\nX: a\n\r\n", b"0\r\nX: a\rb\r\n\r\n",
        ]:
            self.assertFails([start + chunks], (HTTPProtocolError, ConnectionLostBeforeAnswer))
        x = Exchange([start + b"1 ;a=b\r\nx\r\n0\r\nX: 1\r\nY: 2\r\n\r\n"], close=False)
        self.assertEqual(x.result, (200, b"x"))
        self.assertTrue(x.reused)

    def test_unsupportedCoding(self) -> None:
        for coding in [b"gzip", b"chunked, gzip", b"identity", b""]:
            self.assertFails([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\nok"])

    def test_bodyLongerThanDeclared(self) -> None:
        """
        More bytes than the Content-Length: the answer is the declared part,
        the connection is closed.
        """
        x = Exchange([OK + b"EXTRA"], close=False)
        self.assertEqual(x.result, (200, b"ok"))
        self.assertFalse(x.reused)
        self.assertTrue(x.transport.disconnecting)

    def test_extraAfterReuse(self) -> None:
        """
        Bytes arriving after a complete answer, while the connection is idle,
        close it: it is not used for the next request.
        """
        x = Exchange([OK], close=False)
        self.assertTrue(x.reused)
        x.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nXX")
        self.assertNotIn(x.conn, x.origin.idle)
        self.assertTrue(x.transport.disconnecting)
        d = x.origin.post(b"", b"x", 100)
        self.assertEqual(len(x.endpoint.connections), 2)
        self.assertNoResult(d)

    def test_interim(self) -> None:
        x = Exchange([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + OK], close=False)
        self.assertEqual(x.result, (200, b"ok"))
        self.assertTrue(x.reused)

    def test_switchingProtocols(self) -> None:
        """
        A 101 (never asked for) is not an interim answer to skip: what follows
        is not HTTP.
        """
        self.assertFails([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK])

    def test_noBody(self) -> None:
        for code in (204, 304):
            x = Exchange([b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % code], close=False)
            self.assertEqual(x.result, (code, b""))
            self.assertTrue(x.reused)
            x = Exchange([b"HTTP/1.1 %d X\r\n\r\nbody" % code], close=False)
            self.assertEqual(x.result, (code, b""))
            self.assertFalse(x.reused)

    def test_closedMidAnswer(self) -> None:
        """
        A connection closed in the head, in a Content-Length or chunked body
        fails the request.
        """
        for wire in (OK, CHUNKED):
            for i in range(len(wire)):
                self.assertFails([wire[:i]], ConnectionLostBeforeAnswer)

    def test_closeDelimitedTruncated(self) -> None:
        """
        A body that ends with the connection is complete only when the
        connection ends cleanly, not when it is reset or TLS fails.
        """
        x = Exchange([CLOSE])
        self.assertEqual(x.result, (200, b"until close"))
        self.assertFails([CLOSE], ConnectionLostBeforeAnswer, reason=ConnectionLost())

    def test_lostReasonNamed(self) -> None:
        """
        The error of a connection lost before the answer says why (a TLS
        verification error, for example).
        """
        x = self.assertFails([], ConnectionLostBeforeAnswer, reason=ValueError("certificate verify failed"))
        self.assertIn("certificate verify failed", str(x.result.value))

    def test_bareLineEnds(self) -> None:
        """
        A bare LF or CR in the head is refused: a parser that takes a bare LF
        for a line end would frame the answer differently.
        """
        self.assertFails([b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"])
        self.assertFails([b"HTTP/1.1 204 OK\r\nX: a\nConnection: close\r\n\r\n"])
        self.assertFails([b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 0\r\n\r\n"])

    def test_obsoleteFolding(self) -> None:
        """
        A folded line is refused: other parsers would read it as part of
        the previous field, this one could read it as a field of its own.
        """
        self.assertFails([b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 2\r\n\r\nok"])
        self.assertFails([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\tx\r\n\r\nok"])

    def test_unsolicited(self) -> None:
        """
        Bytes on an idle connection, before any request: closed.
        """
        origin, endpoint, _ = _origin()
        conn = _Connection(origin)
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(OK)
        self.assertTrue(transport.disconnecting)


class NextcloudMappingTests(SynchronousTestCase):
    """
    Whatever the server sends, L{NextcloudClient} answers with an
    L{Outcome}, and anything malformed is L{Outcome.UNAVAILABLE}.
    """

    def auth(self, pieces: list[bytes], reason: Exception | None = None) -> Outcome:
        origin, endpoint, pool = _origin()
        clock = pool.reactor
        client = NextcloudClient(pool, URL, b"secret", clock, timeout=10)
        results: list[Any] = []
        client.auth("alice", "example.org", "pw").addBoth(results.append)
        [(transport, conn)] = endpoint.connections
        for piece in pieces:
            if transport.disconnecting:
                break
            conn.dataReceived(piece)
        if not results:
            conn.connectionLost(Failure(reason or ConnectionDone()))
        if not results:
            clock.advance(11)
        [outcome] = results
        assert isinstance(outcome, Outcome), outcome
        return outcome

    def test_valid(self) -> None:
        body = b'{"result":"success","data":{"uid":"alice"}}'
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        self.assertIs(self.auth([wire]), Outcome.YES)
        self.assertIs(self.auth([wire[:30], wire[30:]]), Outcome.YES)

    def test_malformed(self) -> None:
        body = b'{"result":"success","data":{"uid":"alice"}}'
        for pieces in [
            [b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n" + body],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body],
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + body],
            [b"HTTP/1.1 2000 OK\r\n\r\n" + body],
            [b"HTTP/1.1 101 Switching\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" + body],
            [b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n" + body],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n" + body],
            [b"HTTP/1.1 200 OK\r\n"],
            [b"\x00" * 100],
            [],
        ]:
            self.assertIs(self.auth(pieces), Outcome.UNAVAILABLE, pieces)

    @given(mutated())
    def test_anyDamage(self, wire: bytes) -> None:
        """
        A damaged answer gives an outcome, never an error.
        """
        self.auth([wire])

    @given(st.binary(max_size=200))
    def test_anyBytes(self, wire: bytes) -> None:
        self.assertIs(self.auth([wire]), Outcome.UNAVAILABLE)
