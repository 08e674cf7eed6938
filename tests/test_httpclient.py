"""
Tests for L{xcauth.httpclient}: the lean HTTP/1.1 client against a scripted
server on loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from xcauth.httpclient import (
    AnswerTooLarge,
    ConnectionLostBeforeAnswer,
    HTTPClientPool,
    HTTPProtocolError,
)

Answer = Callable[["_Server", bytes, bytes], None]


class _Server(Protocol):
    """
    Reads requests with a Content-Length body and lets the test answer each.
    """

    def __init__(self, factory: _ServerFactory) -> None:
        self.f = factory
        self.buffer = b""

    def connectionMade(self) -> None:
        self.f.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.f.requests.append((head, body))
            self.f.answer(self, head, body)

    def connectionLost(self, reason: Any = None) -> None:
        self.f.lost += 1


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections: list[_Server] = []
        self.requests: list[tuple[bytes, bytes]] = []
        self.lost = 0

    def buildProtocol(self, addr: Any) -> _Server:
        return _Server(self)


def fixed(data: bytes) -> Answer:
    return lambda server, head, body: server.transport.write(data)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class HTTPClientTests(TestCase):
    def serve(self, answer: Answer) -> tuple[_ServerFactory, str]:
        factory = _ServerFactory(answer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.pool = HTTPClientPool(reactor, connectTimeout=5)
        self.addCleanup(self.closeAll)
        return factory, f"http://127.0.0.1:{port.getHost().port}/a/b.php?x=1"

    def closeAll(self) -> Deferred[None]:
        for origin in self.pool._origins.values():
            for conn in list(origin.active):
                if conn.transport is not None:
                    conn.transport.abortConnection()
        self.pool.close()
        return deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_requestAndReuse(self) -> Any:
        """
        The request is one POST with Host and Content-Length; a keep-alive
        answer leaves the connection for the next request.
        """
        factory, url = self.serve(fixed(OK))
        origin = self.pool.origin(url)
        result = yield origin.post(b"X-A: 1\r\n", b"body=1", 100)
        self.assertEqual(result, (200, b"ok"))
        result = yield origin.post(b"X-A: 2\r\n", b"body=22", 100)
        self.assertEqual(result, (200, b"ok"))
        self.assertEqual(len(factory.connections), 1)
        head, body = factory.requests[0]
        port = url.split(":")[2].split("/")[0]
        self.assertEqual(
            head,
            b"POST /a/b.php?x=1 HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode()
            + b"\r\nContent-Length: 6\r\nX-A: 1",
        )
        self.assertEqual(body, b"body=1")
        self.assertEqual(factory.requests[1][1], b"body=22")

    @inlineCallbacks
    def test_chunkedInPieces(self) -> Any:
        """
        A chunked answer arriving in small pieces, with trailers, is decoded.
        """
        answer = (
            b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: y\r\n\r\n"
        )

        def slowly(server: _Server, head: bytes, body: bytes) -> None:
            for i in range(len(answer)):
                reactor.callLater(0.001 * i, server.transport.write, answer[i : i + 1])  # type: ignore[attr-defined]

        factory, url = self.serve(slowly)
        origin = self.pool.origin(url)
        result = yield origin.post(b"", b"x", 100)
        self.assertEqual(result, (500, b"hello world"))
        result = yield origin.post(b"", b"x", 100)
        self.assertEqual(result, (500, b"hello world"))
        self.assertEqual(len(factory.connections), 1)

    @inlineCallbacks
    def test_interimAnswerSkipped(self) -> Any:
        """
        A 100 Continue before the answer is skipped.
        """
        factory, url = self.serve(fixed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
        result = yield self.pool.origin(url).post(b"", b"x", 100)
        self.assertEqual(result, (200, b"ok"))

    @inlineCallbacks
    def test_connectionClose(self) -> Any:
        """
        An answer with Connection: close, or with a body that ends with the
        connection, is not reused.
        """
        answers = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.0 302 Found\r\nLocation: /login\r\n\r\nuntil close",
        ]

        def answer(server: _Server, head: bytes, body: bytes) -> None:
            server.transport.write(answers.pop(0))
            server.transport.loseConnection()

        factory, url = self.serve(answer)
        origin = self.pool.origin(url)
        self.assertEqual((yield origin.post(b"", b"x", 100)), (200, b"a"))
        self.assertEqual((yield origin.post(b"", b"x", 100)), (302, b"until close"))
        self.assertEqual(len(factory.connections), 2)

    @inlineCallbacks
    def test_tooLarge(self) -> Any:
        """
        An answer longer than allowed fails, by its Content-Length or by what
        arrives.
        """
        factory, url = self.serve(
            fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
        )
        with self.assertRaises(AnswerTooLarge):
            yield self.pool.origin(url).post(b"", b"x", 100)
        factory2, url2 = self.serve(
            fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + b"x" * 101)
        )
        with self.assertRaises(AnswerTooLarge):
            yield self.pool.origin(url2).post(b"", b"x", 100)

    @inlineCallbacks
    def test_notHTTP(self) -> Any:
        """
        Something that is not an HTTP answer fails the request.
        """
        factory, url = self.serve(fixed(b"SSH-2.0-OpenSSH\r\n\r\n"))
        with self.assertRaises(HTTPProtocolError):
            yield self.pool.origin(url).post(b"", b"x", 100)

    @inlineCallbacks
    def test_retryWhenReusedConnectionCloses(self) -> Any:
        """
        A reused connection that the server closes without answering (it had
        timed the connection out just as the request was sent) is replaced by
        a new one, once.
        """

        def answer(server: _Server, head: bytes, body: bytes) -> None:
            if server is factory.connections[0] and len(factory.requests) == 2:
                server.transport.loseConnection()
            else:
                server.transport.write(OK)

        factory, url = self.serve(answer)
        origin = self.pool.origin(url)
        yield origin.post(b"", b"x", 100)
        self.assertEqual((yield origin.post(b"", b"x", 100)), (200, b"ok"))
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(len(factory.requests), 3)

    @inlineCallbacks
    def test_retryOnlyOnce(self) -> Any:
        """
        A connection closed without an answer fails the request when it was
        new.
        """
        factory, url = self.serve(lambda server, head, body: server.transport.loseConnection())
        with self.assertRaises(ConnectionLostBeforeAnswer):
            yield self.pool.origin(url).post(b"", b"x", 100)

    @inlineCallbacks
    def test_cancel(self) -> Any:
        """
        Cancelling a request closes its connection.
        """
        factory, url = self.serve(lambda server, head, body: None)
        d = self.pool.origin(url).post(b"", b"x", 100)
        yield deferLater(reactor, 0.05, lambda: None)
        d.cancel()
        with self.assertRaises(CancelledError):
            yield d
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(factory.lost, 1)
