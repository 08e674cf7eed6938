"""
The tests' own PostgreSQL server (L{xcauth.testing.postgres}).
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from xcauth.testing import postgres


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
        The server does not run as root (PostgreSQL refuses to).
        """
        server = postgres.skipUnlessPostgres(self)
        rows = server.admin("SELECT pg_backend_pid()")
        pid = rows[0][0]
        with open(f"/proc/{pid}/status") as f:
            uids = [line for line in f if line.startswith("Uid:")][0].split()[1:]
        self.assertNotIn("0", uids)
