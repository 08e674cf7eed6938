"""
Client for the external API of Nextcloud's JSXC app (ojsxc).

Every request is a form-encoded POST signed with
C{X-JSXC-SIGNATURE: sha1=HMAC-SHA1(secret, body)}.  Only a JSON C{noauth} answer
means "wrong password"; anything the server does not answer properly (5xx,
non-JSON, a redirect, a timeout, a refused connection) means the backend is
unavailable, which callers distinguish from a "no" (see L{Outcome}).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from hyperlink import URL
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from xcauth.deadlines import Deadlines
from xcauth.httpclient import AnswerTooLarge, HTTPClientPool
from xcauth.interfaces import BackendUnavailable, Outcome

log = Logger()

# A JSXC answer is a few hundred bytes; a shared roster may be larger.  Anything
# past this is not a JSXC answer and is treated as "backend unavailable".
MAX_BODY = 4 * 1024 * 1024

_CONTENT_TYPE = [b"application/x-www-form-urlencoded"]
_USER_AGENT = [b"xcauth"]
_FIXED_HEADERS = (
    b"Content-Type: " + _CONTENT_TYPE[0] + b"\r\nUser-Agent: " + _USER_AGENT[0] + b"\r\n"
)


def encodeBody(fields: list[tuple[str, str]]) -> bytes:
    """
    Form-encode C{fields} in the given order, the way the signature is computed.
    """
    return "&".join(
        f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in fields
    ).encode("ascii")


def sign(secret: bytes, body: bytes) -> bytes:
    """
    The C{X-JSXC-SIGNATURE} header value for C{body}.
    """
    return b"sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest().encode("ascii")


def validateURL(url: str) -> str:
    """
    Check that C{url} is an absolute http(s) URL with a host and return it.

    @raise ValueError: with a message a person can act on.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"url {url!r} must be an absolute http:// or https:// URL, e.g. "
            "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"url {url!r} has an invalid port") from None
    return url


