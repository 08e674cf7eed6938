"""
Tests for the options of the stock Nextcloud backend (L{xcauth.daemon.config}), its
per-domain settings (L{xcauth.state.domains.rowSpec}, C{xcauth domains}), and the
C{xcauth token} command.
"""

from __future__ import annotations

import io
import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from xcauth.cli.main import Options as CLIOptions
from xcauth.cli.token import run as runToken
from xcauth.core.tokens import verifyToken
from xcauth.daemon.config import ConfigOptions
from xcauth.interfaces import BackendSpec
from xcauth.state import database as store
from xcauth.state.domains import rowSpec

BASE = "https://cloud.example.org"


class OptionTests(SynchronousTestCase):
    def parse(self, *args: str) -> ConfigOptions:
        options = ConfigOptions()
        if "nextcloud" in args and "--domain" not in args:
            # login-format={user} needs the served domains listed.
            args = (*args, "--domain", "example.org")
        options.parseOptions(list(args))
        return options

    def refused(self, *args: str) -> str:
        e = self.assertRaises(usage.UsageError, self.parse, *args)
        return str(e)

    def test_defaultIsJSXC(self) -> None:
        config = self.parse("--url", BASE + "/index.php/apps/ojsxc/ajax/externalApi.php",
                            "--secret", "s")
        self.assertEqual(config.config.backend, "jsxc")
        self.assertIn("no API secret", self.refused("--url", BASE))

    def test_nextcloud(self) -> None:
        config = self.parse("--backend", "nextcloud", "--url", BASE + "/nextcloud",
                            "--service-user", "xcauth", "--service-password", "app-pw").config
        self.assertEqual(config.backend, "nextcloud")
        self.assertEqual(config.secrets, ())
        self.assertEqual(config.loginFormat, "{user}")
        self.assertEqual(config.servicePassword, "app-pw")
        self.assertNotIn("app-pw", repr(config))
        self.assertEqual(config.penaltyUserChecks, 5)
        self.assertEqual(config.refusedTTL, 600)
        with_secret = self.parse("--backend", "nextcloud", "--url", BASE, "--secret", "t",
                                 "--service-user", "x", "--service-password", "p").config
        self.assertEqual(with_secret.secrets, (b"t",))

    def test_nextcloudNeeds(self) -> None:
        self.assertIn("service-user", self.refused("--backend", "nextcloud", "--url", BASE))
        self.assertIn("service-password-file", self.refused(
            "--backend", "nextcloud", "--url", BASE, "--service-user", "x"))
        self.assertIn("not both", self.refused(
            "--backend", "nextcloud", "--url", BASE, "--service-user", "x",
            "--service-password", "p", "--service-password-file", "/nonexistent"))
        self.assertIn("base URL", self.refused(
            "--backend", "nextcloud", "--url", BASE + "/index.php/apps/ojsxc/ajax/externalApi.php",
            "--service-user", "x", "--service-password", "p"))
        self.assertIn("login-format", self.refused(
            "--backend", "nextcloud", "--url", BASE, "--service-user", "x",
            "--service-password", "p", "--login-format", "{domain}"))
        self.assertIn("backend", self.refused("--backend", "ldap", "--url", BASE))

    def test_passwordFile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-file\n")
        config = self.parse("--backend", "nextcloud", "--url", BASE, "--service-user", "x",
                            "--service-password-file", path).config
        self.assertEqual(config.servicePassword, "from-file")
        message = self.refused("--backend", "nextcloud", "--url", BASE, "--service-user", "x",
                               "--service-password-file", path + ".missing")
        self.assertIn("cannot read", message)
        self.assertNotIn("from-file", message)

    def test_systemdCredential(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "nextcloud"), "w") as f:
            f.write("credential\n")
        old = os.environ.get("CREDENTIALS_DIRECTORY")
        os.environ["CREDENTIALS_DIRECTORY"] = directory
        try:
            config = self.parse("--backend", "nextcloud", "--url", BASE, "--service-user",
                                "x", "--service-password-file", "nextcloud").config
        finally:
            if old is None:
                del os.environ["CREDENTIALS_DIRECTORY"]
            else:
                os.environ["CREDENTIALS_DIRECTORY"] = old
        self.assertEqual(config.servicePassword, "credential")

    def test_penaltyWithinDeadline(self) -> None:
        self.assertIn("below deadline", self.refused(
            "--url", BASE + "/x", "--secret", "s", "--penalty-max-delay", "4"))
        config = self.parse("--url", BASE + "/x", "--secret", "s", "--penalty-user-refill",
                            "1h", "--penalty-user-checks", "3",
                            "--penalty-allow-listed-failures", "0").config
        self.assertEqual((config.penaltyUserRefill, config.penaltyUserChecks,
                          config.penaltyAllowListedFailures), (3600, 3, 0))
        self.assertIn("penalty-backend-failures", self.refused(
            "--url", BASE + "/x", "--secret", "s", "--penalty-backend-failures", "0"))


