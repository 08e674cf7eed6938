"""
The state database on both engines: the row functions of L{xcauth.state.database} and
L{xcauth.state.roster} against SQLite and against the tests' own PostgreSQL
(L{tests.postgres}); the schema's versions (L{xcauth.state.schema}); the
PostgreSQL store of the daemon (L{xcauth.state.postgres.PgStore}): its pool, its
timeouts, its notifications, going down and coming back; the shared
credential cache (L{xcauth.cache.SharedStorage}) of two nodes; the C{db}
settings and C{xcauth db upgrade|copy}.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests import postgres
from tests.e2e.test_admin_cli import xcauth
from tests.unit import test_cache, test_roster
from tests.unit.test_store import writeOldDatabase
from xcauth.daemon.config import ConfigOptions
from xcauth.interfaces import CacheEntry
from xcauth.state import database as store
from xcauth.state import postgres as pgstore
from xcauth.state import roster as rosterstore
from xcauth.state import schema
from xcauth.state.cache import DatabaseStorage, SharedStorage

URL = "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"


class _StateTests:
    """
    The row functions on one engine (C{connect} in the subclass).
    """

    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertRaises: Any
    addCleanup: Any

    def connect(self) -> Any:
        raise NotImplementedError

    def test_domains(self) -> None:
        conn = self.connect()
        self.assertTrue(store.addDomain(conn, "a.org", URL, "s1", None))
        self.assertFalse(store.addDomain(conn, "a.org", URL, "s2", None))
        self.assertTrue(
            store.addDomain(conn, "b.org", "https://c.example", None, "c.example",
                            backend="nextcloud", serviceuser="svc", servicepassword="pw")
        )
        self.assertTrue(store.updateDomain(conn, "a.org", authdomain="x.org"))
        self.assertFalse(store.updateDomain(conn, "zz.org", authdomain="x.org"))
        self.assertEqual(
            store.listDomains(conn),
            [
                store.DomainRow("a.org", "s1", URL, "x.org"),
                store.DomainRow("b.org", None, "https://c.example", "c.example",
                                "nextcloud", "svc", "pw"),
            ],
        )
        self.assertTrue(store.removeDomain(conn, "a.org"))
        self.assertFalse(store.removeDomain(conn, "a.org"))
        self.assertIsNone(store.getDomain(conn, "a.org"))

    def test_cache(self) -> None:
        conn = self.connect()
        store.putCacheEntry(conn, "alice@a.org", "$2b$hash1", 1_000_000)
        store.putCacheEntry(conn, "alice@a.org", "$2b$hash2", 1_000_100)
        store.touchCacheEntry(conn, "alice@a.org", 1_000_200, False)
        self.assertEqual(
            store.getCacheEntry(conn, "alice@a.org"),
            store.CacheRow("alice@a.org", "$2b$hash2", 1_000_000, 1_000_100, 1_000_200),
        )
        store.touchCacheEntry(conn, "alice@a.org", 1_000_300, True)
        entry = store.getCacheEntry(conn, "alice@a.org")
        assert entry is not None
        self.assertEqual((entry.remoteAuth, entry.anyAuth), (1_000_300, 1_000_300))
        store.putCacheEntry(conn, "bob@a.org", "$2b$hash3", 1_000_000)
        self.assertEqual([r.jid for r in store.listCache(conn)], ["alice@a.org", "bob@a.org"])
        self.assertTrue(store.deleteCacheEntry(conn, "alice@a.org"))
        self.assertFalse(store.deleteCacheEntry(conn, "alice@a.org"))
        self.assertEqual(store.clearCache(conn), 1)
        self.assertEqual(store.listCache(conn), [])

    def test_roster(self) -> None:
        conn = self.connect()
        rosterstore.setFullName(conn, "alice@a.org", "Alice")
        rosterstore.setSynced(conn, "alice@a.org", ["G2", "G1"], "h1", 1_000_000)
        self.assertEqual(
            rosterstore.getRosterInfo(conn, "alice@a.org"),
            rosterstore.RosterInfo("alice@a.org", "Alice", ("G1", "G2"), "h1"),
        )
        self.assertEqual(
            rosterstore.getFullNames(conn, ["alice@a.org", "bob@a.org"]),
            {"alice@a.org": "Alice", "bob@a.org": None},
        )
        rosterstore.setGroupMembers(conn, "G1@a.org", ["bob@a.org", "alice@a.org"])
        rosterstore.removeGroupMember(conn, "G1@a.org", "bob@a.org")
        self.assertEqual(
            rosterstore.getGroupMembers(conn, ["G1@a.org", "G9@a.org"]),
            {"G1@a.org": ("alice@a.org",), "G9@a.org": None},
        )
        self.assertEqual(rosterstore.forgetRoster(conn, "alice@a.org"), 1)
        self.assertEqual(
            rosterstore.getRosterInfo(conn, "alice@a.org"),
            rosterstore.RosterInfo("alice@a.org", None, ("G1", "G2"), None),
        )
        self.assertEqual(rosterstore.getGroupMembers(conn, ["G1@a.org"]), {"G1@a.org": None})

    def test_rosterClaims(self) -> None:
        """
        One node holds a user's sync until it gives it up or its claim
        expires; the same node may claim again.
        """
        conn = self.connect()
        self.assertTrue(rosterstore.claimSync(conn, "alice@a.org", "A", 100.0, 300))
        self.assertFalse(rosterstore.claimSync(conn, "alice@a.org", "B", 101.0, 300))
        self.assertTrue(rosterstore.claimSync(conn, "bob@a.org", "B", 101.0, 300))
        self.assertTrue(rosterstore.claimSync(conn, "alice@a.org", "A", 102.0, 300))
        rosterstore.releaseSync(conn, "alice@a.org", "B")  # not B's: kept
        self.assertFalse(rosterstore.claimSync(conn, "alice@a.org", "B", 103.0, 300))
        rosterstore.releaseSync(conn, "alice@a.org", "A")
        self.assertTrue(rosterstore.claimSync(conn, "alice@a.org", "B", 104.0, 300))
        # Past its expiry, a claim no longer holds.
        self.assertTrue(rosterstore.claimSync(conn, "alice@a.org", "C", 405.0, 300))

    def test_schemaVersion(self) -> None:
        """
        The current version is recorded; opening again changes nothing; a
        newer one is refused with one line.
        """
        conn = self.connect()
        self.assertEqual(store.schemaVersion(conn), schema.SCHEMA_VERSION)
        self.assertTrue(schema.complete(conn))
        store.ensureSchema(conn)
        self.assertEqual(store.schemaVersion(conn), schema.SCHEMA_VERSION)
        with store.transaction(conn):
            schema._setVersion(conn, schema.SCHEMA_VERSION + 1)
        e = self.assertRaises(schema.SchemaTooNew, store.ensureSchema, conn)
        self.assertEqual(
            str(e),
            f"the state database has schema version {schema.SCHEMA_VERSION + 1}, newer "
            f"than the {schema.SCHEMA_VERSION} this xcauth knows: upgrade xcauth on this "
            "node",
        )


class SQLiteStateTests(_StateTests, SynchronousTestCase):
    def connect(self) -> Any:
        directory = self.mktemp()
        os.makedirs(directory)
        conn = store.connect(os.path.join(directory, "xcauth.sqlite3"))
        self.addCleanup(conn.close)
        return conn

    def test_version1FileUpgraded(self) -> None:
        """
        A file of version 1 (today's installations) gets version 2's table,
        keeping its rows.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "old.sqlite3")
        writeOldDatabase(path)
        raw = sqlite3.connect(path)
        raw.execute("PRAGMA user_version = 1")
        raw.close()
        conn = store.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(store.schemaVersion(conn), schema.SCHEMA_VERSION)
        self.assertEqual([d.xmppdomain for d in store.listDomains(conn)], ["other.org"])
        self.assertTrue(rosterstore.claimSync(conn, "alice@a.org", "A", 1.0, 10))


