"""
The C{xcauth domains} and C{xcauth token} commands of the stock Nextcloud
backend, run as the C{xcauth} program.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.test_admin_cli import xcauth
from tests.unit.test_stock_config import BASE
from xcauth.state import database as store


class DomainsCommandTests(SynchronousTestCase):
    def test_addSetListShow(self) -> None:
        db = os.path.abspath(self.mktemp())
        r = xcauth("domains", "add", "b.example", "--backend", "nextcloud", "--url", BASE,
                   "--service-user", "svc", "--service-password", "app-secret-pw",
                   "--login-format", "{user}@{domain}", "--db", db)
        self.assertEqual(r.returncode, 0, r.stderr)
        row = store.getDomain(store.connect(db), "b.example")
        assert row is not None
        self.assertEqual((row.backend, row.serviceuser, row.servicepassword, row.loginformat,
                          row.authsecret),
                         ("nextcloud", "svc", "app-secret-pw", "{user}@{domain}", None))
        listing = xcauth("domains", "list", "--db", db)
        shown = xcauth("domains", "show", "b.example", "--db", db)
        for out in (listing, shown):
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertNotIn("app-secret-pw", out.stdout)
            self.assertIn("nextcloud", out.stdout)
        self.assertIn("app-secret-pw",
                      xcauth("domains", "show", "b.example", "--show-secret", "--db", db).stdout)
        r = xcauth("domains", "set", "b.example", "--service-password", "new-pw", "--db", db)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("new-pw", r.stdout)
        self.assertEqual(store.getDomain(store.connect(db), "b.example").servicepassword,  # type: ignore[union-attr]
                         "new-pw")

    def test_addNeeds(self) -> None:
        r = xcauth("domains", "add", "b.example", "--backend", "nextcloud", "--url", BASE,
                   "--db", os.path.abspath(self.mktemp()))
        self.assertEqual(r.returncode, 2)
        self.assertIn("--service-user, --service-password", r.stderr)
        r = xcauth("domains", "add", "b.example", "--backend", "ldap", "--url", BASE,
                   "--secret", "s", "--db", os.path.abspath(self.mktemp()))
        self.assertEqual(r.returncode, 2)

    def test_oldDatabaseGainsColumns(self) -> None:
        db = os.path.abspath(self.mktemp())
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE domains (xmppdomain TEXT PRIMARY KEY, authsecret TEXT, "
                     "authurl TEXT, authdomain TEXT, regcontact TEXT, mine TEXT)")
        conn.execute("INSERT INTO domains VALUES ('a.example', 's', 'https://x/jsxc', "
                     "NULL, NULL, 'kept')")
        conn.commit()
        conn.close()
        r = xcauth("domains", "set", "a.example", "--backend", "jsxc", "--db", db)
        self.assertEqual(r.returncode, 0, r.stderr)
        conn = sqlite3.connect(db)
        self.assertEqual(conn.execute("SELECT mine, backend FROM domains").fetchall(),
                         [("kept", "jsxc")])


class TokenCommandTests(SynchronousTestCase):
    def test_noSecret(self) -> None:
        r = xcauth("token", "bob", "d.example", "--db", os.path.abspath(self.mktemp()),
                   "-c", "/dev/null")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no secret", r.stderr)
