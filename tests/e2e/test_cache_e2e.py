"""
End-to-end tests of the state database with the real C{twistd xcauth} daemon:
logins through a Nextcloud outage from the persistent cache, a SIGKILL in the
middle of a burst of cache writes, and token and isuser answers that do not
wait for busy bcrypt threads.
"""

from __future__ import annotations

import os
import select
import socket
import sqlite3
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests.harness import (
    SECRET,
    XCAUTH,
    Daemon,
    FakeNextcloud,
    childEnv,
    connect,
    recvLine,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken

ALICE = "pa:ss w"


def slowAlice(i: int) -> str:
    """
    A distinct user of the fake Nextcloud with alice's password (and an
    answer delay of C{i} ms).
    """
    return f"slow{i}-alice"


class StateDaemonTests(TestCase):
    """
    A fake Nextcloud and the daemon with C{cache-storage=db}.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "state", "xcauth.sqlite3")
        os.makedirs(os.path.dirname(self.db))
        self.nextcloud = FakeNextcloud(os.path.join(self.dir, "nextcloud"))
        self.nextcloud.start()
        self.addCleanup(self.nextcloud.stop)
        self.port = 0
        self.daemons = 0

    def startDaemon(self, rounds: str = "4,4") -> Daemon:
        self.daemons += 1
        config = writeConfig(
            os.path.join(self.dir, "xcauth.conf"),
            self.nextcloud.url,
            db=self.db,
            cache_storage="db",
            cache_bcrypt_rounds=rounds,
            max_in_flight="512",
            # Generous: bcrypt at cost 13 on a loaded machine must not turn
            # answers into deadline falses.
            deadline="60",
        )
        daemon = Daemon(
            os.path.join(self.dir, f"daemon{self.daemons}"),
            ["-c", config, "--listen", "prosody=tcp:0:interface=127.0.0.1"],
        )
        self.addCleanup(daemon.stop)
        daemon.start()
        # Port 0: each daemon gets its own port from the kernel.
        self.port = daemon.port
        return daemon

    def ask(self, s: socket.socket, line: str) -> bytes:
        s.sendall(line.encode("utf-8") + b"\n")
        return recvLine(s)

    def cachedJIDs(self) -> set[str]:
        if not os.path.exists(self.db):
            return set()
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return {row[0] for row in conn.execute("SELECT jid FROM authcache")}
        except sqlite3.OperationalError:
            return set()
        finally:
            conn.close()

    def test_outageServedFromDatabase(self) -> None:
        """
        After one backend success, logins and isuser work from the database
        while Nextcloud is down, and across a daemon restart.
        """
        daemon = self.startDaemon()
        with connect(("127.0.0.1", self.port)) as s:
            self.assertEqual(self.ask(s, f"auth:alice:example.org:{ALICE}"), b"1")
            waitFor(lambda: "alice@example.org" in self.cachedJIDs(), "cache entry")
        daemon.stop()
        self.nextcloud.stop()
        self.startDaemon()
        with connect(("127.0.0.1", self.port)) as s:
            self.assertEqual(self.ask(s, f"auth:alice:example.org:{ALICE}"), b"1")
            self.assertEqual(self.ask(s, "auth:alice:example.org:wrong"), b"0")
            self.assertEqual(self.ask(s, "isuser:alice:example.org"), b"1")
            self.assertEqual(self.ask(s, "isuser:bob:example.org"), b"0")
            self.assertEqual(self.ask(s, "auth:bob:example.org:bob's secret"), b"0")

    def test_sigkillDuringWrites(self) -> None:
        """
        SIGKILL while cache writes pour in leaves a sound database that the
        next daemon and the admin command use.
        """
        daemon = self.startDaemon()
        users = [slowAlice(i) for i in range(150)]
        sockets = [connect(("127.0.0.1", self.port)) for _ in range(3)]
        try:
            for n, s in enumerate(sockets):
                batch = "".join(
                    f"auth:{u}:example.org:{ALICE}\n" for u in users[n::3]
                )
                s.sendall(batch.encode("utf-8"))
            waitFor(lambda: len(self.cachedJIDs()) >= 5, "first cache writes")
            daemon.kill()
        finally:
            for s in sockets:
                s.close()
        written = self.cachedJIDs()
        self.assertLess(len(written), len(users), "the kill came too late to test")
        conn = sqlite3.connect(self.db)
        try:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        finally:
            conn.close()
        self.startDaemon()
        with connect(("127.0.0.1", self.port)) as s:
            self.assertEqual(self.ask(s, f"auth:alice:example.org:{ALICE}"), b"1")
            waitFor(lambda: "alice@example.org" in self.cachedJIDs(), "new entry")
        self.nextcloud.stop()
        with connect(("127.0.0.1", self.port)) as s:
            for jid in sorted(written)[:3]:
                user = jid.split("@")[0]
                self.assertEqual(self.ask(s, f"auth:{user}:example.org:{ALICE}"), b"1")
        listing = subprocess.run(
            [XCAUTH, "--db", self.db, "cache", "list"],
            capture_output=True, text=True, env=childEnv(), timeout=60,
        )
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("alice@example.org", listing.stdout)

    def test_busyHashersDoNotDelayOthers(self) -> None:
        """
        A burst of cache checks at a high bcrypt cost holds the bcrypt threads;
        a token login and an isuser on another connection are answered while
        the burst's answers are still outstanding.
        """
        first = self.startDaemon(rounds="13,4")
        users = [slowAlice(i) for i in range(8)]
        with connect(("127.0.0.1", self.port), timeout=60) as s:
            for u in users:
                self.assertEqual(self.ask(s, f"auth:{u}:example.org:{ALICE}"), b"1")
        waitFor(lambda: len(self.cachedJIDs()) == len(users), "cache entries", 60)
        # Restarted, the daemon has confirmed none of the stored passwords
        # yet: every check of the burst needs bcrypt.
        first.stop()
        self.startDaemon(rounds="13,4")
        burst = connect(("127.0.0.1", self.port), timeout=60)
        other = connect(("127.0.0.1", self.port), timeout=60)
        try:
            burst.sendall(
                "".join(f"auth:{u}:example.org:{ALICE}\n" for u in users).encode()
            )
            # Give the daemon time to read the burst and start its checks (this
            # pause only makes the test able to fail: were bcrypt run on the
            # reactor thread, the daemon would now be stuck in the burst).
            time.sleep(0.3)
            token = makeToken(
                SECRET.encode(), "alice", "example.org", int(time.time()) + 3600
            )
            self.assertEqual(self.ask(other, f"auth:alice:example.org:{token}"), b"1")
            self.assertEqual(self.ask(other, "isuser:bob:example.org"), b"1")
            # Only now look at the burst: its answers are not all there yet.
            ready, _, _ = select.select([burst], [], [], 0)
            pending = b""
            if ready:
                pending = burst.recv(4096)
            self.assertLess(pending.count(b"\n"), len(users))
            answers = [recvLine(burst) for _ in range(len(users) - pending.count(b"\n"))]
            self.assertEqual(set(answers) | set(pending.split(b"\n")[:-1]), {b"1"})
        finally:
            burst.close()
            other.close()
