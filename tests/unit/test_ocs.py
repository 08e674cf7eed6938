"""
Tests for L{xcauth.backends.ocs} (the stock Nextcloud backend) against
L{FakeStockNextcloud}, through the production request path
(L{xcauth.backends.http.HTTPRequester}) over treq's testing agent.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from xcauth.backends.http import HTTPRequester
from xcauth.backends.ocs import OCSClient, basicAuth
from xcauth.interfaces import (
    BackendUnavailable,
    Outcome,
    RosterEntry,
    StartupRefused,
    ThrottleState,
)
from xcauth.testing.fakestock import (
    GROUPADMIN_PASSWORD,
    GROUPADMIN_USER,
    MAX_DELAY,
    PLAIN_SERVICE_PASSWORD,
    PLAIN_SERVICE_USER,
    SERVICE_PASSWORD,
    SERVICE_USER,
    FakeStockNextcloud,
    Throttle,
    makeStockSite,
    subnet,
)

BASE = "https://cloud.example.org/nextcloud"
DOMAIN = "example.org"


def stockClient(agent: Any, clock: Any, user: str = SERVICE_USER,
                password: str = SERVICE_PASSWORD, loginFormat: str = "{user}",
                timeout: float = 10.0, onLogin: Any = None) -> OCSClient:
    """
    An OCS client sending through C{agent} with the production request path.
    """
    return OCSClient(HTTPRequester(agent, clock, timeout), BASE, user, password,
                     loginFormat, clock, onLogin)


class _Recording:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.sent: list[tuple[bytes, bytes, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        self.sent.append((method, uri, headers))
        return self.agent.request(method, uri, headers, bodyProducer)


class StockTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nextcloud = FakeStockNextcloud(self.clock)
        self.agent = RequestTraversalAgent(makeStockSite(self.nextcloud).resource)
        self.recording = _Recording(self.agent)
        self.client = stockClient(self.recording, self.clock)

    def result(self, d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(lambda r: (results.append(r), r)[1])
        self.agent.flush()
        for _ in range(300):
            if results:
                break
            self.clock.advance(0.1)
            self.agent.flush()
        return self.successResultOf(d)


class AuthTests(StockTestCase):
    def test_rightPassword(self) -> None:
        self.assertIs(self.result(self.client.auth("alice", DOMAIN, "pa:ss w")), Outcome.YES)
        method, uri, headers = self.recording.sent[-1]
        self.assertEqual(method, b"GET")
        self.assertEqual(uri, BASE.encode() + b"/ocs/v2.php/cloud/user?format=json")
        self.assertEqual(headers.getRawHeaders(b"ocs-apirequest"), [b"true"])
        self.assertEqual(headers.getRawHeaders(b"authorization"),
                         [basicAuth("alice", "pa:ss w")])

    def test_nonAscii(self) -> None:
        self.assertIs(self.result(self.client.auth("jörg", DOMAIN, "pässwörd")), Outcome.YES)

    def test_wrongPassword(self) -> None:
        self.assertIs(self.result(self.client.auth("alice", DOMAIN, "nope")), Outcome.NO)
        self.assertEqual(self.nextcloud.throttle.count("127.0.0.1"), 1)

    def test_emptyPassword(self) -> None:
        self.assertIs(self.result(self.client.auth("alice", DOMAIN, "")), Outcome.NO)
        self.assertEqual(self.nextcloud.requests, [])

    def test_unknownUser(self) -> None:
        self.assertIs(self.result(self.client.auth("nobody", DOMAIN, "x")), Outcome.NO)

    def test_disabledUser(self) -> None:
        self.assertIs(self.result(self.client.auth("dave", DOMAIN, "dave-pass")), Outcome.NO)

    def test_appPassword(self) -> None:
        self.assertIs(
            self.result(self.client.auth("carol", DOMAIN, "Carol-App-Passw0rd")), Outcome.YES
        )

    def test_appPasswordOtherLogin(self) -> None:
        """
        An app password works only with the login name that created it.
        """
        self.assertIs(
            self.result(self.client.auth("alice", DOMAIN, "Carol-App-Passw0rd")), Outcome.NO
        )
        self.assertIs(
            self.result(self.client.auth("erin", DOMAIN, "Erin-Mail-App-Passw0rd")), Outcome.NO
        )

    def test_emailLogin(self) -> None:
        """
        With login-format {user}@{domain} the account whose user id is that
        address logs in (case as Nextcloud compares ids); an account that
        only has the address as its e-mail is not the one asked for.
        """
        client = stockClient(self.agent, self.clock, loginFormat="{user}@{domain}")
        self.assertIs(self.result(client.auth("frank", DOMAIN, "frank-pass")), Outcome.YES)
        self.assertIs(self.result(client.auth("Frank", DOMAIN, "frank-pass")), Outcome.YES)
        with capturedLogs() as events:
            self.assertIs(self.result(client.auth("alice", DOMAIN, "pa:ss w")), Outcome.NO)
            self.assertIs(
                self.result(client.auth("erin", DOMAIN, "Erin-Mail-App-Passw0rd")), Outcome.NO
            )
        text = " ".join(str(e.get("log_format", "")).format(**e) for e in events)
        self.assertIn("alice@example.org", text)
        self.assertIn("account alice ", text)
        self.assertIs(self.result(client.auth("alice", DOMAIN, "bad")), Outcome.NO)

    def test_emailImpersonation(self) -> None:
        """
        mallory sets her e-mail to ceo@example.org: her password does not log
        in as ceo.
        """
        self.nextcloud.users["bob"].email = "ceo@example.org"
        client = stockClient(self.agent, self.clock, loginFormat="{user}@{domain}")
        with capturedLogs():
            self.assertIs(self.result(client.auth("ceo", DOMAIN, "bob's secret")), Outcome.NO)
            self.assertIs(self.result(client.isUser("ceo", DOMAIN)), Outcome.NO)

    def test_twoFactorNeedsAppPassword(self) -> None:
        """
        A two-factor user's real password is a "no" and logged once per hour
        as needing an app password; it is not counted as a failure.
        """
        with capturedLogs() as events:
            self.assertIs(self.result(self.client.auth("carol", DOMAIN, "carol-real")),
                          Outcome.NO)
            self.agent.flush()
            self.assertIs(self.result(self.client.auth("carol", DOMAIN, "carol-real")),
                          Outcome.NO)
            self.agent.flush()
        hints = [e for e in events if "needs an app password" in e["log_format"]]
        self.assertEqual(len(hints), 1)
        self.assertEqual(hints[0]["log_level"], LogLevel.info)
        self.assertEqual(self.nextcloud.throttle.count("127.0.0.1"), 0)
        self.clock.advance(3601)
        with capturedLogs() as events:
            self.result(self.client.auth("carol", DOMAIN, "carol-real"))
            self.agent.flush()
        self.assertEqual(
            len([e for e in events if "needs an app password" in e["log_format"]]), 1
        )

    def test_wrongPasswordNoHint(self) -> None:
        with capturedLogs() as events:
            self.result(self.client.auth("alice", DOMAIN, "nope"))
            self.agent.flush()
        self.assertFalse([e for e in events if "app password" in e["log_format"]])

    def test_missingCSRFHeader(self) -> None:
        """
        The fake, like Nextcloud, refuses an OCS request without
        C{OCS-APIRequest} even with the right password.
        """
        from twisted.web.http_headers import Headers

        d = self.agent.request(
            b"GET", BASE.encode() + b"/ocs/v2.php/cloud/user?format=json",
            Headers({b"authorization": [basicAuth("alice", "pa:ss w")]}),
        )
        self.agent.flush()
        self.assertEqual(self.successResultOf(d).code, 401)

    def _unavailable(self, user: str) -> None:
        self.assertIs(self.result(self.client.auth(user, DOMAIN, "x")), Outcome.UNAVAILABLE)

    def test_faults(self) -> None:
        for user in ("fault-500", "fault-nonjson", "fault-302"):
            self._unavailable(user)

    def test_hang(self) -> None:
        client = stockClient(self.agent, self.clock, timeout=3)
        d = client.auth("fault-hang", DOMAIN, "x")
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(3)
        self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)

    def test_slow(self) -> None:
        d = self.client.auth("slow2000-alice", DOMAIN, "pa:ss w")
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(2)
        self.agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.YES)

    def test_tooManyIsUnavailable(self) -> None:
        for _ in range(11):
            self.nextcloud.throttle.register("127.0.0.1")
        with capturedLogs() as events:
            self._unavailable("alice")
        self.assertTrue(any("429" in str(e.get("reason", "")) for e in events))
        self.assertEqual(self.nextcloud.tooMany, 1)

    def test_loginTimesReported(self) -> None:
        seen: list[tuple[float, int]] = []
        client = stockClient(self.agent, self.clock, onLogin=lambda s, c: seen.append((s, c)))
        self.nextcloud.throttle.register("127.0.0.1")
        self.nextcloud.throttle.register("127.0.0.1")
        self.result(client.auth("alice", DOMAIN, "pa:ss w"))
        self.assertEqual(len(seen), 1)
        self.assertTrue(0.35 <= seen[0][0] <= 0.55, seen)
        self.assertEqual(seen[0][1], 200)


class ThrottleTests(SynchronousTestCase):
    def test_delays(self) -> None:
        """
        0.1 s * 2**n, capped at 25 s; blocked past 10 failures in 30 minutes.
        """
        clock = Clock()
        clock.advance(100_000)
        throttle = Throttle(clock)
        self.assertEqual(throttle.delay("10.0.0.1"), 0)
        throttle.register("10.0.0.1")
        self.assertAlmostEqual(throttle.delay("10.0.0.1"), 0.2)
        for _ in range(7):
            throttle.register("10.0.0.1")
        self.assertEqual(throttle.delay("10.0.0.1"), MAX_DELAY)
        self.assertFalse(throttle.blocked("10.0.0.1"))
        for _ in range(3):
            throttle.register("10.0.0.1")
        self.assertTrue(throttle.blocked("10.0.0.1"))
        self.assertFalse(throttle.blocked("10.0.0.2"))
        clock.advance(31 * 60)
        self.assertFalse(throttle.blocked("10.0.0.1"))
        self.assertEqual(throttle.delay("10.0.0.1"), MAX_DELAY)
        clock.advance(12 * 3600)
        self.assertEqual(throttle.delay("10.0.0.1"), 0)

    def test_ipv6Subnet(self) -> None:
        self.assertEqual(subnet("2001:db8:1:2ff::1"), subnet("2001:db8:1:200::9"))
        self.assertNotEqual(subnet("2001:db8:1:2ff::1"), subnet("2001:db8:1:300::1"))

    def test_allowListed(self) -> None:
        clock = Clock()
        throttle = Throttle(clock)
        throttle.allowListed.add(subnet("10.0.0.1"))
        for _ in range(20):
            throttle.register("10.0.0.1")
        self.assertEqual(throttle.delay("10.0.0.1"), 0)


class ThrottleResetTests(StockTestCase):
    def test_successForgetsOwnFailures(self) -> None:
        """
        A successful login forgets the failures registered for its uid from
        that address (resetDelay from lib/OC.php's postLogin hook), not the
        failures of other names.
        """
        for _ in range(2):
            self.assertIs(self.result(self.client.auth("alice", DOMAIN, "wrong")), Outcome.NO)
        self.assertIs(self.result(self.client.auth("bob", DOMAIN, "wrong")), Outcome.NO)
        self.assertEqual(self.nextcloud.throttle.count("127.0.0.1"), 3)
        self.assertIs(self.result(self.client.auth("alice", DOMAIN, "pa:ss w")), Outcome.YES)
        self.assertEqual(self.nextcloud.throttle.count("127.0.0.1"), 1)


class IsUserTests(StockTestCase):
    def test_exists(self) -> None:
        self.assertIs(self.result(self.client.isUser("alice", DOMAIN)), Outcome.YES)
        self.assertIs(self.result(self.client.isUser("dave", DOMAIN)), Outcome.YES)

    def test_missing(self) -> None:
        self.assertIs(self.result(self.client.isUser("nobody", DOMAIN)), Outcome.NO)

    def test_email(self) -> None:
        client = stockClient(self.agent, self.clock, loginFormat="{user}@{domain}")
        self.assertIs(self.result(client.isUser("frank", DOMAIN)), Outcome.YES)
        # alice@example.org is only alice's e-mail: not an account of that name.
        self.assertIs(self.result(client.isUser("alice", DOMAIN)), Outcome.NO)
        self.assertIs(self.result(client.isUser("nobody", DOMAIN)), Outcome.NO)

    def test_fault(self) -> None:
        nc = FakeStockNextcloud(self.clock, [])
        agent = RequestTraversalAgent(makeStockSite(nc).resource)
        client = stockClient(agent, self.clock)
        d = client.isUser("alice", DOMAIN)
        agent.flush()
        self.clock.advance(1)
        agent.flush()
        # The service account itself is refused: unavailable, not "no".
        self.assertIs(self.successResultOf(d), Outcome.UNAVAILABLE)


class RosterTests(StockTestCase):
    def test_roster(self) -> None:
        roster = self.result(self.client.sharedRoster("alice", DOMAIN))
        self.assertEqual(roster["bob"], RosterEntry(name="Bob Builder", groups=("Everyone",)))
        self.assertEqual(
            roster["erin"], RosterEntry(name="Erin", groups=("Wonderland",))
        )
        self.assertEqual(roster["groupadmin"].groups, ("Wonderland",))
        self.assertNotIn("alice", roster)
        self.assertNotIn(SERVICE_USER, roster)

    def test_missingUser(self) -> None:
        d = self.client.sharedRoster("nobody", DOMAIN)
        self.agent.flush()
        self.failureResultOf(d, BackendUnavailable)


class StartupTests(StockTestCase):
    def check(self, user: str, password: str) -> Any:
        client = stockClient(self.agent, self.clock, user, password)
        d = client.checkPrivileges()
        self.agent.flush()
        self.clock.advance(1)
        self.agent.flush()
        return d

    def test_admin(self) -> None:
        self.assertIsNone(self.successResultOf(self.check(SERVICE_USER, SERVICE_PASSWORD)))

    def test_groupAdmin(self) -> None:
        self.assertIsNone(
            self.successResultOf(self.check(GROUPADMIN_USER, GROUPADMIN_PASSWORD))
        )

    def test_unprivileged(self) -> None:
        f = self.failureResultOf(self.check(PLAIN_SERVICE_USER, PLAIN_SERVICE_PASSWORD),
                                 StartupRefused)
        self.assertIn("cannot see other users", str(f.value))
        self.assertIn("administrator", str(f.value))

    def test_wrongServicePassword(self) -> None:
        f = self.failureResultOf(self.check(SERVICE_USER, "wrong"), StartupRefused)
        self.assertIn("service-password", str(f.value))

    def test_capabilities(self) -> None:
        d = self.client.throttleState()
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), ThrottleState(0.0, False))
        self.nextcloud.throttle.register("127.0.0.1")
        self.nextcloud.throttle.register("127.0.0.1")
        d = self.client.throttleState()
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), ThrottleState(0.4, False))
        self.nextcloud.allowList("127.0.0.1")
        d = self.client.throttleState()
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), ThrottleState(0.0, True))


class _Canned:
    """
    A resource answering every request with one status and body.
    """

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return self.body

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self

    def putChild(self, path: bytes, child: Any) -> None:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["ocs", "meta", "data", "id", "users", "groups",
                                       "displayname", "email", "message", "x"]),
                      children, max_size=4),
    max_leaves=12,
)


class AnyAnswerTests(SynchronousTestCase):
    """
    Whatever Nextcloud (or something in front of it) answers, the client
    answers with an L{Outcome} or fails with L{BackendUnavailable}.
    """

    @given(st.sampled_from([200, 401, 404, 403, 429, 500, 302]),
           st.one_of(st.binary(max_size=120),
                     _json.map(lambda v: json.dumps(v).encode())))
    def test_anyAnswer(self, code: int, body: bytes) -> None:
        from twisted.web.resource import IResource
        from zope.interface import directlyProvides

        clock = Clock()
        resource = _Canned(code, body)
        directlyProvides(resource, IResource)
        agent = RequestTraversalAgent(resource)
        client = stockClient(agent, clock)
        for d in (client.auth("alice", DOMAIN, "pw"), client.isUser("alice", DOMAIN)):
            agent.flush()
            self.assertIn(self.successResultOf(d), list(Outcome))
        d = client.sharedRoster("alice", DOMAIN)
        agent.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1)
        if isinstance(results[0], Failure):
            self.assertTrue(results[0].check(BackendUnavailable), results[0])
        else:
            self.assertIsInstance(results[0], dict)
        if code in (200, 401):
            d = client.throttleState()
            agent.flush()
            d.addErrback(lambda f: f.trap(BackendUnavailable))
            self.successResultOf(d)
