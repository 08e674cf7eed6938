"""
A small HTTP/1.1 client for the backend: signed POSTs over a pool of
keep-alive connections, one request per connection at a time.

xcauth sends thousands of tiny requests per second to one origin.  Twisted's
L{twisted.web.client.Agent} parses the URL, builds an endpoint, a L{Headers}
object, a request and a response object with a body protocol for every one of
them, and parses the answer line by line; together that costs more CPU than the
rest of the daemon.  This client encodes the constant part of the request once
per origin, writes each request with one C{write}, and parses the answer from
the bytes it arrives in.

What it understands of HTTP/1.1 answers: a status line and headers, bodies
delimited by C{Content-Length}, by C{Transfer-Encoding: chunked} or by the end
of the connection, C{1xx} interim answers (skipped), C{204}/C{304} without a
body, and C{Connection: close}.  It never pipelines and never follows redirects.
A connection is reused only after a complete, well-formed answer that leaves
no extra bytes.  https uses Twisted's TLS with the same certificate checks as
L{twisted.web.client.Agent}'s default policy.
"""

from __future__ import annotations

from typing import Any

from hyperlink import URL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.python.reflect import qual

#: The status line and headers of an answer may not be longer than this.
MAX_HEAD = 64 * 1024

_HEXDIGITS = b"0123456789abcdefABCDEF"


class HTTPProtocolError(Exception):
    """
    The server's answer is not HTTP/1.x as this client understands it.
    """


class AnswerTooLarge(Exception):
    """
    The answer's body is longer than the caller allows.
    """


class ConnectionLostBeforeAnswer(Exception):
    """
    The connection ended before the answer was complete.
    """


