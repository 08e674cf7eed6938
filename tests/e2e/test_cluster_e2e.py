"""
Several nodes, one state: two real C{twistd xcauth} daemons sharing the tests'
own PostgreSQL (L{tests.postgres}) and one fake Nextcloud.

 - alice logs in through node A; Nextcloud goes down; she logs in through
   node B from the shared cache (and a wrong password is still refused);
 - C{xcauth domains add} against the database applies on node B without a
   signal or a restart;
 - with PostgreSQL stopped both nodes keep answering tokens, backend logins
   and cached logins, refuse wrong passwords, keep their domain rows, and
   write to the database again once it is back;
 - alice logging in on both nodes at once gets one roster sync.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

from tests import postgres
from tests.harness import (
    SECRET,
    TWISTD,
    XCAUTH,
    Daemon,
    FakeNextcloud,
    childEnv,
    connect,
    freePort,
    recvLine,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken
from xcauth.state.schema import SCHEMA_VERSION

ALICE = "pa:ss w"
BOB = "bob's secret"
OTHER_SECRET = "other-domain-secret-0123"


class ClusterTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.pg = postgres.skipUnlessPostgres(self)
        self.dbname = self.pg.newDatabase()
        self.addCleanup(self.pg.dropDatabase, self.dbname)
        self.addCleanup(self._restartServer)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pwfile = os.path.join(self.dir, "db-password")
        with open(self.pwfile, "w") as f:
            f.write(postgres.PASSWORD + "\n")
        os.chmod(self.pwfile, 0o600)
        # A fixed port: it is started again on it.
        self.nextcloud = FakeNextcloud(os.path.join(self.dir, "nextcloud"), port=freePort())
        self.nextcloud.start()
        self.addCleanup(self.nextcloud.stop)
        self.ports: dict[str, int] = {}
        self.daemons: dict[str, Daemon] = {}

    def _restartServer(self) -> None:
        if not self.pg.running:
            self.pg.start()

    def startNode(self, name: str, **options: Any) -> Daemon:
        return self.startDaemon(name, self.nextcloud.url, cache_storage="db",
                                cache_bcrypt_rounds="4,4", **options)

    def startDaemon(self, name: str, url: str, **options: Any) -> Daemon:
        """
        Start node C{name} on the shared database in front of C{url}, serving
        the prosody framing on a port of its own.
        """
        port = self.ports[name] = freePort()
        config = writeConfig(
            os.path.join(self.dir, f"{name}.conf"),
            url,
            db=self.pg.url(self.dbname),
            db_password_file=self.pwfile,
            **options,
        )
        daemon = Daemon(
            os.path.join(self.dir, name),
            ["-c", config, "--listen", f"prosody=tcp:{port}:interface=127.0.0.1"],
            waitOn=[("127.0.0.1", port)],
        )
        self.addCleanup(daemon.stop)
        daemon.start()
        self.daemons[name] = daemon
        return daemon

    def ask(self, node: str, line: str) -> bytes:
        with connect(("127.0.0.1", self.ports[node]), timeout=30) as s:
            s.sendall(line.encode("utf-8") + b"\n")
            return recvLine(s)

    def cached(self) -> set[str]:
        return {row[0] for row in self.pg.admin("SELECT jid FROM authcache", self.dbname)}

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [XCAUTH, *args, "--db", self.pg.url(self.dbname),
             "--db-password-file", self.pwfile],
            capture_output=True, text=True, env=childEnv(), timeout=60,
        )

    def token(self, user: str, domain: str, secret: str = SECRET) -> str:
        return makeToken(secret.encode(), user, domain, int(time.time()) + 3600)

    def test_cacheSharedThroughOutage(self) -> None:
        """
        A password verified through node A is accepted by node B while
        Nextcloud is down; a wrong one is not.
        """
        self.startNode("a")
        self.startNode("b")
        self.assertEqual(self.ask("a", f"auth:alice:example.org:{ALICE}"), b"1")
        waitFor(lambda: "alice@example.org" in self.cached(), "alice's shared cache entry")
        self.nextcloud.stop()
        self.assertEqual(self.ask("b", f"auth:alice:example.org:{ALICE}"), b"1")
        self.assertEqual(self.ask("b", "auth:alice:example.org:wrong"), b"0")
        self.assertEqual(self.ask("b", f"auth:bob:example.org:{BOB}"), b"0")
        self.assertNotIn(postgres.PASSWORD, self.daemons["a"].output())

    def test_domainAddedOnOtherNode(self) -> None:
        """
        A domain added with the admin command (as on node A) applies on node B
        within seconds, without a signal or a restart.
        """
        self.startNode("a")
        self.startNode("b")
        token = self.token("alice", "other.org", OTHER_SECRET)
        self.assertEqual(self.ask("b", f"auth:alice:other.org:{token}"), b"0")
        result = self.admin("domains", "add", "other.org", "--url", self.nextcloud.url,
                            "--secret", OTHER_SECRET)
        self.assertEqual(result.returncode, 0, result.stderr)
        waitFor(lambda: self.ask("b", f"auth:alice:other.org:{token}") == b"1",
                "node B applying the new domain", 20)
        self.assertEqual(self.ask("a", f"auth:alice:other.org:{token}"), b"1")

    def test_postgresDown(self) -> None:
        """
        With PostgreSQL stopped both nodes answer tokens, backend logins and
        cached logins, refuse wrong passwords and keep their domain rows; once
        it is back, they write to it again and no domain row is lost.
        """
        result = self.admin("domains", "add", "other.org", "--url", self.nextcloud.url,
                            "--secret", OTHER_SECRET)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.startNode("a")
        self.startNode("b")
        self.assertEqual(self.ask("a", f"auth:alice:example.org:{ALICE}"), b"1")
        waitFor(lambda: "alice@example.org" in self.cached(), "alice's shared cache entry")
        self.assertEqual(self.ask("b", f"auth:alice:example.org:{ALICE}"), b"1")
        self.pg.stop()
        for node in ("a", "b"):
            started = time.monotonic()
            self.assertEqual(
                self.ask(node, f"auth:bob:example.org:{self.token('bob', 'example.org')}"),
                b"1",
            )
            self.assertEqual(
                self.ask(node, f"auth:alice:other.org:"
                               f"{self.token('alice', 'other.org', OTHER_SECRET)}"),
                b"1",
            )
            self.assertEqual(self.ask(node, f"auth:bob:example.org:{BOB}"), b"1")
            self.assertEqual(self.ask(node, f"auth:alice:example.org:{ALICE}"), b"1")
            self.assertEqual(self.ask(node, "auth:alice:example.org:wrong"), b"0")
            self.assertEqual(self.ask(node, "isuser:bob:example.org"), b"1")
            # Within the requests' deadline (4 s) each, with a wide margin.
            self.assertLess(time.monotonic() - started, 6 * 4)
        # Nextcloud down too: the cached password still works, wrong ones not.
        self.nextcloud.stop()
        self.assertEqual(self.ask("b", f"auth:alice:example.org:{ALICE}"), b"1")
        self.assertEqual(self.ask("b", "auth:alice:example.org:wrong"), b"0")
        self.assertIn("the state database is unavailable", self.daemons["a"].output())
        self.nextcloud.start()
        self.pg.start()
        for name in ("a", "b"):
            waitFor(lambda name=name: "the state database" in self.daemons[name].output()
                    and "is available again" in self.daemons[name].output(),
                    f"node {name} reconnecting", 30)
        waitFor(lambda: self.ask("a", "auth:jörg:example.org:pässwörd") == b"1"
                and "jörg@example.org" in self.cached(), "a new shared cache entry", 30)
        listing = self.admin("domains", "list")
        self.assertIn("other.org", listing.stdout)
        self.assertEqual(self.ask("b", "auth:alice:example.org:wrong"), b"0")

    def test_oneRosterSyncAcrossNodes(self) -> None:
        """
        alice logs in on both nodes at once: one node syncs her roster, the
        other leaves it to that one (its sync holds the claim while its
        ejabberd command hangs).
        """
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        for node in ("a", "b"):
            self.startNode(node, roster_api_url=api, roster_command_timeout="30")
        sockets = {n: connect(("127.0.0.1", self.ports[n]), timeout=30) for n in ("a", "b")}
        try:
            for s in sockets.values():
                s.sendall(f"auth:alice:example.org:{ALICE}\n".encode())
            for s in sockets.values():
                self.assertEqual(recvLine(s), b"1")
        finally:
            for s in sockets.values():
                s.close()
        skipped = "roster sync of alice@example.org: another node is syncing it"
        waitFor(lambda: any(skipped in d.output() for d in self.daemons.values()),
                "one node leaving the sync to the other", 30)
        self.assertEqual(
            sorted(skipped in d.output() for d in self.daemons.values()), [False, True]
        )
        rows = self.pg.admin("SELECT jid FROM rosterclaims", self.dbname)
        self.assertEqual(rows, [("alice@example.org",)])

    def test_newerSchemaStopsTheDaemon(self) -> None:
        """
        A node older than the database's schema stops at start with one line.
        """
        self.admin("db", "upgrade")
        self.pg.admin("UPDATE xcauth_schema SET version = 99", self.dbname)
        config = writeConfig(
            os.path.join(self.dir, "old.conf"), self.nextcloud.url,
            db=self.pg.url(self.dbname), db_password_file=self.pwfile, cache_storage="db",
        )
        port = freePort()
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", f"--logfile={os.path.join(self.dir, 'old.log')}",
             "xcauth", "-c", config, "--listen", f"prosody=tcp:{port}:interface=127.0.0.1"],
            capture_output=True, text=True, env=childEnv(), timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            "xcauth: the state database has schema version 99, newer than the "
            f"{SCHEMA_VERSION} this xcauth knows: upgrade xcauth on this node\n",
        )


class SharedBudgetTests(TestCase):
    """
    Two nodes on one PostgreSQL in front of the fake stock Nextcloud (which
    counts what reaches it): the brute-force budgets are the cluster's.
    """

    timeout = 180
    _restartServer = ClusterTests._restartServer
    ask = ClusterTests.ask

    def setUp(self) -> None:
        ClusterTests.setUp(self)  # type: ignore[arg-type]
        self.stock = FakeNextcloud(os.path.join(self.dir, "stock"), stock=True)
        self.stock.start()
        self.addCleanup(self.stock.stop)

    startDaemon = ClusterTests.startDaemon

    def startStockNode(self, name: str) -> Daemon:
        return self.startDaemon(name, self.stock.url, log_requests="none",
                                **self.stock.stockOptions())

    def refusedOf(self, user: str) -> int:
        url = f"http://127.0.0.1:{self.stock.port}/fake/counts"
        with urllib.request.urlopen(url, timeout=10) as answer:
            counts: dict[str, Any] = json.load(answer)
        return int(counts["refusedOf"].get(user, 0))

    def budgetEvents(self) -> int:
        return len(self.pg.admin("SELECT at FROM budgetevents", self.dbname))

    def test_guessesSplitOverNodes(self) -> None:
        """
        20 distinct wrong passwords for bob, split over both nodes, reach
        Nextcloud no more often than 20 through one node would (the user's
        budget, 5): node A spends it, node B learns it within a second and
        refuses the rest without asking; bob's known password still gets in
        through either node.
        """
        self.startStockNode("a")
        self.startStockNode("b")
        self.assertEqual(self.ask("a", f"auth:bob:example.org:{BOB}"), b"1")
        self.assertEqual(self.ask("b", f"auth:bob:example.org:{BOB}"), b"1")
        for i in range(10):
            self.assertEqual(self.ask("a", f"auth:bob:example.org:guess-a-{i}"), b"0")
        self.assertEqual(self.refusedOf("bob"), 5)
        # Node A writes what it counted (every second): then node B knows.
        waitFor(lambda: self.budgetEvents() >= 5, "node A's checks in the database")
        time.sleep(3 * 1.0)  # node B's next reads (every second), with a wide margin
        for i in range(10):
            self.assertEqual(self.ask("b", f"auth:bob:example.org:guess-b-{i}"), b"0")
        self.assertEqual(self.refusedOf("bob"), 5)
        self.assertEqual(self.ask("b", f"auth:bob:example.org:{BOB}"), b"1")
        self.assertEqual(self.ask("a", f"auth:bob:example.org:{BOB}"), b"1")