def pgConnect(testCase: Any) -> pgstore.PgConnection:
    server = postgres.skipUnlessPostgres(testCase)
    name = server.newDatabase()
    testCase.addCleanup(server.dropDatabase, name)
    conn = pgstore.connect(server.url(name), postgres.PASSWORD, 10)
    testCase.addCleanup(conn.close)
    store.ensureSchema(conn)
    return conn


class PostgresStateTests(_StateTests, SynchronousTestCase):
    def connect(self) -> Any:
        return pgConnect(self)

    def test_concurrentMigrations(self) -> None:
        """
        Nodes starting together on a new database migrate it once (under the
        advisory lock), none fails.
        """
        import threading

        server = postgres.skipUnlessPostgres(self)
        name = server.newDatabase()
        self.addCleanup(server.dropDatabase, name)
        errors: list[BaseException] = []

        def node() -> None:
            try:
                conn = pgstore.connect(server.url(name), postgres.PASSWORD, 30)
                try:
                    store.ensureSchema(conn)
                finally:
                    conn.close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=node) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(server.admin("SELECT version FROM xcauth_schema", name),
                         [(schema.SCHEMA_VERSION,)])

    def test_timestampsAsText(self) -> None:
        """
        Timestamp columns default to C{CURRENT_TIMESTAMP}'s text, as in SQLite.
        """
        conn = self.connect()
        conn.execute("INSERT INTO authcache (jid, pwhash) VALUES (?, ?)", ("x@a.org", "h"))
        entry = store.getCacheEntry(conn, "x@a.org")
        assert entry is not None
        self.assertTrue(abs(entry.firstAuth - time.time()) < 120)

    def test_notifications(self) -> None:
        """
        Domain and cache writes notify their channel when they commit (a
        cache entry when its hash changes or it goes).
        """
        conn = self.connect()
        listener = pgstore.connect(conn.raw.info.dsn, postgres.PASSWORD, 10)
        self.addCleanup(listener.close)
        listener.raw.execute("LISTEN xcauth_domains")  # (psycopg 3.1's way, too)
        listener.raw.execute("LISTEN xcauth_cache")
        store.addDomain(conn, "a.org", URL, "s", None)
        # A first entry, and the same hash again: no word; a new hash: one.
        store.putCacheEntry(conn, "alice@a.org", "h", 1.0)
        store.putCacheEntry(conn, "alice@a.org", "h", 2.0)
        store.putCacheEntry(conn, "alice@a.org", "h2", 3.0)
        store.deleteCacheEntry(conn, "alice@a.org")
        got: list[tuple[str, str]] = []
        listener.raw.add_notify_handler(lambda n: got.append((n.channel, n.payload)))
        for _ in range(100):
            if len(got) >= 3:
                break
            listener.raw.execute("SELECT 1")
            time.sleep(0.05)
        self.assertEqual(
            got,
            [("xcauth_domains", "a.org"), ("xcauth_cache", "alice@a.org"),
             ("xcauth_cache", "alice@a.org")],
        )


