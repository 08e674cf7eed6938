"""
Tests for L{xcauth.daemon.metrics}: what L{Metrics} exposes after a known mix of
calls, and the counting in the framings, the credential cache, the backend
clients and the penalty box; the metrics listener's service.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.unit.fakes import ManualAuthenticator, TableAuthenticator
from tests.unit.test_cache import SwitchableAgent
from xcauth.backends.http import HTTPRequester
from xcauth.backends.jsxc import JSXCClient
from xcauth.core.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.penalty import PenaltyBox, PenaltyPolicy
from xcauth.daemon.metrics import (
    LATENCY_BUCKETS,
    Metrics,
    metricsService,
    quietSite,
)
from xcauth.framing.base import RequestTimer, ServerContext, XcauthFactory
from xcauth.framing.lines import XMPPLineProtocol
from xcauth.interfaces import NoMetrics, Outcome, resultLabel
from xcauth.testing.fakenextcloud import DEMO_USERS, FakeJSXC, makeSite
from xcauth.testing.workers import SynchronousWorker

URL = "http://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"
SECRET = b"metrics-test-secret"
DOMAIN = "example.org"
ALICE = DEMO_USERS["alice"]
HOUR = 3600.0
DAY = 86400.0


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of C{metrics} as served (parsed back from the text format):
    C{(name, sorted labels) -> value}.
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """
    One sample of C{metrics}; 0 when it does not exist (yet).
    """
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsTests(SynchronousTestCase):
    """
    L{Metrics} exposes exactly what it was told.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock)

    def test_knownMix(self) -> None:
        m = self.metrics
        for _ in range(3):
            m.request("prosody", "auth", "true", 0.002)
        m.request("prosody", "auth", "false", 0.3)
        m.request("postfix", "isuser", "unavailable", 7.0)
        m.invalid("prosody")
        m.invalid("prosody")
        for result in ("hit", "hit", "miss", "stale", "fallback"):
            m.cache(result)
        m.deadlineMissed("dovecot")
        m.penalized("delayed")
        m.penalized("refused")
        started = m.now()
        self.clock.advance(0.02)
        self.assertIs(m.backend(Outcome.YES, "jsxc", started), Outcome.YES)
        m.backend(Outcome.UNAVAILABLE, "nextcloud", started)

        def v(name: str, **labels: str) -> float:
            return value(m, name, **labels)

        self.assertEqual(v("xcauth_requests_total", framing="prosody", operation="auth",
                           result="true"), 3)
        self.assertEqual(v("xcauth_requests_total", framing="prosody", operation="auth",
                           result="false"), 1)
        self.assertEqual(v("xcauth_requests_total", framing="prosody", operation="invalid",
                           result="false"), 2)
        self.assertEqual(v("xcauth_requests_total", framing="postfix", operation="isuser",
                           result="unavailable"), 1)
        self.assertEqual(v("xcauth_request_seconds_count", framing="prosody",
                           operation="auth"), 4)
        self.assertAlmostEqual(v("xcauth_request_seconds_sum", framing="prosody",
                                 operation="auth"), 0.306)
        self.assertEqual(v("xcauth_request_seconds_bucket", framing="prosody",
                           operation="auth", le="0.0025"), 3)
        self.assertEqual(v("xcauth_request_seconds_bucket", framing="postfix",
                           operation="isuser", le="5.0"), 0)
        self.assertEqual(v("xcauth_request_seconds_bucket", framing="postfix",
                           operation="isuser", le="+Inf"), 1)
        self.assertEqual(v("xcauth_cache_decisions_total", result="hit"), 2)
        for result in ("miss", "stale", "fallback"):
            self.assertEqual(v("xcauth_cache_decisions_total", result=result), 1)
        self.assertEqual(v("xcauth_deadline_missed_total", framing="dovecot"), 1)
        self.assertEqual(v("xcauth_penalized_total", reason="delayed"), 1)
        self.assertEqual(v("xcauth_penalized_total", reason="refused"), 1)
        self.assertEqual(v("xcauth_backend_requests_total", backend="jsxc", outcome="true"), 1)
        self.assertEqual(v("xcauth_backend_requests_total", backend="nextcloud",
                           outcome="unavailable"), 1)
        self.assertAlmostEqual(v("xcauth_backend_seconds_sum", backend="jsxc"), 0.02)
        self.assertEqual(v("xcauth_in_flight"), 0)

    def test_seriesFromTheStart(self) -> None:
        """
        Before anything happened, every series whose labels are known exists
        at 0: the cache's decisions, the penalty reasons, the backend's
        outcomes, and per framing served its deadline misses and requests.
        """
        m = Metrics(self.clock, process=False, backends=("nextcloud",))
        m.serving("prosody", lambda: 2)
        m.serving("postfix", lambda: 1)
        m.serving("prosody", lambda: 1)
        got = samples(m)

        def zero(name: str, **labels: str) -> None:
            key = (name, tuple(sorted(labels.items())))
            self.assertIn(key, got)
            self.assertEqual(got[key], 0, key)

        for result in ("hit", "miss", "stale", "fallback"):
            zero("xcauth_cache_decisions_total", result=result)
        for reason in ("refused", "delayed"):
            zero("xcauth_penalized_total", reason=reason)
        for outcome in ("true", "false", "unavailable"):
            zero("xcauth_backend_requests_total", backend="nextcloud", outcome=outcome)
        zero("xcauth_backend_seconds_count", backend="nextcloud")
        for framing in ("prosody", "postfix"):
            zero("xcauth_deadline_missed_total", framing=framing)
        for result in ("true", "false", "unavailable", "error"):
            zero("xcauth_requests_total", framing="prosody", operation="auth", result=result)
            zero("xcauth_requests_total", framing="prosody", operation="isuser",
                 result=result)
            zero("xcauth_requests_total", framing="postfix", operation="isuser",
                 result=result)
        self.assertNotIn(("xcauth_requests_total", (("framing", "postfix"),
                          ("operation", "auth"), ("result", "true"))), got)
        zero("xcauth_request_seconds_count", framing="postfix", operation="isuser")
        # Two prosody listeners: their connections add up.
        self.assertEqual(got[("xcauth_open_connections", (("framing", "prosody"),))], 3)
        self.assertEqual(got[("xcauth_open_connections", (("framing", "postfix"),))], 1)

    def test_oneVocabulary(self) -> None:
        """
        Requests' results and backend outcomes use the same words.
        """
        m = self.metrics
        started = m.now()
        for outcome in Outcome:
            m.backend(outcome, "jsxc", started)
        outcomes = {dict(labels)["outcome"] for (name, labels) in samples(m)
                    if name == "xcauth_backend_requests_total"}
        self.assertEqual(outcomes, {"true", "false", "unavailable"})
        self.assertEqual({resultLabel(r) for r in (True, False, None, "cancelled")},
                         {"true", "false", "unavailable"})

    def test_buildInfo(self) -> None:
        import platform

        import twisted
        from xcauth import __version__

        self.assertEqual(value(self.metrics, "xcauth_build_info", version=__version__,
                               python=platform.python_version(),
                               twisted=twisted.__version__), 1)

    def test_throttle(self) -> None:
        """
        Nextcloud's throttle delay and allow-listing, by Nextcloud; the
        allow-listing is absent when Nextcloud does not say.
        """
        m = self.metrics
        m.throttle("https://a.example", 1.6, False)
        m.throttle("https://b.example", 0.0, True)
        m.throttle("https://c.example", 0.2, None)
        got = samples(m)
        delay = "xcauth_nextcloud_throttle_delay_seconds"
        listed = "xcauth_nextcloud_allow_listed"
        self.assertEqual(got[(delay, (("nextcloud", "https://a.example"),))], 1.6)
        self.assertEqual(got[(delay, (("nextcloud", "https://c.example"),))], 0.2)
        self.assertEqual(got[(listed, (("nextcloud", "https://a.example"),))], 0)
        self.assertEqual(got[(listed, (("nextcloud", "https://b.example"),))], 1)
        self.assertNotIn((listed, (("nextcloud", "https://c.example"),)), got)

    @given(st.lists(st.tuples(
        st.sampled_from(["prosody", "ejabberd"]),
        st.sampled_from(["auth", "isuser"]),
        st.sampled_from(["true", "false", "unavailable", "error"]),
        st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 10)),
    ), max_size=30))
    def test_anyRequests(self, calls: list[tuple[str, str, str, float]]) -> None:
        """
        Whatever requests were counted, the scrape gives their number by
        labels, and each histogram bucket the number at or below its bound.
        """
        m = Metrics(self.clock, process=False)
        for call in calls:
            m.request(*call)
        got = samples(m)
        for (framing, operation, result), n in Counter(c[:3] for c in calls).items():
            self.assertEqual(got[("xcauth_requests_total", (("framing", framing),
                              ("operation", operation), ("result", result)))], n)
        self.assertEqual(
            sum(v for (name, _), v in got.items() if name == "xcauth_requests_total"),
            len(calls),
        )
        for framing, operation in {c[:2] for c in calls}:
            mine = [c[3] for c in calls if c[:2] == (framing, operation)]

            def sample(name: str, **more: str) -> float:
                labels = {"framing": framing, "operation": operation, **more}  # noqa: B023
                return got[(name, tuple(sorted(labels.items())))]

            for bound in LATENCY_BUCKETS:
                self.assertEqual(sample("xcauth_request_seconds_bucket", le=str(bound)),
                                 len([x for x in mine if x <= bound]))
            self.assertEqual(sample("xcauth_request_seconds_bucket", le="+Inf"), len(mine))
            self.assertEqual(sample("xcauth_request_seconds_count"), len(mine))
            self.assertAlmostEqual(sample("xcauth_request_seconds_sum"), sum(mine))

    def test_inFlight(self) -> None:
        m = self.metrics
        m.started()
        m.started()
        self.assertEqual(value(m, "xcauth_in_flight"), 2)
        m.finished()
        self.assertEqual(value(m, "xcauth_in_flight"), 1)

    def test_bucketsCoverMillisecondToFiveSeconds(self) -> None:
        """
        The served histogram tells a sub-millisecond answer from a slower one,
        and anything up to five seconds from what took longer; each bucket
        counts the requests up to its bound (cumulative, as Prometheus reads it).
        """
        m = Metrics(self.clock)
        for seconds in (0.0005, 0.001, 0.0011, 5.0, 5.1):
            m.request("prosody", "auth", "true", seconds)

        def bucket(le: str) -> float:
            return value(m, "xcauth_request_seconds_bucket", framing="prosody",
                         operation="auth", le=le)

        self.assertEqual((bucket("0.001"), bucket("5.0"), bucket("+Inf")), (2, 4, 5))
        bounds = [bucket(repr(b)) for b in LATENCY_BUCKETS]
        self.assertEqual(bounds, sorted(bounds))
        self.assertEqual(value(m, "xcauth_request_seconds_count", framing="prosody",
                               operation="auth"), 5)

    def test_processCollectors(self) -> None:
        """
        The process, platform and garbage collector metrics are served too.
        """
        names = {name for name, _ in samples(self.metrics)}
        self.assertIn("python_info", names)
        self.assertIn("python_gc_objects_collected_total", names)
        self.assertIn("process_resident_memory_bytes", names)
        self.assertNotIn("python_info", {n for n, _ in samples(Metrics(self.clock, False))})

    def test_registriesIndependent(self) -> None:
        """
        Each L{Metrics} has its own registry: two in one process (two hubs)
        neither clash nor see each other's counts.
        """
        other = Metrics(self.clock)
        self.metrics.cache("hit")
        self.assertEqual(value(self.metrics, "xcauth_cache_decisions_total", result="hit"), 1)
        self.assertEqual(value(other, "xcauth_cache_decisions_total", result="hit"), 0)

    def test_noMetrics(self) -> None:
        """
        L{NoMetrics} counts nothing and passes backend outcomes through.
        """
        m = NoMetrics()
        m.started()
        m.request("prosody", "auth", "true", 1.0)
        self.assertIs(m.backend(Outcome.NO, "jsxc", m.now()), Outcome.NO)

    def test_resultLabel(self) -> None:
        self.assertEqual(
            [resultLabel(r) for r in (True, b"{}", False, None, "cancelled", "error")],
            ["true", "true", "false", "unavailable", "unavailable", "error"],
        )


