"""
Tests of L{xcauth.daemon.hub.Hub} as a tree of services (the domain table's
refresh and the throttle watches are children, on the hub's clock) and of
L{xcauth.daemon.hub.buildBackends}, which both the start and a reload go
through.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from xcauth.backends.ocs import OCSClient
from xcauth.backends.throttle import ThrottleWatch, ThrottleWatches
from xcauth.daemon import hub as hubModule
from xcauth.daemon.config import Config, ConfigOptions
from xcauth.daemon.hub import Core, Gate, Hub, buildBackends, buildHub
from xcauth.daemon.listen import parseListener
from xcauth.daemon.service import XcauthService
from xcauth.framing.base import ServerContext
from xcauth.interfaces import NoMetrics, ThrottleState
from xcauth.state import database as store
from xcauth.state.database import Store, ThreadWorker
from xcauth.state.domains import REFRESH_SECONDS, DomainTable
from xcauth.testing.workers import SynchronousWorker

STOCK = ("--backend", "nextcloud", "--url", "https://c.example", "--service-user", "svc",
         "--service-password", "pw", "--domain", "example.org")


def config(*args: str) -> Config:
    options = ConfigOptions()
    options.parseOptions(list(args))
    return options.config


class HubOnClock:
    """
    A hub on a L{MemoryReactorClock} whose state database (SQLite) runs its
    calls at once on the test's thread: the schema check and every read of
    the domain table happen when the clock says so.
    """

    mktemp: Any
    patch: Any

    def hub(self, *args: str, authenticator: Any = None) -> Hub:
        self.reactor = MemoryReactorClock()
        cfg = config(*args, "--db", os.path.abspath(self.mktemp()))
        backends = buildBackends(cfg, self.reactor, NoMetrics())
        self.read = 0
        listDomains = store.listDomains

        def counted(conn: Any) -> Any:
            self.read += 1
            return listDomains(conn)

        self.patch(store, "listDomains", counted)
        db = Store(cfg.db, SynchronousWorker())
        domains = DomainTable(db, backends.globalSettings, backends.makeClient, self.reactor,
                              globalSpec=backends.globalSpec, served=backends.served)
        core = Core(
            context=ServerContext(authenticator, self.reactor),
            domains=domains, store=db, dbWorker=ThreadWorker(self.reactor, "test-db"),
            hashWorker=ThreadWorker(self.reactor, "test-bcrypt"), cache=None,
            gate=Gate(opened=True),
        )
        return Hub(core, backends, cfg, self.reactor)

    def reads(self) -> int:
        """
        How often the domain table was read.
        """
        return self.read

    def countThrottleReads(self) -> list[str]:
        """
        Answer every stock client's capabilities at once, noting its URL.
        """
        read: list[str] = []

        def throttleState(client: OCSClient) -> Any:
            read.append(client.url)
            return succeed(ThrottleState(0.0, True))

        self.patch(OCSClient, "throttleState", throttleState)
        self.patch(OCSClient, "checkPrivileges", lambda client: succeed(None))
        return read


class ChildServicesTests(HubOnClock, SynchronousTestCase):
    def test_childrenStartAndStopWithHub(self) -> None:
        """
        The throttle watches (a service of one child per stock backend) and,
        once the schema is checked, the domain table are the hub's children,
        started and stopped with it.
        """
        self.countThrottleReads()
        hub = self.hub(*STOCK)
        watches = hub.watches
        self.assertEqual(list(hub), [watches])
        [watch] = watches
        self.assertIsInstance(watch, ThrottleWatch)
        hub.startService()
        self.assertEqual(list(hub), [watches, hub.domains])
        for svc in [*hub, watch]:
            self.assertTrue(verifyObject(IService, svc))
            self.assertTrue(svc.running)
        self.successResultOf(hub.stopService())
        for svc in [hub, *hub, watch]:
            self.assertFalse(svc.running)

    def test_stopDoesNotWaitForARead(self) -> None:
        """
        A throttle read in progress (Nextcloud does not answer) does not hold
        the hub's stop: it ends within the backend's own timeout.
        """
        hub = self.hub(*STOCK)
        hub.startService()
        [watch] = hub.watches
        self.assertTrue(watch.running)
        self.successResultOf(hub.stopService())
        self.assertFalse(watch.running)

    def test_domainRefreshOnClock(self) -> None:
        """
        The domain table is read at start and every L{REFRESH_SECONDS} on the
        hub's clock, until the hub stops.
        """
        hub = self.hub("--url", "https://c.example/jsxc", "--secret", "s")
        hub.startService()
        self.assertEqual(self.reads(), 1)
        self.reactor.advance(REFRESH_SECONDS - 0.1)
        self.assertEqual(self.reads(), 1)
        self.reactor.advance(0.1)
        self.assertEqual(self.reads(), 2)
        self.reactor.advance(REFRESH_SECONDS)
        self.assertEqual(self.reads(), 3)
        self.successResultOf(hub.stopService())
        self.reactor.advance(REFRESH_SECONDS * 3)
        self.assertEqual(self.reads(), 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_throttleWatchOnClock(self) -> None:
        """
        A throttle watch reads at start and every C{throttle-check-interval}
        on the hub's clock; nothing is read after the stop.
        """
        read = self.countThrottleReads()
        hub = self.hub(*STOCK, "--throttle-check-interval", "60")
        hub.startService()
        self.assertEqual(read, ["https://c.example"])
        self.reactor.advance(59)
        self.assertEqual(len(read), 1)
        self.reactor.advance(1)
        self.assertEqual(read, ["https://c.example"] * 2)
        self.reactor.advance(60)
        self.assertEqual(len(read), 3)
        self.successResultOf(hub.stopService())
        self.reactor.advance(600)
        self.assertEqual(len(read), 3)

    def test_reloadSwapsWatches(self) -> None:
        """
        A reload replaces the throttle watches: the old ones stop, the new
        ones run as children of the running hub.
        """
        read = self.countThrottleReads()
        hub = self.hub(*STOCK)
        hub.startService()
        old = hub.watches
        [oldWatch] = old
        hub.reload(config(*STOCK, "--db", hub.store.path))
        self.assertIsNot(hub.watches, old)
        self.assertFalse(oldWatch.running)
        self.assertIsNone(old.parent)
        self.assertIs(hub.watches.parent, hub)
        [watch] = hub.watches
        self.assertTrue(watch.running)
        self.assertEqual(len(read), 2)
        self.successResultOf(hub.stopService())


def describe(hub: Hub) -> dict[str, Any]:
    """
    What a hub's backends were built with, as far as the configuration
    decides it (the global client, a domain row's client, their throttle
    watches).
    """
    hub.domains.apply([store.DomainRow("nc.example", None, "https://nc.example", None,
                                       backend="nextcloud", serviceuser="s",
                                       servicepassword="p")])

    def client(c: Any) -> tuple[Any, ...]:
        http = c._http
        return (type(c).__name__, c.url, http.timeout, http._turns.limit,
                getattr(c, "_serviceUser", None), c._metrics is hub.context.metrics)

    global_ = hub.domains.globalSettings
    domain = hub.domains.settingsFor("nc.example")
    assert domain is not None
    return {
        "global": client(global_.client),
        "secrets": global_.secrets,
        "served": hub.domains.served,
        "globalSpec": hub.domains.globalSpec,
        "domain": client(domain.client),
        "watches": sorted((w.client.url, w.step, w.warnDelay, w.clock is hub.reactor)
                          for w in hub.watches),
        "startupCheck": hub.startupCheck is not None,
        "connectTimeout": hub.backends.connectTimeout,
    }


class BuildBackendsTests(SynchronousTestCase):
    """
    A reload builds the backends through L{buildBackends}, as the start does:
    a setting the start honours, the reload honours too.
    """

    def db(self) -> str:
        return os.path.abspath(self.mktemp())

    def test_reloadAsStart(self) -> None:
        db = self.db()
        new = (*STOCK[:2], "--url", "https://new.example", *STOCK[4:6],
               "--service-password", "pw2", "--domain", "example.org", "--domain", "b.org",
               "--timeout", "1,7", "--throttle-check-interval", "90",
               "--throttle-warn-delay", "3", "--db", db)
        started = buildHub(config(*new), MemoryReactorClock())
        reloaded = buildHub(config("--url", "https://c.example/jsxc", "--secret", "s",
                                   "--db", db), MemoryReactorClock())
        reloaded.reload(config(*new))
        self.assertEqual(describe(reloaded), describe(started))

    def test_oneBuildFunction(self) -> None:
        """
        buildHub and reload call L{buildBackends}; the reload with the
        backends in use (their pool is kept for the same connect timeout).
        """
        calls: list[tuple[Config, Any]] = []
        real = hubModule.buildBackends

        def recording(cfg: Config, reactor: Any, metrics: Any,
                      previous: Any = None) -> hubModule.Backends:
            calls.append((cfg, previous))
            return real(cfg, reactor, metrics, previous)

        self.patch(hubModule, "buildBackends", recording)
        db = self.db()
        first = config("--url", "https://c.example/jsxc", "--secret", "s", "--db", db)
        hub = buildHub(first, MemoryReactorClock())
        self.assertEqual(calls, [(first, None)])
        backends = hub.backends
        second = config("--url", "https://d.example/jsxc", "--secret", "s", "--db", db)
        hub.reload(second)
        self.assertEqual(calls[1:], [(second, backends)])
        self.assertIs(hub.pool, backends.pool)
        self.assertIsInstance(hub.watches, ThrottleWatches)


class PendingAuthenticator:
    """
    Answers each password check when the test fires its Deferred.
    """

    def __init__(self) -> None:
        self.work: list[Deferred[bool | None]] = []

    def authenticate(self, *a: Any, **k: Any) -> Deferred[bool | None]:
        d: Deferred[bool | None] = Deferred()
        self.work.append(d)
        return d


class StopOrderTests(HubOnClock, SynchronousTestCase):
    def test_listenersDrainHub(self) -> None:
        """
        L{XcauthService} stops through L{MultiService}: the listeners stop at
        once, the request in flight is answered, and the hub stops only when
        the last connection has closed; the metrics listener serves until
        then.
        """
        from xcauth.daemon.metrics import Metrics

        auth = PendingAuthenticator()
        hub = self.hub("--url", "https://c.example/jsxc", "--secret", "s",
                       "--metrics", "tcp:0:interface=127.0.0.1", authenticator=auth)
        hub.metrics = Metrics(self.reactor)
        service = XcauthService(
            hub, [parseListener("prosody=tcp:0:interface=127.0.0.1", "generic")], self.reactor
        )
        service.startService()
        [listener] = service.listeners
        metrics = service.metricsListener
        assert metrics is not None
        self.assertTrue(listener.running)
        self.assertTrue(metrics.running)
        p = service.factories[0].buildProtocol(None)
        transport = StringTransport()
        p.makeConnection(transport)
        p.dataReceived(b"auth:alice:example.org:pw\n")
        [work] = auth.work
        stopped = service.stopService()
        self.assertFalse(listener.running)
        self.assertTrue(hub.running)
        self.assertNoResult(stopped)
        work.callback(True)
        self.assertEqual(transport.value(), b"1\n")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(hub.running)
        self.assertNoResult(stopped)
        self.assertTrue(metrics.running)
        p.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertFalse(hub.running)
        self.assertFalse(metrics.running)
        self.assertFalse(hub.domains.running)


class SharedBudgetTimerTests(HubOnClock, SynchronousTestCase):
    def test_exchangesOnClockAndOnceAtStop(self) -> None:
        """
        The shared budgets (a PostgreSQL store) are exchanged once the domains
        are read and every L{SharedBudget.INTERVAL} seconds on the hub's clock,
        by a child service; the hub's stop writes once more, after the timer
        has stopped.
        """
        from types import SimpleNamespace

        from xcauth.core.sharedbudget import SharedBudget

        calls: list[float] = []

        def exchange(node: str, events: Any, since: float, before: float) -> Deferred[Any]:
            calls.append(self.reactor.seconds())
            return succeed([])

        authenticator = SimpleNamespace(penalty=SimpleNamespace(budget=None))
        hub = self.hub("--url", "https://c.example/jsxc", "--secret", "s",
                       authenticator=authenticator)
        budget = SharedBudget(exchange, self.reactor, "node-a")
        authenticator.penalty.budget = budget
        hub.startService()
        self.assertEqual(calls, [0.0])
        self.reactor.advance(SharedBudget.INTERVAL)
        self.reactor.advance(SharedBudget.INTERVAL)
        self.assertEqual(calls, [0.0, 1.0, 2.0])
        [timer] = [svc for svc in hub if svc.name == "shared brute-force budgets"]
        self.assertTrue(verifyObject(IService, timer))
        self.successResultOf(hub.stopService())
        self.assertFalse(timer.running)
        self.assertEqual(calls, [0.0, 1.0, 2.0, 2.0])
        self.reactor.advance(10 * SharedBudget.INTERVAL)
        self.assertEqual(len(calls), 4)
