"""
Tests for L{xcauth.metrics}: what L{Metrics} exposes after a known mix of
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

from tests.fakes import ManualAuthenticator, TableAuthenticator
from tests.test_cache import SwitchableAgent
from xcauth.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.framing.base import RequestTimer, ServerContext, XcauthFactory
from xcauth.framing.lines import XMPPLineProtocol
from xcauth.http import HTTPRequester
from xcauth.interfaces import Outcome
from xcauth.jsxc import JSXCClient
from xcauth.keys import PasswordKeys
from xcauth.metrics import (
    LATENCY_BUCKETS,
    Metrics,
    NoMetrics,
    metricsService,
    quietSite,
    resultLabel,
)
from xcauth.penalty import PenaltyBox, PenaltyPolicy
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
        self.assertEqual(v("xcauth_cache_total", result="hit"), 2)
        for result in ("miss", "stale", "fallback"):
            self.assertEqual(v("xcauth_cache_total", result=result), 1)
        self.assertEqual(v("xcauth_deadline_missed_total", framing="dovecot"), 1)
        self.assertEqual(v("xcauth_penalized_total", reason="delayed"), 1)
        self.assertEqual(v("xcauth_penalized_total", reason="refused"), 1)
        self.assertEqual(v("xcauth_backend_requests_total", backend="jsxc", outcome="yes"), 1)
        self.assertEqual(v("xcauth_backend_requests_total", backend="nextcloud",
                           outcome="unavailable"), 1)
        self.assertAlmostEqual(v("xcauth_backend_seconds_sum", backend="jsxc"), 0.02)
        self.assertEqual(v("xcauth_in_flight"), 0)

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
        self.assertEqual((LATENCY_BUCKETS[0], LATENCY_BUCKETS[-1]), (0.001, 5.0))
        self.assertEqual(list(LATENCY_BUCKETS), sorted(LATENCY_BUCKETS))

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
        self.assertEqual(value(self.metrics, "xcauth_cache_total", result="hit"), 1)
        self.assertEqual(value(other, "xcauth_cache_total", result="hit"), 0)

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
        from tests.test_dovecot import PROSODY_HELLO, plain
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
        return value(self.metrics, "xcauth_cache_total", result=result)

    def backend(self, outcome: str) -> float:
        return value(self.metrics, "xcauth_backend_requests_total", backend="jsxc",
                     outcome=outcome)

    def test_timeline(self) -> None:
        self.assertIs(self.login(ALICE), True)  # no entry: asks the backend
        self.assertEqual((self.cache_("miss"), self.backend("yes")), (1, 1))
        self.assertIs(self.login(ALICE), True)  # fresh entry
        self.assertEqual((self.cache_("hit"), self.backend("yes")), (1, 1))
        self.assertIs(self.login("wrong"), False)  # fresh entry, no match
        self.assertEqual((self.cache_("miss"), self.backend("no")), (2, 1))
        self.assertIs(self.login(ALICE), True)  # a wrong password evicts nothing
        self.assertEqual((self.cache_("hit"), self.cache_("miss")), (2, 2))
        self.clock.advance(2 * HOUR)  # past the query TTL
        self.assertIs(self.login(ALICE), True)
        self.assertEqual((self.cache_("stale"), self.backend("yes")), (1, 2))
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
        self.assertEqual((self.backend("yes"), self.backend("no")), (1, 1))


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
        return box.gate("a@x", "a@x", key, lambda: succeed(answer))

    def test_refusedAndDelayed(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(baseDelay=0.5, maxDelay=2.0,
                                                   lockoutAfter=2, lockoutSeconds=900),
                         metrics=self.metrics)
        d = self.gate(box, b"k1" * 16, False)  # the backend says no: held back
        self.assertEqual(self.penalized("delayed"), 1)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(d), False)
        d = self.gate(box, b"k1" * 16, True)  # the same wrong password: refused locally
        self.assertEqual(self.penalized("refused"), 1)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), False)
        self.gate(box, b"k2" * 16, False)  # a second distinct one: locked out after
        self.clock.advance(2.0)
        d = self.gate(box, b"k3" * 16, True)
        self.assertEqual(self.penalized("locked-out"), 1)
        self.assertEqual(self.penalized("delayed"), 2)

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
        self.assertIsInstance(factory, Site)
        self.assertIs(factory.resource, resource)
        self.assertFalse(factory.noisy)

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
        from xcauth.tap import Options
        from xcauth.testing.processes import writeConfig

        path = writeConfig(self.mktemp(), URL, "s3cret", **config)
        options = Options()
        options.parseOptions(["-c", path, "--listen", "tcp:0:interface=127.0.0.1", *args])
        return options

    def test_defaultNone(self) -> None:
        """
        Without C{--metrics} nothing is counted and nothing more listens.
        """
        from xcauth.hub import buildHub
        from xcauth.service import XcauthService

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
        from xcauth.auth import Authenticator
        from xcauth.hub import buildHub
        from xcauth.service import XcauthService

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
        self.assertIn(service.metricsListener, list(service))

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
        from xcauth.hub import RESTART_SETTINGS

        self.assertIn(("metrics", "metrics"), RESTART_SETTINGS)