def connected(authenticator: Any, metrics: Metrics, clock: Clock,
              deadline: float = 4.0) -> tuple[Any, Any]:
    from twisted.internet.testing import StringTransport

    context = ServerContext(authenticator=authenticator, clock=clock, deadline=deadline,
                            logRequests="none", metrics=metrics)
    protocol = XcauthFactory(XMPPLineProtocol, context).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class FramingTests(SynchronousTestCase):
    """
    Every request of a connection is counted once by its result, whatever
    is logged (here: nothing).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)

    def count(self, operation: str, result: str) -> float:
        return value(self.metrics, "xcauth_requests_total", framing="prosody",
                     operation=operation, result=result)

    def test_results(self) -> None:
        auth = TableAuthenticator({f"alice@{DOMAIN}": "right"})
        protocol, transport = connected(auth, self.metrics, self.clock)
        protocol.dataReceived(
            b"auth:alice:example.org:right\n"
            b"auth:alice:example.org:wrong\n"
            b"auth:bob:down.example:x\n"
            b"isuser:alice:example.org\n"
            b"isuser:bob:example.org\n"
            b"nonsense\n"
        )
        self.assertEqual(transport.value(), b"1\n0\n0\n1\n0\n0\n")
        self.assertEqual(self.count("auth", "true"), 1)
        self.assertEqual(self.count("auth", "false"), 1)
        self.assertEqual(self.count("auth", "unavailable"), 1)
        self.assertEqual(self.count("isuser", "true"), 1)
        self.assertEqual(self.count("isuser", "false"), 1)
        self.assertEqual(self.count("invalid", "false"), 1)
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 0)

    def test_inFlightAndDeadline(self) -> None:
        """
        A request waiting for the backend is in flight; one that misses the
        deadline is counted as missed and unavailable; one cut short by the
        client going away is not a missed deadline.
        """
        auth = ManualAuthenticator()
        protocol, transport = connected(auth, self.metrics, self.clock, deadline=4.0)
        protocol.dataReceived(b"auth:alice:example.org:x\nisuser:bob:example.org\n")
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 2)
        auth.calls[1][2].callback(True)
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 1)
        self.clock.advance(4.0)
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 0)
        self.assertEqual(value(self.metrics, "xcauth_deadline_missed_total",
                               framing="prosody"), 1)
        self.assertEqual(self.count("auth", "unavailable"), 1)
        self.assertEqual(self.count("isuser", "true"), 1)

        protocol.dataReceived(b"auth:carol:example.org:x\n")
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 1)
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(value(self.metrics, "xcauth_in_flight"), 0)
        self.assertEqual(value(self.metrics, "xcauth_deadline_missed_total",
                               framing="prosody"), 1)

    def test_errorResult(self) -> None:
        """
        Work that fails is counted as C{error}, with its latency.
        """
        timer: RequestTimer[Any] = RequestTimer(
            self.clock, "prosody", "auth", "alice", DOMAIN, "none", self.metrics
        )
        self.clock.advance(0.5)
        d = timer.observe(fail(RuntimeError("boom")))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.count("auth", "error"), 1)
        self.assertEqual(value(self.metrics, "xcauth_request_seconds_sum", framing="prosody",
                               operation="auth"), 0.5)


class DovecotTests(SynchronousTestCase):
    """
    The dovecot framing counts through its request timers too; a login it
    refuses without asking anyone is an invalid request.
    """

    def test_counts(self) -> None:
        from tests.unit.test_dovecot import PROSODY_HELLO, plain
        from xcauth.framing.dovecot import DovecotProtocol

        clock = Clock()
        metrics = Metrics(clock, process=False)
        context = ServerContext(
            authenticator=TableAuthenticator({f"alice@{DOMAIN}": "right"}), clock=clock,
            logRequests="none", defaultDomain=DOMAIN, metrics=metrics,
        )
        protocol = XcauthFactory(DovecotProtocol, context).buildProtocol(None)
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(PROSODY_HELLO)
        for i, (user, password) in enumerate(
            [("alice", "right"), ("alice", "wrong"), ("alice", "")], 1
        ):
            protocol.dataReceived(
                b"AUTH\t%d\tPLAIN\tservice=xmpp\tresp=" % i + plain(user, password) + b"\n"
            )
        answers = transport.value().split(b"\n")
        self.assertEqual(sum(1 for a in answers if a.startswith(b"OK\t1\t")), 1)

        def count(operation: str, result: str) -> float:
            return value(metrics, "xcauth_requests_total", framing="dovecot",
                         operation=operation, result=result)

        self.assertEqual((count("auth", "true"), count("auth", "false"),
                          count("invalid", "false")), (1, 1, 1))
        self.assertEqual(value(metrics, "xcauth_in_flight"), 0)


class CacheAndBackendTests(SynchronousTestCase):
    """
    The credential cache counts its decisions; the JSXC client its answers.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics(self.clock, process=False)
        self.resource = FakeJSXC(SECRET, dict(DEMO_USERS), self.clock, 0.0)
        self.agent = SwitchableAgent(RequestTraversalAgent(makeSite(self.resource).resource))
        self.client = JSXCClient(HTTPRequester(self.agent, self.clock, 10), URL, SECRET,
                                 self.metrics)
        self.cache = CredentialCache(
            MemoryStorage(), SynchronousWorker(), self.clock, CachePolicy(HOUR, DAY, 7 * DAY),
            rounds=4, passwordKey=PasswordKeys(), metrics=self.metrics,
        )

    def login(self, password: str) -> bool | None:
        d = self.cache.authenticate(
            f"alice@{DOMAIN}", password, lambda: self.client.auth("alice", DOMAIN, password)
        )
        self.agent.agent.flush()
        return self.successResultOf(d)

    def cache_(self, result: str) -> float:
        return value(self.metrics, "xcauth_cache_decisions_total", result=result)

    def backend(self, outcome: str) -> float:
        return value(self.metrics, "xcauth_backend_requests_total", backend="jsxc",
                     outcome=outcome)

    def test_timeline(self) -> None:
        self.assertIs(self.login(ALICE), True)  # no entry: asks the backend
        self.assertEqual((self.cache_("miss"), self.backend("true")), (1, 1))
        self.assertIs(self.login(ALICE), True)  # fresh entry
        self.assertEqual((self.cache_("hit"), self.backend("true")), (1, 1))
        self.assertIs(self.login("wrong"), False)  # fresh entry, no match
        self.assertEqual((self.cache_("miss"), self.backend("false")), (2, 1))
        self.assertIs(self.login(ALICE), True)  # a wrong password evicts nothing
        self.assertEqual((self.cache_("hit"), self.cache_("miss")), (2, 2))
        self.clock.advance(2 * HOUR)  # past the query TTL
        self.assertIs(self.login(ALICE), True)
        self.assertEqual((self.cache_("stale"), self.backend("true")), (1, 2))
        self.clock.advance(2 * HOUR)
        self.agent.down = True
        self.assertIs(self.login(ALICE), True)  # accepted while unavailable
        self.assertEqual((self.cache_("stale"), self.cache_("fallback")), (2, 1))
        self.assertEqual(self.backend("unavailable"), 1)
        self.assertEqual((self.cache_("hit"), self.cache_("miss")), (2, 2))

    def test_isUser(self) -> None:
        d = self.client.isUser("alice", DOMAIN)
        self.agent.agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.YES)
        d = self.client.isUser("nobody", DOMAIN)
        self.agent.agent.flush()
        self.assertIs(self.successResultOf(d), Outcome.NO)
        self.assertEqual((self.backend("true"), self.backend("false")), (1, 1))


