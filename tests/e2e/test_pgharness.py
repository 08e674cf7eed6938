"""
The tests' own PostgreSQL server (L{tests.postgres}).
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests import postgres


class HarnessTests(TestCase):
    def test_roleConnectsOverTCPWithItsPassword(self) -> None:
        """
        The C{xcauth} role reaches a database of its own on 127.0.0.1 with its
        password, and not without it.
        """
        import psycopg

        server = postgres.skipUnlessPostgres(self)
        name = server.newDatabase()
        self.addCleanup(server.dropDatabase, name)
        with psycopg.connect(server.url(name), password=postgres.PASSWORD) as c:
            self.assertEqual(c.execute("SELECT current_user").fetchone(), ("xcauth",))
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(server.url(name), password="wrong", connect_timeout=5)

    def test_notRunningAsRoot(self) -> None:
        """
        The server does not run as root (PostgreSQL refuses to).  The
        postmaster's pid is read from its pid file: it lives as long as the
        server, unlike a backend, which exits with its connection.
        """
        import os

        server = postgres.skipUnlessPostgres(self)
        with open(os.path.join(server.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        with open(f"/proc/{pid}/status") as f:
            uids = [line for line in f if line.startswith("Uid:")][0].split()[1:]
        self.assertNotIn("0", uids)
