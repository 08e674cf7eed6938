"""
Tests for L{xcauth.backends.jsxc}: signed requests to the JSXC API and how every
kind of answer is classified, against L{FakeJSXC} through treq's testing agent.
"""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import jsxc
from xcauth.backends.jsxc import encodeBody, sign
from xcauth.interfaces import BackendUnavailable, Outcome, RosterEntry
from xcauth.testing.fakenextcloud import DEMO_USERS, FakeJSXC, makeSite
from xcauth.text import validateURL

URL = "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"
SECRET = b"0123456789abcdefghijklm"


class SignatureTests(SynchronousTestCase):
    def test_protocolExample(self) -> None:
        """
        The body and signature example of PROTOCOLS.md.
        """
        body = encodeBody(
            [("operation", "auth"), ("username", "alice"), ("domain", "example.org"),
             ("password", "p@ss:w0rd")]
        )
        self.assertEqual(
            body, b"operation=auth&username=alice&domain=example.org&password=p%40ss%3Aw0rd"
        )
        self.assertEqual(sign(SECRET, body), b"sha1=fd1caece557f05bcb8e905ad7d07d8b92fcaa7d8")

    def test_nonAsciiEncoded(self) -> None:
        self.assertEqual(
            encodeBody([("username", "jörg"), ("password", "a b&c=d+")]),
            b"username=j%C3%B6rg&password=a%20b%26c%3Dd%2B",
        )

    def test_validateURL(self) -> None:
        self.assertEqual(validateURL(URL), URL)
        for bad in ("cloud.example.org/x", "ftp://x/y", "http:///path", "http://h:99999/"):
            self.assertRaises(ValueError, validateURL, bad)