class PenaltyTests(SynchronousTestCase):
    """
    The penalty box counts the logins it refuses or delays.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)

    def penalized(self, reason: str) -> float:
        return value(self.metrics, "xcauth_penalized_total", reason=reason)

    def gate(self, box: PenaltyBox, key: bytes, answer: bool | None) -> Deferred[bool | None]:
        return box.gate("a@x", key, lambda: succeed(answer))

    def bruteForce(self, event: str) -> float:
        return value(self.metrics, "xcauth_bruteforce_total", event=event)

    def test_refusedAndDelayed(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(baseDelay=0.5, maxDelay=2.0,
                                                   userChecks=2, userRefill=900),
                         metrics=self.metrics)
        d = self.gate(box, b"k1" * 16, False)  # the backend says no: held back
        self.assertEqual(self.penalized("delayed"), 1)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(d), False)
        d = self.gate(box, b"k1" * 16, True)  # the same wrong password: refused locally
        self.assertEqual(self.penalized("refused"), 1)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), False)
        self.gate(box, b"k2" * 16, False)  # a second new one spends the budget
        self.clock.advance(2.0)
        d = self.gate(box, b"k3" * 16, True)
        self.assertEqual(self.bruteForce("user-budget"), 1)
        self.assertEqual(self.penalized("delayed"), 2)

    def test_budgetsAndKnown(self) -> None:
        """
        Checks refused by the per-user budget and by the daemon-wide one, and
        known passwords let through during a limit, are counted.
        """

        class Watch:
            def throttled(self) -> bool:
                return False

            def allowListed(self) -> bool:
                return False

            def key(self) -> str:
                return "https://cloud"

        box = PenaltyBox(self.clock, PenaltyPolicy(baseDelay=0.0, userChecks=1,
                                                   backendFailures=2),
                         metrics=self.metrics)
        right = b"r" * 32
        self.successResultOf(box.gate("a@x", right, lambda: succeed(True), watch=Watch()))
        self.successResultOf(box.gate("a@x", b"1" * 32, lambda: succeed(False), watch=Watch()))
        self.assertIs(self.successResultOf(
            box.gate("a@x", b"2" * 32, lambda: succeed(True), watch=Watch())), False)
        self.assertEqual(self.bruteForce("user-budget"), 1)
        self.successResultOf(box.gate("b@x", b"3" * 32, lambda: succeed(False), watch=Watch()))
        self.assertIsNone(self.successResultOf(
            box.gate("c@x", b"4" * 32, lambda: succeed(True), watch=Watch())))
        self.assertEqual(self.bruteForce("backend-budget"), 1)
        self.assertIs(self.successResultOf(
            box.gate("a@x", right, lambda: succeed(None), watch=Watch())), True)
        self.assertEqual(self.bruteForce("known-let-through"), 1)

    def test_noDelayNotCounted(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(baseDelay=0.0), metrics=self.metrics)
        self.assertIs(self.successResultOf(self.gate(box, b"k1" * 16, False)), False)
        self.assertIs(self.successResultOf(self.gate(box, b"k2" * 16, True)), True)
        self.assertEqual(self.penalized("delayed"), 0)


class ServiceTests(SynchronousTestCase):
    """
    The metrics listener.
    """

    def test_listens(self) -> None:
        reactor = MemoryReactorClock()
        resource = Resource()
        svc = metricsService(Metrics(reactor, process=False),
                             "tcp:9464:interface=127.0.0.1", reactor, resource)
        self.assertEqual(svc.name, "metrics=tcp:9464:interface=127.0.0.1")
        svc.privilegedStartService()
        svc.startService()
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9464, "127.0.0.1"))
        site = factory.wrappedFactory
        self.assertIsInstance(site, Site)
        self.assertIs(site.resource, resource)
        self.assertFalse(site.noisy)
        self.assertFalse(factory.noisy)

    def test_connectionCap(self) -> None:
        """
        The metrics listener accepts a few connections at once: idle ones
        cannot use up the descriptors the logins need; one closing makes room.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        from twisted.logger import capturedLogs

        reactor = MemoryReactorClock()
        svc = metricsService(Metrics(reactor, process=False),
                             "tcp:9464:interface=127.0.0.1", reactor, Resource(),
                             maxConnections=3)
        svc.privilegedStartService()
        svc.startService()
        [(_, factory, _, _)] = reactor.tcpServers
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        open_ = []
        with capturedLogs() as events:
            for _ in range(5):
                p = factory.buildProtocol(addr)
                if p is not None:
                    p.makeConnection(StringTransport())
                    open_.append(p)
        self.assertEqual(len(open_), 3)
        self.assertEqual(len([e for e in events if "metrics listener" in e["log_format"]]), 1)
        open_[0].connectionLost(None)
        self.assertIsNotNone(factory.buildProtocol(addr))

    def test_noAccessLog(self) -> None:
        """
        Unlike Twisted's L{Site}, which writes an access line per request
        even without a log path, the metrics site writes none.
        """
        written: list[str] = []

        class Log:
            def write(self, line: str) -> None:
                written.append(line)

        from twisted.web.test.requesthelper import DummyRequest

        for site, expected in ((Site(Resource()), 1), (quietSite(Resource(), None), 0)):
            # The access log file: _logFile from Twisted 23.8 on, logFile before.
            site._logFile = site.logFile = Log()  # type: ignore[attr-defined]
            site._logDateTime = "-"
            request: Any = DummyRequest([b"metrics"])
            request.method = b"GET"
            request.uri = b"/metrics"
            request.clientproto = b"HTTP/1.1"
            request.code = 200
            request.sentLength = 0
            request.getClientAddress = lambda: None
            before = len(written)
            site.log(request)
            self.assertEqual(len(written) - before, expected)


