"""
The backends' HTTP: requests through Twisted's L{Agent} over one persistent
L{HTTPConnectionPool}, with what an authentication backend needs on top.

 - one time limit over the whole request (connect, send, headers and body),
   shared by all requests on one timer (L{xcauth.deadlines});
 - a size cap on every body, and a cap on the bytes all bodies in flight may
   hold together (L{BodyBudget});
 - every body read to its end or the connection closed, so a pooled connection
   is only reused after a complete answer;
 - cancellation (the client went away) closes the request's connection;
 - a bounded number of requests in flight (the rest wait their turn);
 - one retry on a fresh connection when a pooled connection turns out to have
   been closed by the server before it answered (L{Agent} retries only
   idempotent requests without a body by itself; JSXC requests are POSTs);
 - failures as L{BackendUnavailable} with a reason that is safe to log.

There is no cookie jar (L{Agent} keeps no cookies) and redirects are not
followed (L{Agent} does not follow them): a backend that redirects is
misconfigured, and the caller says so.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    TimeoutError,
    succeed,
)
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IConsumer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from xcauth.deadlines import Deadlines
from xcauth.interfaces import BackendUnavailable, Outcome
from xcauth.text import printable
from xcauth.twistedprivate import RequestNotSent, quietConnectionPool

log = Logger()

#: Requests to the backends in flight at once, overall; more wait for a turn.
#: Each holds one connection (a file descriptor) for as long as Nextcloud
#: takes to answer, so this stays well below the file descriptor limit.
DEFAULT_MAX_REQUESTS = 512
#: Idle connections kept per backend host, and for how long.  A server that
#: closes an idle connection first costs one retry.  As many as may be in use:
#: after a burst of logins, fewer would be closed only to be opened again by
#: the next burst (a connect and, for https, a TLS handshake each).
DEFAULT_IDLE_CONNECTIONS = DEFAULT_MAX_REQUESTS
DEFAULT_IDLE_SECONDS = 30.0
#: Bytes all backend answers being read may hold together.
DEFAULT_BODY_BUDGET = 64 * 1024 * 1024


def makeAgent(
    reactor: Any,
    connectTimeout: float,
    idleConnections: int = DEFAULT_IDLE_CONNECTIONS,
    idleSeconds: float = DEFAULT_IDLE_SECONDS,
    tlsPolicy: IPolicyForHTTPS | None = None,
    retryAutomatically: bool = True,
) -> tuple[IAgent, HTTPConnectionPool]:
    """
    The daemon's L{Agent} and its connection pool (close the pool on stop).

    @param tlsPolicy: how https certificates are checked; by default Twisted's
        browser-like policy (the system's trust roots, host names checked with
        service-identity).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    # Each new connection's factory would log "Starting factory ..." and
    # "Stopping factory ...": two lines per backend connection, hundreds
    # after a burst of logins.
    quietConnectionPool(pool)
    # The default keeps 2 idle connections per host: far too few for hundreds
    # of logins at once, each of which would then open a new connection.
    pool.maxPersistentPerHost = idleConnections
    pool.cachedConnectionTimeout = idleSeconds  # type: ignore[assignment]
    pool.retryAutomatically = retryAutomatically
    endpoints = _Endpoints(reactor, tlsPolicy or BrowserLikePolicyForHTTPS(), connectTimeout)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Agent's endpoints, made once per origin: Agent's own factory builds a
    L{HostnameEndpoint} (host name IDNA-encoded) and a TLS connection creator
    for every request, which profiled as a tenth of a backend login's CPU.
    xcauth talks to one or a few origins, so they are kept.
    """

    def __init__(self, reactor: Any, tlsPolicy: IPolicyForHTTPS, connectTimeout: float) -> None:
        self._reactor = reactor
        self._tlsPolicy = tlsPolicy
        self._connectTimeout = connectTimeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        known = self._endpoints.get(key)
        if known is not None:
            return known
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            # No name resolution for an address (HostnameEndpoint would
            # still ask getaddrinfo, in a thread, for every connection).
            endpoint = TCP4ClientEndpoint(
                self._reactor, host, uri.port, timeout=self._connectTimeout
            )
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(
                self._reactor, host, uri.port, timeout=self._connectTimeout
            )
        else:
            endpoint = HostnameEndpoint(
                self._reactor, uri.host, uri.port, timeout=self._connectTimeout
            )
        if uri.scheme == b"https":
            creator = self._tlsPolicy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        self._endpoints[key] = endpoint
        return endpoint


class BodyBudget:
    """
    The bytes that all backend answers being read may hold together.  An
    answer that would exceed it fails as L{BackendUnavailable} instead of
    growing the daemon.
    """

    def __init__(self, limit: int = DEFAULT_BODY_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """
        Reserve C{size} bytes; C{False} (nothing reserved) if that would exceed
        the budget.
        """
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """
        Return bytes reserved with L{take}.
        """
        self.used -= size


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """
    A complete HTTP answer.
    """

    code: int
    headers: Headers
    body: bytes


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body known in full: written at once, with its exact length
    (L{twisted.web.client.FileBodyProducer} would schedule a task per body).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Request:
    """
    What to send, while the request waits for its turn.
    """

    method: bytes
    url: bytes
    headers: Headers
    body: bytes | None
    maxBody: int


class _CappedBody(Protocol):
    """
    Collects a body of at most C{limit} bytes within a L{BodyBudget}; closes
    the connection when it is cancelled or the body grows past either.

    (C{treq.collect} does the collecting, but its L{Deferred} cannot be
    cancelled: a cancelled request would go on reading an endless body.)
    """

    def __init__(self, limit: int, budget: BodyBudget) -> None:
        self.limit = limit
        self.budget = budget
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)
        self._over = False

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        self.budget.give(self.size)
        self.size = 0
        self.chunks = []
        self._over = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._over:
            return
        size = len(data)
        if self.size + size > self.limit:
            self._stop()
            self.finished.errback(BackendUnavailable(f"answer over {self.limit} bytes"))
            return
        if not self.budget.take(size):
            self._stop()
            self.finished.errback(
                BackendUnavailable("answers being read exceed the memory budget")
            )
            return
        self.size += size
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._over:
            return
        self._over = True
        body = b"".join(self.chunks)
        self.budget.give(self.size)
        self.chunks = []
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(body)
        else:
            self.finished.errback(reason)


class _Discard(Protocol):
    """
    Throws a body away by closing its connection (an answer too large to read).
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