class RowSpecTests(SynchronousTestCase):
    JSXC = BackendSpec("jsxc", BASE + "/jsxc", b"global")
    NC = BackendSpec("nextcloud", BASE, b"", "svc", "pw", "{user}")

    def row(self, **kw: str | None) -> store.DomainRow:
        values: dict[str, str | None] = {"authsecret": None, "authurl": None, "authdomain": None}
        values.update(kw)
        return store.DomainRow("d.example", **values)  # type: ignore[arg-type]

    def test_oldRowIsJSXC(self) -> None:
        spec = rowSpec(self.row(authurl="https://other/jsxc"), self.NC, (b"s",))
        self.assertEqual(spec, BackendSpec("jsxc", "https://other/jsxc", b"s"))

    def test_inheritsGlobal(self) -> None:
        self.assertEqual(rowSpec(self.row(authdomain="x"), self.NC, ()), self.NC)
        self.assertEqual(rowSpec(self.row(), self.JSXC, (b"global",)), self.JSXC)

    def test_ownNextcloud(self) -> None:
        spec = rowSpec(self.row(backend="nextcloud", authurl="https://nc2", serviceuser="u2",
                                servicepassword="p2", loginformat="{user}@{domain}"),
                       self.JSXC, (b"global",))
        self.assertEqual(spec, BackendSpec("nextcloud", "https://nc2", b"", "u2", "p2",
                                           "{user}@{domain}"))

    def test_incomplete(self) -> None:
        self.assertRaises(ValueError, rowSpec, self.row(backend="nextcloud",
                                                        authurl="https://nc2"), self.JSXC, ())
        self.assertRaises(ValueError, rowSpec, self.row(backend="nextcloud"), self.JSXC, ())
        self.assertRaises(ValueError, rowSpec, self.row(backend="other", authurl="https://x"),
                          self.JSXC, ())


class TokenCommandTests(SynchronousTestCase):
    def options(self, *args: str) -> CLIOptions:
        options = CLIOptions()
        options.parseOptions(list(args))
        return options

    def test_globalSecret(self) -> None:
        conf = self.mktemp()
        with open(conf, "w") as f:
            f.write(f"backend=nextcloud\nurl={BASE}\nsecret=tok-key,old\n")
        options = self.options("-c", conf, "--db", self.mktemp(), "token", "alice",
                               "example.org", "--ttl", "2h")
        out = io.StringIO()
        self.assertEqual(runToken(options.subOptions, out, now=lambda: 1000.0), 0)
        token = out.getvalue().strip()
        self.assertTrue(verifyToken(token, "alice", "example.org", [b"tok-key"], 8200))
        self.assertFalse(verifyToken(token, "alice", "example.org", [b"tok-key"], 8201))
        self.assertFalse(verifyToken(token, "bob", "example.org", [b"tok-key"], 2000))

    def test_domainSecret(self) -> None:
        db = os.path.abspath(self.mktemp())
        conn = store.connect(db)
        store.addDomain(conn, "d.example", "https://x/jsxc", "dom-key", None)
        conn.close()
        options = self.options("--db", db, "token", "bob", "d.example")
        out = io.StringIO()
        self.assertEqual(runToken(options.subOptions, out, now=lambda: 0.0), 0)
        self.assertTrue(verifyToken(out.getvalue().strip(), "bob", "d.example",
                                    [b"dom-key"], 3600))