class PgStoreTests(TestCase):
    """
    The daemon's PostgreSQL store on the real reactor.
    """

    timeout = 60

    def setUp(self) -> None:
        self.server = postgres.skipUnlessPostgres(self)
        self.name = self.server.newDatabase()
        self.addCleanup(self.server.dropDatabase, self.name)

    def makeStore(self, timeout: float = 1.0) -> pgstore.PgStore:
        s = pgstore.PgStore(
            self.server.url(self.name), postgres.PASSWORD, reactor, timeout=timeout
        )
        self.addCleanup(s.close)
        return s

    @inlineCallbacks
    def test_runsAndMigrates(self) -> Any:
        s = self.makeStore(5.0)
        yield s.run(store.ensureSchema)
        yield s.run(store.addDomain, "a.org", URL, "s", None)
        rows = yield s.run(store.listDomains)
        self.assertEqual([r.xmppdomain for r in rows], ["a.org"])
        self.assertNotIn(postgres.PASSWORD, repr(s))

    @inlineCallbacks
    def test_slowQueryBounded(self) -> Any:
        """
        A query slower than the timeout fails with L{StoreUnavailable} within
        about the timeout (the server cancels it too), and the store goes on.
        """
        s = self.makeStore(0.5)
        yield s.run(store.ensureSchema)
        started = time.monotonic()
        d = s.run(lambda c: c.execute("SELECT pg_sleep(5)"))
        yield self.assertFailure(d, pgstore.StoreUnavailable)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertFalse(s.down)
        yield deferLater(reactor, 0.6, lambda: None)
        rows = yield s.run(store.listDomains)
        self.assertEqual(rows, [])

    @inlineCallbacks
    def test_downAndBack(self) -> Any:
        """
        With the server stopped, calls fail at once; when it is back, the
        reconnect callbacks run and calls work again.
        """
        s = self.makeStore(1.0)
        yield s.run(store.ensureSchema)
        back: list[bool] = []
        s.onReconnect(lambda: back.append(True))
        self.server.stop()
        try:
            yield self.assertFailure(s.run(store.listDomains), pgstore.StoreUnavailable)
            self.assertTrue(s.down)
            started = time.monotonic()
            yield self.assertFailure(s.run(store.listDomains), pgstore.StoreUnavailable)
            self.assertLess(time.monotonic() - started, 0.5)
        finally:
            self.server.start()
        for _ in range(100):
            if back:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(back, [True])
        rows = yield s.run(store.listDomains)
        self.assertEqual(rows, [])

    @inlineCallbacks
    def test_metrics(self) -> Any:
        """
        Calls, their latency and outcome, the outage and the reconnection are
        in the metrics.
        """
        from prometheus_client import generate_latest

        from xcauth.daemon.metrics import Metrics

        metrics = Metrics(reactor, process=False)
        s = pgstore.PgStore(
            self.server.url(self.name), postgres.PASSWORD, reactor, 1.0, metrics=metrics
        )
        self.addCleanup(s.close)
        yield s.run(store.ensureSchema)
        self.server.stop()
        try:
            yield self.assertFailure(s.run(store.listDomains), pgstore.StoreUnavailable)
            text = generate_latest(metrics.registry).decode()
            self.assertIn("xcauth_store_down 1.0", text)
        finally:
            self.server.start()
        for _ in range(100):
            if not s.down:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        text = generate_latest(metrics.registry).decode()
        self.assertIn("xcauth_store_down 0.0", text)
        self.assertIn("xcauth_store_reconnects_total 1.0", text)
        self.assertIn('xcauth_store_query_seconds_count{outcome="ok"}', text)
        self.assertIn('xcauth_store_query_seconds_count{outcome="error"} 1.0', text)
        self.assertIn("xcauth_store_in_use 0.0", text)

    @inlineCallbacks
    def test_serverRestartedBetweenCalls(self) -> Any:
        """
        After a restart of the server between two calls, the next call gets a
        new connection at once: it succeeds and the store is not marked down.
        """
        s = self.makeStore(5.0)
        yield s.run(store.ensureSchema)
        self.server.stop()
        self.server.start()
        rows = yield s.run(store.listDomains)
        self.assertEqual(rows, [])
        self.assertFalse(s.down)

    @inlineCallbacks
    def test_notificationsFromOtherNodes(self) -> Any:
        """
        A subscriber hears C{None} when the listener connects, then each change
        made by another node or the admin command, and not its own.
        """
        a = self.makeStore(5.0)
        b = self.makeStore(5.0)
        yield a.run(store.ensureSchema)
        heard: list[str | None] = []
        a.subscribe(store.DOMAINS_CHANNEL, heard.append)
        a.startListening()
        for _ in range(100):
            if heard:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(heard, [None])
        yield a.run(store.addDomain, "own.org", URL, "s", None)
        yield b.run(store.addDomain, "b.org", URL, "s", None)
        for _ in range(100):
            if len(heard) > 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(heard, [None, "b.org"])