class _Connection(Protocol):
    """
    One keep-alive connection to an origin.
    """

    # TCP, or TLS over TCP: both can abort.
    transport: ITCPTransport | None

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.pending: Deferred[tuple[int, bytes]] | None = None
        self.maxBody = 0
        self.idleSince = 0.0
        self.gone = False
        self.received = False
        self._reset()

    def _reset(self) -> None:
        self._buffer = b""
        self._code = 0
        self._headDone = False
        self._length: int | None = None
        self._chunked = False
        self._untilClose = False
        self._close = False
        self._body: list[bytes] = []
        self._bodySize = 0
        self._chunkLeft = -1

    def send(self, data: bytes, maxBody: int) -> Deferred[tuple[int, bytes]]:
        """
        Write one request; the L{Deferred} fires with the status and body.
        """
        self._reset()
        self.received = False
        self.maxBody = maxBody
        d: Deferred[tuple[int, bytes]] = Deferred(self._cancel)
        self.pending = d
        assert self.transport is not None
        self.transport.write(data)
        return d

    def _cancel(self, d: Deferred[tuple[int, bytes]]) -> None:
        if self.pending is d:
            self.pending = None
            self._abort()

    def _abort(self) -> None:
        self.gone = True
        self.origin.forget(self)
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.pending is None:
            # Bytes nobody asked for: the connection cannot be trusted.
            self._abort()
            return
        self.received = True
        try:
            self._parse(self._buffer + data if self._buffer else data)
        except (HTTPProtocolError, AnswerTooLarge) as e:
            d, self.pending = self.pending, None
            self._abort()
            if d is not None:
                d.errback(Failure(e))

    def _parse(self, data: bytes) -> None:
        while not self._headDone:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    raise HTTPProtocolError("answer head too long")
                self._buffer = data
                return
            if end > MAX_HEAD:
                raise HTTPProtocolError("answer head too long")
            self._head(data[:end])
            data = data[end + 4 :]
        if self._chunked:
            rest = self._chunks(data)
            if rest is None:
                return
            data = rest
        elif self._length is not None:
            need = self._length - self._bodySize
            if len(data) < need:
                self._addBody(data)
                self._buffer = b""
                return
            self._addBody(data[:need])
            data = data[need:]
        else:
            self._addBody(data)
            self._buffer = b""
            return
        self._complete(extra=bool(data))

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            # A bare CR or LF: other parsers would see another line there.
            raise HTTPProtocolError("bare CR or LF in the answer head")
        parts = lines[0].split(b" ", 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise HTTPProtocolError("not an HTTP/1.x status line")
        try:
            code = int(parts[1])
        except ValueError:
            raise HTTPProtocolError("bad status code") from None
        if code == 101:
            # Never asked for: what follows is not HTTP/1.1.
            raise HTTPProtocolError("unexpected 101 Switching Protocols")
        if 100 <= code < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one
            # follows.
            return
        close = parts[0] == b"HTTP/1.0"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or name[:1].isspace():
                # A line starting with whitespace is obsolete line folding:
                # the previous field's value, not a field of its own.
                raise HTTPProtocolError("bad header line")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                try:
                    # int() also takes "+5", "5_0", and more digits than any
                    # body: only plain ASCII digits are a length.
                    if not value.isdigit():
                        raise ValueError
                    n = int(value)
                except ValueError:
                    raise HTTPProtocolError("bad Content-Length") from None
                if n < 0 or (length is not None and n != length):
                    raise HTTPProtocolError("bad Content-Length")
                length = n
            elif name == b"transfer-encoding":
                codings = [c.strip().lower() for c in value.split(b",")]
                chunked = codings[-1] == b"chunked"
                if not chunked:
                    raise HTTPProtocolError("unsupported Transfer-Encoding")
            elif name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    close = False
        self._code = code
        self._headDone = True
        self._close = close
        if code in (204, 304):
            self._length = 0
        elif chunked:
            self._chunked = True
            if length is not None:
                # Both: the length is ignored (RFC 9112, 6.3), and a server
                # that sends both cannot be trusted with the next request.
                self._close = True
        elif length is not None:
            if length > self.maxBody:
                raise AnswerTooLarge(f"answer of {length} bytes")
            self._length = length
        else:
            self._untilClose = True
            self._close = True

    def _chunks(self, data: bytes) -> bytes | None:
        """
        Decode chunks; the bytes after the last chunk, or C{None} for more.
        C{_chunkLeft} is the rest of the current chunk (0: only its CRLF is
        missing), C{-1} before a chunk size line, C{-2} in the trailers.
        """
        while True:
            if self._chunkLeft == -1:
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise HTTPProtocolError("chunk size line too long")
                    self._buffer = data
                    return None
                if end > MAX_HEAD:
                    raise HTTPProtocolError("chunk size line too long")
                line = data[:end]
                if b"\n" in line or b"\r" in line:
                    raise HTTPProtocolError("bare CR or LF in a chunk size line")
                size = line.split(b";", 1)[0].rstrip(b" \t")
                try:
                    # Hex digits only: int(..., 16) also takes "0x5", "+5", "5_0",
                    # and surrounding whitespace.
                    if size.strip(_HEXDIGITS):
                        raise ValueError
                    n = int(size, 16)
                except ValueError:
                    raise HTTPProtocolError("bad chunk size") from None
                data = data[end + 2 :]
                self._chunkLeft = n if n else -2
            if self._chunkLeft == -2:
                if data.startswith(b"\r\n"):
                    return data[2:]
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise HTTPProtocolError("trailers too long")
                    self._buffer = data
                    return None
                if end > MAX_HEAD:
                    raise HTTPProtocolError("trailers too long")
                trailers = data[: end + 2]
                crlf = trailers.count(b"\r\n")
                if trailers.count(b"\n") != crlf or trailers.count(b"\r") != crlf:
                    raise HTTPProtocolError("bare CR or LF in the trailers")
                return data[end + 4 :]
            n = self._chunkLeft
            if len(data) < n + 2:
                take = min(n, len(data))
                self._addBody(data[:take])
                self._chunkLeft -= take
                self._buffer = data[take:]
                return None
            self._addBody(data[:n])
            if data[n : n + 2] != b"\r\n":
                raise HTTPProtocolError("chunk not followed by CRLF")
            data = data[n + 2 :]
            self._chunkLeft = -1

    def _addBody(self, data: bytes) -> None:
        if not data:
            return
        self._bodySize += len(data)
        if self._bodySize > self.maxBody:
            raise AnswerTooLarge(f"answer of more than {self.maxBody} bytes")
        self._body.append(data)

    def _complete(self, extra: bool = False) -> None:
        d, self.pending = self.pending, None
        result = (self._code, b"".join(self._body))
        self._buffer = b""
        if self._close or extra:
            self.gone = True
            self.origin.forget(self)
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.origin.release(self)
        if d is not None:
            d.callback(result)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone = True
        self.origin.forget(self)
        d = self.pending
        if d is None:
            return
        clean = reason is None or reason.check(ConnectionDone) is not None
        if self._headDone and self._untilClose and clean:
            # Only a clean close ends such a body: a reset or a TLS error
            # (no close_notify) may have cut it short.
            self._complete()
            return
        self.pending = None
        why = "" if clean else f" ({qual(type(reason.value))}: {reason.getErrorMessage()})"[:300]
        d.errback(Failure(ConnectionLostBeforeAnswer(
            "connection closed before the answer was complete" + why
        )))


class _OneConnection(Factory):
    """
    Builds one given connection, without a log line (Twisted's
    C{connectProtocol} logs two per connection).
    """

    noisy = False

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> _Connection:
        return self.conn


class Origin:
    """
    The connections to one scheme, host and port, and the encoded start of
    every request to one URL on it.
    """

    def __init__(self, pool: HTTPClientPool, url: str) -> None:
        self.pool = pool
        uri = URL.from_text(url).to_uri()
        self.scheme = uri.scheme
        self.host = uri.host
        self.port = uri.port or (443 if uri.scheme == "https" else 80)
        target = uri.replace(scheme="", host="", port=None, fragment="").to_text()
        if not target.startswith("/"):
            target = "/" + target.lstrip("/")
        hostHeader = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != (443 if self.scheme == "https" else 80):
            hostHeader += f":{self.port}"
        self.prefix = (
            f"POST {target} HTTP/1.1\r\nHost: {hostHeader}\r\n".encode("ascii")
        )
        self.idle: list[_Connection] = []
        self.active: set[_Connection] = set()
        self._sweep: IDelayedCall | None = None

    def endpoint(self) -> IStreamClientEndpoint:
        """
        Where new connections go (TLS for https).
        """
        pool = self.pool
        # The host is in its URI form: IDNA-encoded, plain ASCII.
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            pool.reactor, self.host.encode("ascii"), self.port,
            timeout=pool.connectTimeout,
        )
        if self.scheme == "https":
            creator = pool.tlsPolicy.creatorForNetloc(self.host.encode("ascii"), self.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def post(self, headers: bytes, body: bytes, maxBody: int) -> Deferred[tuple[int, bytes]]:
        """
        POST C{body} with the header lines C{headers} (each ending in CRLF,
        without C{Content-Length}); fires with C{(status, body)}.  A request on
        a reused connection that the server had closed is retried once on a
        new connection.
        """
        data = b"%sContent-Length: %d\r\n%s\r\n%s" % (self.prefix, len(body), headers, body)
        now = self.pool.reactor.seconds()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.gone or now - conn.idleSince > self.pool.idleTimeout:
                conn.gone = True
                if conn.transport is not None:
                    conn.transport.loseConnection()
                continue
            self.active.add(conn)
            return self._retrying(conn.send(data, maxBody), conn, data, maxBody)
        return self._fresh(data, maxBody)

    def _retrying(
        self, d: Deferred[tuple[int, bytes]], conn: _Connection, data: bytes, maxBody: int
    ) -> Deferred[tuple[int, bytes]]:
        # An errback with arguments rather than a closure: fewer objects per
        # request for the garbage collector.
        return d.addErrback(self._again, conn, data, maxBody)

    def _again(
        self, f: Failure, conn: _Connection, data: bytes, maxBody: int
    ) -> Any:
        # Nothing was received on this reused connection: the server had
        # closed it while idle.  These requests only read state, so one new
        # try is safe.
        if f.check(ConnectionLostBeforeAnswer) and not conn.received:
            return self._fresh(data, maxBody)
        return f

    def _fresh(self, data: bytes, maxBody: int) -> Deferred[tuple[int, bytes]]:
        sending: list[Deferred[tuple[int, bytes]]] = []

        def cancel(_: Deferred[Any]) -> None:
            if sending:
                sending[0].cancel()
            else:
                connecting.cancel()

        result: Deferred[tuple[int, bytes]] = Deferred(cancel)
        conn = _Connection(self)
        connecting = self.endpoint().connect(_OneConnection(conn))

        def connected(_: Any) -> None:
            self.active.add(conn)
            d = conn.send(data, maxBody)
            sending.append(d)
            d.chainDeferred(result)

        def failed(f: Failure) -> None:
            if not result.called:
                result.errback(f)

        connecting.addCallbacks(connected, failed)
        return result

    def release(self, conn: _Connection) -> None:
        """
        C{conn} finished its answer and may be reused.
        """
        self.active.discard(conn)
        if len(self.idle) >= self.pool.maxIdle:
            conn.gone = True
            assert conn.transport is not None
            conn.transport.loseConnection()
            return
        conn.idleSince = self.pool.reactor.seconds()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.pool.reactor.callLater(self.pool.idleTimeout, self._expire)

    def forget(self, conn: _Connection) -> None:
        """
        C{conn} is closed or closing: never use it again.
        """
        self.active.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def _expire(self) -> None:
        self._sweep = None
        now = self.pool.reactor.seconds()
        limit = now - self.pool.idleTimeout
        # The idle list is ordered by idleSince (appended as they become idle).
        old = [c for c in self.idle if c.idleSince <= limit]
        self.idle = [c for c in self.idle if c.idleSince > limit]
        for conn in old:
            conn.gone = True
            if conn.transport is not None:
                conn.transport.loseConnection()
        if self.idle:
            delay = self.idle[0].idleSince + self.pool.idleTimeout - now
            self._sweep = self.pool.reactor.callLater(max(delay, 1.0), self._expire)

    def close(self) -> Deferred[None]:
        """
        Close every idle connection and stop the expiry timer.
        """
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.gone = True
            if conn.transport is not None:
                conn.transport.loseConnection()
        return succeed(None)


class HTTPClientPool:
    """
    Keep-alive connections to the backend origins, shared by all backend
    clients of a daemon.

    @param reactor: provides L{IReactorTCP}, L{IReactorTime} (and TLS).
    @param connectTimeout: seconds to establish a connection.
    @param maxIdle: idle connections kept per origin.
    @param idleTimeout: seconds an idle connection is kept.
    @param tlsPolicy: makes the TLS settings for an https origin
        (C{creatorForNetloc}); by default Agent's browser-like certificate
        checks.
    """

    def __init__(
        self,
        reactor: Any,
        connectTimeout: float = 30.0,
        maxIdle: int = 512,
        idleTimeout: float = 55.0,
        tlsPolicy: Any = None,
    ) -> None:
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        if tlsPolicy is None:
            from twisted.web.client import BrowserLikePolicyForHTTPS

            tlsPolicy = BrowserLikePolicyForHTTPS()
        self.tlsPolicy = tlsPolicy
        self._origins: dict[tuple[str, str, int, bytes], Origin] = {}

    def origin(self, url: str) -> Origin:
        """
        The L{Origin} for posting to C{url} (one per URL, sharing nothing but
        this pool's settings).
        """
        candidate = Origin(self, url)
        key = (candidate.scheme, candidate.host, candidate.port, candidate.prefix)
        return self._origins.setdefault(key, candidate)

    def close(self) -> Deferred[None]:
        """
        Close every idle connection.
        """
        for origin in self._origins.values():
            origin.close()
        return succeed(None)

