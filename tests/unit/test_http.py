"""
Tests for L{xcauth.backends.http}: the production request path (the pooled L{Agent} of
L{makeAgent} behind an L{HTTPRequester}) against a scripted server on
loopback, for every way a backend can answer badly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from xcauth.backends.http import (
    BodyBudget,
    HTTPRequester,
    describeFailure,
    makeAgent,
    parseJSON,
)
from xcauth.interfaces import BackendUnavailable

Script = Callable[["_Server", bytes, bytes], None]


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
            self.f.script(self, head, body)

    gone = False

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True
        self.f.lost += 1


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections: list[_Server] = []
        self.requests: list[tuple[bytes, bytes]] = []
        self.lost = 0

    def buildProtocol(self, addr: Any) -> _Server:
        return _Server(self)


def fixed(data: bytes) -> Script:
    def answer(server: _Server, head: bytes, body: bytes) -> None:
        assert server.transport is not None
        server.transport.write(data)

    return answer


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class RequesterTests(TestCase):
    def serve(self, script: Script, timeout: float = 5.0, **kw: Any) -> tuple[_ServerFactory, bytes]:
        factory = _ServerFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        agent, self.pool = makeAgent(reactor, connectTimeout=5)
        self.http = HTTPRequester(agent, reactor, timeout, **kw)
        self.factory = factory
        self.addCleanup(self.closeAll)
        return factory, f"http://127.0.0.1:{port.getHost().port}/a/b.php".encode()

    @inlineCallbacks
    def closeAll(self) -> Any:
        for server in self.factory.connections:
            if server.transport is not None:
                server.transport.abortConnection()  # type: ignore[attr-defined]
        yield deferLater(reactor, 0.05, lambda: None)
        yield self.pool.closeCachedConnections()

    def post(self, url: bytes, body: bytes = b"x=1", maxBody: int = 100) -> Deferred[Any]:
        return self.http.request(
            b"POST", url, Headers({b"x-test": [b"1"]}), body, maxBody
        )

    @inlineCallbacks
    def test_requestAndReuse(self) -> Any:
        """
        The exact body bytes are sent; a keep-alive answer leaves the
        connection for the next request.
        """
        factory, url = self.serve(fixed(OK))
        answer = yield self.post(url, b"a=1&b=%40")
        self.assertEqual((answer.code, answer.body), (200, b"ok"))
        answer = yield self.post(url, b"c=2")
        self.assertEqual(answer.body, b"ok")
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual([body for _, body in factory.requests], [b"a=1&b=%40", b"c=2"])
        head = factory.requests[0][0].lower()
        self.assertIn(b"content-length: 9", head)
        self.assertIn(b"x-test: 1", head)
        self.assertNotIn(b"cookie", head)

    @inlineCallbacks
    def test_redirectNotFollowed(self) -> Any:
        """
        A 3xx is an answer like any other: the caller decides; nothing follows
        C{Location}.
        """
        factory, url = self.serve(
            fixed(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
        )
        answer = yield self.post(url)
        self.assertEqual(answer.code, 302)
        self.assertEqual(len(factory.requests), 1)

    @inlineCallbacks
    def test_oversizeByLength(self) -> Any:
        """
        A Content-Length over the cap is refused without reading the body; the
        connection is closed.
        """
        factory, url = self.serve(
            fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
        )
        f = yield self.assertFailure(self.post(url, maxBody=100), BackendUnavailable)
        self.assertIn("1000 bytes", str(f))
        # The connection is not reused with the rest of that body in it.
        factory.script = fixed(OK)
        answer = yield self.post(url)
        self.assertEqual(answer.body, b"ok")

    @inlineCallbacks
    def test_endlessChunkedBody(self) -> Any:
        """
        A chunked body that grows past the cap fails at the cap and the
        connection is closed (it is not read for ever).
        """

        def endless(server: _Server, head: bytes, body: bytes) -> None:
            assert server.transport is not None
            server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

            def more() -> None:
                if server.transport is not None and not server.gone:
                    server.transport.write(b"40\r\n" + b"x" * 64 + b"\r\n")
                    reactor.callLater(0, more)  # type: ignore[attr-defined]

            more()

        factory, url = self.serve(endless)
        f = yield self.assertFailure(self.post(url, maxBody=4096), BackendUnavailable)
        self.assertIn("over 4096 bytes", str(f))
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(factory.lost, 1)
        self.assertEqual(self.http.budget.used, 0)

    @inlineCallbacks
    def test_budgetShared(self) -> Any:
        """
        Bodies being read share one budget: past it, an answer fails instead
        of growing the daemon, and what it held is given back.
        """

        def slowBody(server: _Server, head: bytes, body: bytes) -> None:
            assert server.transport is not None
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + b"y" * 2000)

        factory, url = self.serve(slowBody, timeout=1.0, budget=BodyBudget(3000))
        first = self.post(url, maxBody=4000)
        second = self.post(url, maxBody=4000)
        results = yield Deferred.fromCoroutine(_settle([first, second]))
        failures = [r for r in results if isinstance(r, BaseException)]
        self.assertEqual(len(failures), 2)  # one over budget, one cancelled below
        self.assertTrue(any("memory budget" in str(e) for e in failures), failures)

    @inlineCallbacks
    def test_hangAfterHeaders(self) -> Any:
        """
        A server that sends the headers and then nothing: the time limit
        covers the body too, and the reason says so.
        """
        factory, url = self.serve(
            fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), timeout=0.5
        )
        f = yield self.assertFailure(self.post(url), BackendUnavailable)
        self.assertIn("no answer within 0.5 s", str(f))

    @inlineCallbacks
    def test_resetMidBody(self) -> Any:
        def reset(server: _Server, head: bytes, body: bytes) -> None:
            assert server.transport is not None
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            server.transport.abortConnection()  # type: ignore[attr-defined]

        factory, url = self.serve(reset)
        yield self.assertFailure(self.post(url), BackendUnavailable)

    @inlineCallbacks
    def test_retryWhenPooledConnectionClosed(self) -> Any:
        """
        The server closing a kept-alive connection while it is idle costs one
        retry on a fresh connection, not a failed login.
        """

        def answerThenClose(server: _Server, head: bytes, body: bytes) -> None:
            assert server.transport is not None
            if len(server.f.requests) == 1:
                server.transport.write(OK)
            else:
                # The second request arrives on the pooled connection: close
                # it without answering, as a server whose keep-alive ran out.
                server.transport.abortConnection()  # type: ignore[attr-defined]
                server.f.script = fixed(OK)

        factory, url = self.serve(answerThenClose)
        yield self.post(url)
        answer = yield self.post(url)
        self.assertEqual(answer.body, b"ok")
        self.assertEqual(len(factory.connections), 2)

    @inlineCallbacks
    def test_retryOnlyOnce(self) -> Any:
        def neverAnswer(server: _Server, head: bytes, body: bytes) -> None:
            assert server.transport is not None
            server.transport.abortConnection()  # type: ignore[attr-defined]

        factory, url = self.serve(neverAnswer)
        yield self.assertFailure(self.post(url), BackendUnavailable)
        self.assertEqual(len(factory.requests), 2)

    @inlineCallbacks
    def test_cancelClosesConnection(self) -> Any:
        """
        Cancelling a request (the client went away) closes its connection:
        nothing is left reading for it.
        """
        factory, url = self.serve(lambda server, head, body: None)
        d = self.post(url)
        yield deferLater(reactor, 0.1, lambda: None)
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(factory.lost, 1)

    @inlineCallbacks
    def test_refused(self) -> Any:
        factory, url = self.serve(fixed(OK))
        port = freeClosedPort()
        f = yield self.assertFailure(
            self.post(f"http://127.0.0.1:{port}/x".encode()), BackendUnavailable
        )
        self.assertIn("ConnectionRefused", str(f))


async def _settle(ds: list[Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        try:
            out.append(await d)
        except BaseException as e:
            out.append(e)
            for other in ds:
                other.cancel()
    return out


def freeClosedPort() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TurnTests(SynchronousTestCase):
    def test_boundedInFlight(self) -> None:
        """
        At most C{maxRequests} requests are sent at once; the others wait for
        a turn, and a waiting request that is cancelled never starts.
        """
        sent: list[Deferred[Any]] = []

        class Agent:
            def request(self, *a: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                sent.append(d)
                return d

        http = HTTPRequester(Agent(), Clock(), 10, maxRequests=2)  # type: ignore[arg-type]
        ds = [http.request(b"GET", b"http://x/", Headers(), None, 10) for _ in range(4)]
        self.assertEqual(len(sent), 2)
        ds[2].cancel()
        self.failureResultOf(ds[2], CancelledError)
        sent[0].cancel()
        self.failureResultOf(ds[0], CancelledError)
        self.assertEqual(len(sent), 3)  # the fourth started, the cancelled third did not


class HelperTests(SynchronousTestCase):
    def test_deepJSON(self) -> None:
        """
        An answer nested too deeply for the parser is "not JSON", not a crash.
        """
        self.assertIsNone(parseJSON(b"[" * 200_000 + b"]" * 200_000))
        self.assertIsNone(parseJSON(b"<html>"))
        self.assertEqual(parseJSON(b'{"a": 1}'), {"a": 1})

    def test_describeTLSToPlainPort(self) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        class SSLError(Exception):
            pass

        f = Failure(ResponseNeverReceived([Failure(SSLError("[('SSL routines', '', 'wrong version number')]"))]))
        self.assertIn("does not speak TLS", describeFailure(f))