class SharedDomainsTests(TestCase):
    """
    L{DomainTable} on PostgreSQL: a change made elsewhere is read when it is
    announced, not at the next periodic read.
    """

    timeout = 60

    @inlineCallbacks
    def test_changeAnnounced(self) -> Any:
        from xcauth.state.domains import BackendSpec, DomainSettings, DomainTable

        server = postgres.skipUnlessPostgres(self)
        name = server.newDatabase()
        self.addCleanup(server.dropDatabase, name)
        s = pgstore.PgStore(server.url(name), postgres.PASSWORD, reactor, 5.0)
        self.addCleanup(s.close)
        yield s.run(store.ensureSchema)
        made: list[BackendSpec] = []

        def makeClient(spec: BackendSpec) -> Any:
            made.append(spec)
            return object()

        globalSettings = DomainSettings((b"g",), None, makeClient(BackendSpec("jsxc", URL, b"g")))
        # The periodic read once an hour: only the announcement can apply
        # the change within the test.
        table = DomainTable(s, globalSettings, makeClient, reactor, interval=3600,
                            globalSpec=BackendSpec("jsxc", URL, b"g"))
        s.startListening()
        table.startService()
        self.addCleanup(table.stopService)
        for _ in range(100):
            if s.listening and table.whenReady() is None:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIs(table.settingsFor("other.org"), globalSettings)
        admin = pgstore.connect(server.url(name), postgres.PASSWORD, 10)
        self.addCleanup(admin.close)
        store.addDomain(admin, "other.org", URL, "other-secret", None)
        for _ in range(200):
            if table.settingsFor("other.org") is not globalSettings:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(table.settingsFor("other.org").secrets, (b"other-secret",))
        store.removeDomain(admin, "other.org")
        for _ in range(200):
            if table.settingsFor("other.org") is globalSettings:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIs(table.settingsFor("other.org"), globalSettings)