class WiringTests(SynchronousTestCase):
    """
    C{--metrics} in the configuration, the hub and the daemon's services.
    """

    def options(self, *args: str, **config: Any) -> Any:
        from tests.harness import writeConfig
        from xcauth.daemon.tap import Options

        path = writeConfig(self.mktemp(), URL, "s3cret", **config)
        options = Options()
        options.parseOptions(["-c", path, "--listen", "tcp:0:interface=127.0.0.1", *args])
        return options

    def test_defaultNone(self) -> None:
        """
        Without C{--metrics} nothing is counted and nothing more listens.
        """
        from xcauth.daemon.hub import buildHub
        from xcauth.daemon.service import XcauthService

        options = self.options()
        self.assertIsNone(options.config.metrics)
        hub = buildHub(options.config, MemoryReactorClock())
        self.assertIsNone(hub.metrics)
        self.assertNotIsInstance(hub.context.metrics, Metrics)
        service = XcauthService(hub, options.listeners, MemoryReactorClock())
        self.assertIsNone(service.metricsListener)

    def test_injected(self) -> None:
        """
        With C{--metrics}, the hub's one L{Metrics} reaches the framings'
        context, the cache, the penalty box and the backend client, and the
        daemon has one more listener serving it.
        """
        from xcauth.core.authenticator import Authenticator
        from xcauth.daemon.hub import buildHub
        from xcauth.daemon.service import XcauthService

        options = self.options("--metrics", "tcp:9464:interface=127.0.0.1",
                               cache_storage="memory")
        self.assertEqual(options.config.metrics, "tcp:9464:interface=127.0.0.1")
        reactor = MemoryReactorClock()
        hub = buildHub(options.config, reactor)
        metrics = hub.metrics
        assert metrics is not None
        self.assertIs(hub.context.metrics, metrics)
        assert hub.cache is not None
        self.assertIs(hub.cache.metrics, metrics)
        assert isinstance(hub.authenticator, Authenticator)
        self.assertIs(hub.authenticator.penalty.metrics, metrics)  # type: ignore[union-attr]
        client = hub.domains.settingsFor(DOMAIN)
        self.assertIs(client.client._metrics, metrics)  # type: ignore[union-attr,attr-defined]
        service = XcauthService(hub, options.listeners, reactor)
        self.assertEqual(service.metricsListener.name,  # type: ignore[union-attr]
                         "metrics=tcp:9464:interface=127.0.0.1")
        # Started and stopped with the daemon, through a parent that stops it
        # once the connections are answered.
        parent = service.metricsListener.parent  # type: ignore[union-attr]
        self.assertIn(parent, list(service))

    def test_badEndpoint(self) -> None:
        """
        A metrics endpoint that is not one stops the start with one line.
        """
        with self.assertRaises(SystemExit) as e:
            self.options("--metrics", "tcpp:9464")
        self.assertIn("xcauth: metrics: ", str(e.exception))
        self.assertNotIn("\n", str(e.exception))

    def test_reloadKeepsEndpoint(self) -> None:
        """
        The endpoint is bound once: a reload that changes it asks for a restart.
        """
        from xcauth.daemon.hub import RESTART_SETTINGS

        self.assertIn(("metrics", "metrics"), RESTART_SETTINGS)
