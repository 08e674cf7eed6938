"""
Tests for the state database (L{xcauth.state.database}) and the domain table
(L{xcauth.state.domains}): a file written by an older installation with the schema of
PROTOCOLS.md is opened unchanged and used; user-added columns survive; WAL and
the schema version; domains
from the database with their own secrets, picked up without a restart.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import bcrypt
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import jsxc
from xcauth.core.authenticator import Authenticator
from xcauth.core.cache import CachePolicy, CredentialCache
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.tokens import makeToken
from xcauth.interfaces import BackendSpec, DomainSettings
from xcauth.state import database as store
from xcauth.state.cache import DatabaseStorage
from xcauth.state.domains import DomainTable
from xcauth.testing.fakenextcloud import DEMO_USERS, FakeJSXC, makeSite
from xcauth.testing.workers import SynchronousWorker

#: The CREATE statements of PROTOCOLS.md, as older installations ran them.
OLD_SCHEMA = """
CREATE TABLE domains (xmppdomain TEXT PRIMARY KEY, authsecret TEXT, authurl TEXT,
  authdomain TEXT, regcontact TEXT, regfirst TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  reglatest TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE authcache (jid TEXT PRIMARY KEY, pwhash TEXT,
  firstauth TIMESTAMP DEFAULT CURRENT_TIMESTAMP, remoteauth TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  anyauth TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE rosterinfo (jid TEXT PRIMARY KEY, fullname TEXT, grouplist TEXT,
  responsehash TEXT, last_update TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE rostergroups (groupname TEXT PRIMARY KEY, userlist TEXT);
"""

GLOBAL_SECRET = b"global-secret"
GLOBAL_URL = "http://global.example/index.php/apps/ojsxc/ajax/externalApi.php"
OTHER_SECRET = "other-secret"
OTHER_URL = "http://other.example/index.php/apps/ojsxc/ajax/externalApi.php"


def writeOldDatabase(path: str) -> None:
    """
    A database as an older installation left it: old schema, a column the
    admin added, a domain, a cache entry and roster rows.
    """
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.execute("ALTER TABLE domains ADD COLUMN admin_note TEXT")
    conn.execute(
        "INSERT INTO domains (xmppdomain, authsecret, authurl, authdomain, "
        "regcontact, admin_note) VALUES (?, ?, ?, ?, ?, ?)",
        ("other.org", OTHER_SECRET, OTHER_URL, "cloud.other.org", "admin@other.org",
         "keep me"),
    )
    pwhash = bcrypt.hashpw(DEMO_USERS["alice"].encode(), bcrypt.gensalt(4)).decode()
    # Timestamps as CURRENT_TIMESTAMP wrote them: two hours ago.
    conn.execute(
        "INSERT INTO authcache (jid, pwhash, firstauth, remoteauth, anyauth) VALUES "
        "(?, ?, datetime('now', '-30 days'), datetime('now', '-2 hours'), "
        "datetime('now', '-2 hours'))",
        ("alice@example.org", pwhash),
    )
    conn.execute(
        "INSERT INTO rosterinfo (jid, fullname, grouplist) VALUES (?, ?, ?)",
        ("alice@example.org", "Alice", "G1"),
    )
    conn.execute("INSERT INTO rostergroups VALUES (?, ?)", ("G1", "alice@example.org"))
    conn.commit()
    conn.close()


def tableInfo(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in store.TABLES
    }


class SchemaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "xcauth.sqlite3")

    def test_oldDatabaseOpenedUnchanged(self) -> None:
        """
        Tables, rows and the user's own column stay as they were; WAL is on and
        the schema version recorded.
        """
        writeOldDatabase(self.path)
        before = sqlite3.connect(self.path)
        info = tableInfo(before)
        rows = {t: before.execute(f"SELECT * FROM {t}").fetchall() for t in store.TABLES}
        before.close()
        conn = store.connect(self.path)
        try:
            # The old columns are as they were; the backend columns of the
            # domains table are added after them, empty.
            after = tableInfo(conn)
            added = {t: after[t][len(info[t]):] for t in info}
            self.assertEqual({t: after[t][: len(info[t])] for t in info}, info)
            self.assertEqual(
                [c[1] for c in added["domains"]],
                ["backend", "serviceuser", "servicepassword", "loginformat"],
            )
            self.assertEqual({t: c for t, c in added.items() if c and t != "domains"}, {})
            self.assertEqual(
                {
                    t: [r[: len(info[t])] for r in conn.execute(f"SELECT * FROM {t}")]
                    for t in store.TABLES
                },
                rows,
            )
            self.assertEqual(store.schemaVersion(conn), store.SCHEMA_VERSION)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            # Writing through xcauth keeps the user's column.
            store.updateDomain(conn, "other.org", authurl=OTHER_URL + "?x")
            self.assertEqual(
                conn.execute(
                    "SELECT admin_note FROM domains WHERE xmppdomain = 'other.org'"
                ).fetchone()[0],
                "keep me",
            )
            entry = store.getCacheEntry(conn, "alice@example.org")
            assert entry is not None
            self.assertTrue(abs(entry.remoteAuth - (time.time() - 7200)) < 60)
        finally:
            conn.close()

    def test_reopenIsNoOp(self) -> None:
        """
        Opening a current database again changes nothing.
        """
        store.connect(self.path).close()
        conn = sqlite3.connect(self.path)
        conn.execute("ALTER TABLE authcache ADD COLUMN mine INTEGER")
        conn.commit()
        info = tableInfo(conn)
        conn.close()
        conn = store.connect(self.path)
        self.assertEqual(tableInfo(conn), info)
        conn.close()

    def test_missingTablesAndColumnsAdded(self) -> None:
        """
        A partial older database gets the missing tables and columns.
        """
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE domains (xmppdomain TEXT PRIMARY KEY, authsecret TEXT)")
        conn.execute("INSERT INTO domains VALUES ('a.org', 's')")
        conn.commit()
        conn.close()
        conn = store.connect(self.path)
        try:
            self.assertEqual(
                store.listDomains(conn), [store.DomainRow("a.org", "s", None, None)]
            )
            self.assertIsNone(store.getCacheEntry(conn, "x@a.org"))
            names = {r[1] for r in conn.execute("PRAGMA table_info(domains)")}
            self.assertTrue({"authurl", "authdomain", "regfirst"} <= names)
        finally:
            conn.close()

    def test_noCreate(self) -> None:
        """
        Without C{create}, a missing file is reported and not created.
        """
        self.assertRaises(store.NoDatabase, store.connect, self.path, False)
        self.assertFalse(os.path.exists(self.path))

    def test_notADatabase(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        self.assertRaises(store.DatabaseError, store.connect, self.path)

    def test_timestamps(self) -> None:
        self.assertEqual(store.formatTimestamp(0), "1970-01-01 00:00:00")
        for text in ("2024-05-06 07:08:09", "2024-05-06T07:08:09", "2024-05-06 07:08:09.5"):
            self.assertTrue(abs(store.parseTimestamp(text) - 1714979289) <= 0.5, text)
        self.assertEqual(store.parseTimestamp(12.5), 12.5)
        self.assertEqual(store.parseTimestamp("garbage"), 0.0)
        self.assertEqual(store.parseTimestamp(None), 0.0)


class OldDatabaseInUseTests(SynchronousTestCase):
    """
    The old file driving a running authenticator: its domain and its cache.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "xcauth.sqlite3")
        writeOldDatabase(self.path)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.db = store.Store(self.path, SynchronousWorker(), create=False)
        self.addCleanup(lambda: self.successResultOf(self.db.close()))
        # Two backends: the global one and other.org's, each with its secret.
        self.globalNC = FakeJSXC(GLOBAL_SECRET, dict(DEMO_USERS), self.clock)
        self.otherNC = FakeJSXC(OTHER_SECRET.encode(), {"olga": "o-pw"}, self.clock)
        self.agents = {
            GLOBAL_URL: RequestTraversalAgent(makeSite(self.globalNC).resource),
            OTHER_URL: RequestTraversalAgent(makeSite(self.otherNC).resource),
        }
        self.down = False

        test = self

        class Router:
            def request(self, method: bytes, uri: bytes, *a: Any, **kw: Any) -> Any:
                if test.down:
                    from twisted.internet.defer import fail

                    return fail(ConnectionRefusedError())
                for url, agent in test.agents.items():
                    if uri.decode().startswith(url):
                        return agent.request(method, uri, *a, **kw)
                raise AssertionError(uri)

        self.router = Router()
        self.made: list[tuple[str, bytes]] = []

        def makeClient(spec: BackendSpec) -> Any:
            self.made.append((spec.url, spec.secret))
            return jsxc(self.router, spec.url, spec.secret, self.clock, 10)

        globalSettings = DomainSettings(
            (GLOBAL_SECRET,), None, makeClient(BackendSpec("jsxc", GLOBAL_URL, GLOBAL_SECRET))
        )
        self.table = DomainTable(self.db, globalSettings, makeClient, self.clock, 5.0)
        self.cache = CredentialCache(
            DatabaseStorage(self.db),
            SynchronousWorker(),
            self.clock,
            CachePolicy(3600, 86400, 7 * 86400),
            4,
            PasswordKeys(),
        )
        self.auth = Authenticator(
            self.table.settingsFor, self.clock, PasswordKeys(), self.cache, self.table.whenReady
        )

    def flush(self) -> None:
        for agent in self.agents.values():
            agent.flush()

    def result(self, d: Any) -> Any:
        self.flush()
        return self.successResultOf(d)

    def test_waitsForFirstLoad(self) -> None:
        """
        Requests before the first read of the table wait for it.
        """
        d = self.auth.authenticate("olga", "other.org", "o-pw")
        self.assertNoResult(d)
        self.table.startService()
        self.assertTrue(self.result(d))
        self.table.stopService()

    def test_domainFromOldDatabase(self) -> None:
        """
        other.org uses its own URL, secret and backend domain name; other
        domains the global ones.
        """
        self.table.startService()
        self.addCleanup(self.table.stopService)
        self.assertTrue(self.result(self.auth.authenticate("olga", "other.org", "o-pw")))
        self.assertEqual(self.otherNC.requests[-1]["domain"], "cloud.other.org")
        self.assertTrue(
            self.result(self.auth.authenticate("alice", "example.org", DEMO_USERS["alice"]))
        )
        self.assertEqual(self.globalNC.requests[-1]["domain"], "example.org")
        self.assertFalse(self.result(self.auth.authenticate("olga", "example.org", "o-pw")))
        # Tokens: other.org's secret, not the global one.
        expiry = int(self.clock.seconds() + 60)
        good = makeToken(OTHER_SECRET.encode(), "olga", "other.org", expiry)
        bad = makeToken(GLOBAL_SECRET, "olga", "other.org", expiry)
        before = len(self.otherNC.requests)
        self.assertTrue(self.result(self.auth.authenticate("olga", "other.org", good)))
        self.assertEqual(len(self.otherNC.requests), before)
        self.assertFalse(self.result(self.auth.authenticate("olga", "other.org", bad)))

    def test_cacheFromOldDatabase(self) -> None:
        """
        The old cache entry (verified two hours ago) carries a login through an
        outage, and its user counts as existing.
        """
        self.table.startService()
        self.addCleanup(self.table.stopService)
        self.down = True
        d = self.auth.authenticate("alice", "example.org", DEMO_USERS["alice"])
        self.assertTrue(self.result(d))
        self.assertFalse(self.result(self.auth.authenticate("alice", "example.org", "x")))
        self.assertIs(self.result(self.auth.isUser("alice", "example.org")), True)
        self.assertIsNone(self.result(self.auth.isUser("bob", "example.org")))
        # Back up, the query TTL over: a backend success refreshes the old row
        # in place.
        self.down = False
        self.clock.advance(3600)
        self.assertTrue(
            self.result(self.auth.authenticate("alice", "example.org", DEMO_USERS["alice"]))
        )
        conn = sqlite3.connect(self.path)
        row = conn.execute(
            "SELECT remoteauth, firstauth FROM authcache WHERE jid = 'alice@example.org'"
        ).fetchone()
        conn.close()
        self.assertEqual(row[0], store.formatTimestamp(self.clock.seconds()))
        self.assertLess(store.parseTimestamp(row[1]), self.clock.seconds() - 20 * 86400)

    def test_changesPickedUpWithoutRestart(self) -> None:
        """
        Domains added, changed and removed in the file (as the admin command
        does) apply at the next refresh; lookups in between cost no database
        call.
        """
        worker = SynchronousWorker()
        self.db._worker = worker
        self.table.startService()
        self.addCleanup(self.table.stopService)
        self.assertEqual(self.table.settingsFor("new.org").secrets, (GLOBAL_SECRET,))
        conn = store.connect(self.path)
        store.addDomain(conn, "new.org", OTHER_URL, "s1,s0", None)
        self.assertEqual(self.table.settingsFor("new.org").secrets, (GLOBAL_SECRET,))
        calls = len(worker.calls)
        for _ in range(100):
            self.table.settingsFor("new.org")
        self.assertEqual(len(worker.calls), calls)
        self.clock.advance(5.0)
        settings = self.table.settingsFor("new.org")
        self.assertEqual(settings.secrets, (b"s1", b"s0"))
        self.assertEqual(settings.client.url, OTHER_URL)
        # Same URL and secret: one client shared, not rebuilt on refresh.
        made = len(self.made)
        self.clock.advance(5.0)
        self.assertIs(self.table.settingsFor("new.org").client, settings.client)
        self.assertEqual(len(self.made), made)
        store.updateDomain(conn, "new.org", authsecret="s2")
        self.clock.advance(5.0)
        self.assertEqual(self.table.settingsFor("new.org").secrets, (b"s2",))
        store.removeDomain(conn, "new.org")
        self.clock.advance(5.0)
        self.assertEqual(self.table.settingsFor("new.org").secrets, (GLOBAL_SECRET,))
        conn.close()

    def test_databaseAppearsLater(self) -> None:
        """
        Without a file, every domain is global; a file created later is read.
        """
        os.rename(self.path, self.path + ".away")
        self.table.startService()
        self.addCleanup(self.table.stopService)
        self.assertIsNone(self.table.whenReady())
        self.assertEqual(self.table.settingsFor("other.org").secrets, (GLOBAL_SECRET,))
        os.rename(self.path + ".away", self.path)
        self.clock.advance(5.0)
        self.assertEqual(
            self.table.settingsFor("other.org").secrets, (OTHER_SECRET.encode(),)
        )