class SharedCacheTests(TestCase):
    """
    L{SharedStorage} of two nodes on one PostgreSQL.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = postgres.skipUnlessPostgres(self)
        self.name = self.server.newDatabase()
        self.addCleanup(self.server.dropDatabase, self.name)
        self.stores = []
        for _ in range(2):
            s = pgstore.PgStore(self.server.url(self.name), postgres.PASSWORD, reactor, 2.0)
            self.addCleanup(s.close)
            self.stores.append(s)
        yield self.stores[0].run(store.ensureSchema)
        self.a = SharedStorage(self.stores[0], reactor)
        self.b = SharedStorage(self.stores[1], reactor)
        for s in self.stores:
            s.startListening()
        yield self.until(lambda: all(s.listening for s in self.stores))

    @inlineCallbacks
    def until(self, check: Any) -> Any:
        for _ in range(200):
            if check():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("timed out")

    @inlineCallbacks
    def test_evictionReachesOtherNode(self) -> Any:
        """
        An entry node A wrote is read by node B; B's eviction (a refused
        password) makes A forget its copy at once, not after seconds.
        """
        now = time.time()
        yield self.a.put("alice@a.org", b"$2b$hash", now)
        entry = yield self.b.get("alice@a.org")
        self.assertEqual(entry, CacheEntry(b"$2b$hash", int(now), int(now), int(now)))
        self.assertIsNotNone((yield self.a.get("alice@a.org")))
        yield self.b.delete("alice@a.org")
        yield self.until(lambda: "alice@a.org" not in self.a._local)
        self.assertIsNone((yield self.a.get("alice@a.org")))

    @inlineCallbacks
    def test_newPasswordReachesOtherNode(self) -> Any:
        """
        A new hash written on node B replaces what node A kept.
        """
        now = time.time()
        yield self.a.put("alice@a.org", b"$2b$old", now)
        yield self.b.put("alice@a.org", b"$2b$new", now + 1)
        yield self.until(lambda: "alice@a.org" not in self.a._local)
        entry = yield self.a.get("alice@a.org")
        self.assertEqual(entry.pwhash, b"$2b$new")

    @inlineCallbacks
    def test_hitsFromMemory(self) -> Any:
        """
        While the listener is connected, a kept entry is answered without a
        call to the database.
        """
        yield self.a.put("alice@a.org", b"$2b$hash", time.time())
        calls: list[object] = []
        run = self.stores[0].run
        self.stores[0].run = lambda *a: calls.append(a) or run(*a)  # type: ignore[method-assign]
        d = self.a.get("alice@a.org")
        self.assertTrue(d.called)
        self.assertEqual(calls, [])

    @inlineCallbacks
    def test_hitsWriteNothing(self) -> Any:
        """
        Cache hits within a minute of the last recorded one are recorded in
        memory only (the 60 s rule of L{DatabaseStorage}), also once the
        entry has been kept longer than 5 s.
        """
        now = time.time()
        yield self.a.put("alice@a.org", b"$2b$hash", now)
        calls: list[object] = []
        run = self.stores[0].run
        self.stores[0].run = lambda *a: calls.append(a) or run(*a)  # type: ignore[method-assign]
        for later in (1, 10, 30, 59):
            yield self.a.touch("alice@a.org", now + later, False)
        self.assertEqual(calls, [])
        yield self.a.touch("alice@a.org", now + 61, False)
        self.assertEqual(len(calls), 1)

    @inlineCallbacks
    def test_evictionKeptThroughFailedPut(self) -> Any:
        """
        An eviction made while PostgreSQL is down stays to be written even if
        a new hash for the user could not be written either: the old hash is
        gone once the database is back.
        """
        now = time.time()
        yield self.a.put("alice@a.org", b"$2b$old", now)
        self.server.stop()
        try:
            yield self.until(lambda: not self.stores[0].listening)
            yield self.a.delete("alice@a.org")
            yield self.a.put("alice@a.org", b"$2b$new", now + 1)
            self.assertIn("alice@a.org", self.a.evictions)
        finally:
            self.server.start()
        yield self.until(lambda: not self.a.evictions and not self.stores[0].down)
        rows = yield self.stores[1].run(store.listCache)
        self.assertEqual(rows, [])

    @inlineCallbacks
    def test_outage(self) -> Any:
        """
        With PostgreSQL stopped, reads come from memory and an eviction is
        kept; when it is back, the eviction is written and no other entry is
        lost.
        """
        now = time.time()
        yield self.a.put("alice@a.org", b"$2b$hash", now)
        yield self.a.put("bob@a.org", b"$2b$bob", now)
        self.server.stop()
        try:
            yield self.until(lambda: not self.stores[0].listening)
            entry = yield self.a.get("alice@a.org")
            self.assertEqual(entry.pwhash, b"$2b$hash")
            yield self.a.delete("alice@a.org")
            self.assertIn("alice@a.org", self.a.evictions)
            self.assertIsNone((yield self.a.get("alice@a.org")))
        finally:
            self.server.start()
        yield self.until(lambda: not self.a.evictions and not self.stores[0].down)
        rows = yield self.stores[1].run(store.listCache)
        self.assertEqual([r.jid for r in rows], ["bob@a.org"])


class SettingsTests(SynchronousTestCase):
    def parse(self, *args: str) -> ConfigOptions:
        options = ConfigOptions()
        options.parseOptions(["--url", URL, "--secret", "s", *args])
        return options

    def test_postgresSettings(self) -> None:
        """
        A URL or key/value string selects PostgreSQL; the password comes from
        its file and is in no repr; a SQLite path stays a path.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret-pw\n")
        config = self.parse(
            "--db", "postgresql://xcauth@127.0.0.1/xcauth", "--db-password-file", path
        ).config
        self.assertEqual(config.dbPassword, "s3cret-pw")
        self.assertNotIn("s3cret-pw", repr(config))
        self.assertTrue(pgstore.isPostgres("host=/run/postgresql dbname=xcauth"))
        self.assertFalse(pgstore.isPostgres("/var/lib/xcauth/xcauth.sqlite3"))
        self.assertFalse(pgstore.isPostgres("xcauth.sqlite3"))

    def test_passwordInDbRefused(self) -> None:
        """
        A password in C{db} (it would be on command lines and in logs) stops
        the configuration with one line that does not repeat it.
        """
        from twisted.python import usage

        for db in ("postgresql://xcauth:hunter2@127.0.0.1/xcauth",
                   "host=127.0.0.1 password=hunter2 dbname=x"):
            e = self.assertRaises(usage.UsageError, self.parse, "--db", db)
            self.assertIn("db-password-file", str(e))
            self.assertNotIn("hunter2", str(e))
        e = self.assertRaises(usage.UsageError, self.parse, "--db", "host='hunter2")
        self.assertNotIn("hunter2", str(e))

    def test_passwordFileWithSQLite(self) -> None:
        """
        A password file for a SQLite db is a mistake said in one line.
        """
        from twisted.python import usage

        e = self.assertRaises(usage.UsageError, self.parse, "--db", self.mktemp(),
                              "--db-password-file", "/nonexistent")
        self.assertEqual(str(e), "db-password-file is for a PostgreSQL db, and db is a file")

    def test_unreadablePasswordFile(self) -> None:
        from twisted.python import usage

        e = self.assertRaises(usage.UsageError, self.parse, "--db", "dbname=xcauth",
                              "--db-password-file", "/nonexistent/pw")
        self.assertIn("db-password-file: cannot read /nonexistent/pw", str(e))

    def test_describe(self) -> None:
        self.assertNotIn("pw", pgstore.describe("postgresql://u:pw@h/d"))
        self.assertEqual(pgstore.describe("/x.sqlite3"), "/x.sqlite3")


