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
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hyperlink import URL
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from xcauth.backends.http import Answer, HTTPRequester, parseJSON, unavailableOutcome
from xcauth.interfaces import (
    BackendUnavailable,
    IBackendClient,
    NoMetrics,
    Outcome,
    RosterEntry,
)
from xcauth.text import validateURL

log = Logger()

# A JSXC answer to auth or isuser is a few hundred bytes; a shared roster may be
# far larger.  Anything past these is not a JSXC answer and is treated as
# "backend unavailable".
MAX_ANSWER = 64 * 1024
MAX_ROSTER = 4 * 1024 * 1024

_CONTENT_TYPE = [b"application/x-www-form-urlencoded"]
USER_AGENT = [b"xcauth"]


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


@implementer(IBackendClient)
class JSXCClient:
    """
    Signed requests to one JSXC external API endpoint.

    @param http: sends the requests (the daemon's pooled L{Agent}, or in tests
        treq's L{treq.testing.RequestTraversalAgent}, behind an
        L{HTTPRequester}).
    @param url: the external API URL.
    @param secret: the API secret used to sign requests.
    @param metrics: counts the answers to C{auth} and C{isuser} by outcome.
    """

    def __init__(
        self, http: HTTPRequester, url: str, secret: bytes, metrics: NoMetrics | None = None
    ) -> None:
        self._metrics = metrics if metrics is not None else NoMetrics()  # metrics
        self._http = http
        self.url = validateURL(url)
        # Encode the URL once: parsing it on every request costs more than the
        # rest of the client together.
        self._urlBytes = URL.from_text(url).to_uri().to_text().encode("ascii")
        self._secret = secret

    def _post(self, body: bytes, maxBody: int) -> Deferred[Answer]:
        headers = Headers(
            {
                b"content-type": _CONTENT_TYPE,
                b"user-agent": USER_AGENT,
                b"x-jsxc-signature": [sign(self._secret, body)],
            }
        )
        return self._http.request(b"POST", self._urlBytes, headers, body, maxBody)

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
        maxBody = MAX_ROSTER if operation == "sharedroster" else MAX_ANSWER
        return self._post(encodeBody(fields), maxBody).addCallback(self._decode)

    def _decode(self, answer: Answer) -> Any:
        code = answer.code
        parsed = parseJSON(answer.body)
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

    def sharedRoster(self, user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        """
        The users who share a group with C{user}, from the C{sharedroster}
        operation; fails with L{BackendUnavailable} without a usable answer.
        """
        d = self.call("sharedroster", user, domain)
        d.addCallback(parseSharedRoster)
        return d

    def _classify(
        self,
        d: Deferred[Any],
        interpret: Callable[[Any], Outcome],
        user: str,
        domain: str,
    ) -> Deferred[Outcome]:
        d.addCallback(interpret)
        d.addErrback(unavailableOutcome, "request", user, domain)
        d.addCallback(self._metrics.backend, "jsxc", self._metrics.now())  # metrics
        return d


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


def parseSharedRoster(answer: Any) -> dict[str, RosterEntry]:
    """
    The shared roster in a JSXC C{sharedroster} answer
    (C{{"result":"success","data":{"sharedRoster":{USER:{"name":..,"groups":[..]}}}}};
    an empty one is C{[]}, as PHP encodes an empty array).  Entries that are
    not objects are skipped, a missing name is C{""}, groups that are not
    strings are dropped.

    @raise BackendUnavailable: the answer is not a successful C{sharedroster}
        answer.
    """
    if not isinstance(answer, dict) or answer.get("result") != "success":
        raise BackendUnavailable("the sharedroster answer is not a success")
    data = answer.get("data")
    roster = data.get("sharedRoster") if isinstance(data, dict) else None
    if roster == [] or roster is None and isinstance(data, dict) and not data:
        return {}
    if not isinstance(roster, dict):
        raise BackendUnavailable("the sharedroster answer holds no sharedRoster object")
    entries: dict[str, RosterEntry] = {}
    for user, item in roster.items():
        if not isinstance(item, dict) or not user:
            continue
        name = item.get("name")
        groups = item.get("groups")
        entries[str(user)] = RosterEntry(
            name=name if isinstance(name, str) else "",
            groups=tuple(
                g for g in (groups if isinstance(groups, list) else []) if isinstance(g, str)
            ),
        )
    return entries