class HTTPRequester:
    """
    Backend requests through one L{IAgent}: the daemon's pooled L{Agent}, or
    in tests treq's L{treq.testing.RequestTraversalAgent}.

    @param agent: what sends the requests.
    @param clock: the clock of the time limit.
    @param timeout: seconds for a whole request, from the moment it is allowed
        to start until its body has been read.
    @param maxRequests: requests in flight at once; more wait for a turn
        (their wait counts against their caller's deadline, not this timeout).
    @param budget: the memory all bodies being read may use together.
    """

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        timeout: float,
        maxRequests: int = DEFAULT_MAX_REQUESTS,
        budget: BodyBudget | None = None,
    ) -> None:
        self.agent = agent
        self.timeout = timeout
        self._deadlines = Deadlines(clock, timeout)
        self._turns = DeferredSemaphore(maxRequests)
        self.budget = budget if budget is not None else BodyBudget()

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: bytes | None,
        maxBody: int,
    ) -> Deferred[Answer]:
        """
        Send one request and read its answer (any status).

        @param url: the absolute URL, already encoded (encode it once, not per
            request: hyperlink's parsing costs more than the rest).
        @param maxBody: the largest body accepted.
        @return: a L{Deferred} firing with the L{Answer}, or failing with
            L{BackendUnavailable} (no answer, time limit, connection failure,
            body too large) or L{CancelledError} when cancelled.
        """
        turn: Deferred[Any] = self._turns.acquire()
        turn.addCallback(self._start, _Request(method, url, headers, body, maxBody))
        turn.addErrback(self._unavailable, url)
        return turn

    def _start(self, _: object, r: _Request) -> Deferred[Answer]:
        d: Deferred[Any] = self._send(r.method, r.url, r.headers, r.body, r.method == b"POST")
        d.addCallback(self._read, r.maxBody)
        d.addErrback(_normalizeCancel)
        self._deadlines.watch(d)
        d.addBoth(self._release)
        return d

    def _release(self, result: Any) -> Any:
        self._turns.release()
        return result

    def _send(
        self, method: bytes, url: bytes, headers: Headers, body: bytes | None, retry: bool
    ) -> Deferred[IResponse]:
        # Agent.request rather than treq.request: treq would parse and
        # re-encode the URL (hyperlink, IDNA) on every call, which measured
        # as the largest cost per login; there are no cookies, redirects or
        # query parameters for treq to help with.
        producer = BytesProducer(body) if body is not None else None
        d = self.agent.request(method, url, headers, producer)
        if retry:
            d.addErrback(self._again, method, url, headers, body)
        return d

    def _again(
        self, f: Failure, method: bytes, url: bytes, headers: Headers, body: bytes | None
    ) -> Deferred[IResponse] | Failure:
        # A pooled connection the server closed while idle fails before any
        # answer; the requests only read state, so one retry is safe.
        f.trap(ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)
        if _cancelled(f):
            return f
        return self._send(method, url, headers, body, retry=False)

    def _read(self, response: IResponse, maxBody: int) -> Deferred[Answer]:
        if response.length is not UNKNOWN_LENGTH and response.length > maxBody:
            response.deliverBody(_Discard())
            raise BackendUnavailable(f"answer of {response.length} bytes")
        collector = _CappedBody(maxBody, self.budget)
        response.deliverBody(collector)
        return collector.finished.addCallback(
            lambda body: Answer(response.code, response.headers, body)
        )

    def _unavailable(self, f: Failure, url: bytes) -> Failure:
        if f.check(BackendUnavailable, CancelledError):
            return f
        if f.check(TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
            if url.startswith(b"https:"):
                # A plain-HTTP server waits for a request line that a TLS
                # handshake never sends: both sides wait until this limit.
                reason += " (if that port speaks plain HTTP, the TLS handshake never completes: check the url's scheme)"
        else:
            reason = describeFailure(f)
        return Failure(BackendUnavailable(reason))


def _normalizeCancel(f: Failure) -> Failure:
    # Agent reports a cancelled request as a connection failure wrapping a
    # CancelledError; make it a plain cancellation so that the time limit
    # (and callers) see what it is.
    return Failure(CancelledError()) if _cancelled(f) else f


def _cancelled(f: Failure) -> bool:
    """
    Whether C{f} is the HTTP client's way of saying "cancelled by the caller".
    """
    if f.check(CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(f.value, "reasons", None) or [])


def unavailableOutcome(f: Failure, what: str, user: str, domain: str) -> Outcome:
    """
    The errback of a backend client's answer: a request the backend gave no
    usable answer to is L{Outcome.UNAVAILABLE}, with a warning saying why
    (anything unexpected is logged with its traceback); a cancellation goes
    on as it is.
    """
    f.trap(Exception)
    if f.check(CancelledError):
        f.raiseException()
    if f.check(BackendUnavailable):
        log.warn(
            "Nextcloud backend unavailable for {what} of {user}@{domain}: {reason}",
            what=what,
            user=printable(user),
            domain=printable(domain),
            reason=str(f.value),
        )
    else:
        log.failure(
            "Unexpected error talking to Nextcloud for {user}@{domain}",
            f,
            user=printable(user),
            domain=printable(domain),
        )
    return Outcome.UNAVAILABLE


def describeFailure(f: Failure) -> str:
    """
    A short description of why a request failed, safe to log (no URL
    credentials, no body).
    """
    value = f.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        texts = [describeFailure(r) for r in reasons]
        if any("WRONG_VERSION_NUMBER" in t or "wrong version number" in t for t in texts):
            return "TLS handshake failed: the server does not speak TLS (is the url http://?)"
        return "; ".join(texts)
    if "Too many open files" in str(value) or _outOfDescriptors():
        return "out of file descriptors (raise LimitNOFILE, or lower max-connections)"
    if isinstance(value, DNSLookupError):
        return f"cannot resolve the host name: {value}"[:300]
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}"[:300]


def _outOfDescriptors() -> bool:
    """
    Whether this process is at its file descriptor limit (a failure to
    connect or resolve is then that, whatever it says).
    """
    import resource

    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return len(os.listdir("/proc/self/fd")) >= soft - 2
    except OSError as e:
        return e.errno == errno.EMFILE


def parseJSON(body: bytes) -> Any:
    """
    The JSON value of C{body}, or C{None} if it is not JSON (or nested too
    deeply to parse: no backend answer is).
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