class DbCommandTests(SynchronousTestCase):
    """
    C{xcauth db upgrade} and C{xcauth db copy} (the real console script).
    """

    def test_copyAndUpgrade(self) -> None:
        """
        An older installation's SQLite file moves into PostgreSQL: domains,
        cache, roster state; a second copy keeps what is there.
        """
        server = postgres.skipUnlessPostgres(self)
        name = server.newDatabase()
        self.addCleanup(server.dropDatabase, name)
        directory = self.mktemp()
        os.makedirs(directory)
        source = os.path.join(directory, "old.sqlite3")
        writeOldDatabase(source)
        pwfile = os.path.join(directory, "pw")
        with open(pwfile, "w") as f:
            f.write(postgres.PASSWORD + "\n")
        db = ["--db", server.url(name), "--db-password-file", pwfile]
        result = xcauth("db", "upgrade", *db)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"schema version {schema.SCHEMA_VERSION}", result.stdout)
        result = xcauth("db", "copy", source, *db)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("domains: 1 rows copied, 0 already there", result.stdout)
        self.assertIn("authcache: 1 rows copied", result.stdout)
        result = xcauth("db", "copy", source, *db)
        self.assertIn("domains: 0 rows copied, 1 already there", result.stdout)
        conn = pgstore.connect(server.url(name), postgres.PASSWORD, 10)
        self.addCleanup(conn.close)
        self.assertEqual(
            store.getDomain(conn, "other.org"),
            store.DomainRow("other.org", "other-secret", store.getDomain(conn, "other.org").authurl,  # type: ignore[union-attr]
                            "cloud.other.org"),
        )
        entry = store.getCacheEntry(conn, "alice@example.org")
        assert entry is not None
        self.assertTrue(abs(entry.remoteAuth - (time.time() - 7200)) < 120)
        self.assertEqual(
            rosterstore.getRosterInfo(conn, "alice@example.org"),
            rosterstore.RosterInfo("alice@example.org", "Alice", ("G1",), None),
        )
        result = xcauth("domains", "list", *db)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("other.org", result.stdout)
        self.assertNotIn(postgres.PASSWORD, result.stdout + result.stderr)

    def test_oneShotOnNewDatabase(self) -> None:
        """
        C{xcauth -A} with a new, empty database: the schema is created before
        the domains table is read (the pool runs calls in parallel).
        """
        from xcauth.core.tokens import makeToken

        server = postgres.skipUnlessPostgres(self)
        name = server.newDatabase()
        self.addCleanup(server.dropDatabase, name)
        directory = self.mktemp()
        os.makedirs(directory)
        pwfile = os.path.join(directory, "pw")
        with open(pwfile, "w") as f:
            f.write(postgres.PASSWORD)
        token = makeToken(b"s3cret", "alice", "example.org", int(time.time()) + 3600)
        result = xcauth("--url", URL, "--secret", "s3cret", "--db", server.url(name),
                        "--db-password-file", pwfile, "--cache-storage", "db",
                        "--debug", "-A", "alice", "example.org", token)
        self.assertEqual((result.returncode, result.stdout), (0, "True\n"), result.stderr)
        self.assertNotIn("cannot read the domains table", result.stderr)
        self.assertIn("domain settings loaded: 0 domain(s)", result.stderr)

    def test_newerSchemaRefused(self) -> None:
        """
        A database upgraded by a newer xcauth: one line, status 1.
        """
        conn = pgConnect(self)
        with store.transaction(conn):
            schema._setVersion(conn, schema.SCHEMA_VERSION + 5)
        directory = self.mktemp()
        os.makedirs(directory)
        pwfile = os.path.join(directory, "pw")
        with open(pwfile, "w") as f:
            f.write(postgres.PASSWORD)
        server = postgres.server()
        result = xcauth("domains", "list", "--db", server.url(conn.raw.info.dbname),
                        "--db-password-file", pwfile)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"xcauth: the state database has schema version {schema.SCHEMA_VERSION + 5}, "
            f"newer than the {schema.SCHEMA_VERSION} this xcauth knows: upgrade xcauth "
            "on this node\n",
        )

    def test_wrongPassword(self) -> None:
        server = postgres.skipUnlessPostgres(self)
        directory = self.mktemp()
        os.makedirs(directory)
        pwfile = os.path.join(directory, "pw")
        with open(pwfile, "w") as f:
            f.write("not-the-password")
        result = xcauth("domains", "list", "--db", server.url("postgres"),
                        "--db-password-file", pwfile)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("password authentication failed", result.stderr)
        self.assertNotIn("not-the-password", result.stderr)