class _RecordingAgent:
    """
    Wraps an agent and records what was sent.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.sent: list[tuple[bytes, bytes, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.sent.append((method, uri, headers))
        return self.agent.request(method, uri, headers, bodyProducer)


class RetryTests(SynchronousTestCase):
    def test_retryOnceOnStaleConnection(self) -> None:
        """
        A pooled connection closed by the server before any response is
        retried once on a new one; a second failure is "unavailable".
        """
        from twisted.web._newclient import ResponseNeverReceived

        calls = []

        class Flaky:
            def __init__(self, failures: int, agent: Any) -> None:
                self.failures = failures
                self.agent = agent

            def request(self, *a: Any) -> Deferred[Any]:
                calls.append(a)
                if self.failures:
                    self.failures -= 1
                    return fail(ResponseNeverReceived([Failure(ConnectionRefusedError())]))
                return self.agent.request(*a)

        clock = Clock()
        agent = RequestTraversalAgent(makeSite(FakeJSXC(SECRET, dict(DEMO_USERS), clock)).resource)
        client = jsxc(Flaky(1, agent), URL, SECRET, clock, 10)
        d = client.auth("alice", "example.org", "pa:ss w")
        agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.YES)
        self.assertEqual(len(calls), 2)
        calls.clear()
        client = jsxc(Flaky(2, agent), URL, SECRET, clock, 10)
        d = client.auth("alice", "example.org", "pa:ss w")
        self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)
        self.assertEqual(len(calls), 2)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = FakeJSXC(SECRET, dict(DEMO_USERS), self.clock)
        self.agent = RequestTraversalAgent(makeSite(self.resource).resource)
        self.recording = _RecordingAgent(self.agent)
        self.client = jsxc(self.recording, URL, SECRET, self.clock, 10)

    def result(self, d: Deferred[Any]) -> Any:
        self.agent.flush()
        return self.successResultOf(d)

    def test_authSuccess(self) -> None:
        self.assertIs(self.result(self.client.auth("alice", "example.org", "pa:ss w")), Outcome.YES)
        self.assertEqual(
            self.resource.requests[-1],
            {"operation": "auth", "username": "alice", "domain": "example.org", "password": "pa:ss w"},
        )

    def test_requestShape(self) -> None:
        """
        A POST to the configured URL, form-encoded, signed, no cookies.
        """
        self.result(self.client.isUser("alice", "example.org"))
        method, uri, headers = self.recording.sent[-1]
        self.assertEqual(method, b"POST")
        self.assertEqual(uri, URL.encode())
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/x-www-form-urlencoded"])
        body = b"operation=isuser&username=alice&domain=example.org"
        self.assertEqual(headers.getRawHeaders(b"x-jsxc-signature"), [sign(SECRET, body)])
        self.assertIsNone(headers.getRawHeaders(b"cookie"))

    def test_authNoauth(self) -> None:
        self.assertIs(self.result(self.client.auth("alice", "example.org", "wrong")), Outcome.NO)

    def test_nonAsciiPassword(self) -> None:
        self.assertIs(self.result(self.client.auth("jörg", "example.org", "pässwörd")), Outcome.YES)

    def test_isUser(self) -> None:
        self.assertIs(self.result(self.client.isUser("alice", "example.org")), Outcome.YES)
        self.assertIs(self.result(self.client.isUser("nobody", "example.org")), Outcome.NO)

    def test_sharedRoster(self) -> None:
        roster = self.result(self.client.sharedRoster("alice", "example.org"))
        self.assertEqual(roster["bob"], RosterEntry("Bob", ("Everyone",)))
        self.assertNotIn("alice", roster)
        d = self.client.sharedRoster("nobody", "example.org")
        self.agent.flush()
        self.failureResultOf(d, BackendUnavailable)

    def assertUnavailable(self, user: str, *, advance: float = 0) -> list[dict[str, Any]]:
        with capturedLogs() as events:
            d = self.client.auth(user, "example.org", "pw")
            self.agent.flush()
            if advance:
                self.clock.advance(advance)
                self.agent.flush()
            self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)
        return events

    def test_500json(self) -> None:
        self.assertUnavailable("fault-500json")

    def test_500html(self) -> None:
        self.assertUnavailable("fault-500html")

    def test_nonJSON200(self) -> None:
        self.assertUnavailable("fault-nonjson")

    def test_redirectNotFollowed(self) -> None:
        self.assertUnavailable("fault-302")
        self.assertEqual(len(self.recording.sent), 1)

    def test_hangBeforeHeaders(self) -> None:
        """
        A server that never answers costs at most the timeout.
        """
        d = self.client.auth("fault-hang", "example.org", "pw")
        self.agent.flush()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)
        # The timed-out request is not retried.
        self.assertEqual(len(self.recording.sent), 1)

    def test_hangAfterHeaders(self) -> None:
        """
        The deadline covers the body as well, not only the headers.
        """
        d = self.client.auth("fault-hangbody", "example.org", "pw")
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(10.1)
        self.agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)

    def test_badSignatureIsConfigurationError(self) -> None:
        client = jsxc(self.agent, URL, b"wrong secret", self.clock, 10)
        with capturedLogs() as events:
            d = client.auth("alice", "example.org", "pa:ss w")
            self.agent.flush()
            self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("secret", errors[0]["log_format"])

    def test_connectionRefused(self) -> None:
        class Refusing:
            def request(self, *a: Any, **kw: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        client = jsxc(Refusing(), URL, SECRET, self.clock, 10)
        self.assertIs(self.successResultOf(client.auth("a", "b", "c")), Outcome.UNAVAILABLE)

    def test_cancelPropagates(self) -> None:
        """
        Cancelling a pending call (the client went away) cancels the HTTP
        request and logs no backend warning.
        """
        with capturedLogs() as events:
            d = self.client.auth("fault-hang", "example.org", "pw")
            self.agent.flush()
            d.cancel()
            self.agent.flush()
            self.failureResultOf(d)
        self.assertEqual(len(self.recording.sent), 1)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])

    def test_noSecretsInLogs(self) -> None:
        """
        Warnings about an unavailable backend name the user, never the
        password or the secret.
        """
        events = self.assertUnavailable("fault-500json")
        from twisted.logger import formatEvent

        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("fault-500json", text)
        self.assertNotIn("pw", text.replace("fault", ""))
        self.assertNotIn(SECRET.decode(), text)