@implementer(IBodyProducer)
class _BytesProducer:
    """
    The smallest body producer: writes one byte string at once.
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


class NextcloudClient:
    """
    Signed requests to one JSXC external API endpoint.

    @param agent: what to send requests with: in production the daemon's
        L{xcauth.httpclient.HTTPClientPool}; any L{IAgent} works too (in tests
        treq's L{treq.testing.RequestTraversalAgent}).
    @param url: the external API URL.
    @param secret: the API secret used to sign requests.
    @param clock: the clock for the request deadline.
    @param timeout: seconds for a whole request (connect, send, headers, body).
    """

    def __init__(
        self,
        agent: IAgent | HTTPClientPool,
        url: str,
        secret: bytes,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        # The agent for requests that do not go through an HTTPClientPool origin.
        self._agent = None if isinstance(agent, HTTPClientPool) else agent
        self.url = validateURL(url)
        # Encode the URL once: parsing it on every request costs more than the
        # rest of the client together.
        self._urlBytes = URL.from_text(url).to_uri().to_text().encode("ascii")
        self._origin = agent.origin(url) if isinstance(agent, HTTPClientPool) else None
        self._secret = secret
        self._clock = clock
        self._timeout = timeout
        # One timer for the time limits of all requests (see xcauth.deadlines).
        self._deadlines = Deadlines(clock, timeout)

    def _post(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        if self._origin is not None:
            d = self._origin.post(
                _FIXED_HEADERS + b"X-JSXC-SIGNATURE: " + sign(self._secret, body) + b"\r\n",
                body,
                MAX_BODY,
            )
            d.addErrback(_tooLarge)
            return self._deadlines.watch(d)
        return self._postWithAgent(body)

    def _postWithAgent(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        headers = Headers(
            {
                b"content-type": _CONTENT_TYPE,
                b"user-agent": _USER_AGENT,
                b"x-jsxc-signature": [sign(self._secret, body)],
            }
        )

        agent = self._agent
        assert agent is not None  # else self._origin is set and _post uses it

        def send(retry: bool) -> Deferred[IResponse]:
            d = agent.request(
                b"POST", self._urlBytes, headers, _BytesProducer(body)
            )
            if retry:
                # A pooled connection the server closed while idle fails before
                # any response; these requests only read state, so one retry on a
                # fresh connection is safe.
                def again(f: Failure) -> Deferred[IResponse] | Failure:
                    f.trap(ResponseNeverReceived)
                    if _cancelled(f):
                        return f
                    return send(False)

                d.addErrback(again)
            return d

        def read(response: IResponse) -> Deferred[tuple[int, bytes]]:
            if response.length is not UNKNOWN_LENGTH and response.length > MAX_BODY:
                response.deliverBody(_Discard())
                raise BackendUnavailable(f"answer of {response.length} bytes")
            return readBody(response).addCallback(lambda b: (response.code, b))

        def normalizeCancel(f: Failure) -> Failure:
            # The HTTP client reports a cancelled request as a connection
            # failure; make it a plain cancellation so that addTimeout (and
            # callers) see what it is.
            return Failure(CancelledError()) if _cancelled(f) else f

        d = send(True).addCallback(read).addErrback(normalizeCancel)
        return self._deadlines.watch(d)

    def call(
        self, operation: str, username: str, domain: str, password: str | None = None
    ) -> Deferred[Any]:
        """
        Send one operation and return the decoded JSON answer of a C{200}.

        @return: a L{Deferred} firing with the parsed JSON object, or failing
            with L{BackendUnavailable} (any other status, non-JSON, timeout,
            connection failure), whose message is safe to log.
        """
        fields = [("operation", operation), ("username", username), ("domain", domain)]
        if password is not None:
            fields.append(("password", password))
        d = self._post(encodeBody(fields))
        d.addCallbacks(self._decode, self._unavailable)
        return d

    def _unavailable(self, f: Failure) -> Failure:
        if f.check(BackendUnavailable, CancelledError):
            return f
        if f.check(TimeoutError):
            reason = f"no answer within {self._timeout:g} s"
        else:
            reason = _describe(f)
        return Failure(BackendUnavailable(reason))

    def _decode(self, result: tuple[int, bytes]) -> Any:
        code, body = result
        parsed = _parseJSON(body)
        if code != 200:
            message = ""
            if isinstance(parsed, dict) and isinstance(parsed.get("data"), dict):
                message = str(parsed["data"].get("msg", ""))[:200]
            if "signature" in message.lower():
                log.error(
                    "Nextcloud at {url} rejected the request signature: the secret "
                    "configured for xcauth does not match the JSXC app's API secret",
                    url=self.url,
                )
                raise BackendUnavailable(f"HTTP {code}: signature mismatch")
            if 300 <= code < 400:
                raise BackendUnavailable(
                    f"HTTP {code} redirect (not followed): check the url setting"
                )
            raise BackendUnavailable(f"HTTP {code} {message}".rstrip())
        if not isinstance(parsed, dict):
            raise BackendUnavailable("HTTP 200 with a body that is not a JSON object")
        return parsed

    def auth(self, user: str, domain: str, password: str) -> Deferred[Outcome]:
        """
        Check a password: L{Outcome.YES}, L{Outcome.NO} (only for C{noauth}) or
        L{Outcome.UNAVAILABLE}.
        """
        return self._classify(
            self.call("auth", user, domain, password), _authAnswer, user, domain
        )

    def isUser(self, user: str, domain: str) -> Deferred[Outcome]:
        """
        Ask whether a user exists: L{Outcome.YES}, L{Outcome.NO} or
        L{Outcome.UNAVAILABLE}.
        """
        return self._classify(
            self.call("isuser", user, domain), _isUserAnswer, user, domain
        )

    def sharedRoster(self, user: str, domain: str) -> Deferred[bytes | None]:
        """
        The shared roster of a user as the backend's JSON, compacted to one line,
        or C{None} if the backend gave no usable answer.
        """

        def compact(parsed: Any) -> bytes | None:
            if parsed.get("result") != "success":
                return None
            return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode(
                "utf-8"
            )

        d = self.call("sharedroster", user, domain)
        d.addCallback(compact)
        d.addErrback(self._logUnavailable, "sharedroster", user, domain, None)
        return d

    def _classify(
        self,
        d: Deferred[Any],
        interpret: Callable[[Any], Outcome],
        user: str,
        domain: str,
    ) -> Deferred[Outcome]:
        d.addCallback(interpret)
        d.addErrback(self._logUnavailable, "request", user, domain, Outcome.UNAVAILABLE)
        return d

    def _logUnavailable(
        self, f: Failure, what: str, user: str, domain: str, answer: Any
    ) -> Any:
        if f.check(BackendUnavailable):
            log.warn(
                "Nextcloud backend unavailable for {what} of {user}@{domain}: {reason}",
                what=what,
                user=user,
                domain=domain,
                reason=str(f.value),
            )
        elif f.check(CancelledError):
            return f
        else:
            log.failure(
                "Unexpected error talking to Nextcloud for {user}@{domain}",
                f,
                user=user,
                domain=domain,
            )
        return answer


class _Discard:
    """
    A body protocol that throws the body away (and so frees the connection).
    """

    transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


def _cancelled(f: Failure) -> bool:
    """
    Whether C{f} is the HTTP client's way of saying "cancelled by the caller".
    """
    if f.check(CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(f.value, "reasons", None) or [])


def _tooLarge(f: Failure) -> Failure:
    if f.check(AnswerTooLarge):
        return Failure(BackendUnavailable(str(f.value)))
    return f


def _parseJSON(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _authAnswer(parsed: Any) -> Outcome:
    result = parsed.get("result")
    if result == "success":
        return Outcome.YES
    if result == "noauth":
        return Outcome.NO
    raise BackendUnavailable(f"unexpected auth result {str(result)[:40]!r}")


def _isUserAnswer(parsed: Any) -> Outcome:
    data = parsed.get("data")
    if parsed.get("result") == "success" and isinstance(data, dict):
        isUser = data.get("isUser")
        if isUser is True:
            return Outcome.YES
        if isUser is False:
            return Outcome.NO
    raise BackendUnavailable("unexpected isuser answer")


def _describe(f: Failure) -> str:
    value = f.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}"[:300]