class SynchronousPgStore(store.Store):
    """
    The row functions on one PostgreSQL connection, called at once (as
    L{store.Store} with a synchronous worker is for SQLite): the state tests
    of the roster sync and of the cache run unchanged on PostgreSQL.
    """

    engine = "postgresql"

    def __init__(self, conn: pgstore.PgConnection) -> None:
        self.path = "postgresql"
        self.conn = conn

    def run(self, f: Any, *args: Any) -> Any:
        from twisted.internet.defer import fail, succeed

        try:
            return succeed(f(self.conn, *args))
        except Exception:
            return fail()

    def close(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


class PostgresRosterSyncTests(test_roster.SyncTests):
    """
    L{tests.unit.test_roster.SyncTests} with the state on PostgreSQL.
    """

    def setUp(self) -> None:
        super().setUp()
        self.pg = pgConnect(self)
        self.store = SynchronousPgStore(self.pg)
        self.sync = self.makeSync()

    def db(self) -> Any:
        return self.pg

    def test_oldDatabase(self) -> None:
        raise SkipTest("an older installation's SQLite file: moved with 'xcauth db copy' "
                       "(DbCommandTests)")


class PostgresRosterSchedulingTests(test_roster.SchedulingTests):
    """
    L{tests.unit.test_roster.SchedulingTests} (with the sync claims) on PostgreSQL.
    """

    def setUp(self) -> None:
        super().setUp()
        self.pg = pgConnect(self)
        self.store = SynchronousPgStore(self.pg)
        self.sync = self.makeSync()

    def db(self) -> Any:
        return self.pg


class PostgresCacheTimelineTests(test_cache.DatabaseTimelineTests):
    """
    L{tests.unit.test_cache.DatabaseTimelineTests} with the cache on PostgreSQL.
    """

    def makeStorage(self) -> Any:
        if not hasattr(self, "pg"):
            self.pg = pgConnect(self)
        self.db = SynchronousPgStore(self.pg)
        return DatabaseStorage(self.db)

    def test_storedInOldFormat(self) -> None:
        """
        Timestamps are stored as CURRENT_TIMESTAMP text, the hash as text.
        """
        env = test_cache.Env(self.makeStorage())
        self.assertTrue(self.login(env))
        row = self.pg.execute(
            "SELECT pwhash, firstauth, remoteauth, pg_typeof(firstauth)::text "
            "FROM authcache WHERE jid = ?", (f"alice@{test_cache.DOMAIN}",),
        ).fetchone()
        self.assertTrue(row[0].startswith("$2"))
        self.assertEqual(row[1], store.formatTimestamp(test_cache.START))
        self.assertEqual(row[1], row[2])
        self.assertEqual(row[3], "text")
