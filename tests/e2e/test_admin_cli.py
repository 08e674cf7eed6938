"""
Tests for the state options and the administration commands: the real C{xcauth}
console script run in subprocesses (C{domains ...}, C{cache ...}), including
against a running daemon that picks domain changes up without a restart.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time

from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.harness import (
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
from xcauth.daemon.config import ConfigError, ConfigOptions, parseRounds, parseTTL
from xcauth.state import database as store

URL = "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"


def xcauth(*args: str) -> subprocess.CompletedProcess[str]:
    """
    Run the console script.
    """
    return subprocess.run(
        [XCAUTH, *args], capture_output=True, text=True, env=childEnv(), timeout=60
    )


class StateOptionTests(SynchronousTestCase):
    def parse(self, *args: str) -> ConfigOptions:
        options = ConfigOptions()
        options.parseOptions(["--url", URL, "--secret", "s", *args])
        return options

    def test_defaults(self) -> None:
        config = self.parse().config
        self.assertEqual(config.cacheStorage, "none")
        self.assertEqual(config.db, "/var/lib/xcauth/xcauth.sqlite3")
        self.assertEqual(
            (config.cacheQueryTTL, config.cacheVerificationTTL, config.cacheUnreachableTTL),
            (3600, 86400, 7 * 86400),
        )
        self.assertEqual(config.bcryptRounds, (12, 4))

    def test_values(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        config = self.parse(
            "--cache-storage", "db", "--db", os.path.join(directory, "x.db"),
            "--cache-query-ttl", "90", "--cache-verification-ttl", "2d",
            "--cache-unreachable-ttl", "30m", "--cache-bcrypt-rounds", "10,5",
        ).config
        self.assertEqual(config.cacheStorage, "db")
        self.assertEqual(
            (config.cacheQueryTTL, config.cacheVerificationTTL, config.cacheUnreachableTTL),
            (90, 2 * 86400, 1800),
        )
        self.assertEqual(config.bcryptRounds, (10, 5))

    def test_fromConfigFile(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = writeConfig(
            os.path.join(directory, "x.conf"), URL, db=os.path.join(directory, "s.db"),
            cache_storage="memory", cache_query_ttl="2h", cache_bcrypt_rounds="11,4",
        )
        config = self.parse("-c", path).config
        self.assertEqual(config.cacheStorage, "memory")
        self.assertEqual(config.cacheQueryTTL, 7200)
        self.assertEqual(config.db, os.path.join(directory, "s.db"))

    def test_badValues(self) -> None:
        for args in (
            ["--cache-storage", "redis"],
            ["--cache-query-ttl", "1x"],
            ["--cache-query-ttl", "-5"],
            ["--cache-verification-ttl", "1.5h"],
            ["--cache-unreachable-ttl", "h"],
            ["--cache-bcrypt-rounds", "3,4"],
            ["--cache-bcrypt-rounds", "12,4,4"],
            ["--cache-bcrypt-rounds", "twelve"],
            ["--cache-storage", "db", "--db", "/nonexistent-dir/x.sqlite3"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_parsers(self) -> None:
        self.assertEqual(parseTTL("t", "45"), 45)
        self.assertEqual(parseTTL("t", "3w"), 3 * 7 * 86400)
        self.assertEqual(parseTTL("t", "10s"), 10)
        self.assertRaises(ConfigError, parseTTL, "t", "")
        self.assertEqual(parseRounds("12"), (12, 12))
        self.assertEqual(parseRounds("12, 4"), (12, 4))


class AdminCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "xcauth.sqlite3")

    def test_domainsLifecycle(self) -> None:
        r = xcauth("--db", self.db, "domains", "add", "example.org", "--url", URL,
                   "--secret", "top-secret-1")
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        r = xcauth("--db", self.db, "domains", "list")
        self.assertEqual(r.returncode, 0)
        self.assertIn("example.org", r.stdout)
        self.assertIn(URL, r.stdout)
        self.assertNotIn("top-secret-1", r.stdout)
        r = xcauth("domains", "show", "example.org", "--db", self.db)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("top-secret", r.stdout)
        self.assertIn("authdomain: example.org", r.stdout)
        r = xcauth("--db", self.db, "domains", "show", "example.org", "--show-secret")
        self.assertIn("top-secret-1", r.stdout)
        # set changes only what is given.
        r = xcauth("--db", self.db, "domains", "set", "example.org", "--authdomain",
                   "cloud.example.org")
        self.assertEqual(r.returncode, 0, r.stderr)
        conn = store.connect(self.db)
        self.assertEqual(
            store.getDomain(conn, "example.org"),
            store.DomainRow("example.org", "top-secret-1", URL, "cloud.example.org"),
        )
        conn.close()
        r = xcauth("--db", self.db, "domains", "set", "example.org", "--secret", "s2")
        conn = store.connect(self.db)
        self.assertEqual(
            store.getDomain(conn, "example.org"),
            store.DomainRow("example.org", "s2", URL, "cloud.example.org"),
        )
        conn.close()
        r = xcauth("--db", self.db, "domains", "add", "example.org", "--url", URL,
                   "--secret", "x")
        self.assertEqual(r.returncode, 1)
        self.assertIn("exists already", r.stderr)
        r = xcauth("--db", self.db, "domains", "remove", "example.org")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = xcauth("--db", self.db, "domains", "list")
        self.assertNotIn("example.org", r.stdout)

    def test_errors(self) -> None:
        xcauth("--db", self.db, "domains", "add", "a.org", "--url", URL, "--secret", "s")
        for args, status, message in (
            (["domains", "show", "nope.org"], 1, "unknown domain nope.org"),
            (["domains", "remove", "nope.org"], 1, "unknown domain nope.org"),
            (["domains", "set", "nope.org", "--url", URL], 1, "unknown domain"),
            (["domains", "add", "b.org", "--url", "ftp://x", "--secret", "s"], 2,
             "http://"),
            (["domains", "add", "b.org", "--url", "not a url", "--secret", "s"], 2,
             "url"),
            (["domains", "set", "a.org", "--url", "cloud.example.org"], 2, "url"),
            (["domains", "add", "b.org", "--url", URL], 2, "--secret"),
            (["domains", "set", "a.org"], 2, "at least one"),
            (["domains", "add", "b@org", "--url", URL, "--secret", "s"], 2, "domain"),
            (["domains"], 2, "add, set"),
            (["cache", "remove", "x@a.org"], 1, "no cache entry"),
        ):
            r = xcauth("--db", self.db, *args)
            self.assertEqual(r.returncode, status, (args, r.stdout, r.stderr))
            self.assertIn(message, r.stderr, args)
            self.assertNotIn("Traceback", r.stderr)
        r = xcauth("--db", os.path.join(self.dir, "missing.db"), "domains", "list")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no state database", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "missing.db")))

    def test_secretsNotOnTheCommandLine(self) -> None:
        """
        domains add takes the service password from a file or standard input;
        without one (and no terminal) it says which option to give.
        """
        path = os.path.join(self.dir, "app-password")
        with open(path, "w") as f:
            f.write("App-Passw0rd-1\n")
        r = xcauth("--db", self.db, "domains", "add", "nc.org", "--backend", "nextcloud",
                   "--url", "https://cloud.nc.org", "--service-user", "svc",
                   "--service-password-file", path)
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        r = subprocess.run(
            [XCAUTH, "--db", self.db, "domains", "add", "nc2.org", "--backend", "nextcloud",
             "--url", "https://cloud.nc.org", "--service-user", "svc",
             "--service-password-file", "-"],
            input="App-Passw0rd-2\n", capture_output=True, text=True, env=childEnv(),
            timeout=60)
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        r = xcauth("--db", self.db, "domains", "set", "nc2.org", "--secret-file", path)
        self.assertEqual((r.returncode, r.stderr), (0, ""))
        self.assertEqual(r.stdout, "changed domain nc2.org: secret\n")
        conn = store.connect(self.db)
        self.assertEqual(store.getDomain(conn, "nc.org").servicepassword,  # type: ignore[union-attr]
                         "App-Passw0rd-1")
        found = store.getDomain(conn, "nc2.org")
        assert found is not None
        self.assertEqual((found.servicepassword, found.authsecret),
                         ("App-Passw0rd-2", "App-Passw0rd-1"))
        conn.close()
        r = subprocess.run(
            [XCAUTH, "--db", self.db, "domains", "add", "nc3.org", "--backend", "nextcloud",
             "--url", "https://cloud.nc.org", "--service-user", "svc"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=childEnv(),
            timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--service-password-file (or --service-password)", r.stderr)
        r = xcauth("--db", self.db, "domains", "add", "nc4.org", "--backend", "nextcloud",
                   "--url", "https://cloud.nc.org", "--service-user", "svc",
                   "--service-password-file", os.path.join(self.dir, "missing"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("--service-password-file: cannot read", r.stderr)

    def test_listAndShowSayTheBackend(self) -> None:
        """
        list and show name every domain's backend (jsxc for a row with a URL
        and no backend); --show-secret prints "(global)" for a domain without a
        secret of its own, never "None"; messages use the options' names.
        """
        xcauth("--db", self.db, "domains", "add", "old.org", "--url", URL, "--secret", "s")
        r = subprocess.run(
            [XCAUTH, "--db", self.db, "domains", "add", "nc.org", "--backend", "nextcloud",
             "--url", "https://cloud.nc.org", "--service-user", "svc",
             "--service-password-file", "-"],
            input="pw\n", capture_output=True, text=True, env=childEnv(), timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        listing = xcauth("--db", self.db, "domains", "list").stdout.splitlines()
        self.assertTrue(listing[0].startswith("nc.org\tbackend=nextcloud\t"), listing)
        self.assertTrue(listing[1].startswith("old.org\tbackend=jsxc\t"), listing)
        r = xcauth("--db", self.db, "domains", "show", "nc.org", "--show-secret")
        self.assertIn("secret:     (global)\n", r.stdout)
        self.assertIn("backend:    nextcloud\n", r.stdout)
        self.assertNotIn("None", r.stdout)
        r = xcauth("--db", self.db, "domains", "set", "old.org", "--url", URL, "--secret", "t")
        self.assertEqual(r.stdout, "changed domain old.org: secret, url\n")

    def test_rootRefusesServiceDatabase(self) -> None:
        """
        As root, on a database directory that belongs to another user (the
        service's), the commands refuse with a line saying how to run them,
        and create nothing.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        os.chown(self.dir, 65534, 65534)
        for args in (["domains", "list"],
                     ["domains", "add", "a.org", "--url", URL, "--secret", "s"]):
            r = xcauth("--db", self.db, *args)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn(f"xcauth: {self.dir} belongs to nobody, the service's user: as "
                          "root this command would leave files the service cannot open; "
                          f"run it as nobody: runuser -u nobody -- xcauth {args[0]} ...",
                          r.stderr)
            self.assertEqual(os.listdir(self.dir), [])

    def test_databaseFromConfigFile(self) -> None:
        config = writeConfig(os.path.join(self.dir, "x.conf"), URL, db=self.db)
        r = xcauth("-c", config, "domains", "add", "c.org", "--url", URL, "--secret", "s")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = xcauth("--db", self.db, "domains", "list")
        self.assertIn("c.org", r.stdout)
        # --db wins over the file.
        other = os.path.join(self.dir, "other.db")
        r = xcauth("-c", config, "--db", other, "domains", "add", "d.org", "--url", URL,
                   "--secret", "s")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("d.org", xcauth("-c", config, "domains", "list").stdout)

    def test_cacheCommands(self) -> None:
        conn = store.connect(self.db)
        store.putCacheEntry(conn, "alice@a.org", "$2b$04$SECRETHASHabcdefghijklmnopqrstu", 1e9)
        store.putCacheEntry(conn, "bob@a.org", "$2b$04$OTHERHASH", 1e9 + 60)
        conn.close()
        r = xcauth("--db", self.db, "cache", "list")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("alice@a.org", r.stdout)
        self.assertIn("bob@a.org", r.stdout)
        self.assertIn(store.formatTimestamp(1e9), r.stdout)
        self.assertNotIn("$2b$", r.stdout)
        self.assertNotIn("HASH", r.stdout)
        r = xcauth("--db", self.db, "cache", "remove", "alice@a.org")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("alice@a.org", xcauth("--db", self.db, "cache", "list").stdout)
        r = xcauth("--db", self.db, "cache", "clear")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("removed 1", r.stdout)
        conn = sqlite3.connect(self.db)
        self.assertEqual(conn.execute("SELECT count(*) FROM authcache").fetchone()[0], 0)
        conn.close()

    def test_oneShotChecksStillWork(self) -> None:
        """
        The admin words do not swallow the arguments of -A/-I: a user called
        "domains" is just a user.
        """
        r = xcauth("--url", "http://127.0.0.1:1/x", "--secret", "s", "-I", "domains",
                   "example.org")
        self.assertEqual(r.stdout.strip(), "None")
        self.assertEqual(r.returncode, 3)


class LiveDaemonTests(TestCase):
    """
    The admin command changing the domains of a running daemon.
    """

    timeout = 120

    def test_domainAddedWhileRunning(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        db = os.path.join(directory, "xcauth.sqlite3")
        nextcloud = FakeNextcloud(os.path.join(directory, "nc"), secret="domain-secret")
        nextcloud.start()
        self.addCleanup(nextcloud.stop)
        port = freePort()
        # The global backend is a closed port; only the domain row makes
        # example.org work.
        dead = f"http://127.0.0.1:{freePort()}/index.php/apps/ojsxc/ajax/externalApi.php"
        config = writeConfig(os.path.join(directory, "x.conf"), dead, secret="global",
                             db=db)
        daemon = Daemon(
            os.path.join(directory, "daemon"),
            ["-c", config, "--listen", f"prosody=tcp:{port}:interface=127.0.0.1"],
            waitOn=[("127.0.0.1", port)],
        )
        self.addCleanup(daemon.stop)
        daemon.start()

        def ask(line: str) -> bytes:
            with connect(("127.0.0.1", port)) as s:
                s.sendall(line.encode() + b"\n")
                return recvLine(s)

        self.assertEqual(ask("auth:alice:example.org:pa:ss w"), b"0")
        r = xcauth("-c", config, "domains", "add", "example.org", "--url", nextcloud.url,
                   "--secret", "domain-secret")
        self.assertEqual(r.returncode, 0, r.stderr)
        waitFor(lambda: ask("auth:alice:example.org:pa:ss w") == b"1",
                "the daemon to use the new domain", timeout=30)
        token = makeToken(b"domain-secret", "bob", "example.org", int(time.time()) + 60)
        self.assertEqual(ask(f"auth:bob:example.org:{token}"), b"1")
        self.assertEqual(ask("isuser:admin:example.org"), b"1")
        r = xcauth("-c", config, "domains", "remove", "example.org")
        self.assertEqual(r.returncode, 0, r.stderr)
        waitFor(lambda: ask(f"auth:bob:example.org:{token}") == b"0",
                "the daemon to drop the domain", timeout=30)


class CommandLineTests(SynchronousTestCase):
    """
    --help shows a usage line, a command's help only its own; --version is
    xcauth's everywhere; an unknown option is one line and a pointer.
    """

    def test_help(self) -> None:
        r = xcauth("--help")
        self.assertEqual(r.returncode, 0)
        self.assertTrue(r.stdout.startswith("Usage: xcauth [-c FILE] [-A USER DOMAIN"),
                        r.stdout)
        r = xcauth("domains", "add", "--help")
        self.assertEqual(r.returncode, 0)
        self.assertTrue(r.stdout.startswith("Usage: xcauth domains add DOMAIN --url URL"),
                        r.stdout)
        self.assertNotIn("-A USER", r.stdout)
        self.assertNotIn("add|set|remove", r.stdout)
        r = xcauth("token", "--help")
        self.assertTrue(r.stdout.startswith("Usage: xcauth token USER DOMAIN"), r.stdout)

    def test_version(self) -> None:
        import platform

        import twisted
        from xcauth import __version__

        line = (f"{__version__} (Twisted {twisted.__version__}, "
                f"Python {platform.python_version()})\n")
        for args in (["--version"], ["token", "--version"], ["domains", "--version"],
                     ["domains", "list", "--version"], ["cache", "clear", "--version"]):
            r = xcauth(*args)
            self.assertEqual((r.returncode, r.stdout), (0, "xcauth " + line), args)
        r = subprocess.run([XCAUTH + "-daemon", "--version"], capture_output=True, text=True,
                           env=childEnv(), timeout=60)
        self.assertEqual((r.returncode, r.stdout), (0, "xcauth-daemon " + line))

    def test_unknownOption(self) -> None:
        for args in (["--bogus"], ["domains", "add", "--bogus"], ["token", "--bogus"]):
            r = xcauth(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.splitlines()), 2, (args, r.stderr))
            self.assertIn("--bogus", r.stderr)
        for args in (["--bogus"], ["-n", "xcauth", "--bogus"]):
            r = subprocess.run([XCAUTH + "-daemon", *args], capture_output=True, text=True,
                               env=childEnv(), timeout=60)
            self.assertEqual(r.returncode, 1, args)
            self.assertEqual(r.stderr, "xcauth-daemon: option --bogus not recognized\n"
                             "Run 'xcauth-daemon --help' or 'xcauth-daemon xcauth --help' "
                             "for the options.\n")
