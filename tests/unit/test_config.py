"""
Tests for option and config-file handling (L{xcauth.daemon.config}, L{xcauth.daemon.tap}).
"""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xcauth.daemon.config import ConfigError, parseTimeout, readConfigFile
from xcauth.daemon.listen import framingFromSystemdName, splitListen
from xcauth.daemon.tap import Options


class ConfigFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_format(self) -> None:
        path = self.write(
            "# comment\n\n  url = https://x/y \ntype=ejabberd\ndebug\n"
            "listen=tcp:1\nlisten=prosody=unix:/tmp/s\nsecret=a=b#c\n"
        )
        self.assertEqual(
            readConfigFile(path),
            [("url", "https://x/y", 3), ("type", "ejabberd", 4), ("debug", None, 5),
             ("listen", "tcp:1", 6), ("listen", "prosody=unix:/tmp/s", 7),
             ("secret", "a=b#c", 8)],
        )

    def test_configargparseGrammar(self) -> None:
        """
        Files written for older versions (read with configargparse) parse the
        same way: ":" or white space as separator, comments after white space,
        section headers and ";" lines skipped, lists for repeatable keys.
        """
        path = self.write(
            "[xcauth]\n; a comment\n---\ntype: ejabberd\nurl https://x/y\n"
            "secret=abc#def ; the secret\ndebug = true\n"
            "listen=[tcp:1, prosody=tcp:2]\n"
        )
        self.assertEqual(
            readConfigFile(path),
            [("type", "ejabberd", 4), ("url", "https://x/y", 5), ("secret", "abc#def", 6),
             ("debug", "true", 7), ("listen", "tcp:1", 8), ("listen", "prosody=tcp:2", 8)],
        )

    def test_unparsableLine(self) -> None:
        path = self.write("url=https://x/y\n=value\n")
        with self.assertRaises(ConfigError) as e:
            readConfigFile(path)
        self.assertIn("line 2", str(e.exception))

    def test_legacyFile(self) -> None:
        """
        A configuration of an older installation starts, with warnings for the
        keys this version does not act on.
        """
        import contextlib
        import io
        import os

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ctl = os.path.join(directory, "ejabberdctl")
        with open(ctl, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(ctl, 0o755)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            options = self.parse(
                "type=ejabberd\nurl=https://cloud.example.org/x\nsecret=s\n"
                "log=/var/log/xcauth\ndebug\ninteractive\ndomain-db=/var/lib/xcauth/domains\n"
                "cache-db=/var/cache/xcauth\ncache-bcrypt-rounds=12\ntimeout=5\n"
                f"db={directory}/xcauth.sqlite3\n"
                f"ejabberdctl={ctl}\nshared-roster-db=/var/lib/xcauth/sr\n"
                "update-roster\nper-domain-config=/etc/xcauth.domlist\n"
                "domains-db=/var/lib/xcauth\nlisten=tcp:1\n",
            )
        config = options.config
        self.assertEqual(config.bcryptRounds, (12, 12))
        self.assertEqual(config.log, "/var/log/xcauth")
        self.assertTrue(config.debug)
        for key in ("interactive", "domain-db", "cache-db", "shared-roster-db",
                    "update-roster", "per-domain-config", "domains-db"):
            self.assertIn(f"option {key!r} is not supported", stderr.getvalue())
        # ejabberdctl= enables the roster sync, as it did.
        self.assertNotIn("'ejabberdctl' is not supported", stderr.getvalue())
        self.assertEqual((config.rosterSync, config.ejabberdctl), ("ejabberdctl", ctl))

    def test_debugFalse(self) -> None:
        config = self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\ndebug=false\n").config
        self.assertFalse(config.debug)

    def test_missingFile(self) -> None:
        with self.assertRaises(ConfigError) as e:
            readConfigFile("/nonexistent/xcauth.conf")
        self.assertIn("/nonexistent/xcauth.conf", str(e.exception))

    def parse(self, text: str, *args: str) -> Options:
        options = Options()
        options.parseOptions(["-c", self.write(text), *args])
        return options

    def test_commandLineOverridesFile(self) -> None:
        options = self.parse(
            "url=http://file/x\nsecret=filesecret\ntype=prosody\nlisten=tcp:1\nlisten=tcp:2\n",
            "--url", "http://cli/x", "--listen", "ejabberd=tcp:3",
        )
        config = options.config
        self.assertEqual(config.url, "http://cli/x")
        self.assertEqual(config.secrets, (b"filesecret",))
        self.assertEqual(config.type, "prosody")
        # A --listen on the command line replaces those of the file.
        self.assertEqual([(li.framing, li.entry) for li in options.listeners], [("ejabberd", "tcp:3")])

    def test_fileListens(self) -> None:
        options = self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\nlisten=ejabberd-line=tcp:2\n")
        self.assertEqual([(li.framing, li.entry) for li in options.listeners], [("generic", "tcp:1"), ("ejabberd-line", "tcp:2")])

    def test_defaults(self) -> None:
        config = self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\n").config
        self.assertEqual((config.connectTimeout, config.totalTimeout), (2.0, 2.5))
        self.assertEqual(config.deadline, 4.0)
        self.assertFalse(config.debug)

    def test_debugFlag(self) -> None:
        self.assertTrue(self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\ndebug\n").config.debug)

    def test_rotatedSecrets(self) -> None:
        config = self.parse("url=http://f/x\nsecret= new , old \nlisten=tcp:1\n").config
        self.assertEqual(config.secrets, (b"new", b"old"))

    def test_timeoutNotBelowDeadline(self) -> None:
        """
        A backend timeout above the deadline is accepted with a
        warning saying why it defeats the cache; the invalid-value message
        suggests a valid one.
        """
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\ntimeout=5,10\n")
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertIn("xcauth: warning: the backend timeout 10 s is above the "
                      "deadline 4 s", err.getvalue())
        err = io.StringIO()
        with redirect_stderr(err):
            self.parse("url=http://f/x\nsecret=s\nlisten=tcp:1\ntimeout=2,3\n")
        self.assertEqual(err.getvalue(), "")
        e = self.assertRaises(ConfigError, parseTimeout, "abc")
        self.assertIn("(for example 2,2.5: the total below the deadline)", str(e))

    def test_errors(self) -> None:
        cases = [
            ("url=http://f/x\nsecret=s\nlisten=tcp:1\nfrobnicate=1\n", "unknown option 'frobnicate'"),
            ("secret=s\nlisten=tcp:1\n", "no backend url"),
            # The "no backend" error names the stock backend's settings.
            ("listen=tcp:1\n", "set backend=nextcloud, url=, service-user= and "
             "service-password-file="),
            ("backend=nextcloud\nlisten=tcp:1\n", "no backend url: set url= (your "
             "Nextcloud's address), service-user= and service-password-file="),
            ("url=http://f/x\nlisten=tcp:1\n", "no API secret"),
            ("url=ftp://f/x\nsecret=s\nlisten=tcp:1\n", "http:// or https://"),
            ("url=http://f/x\nsecret=s\nlisten=tcp:1\ntimeout=0\n", "timeout '0' is not valid"),
            ("url=http://f/x\nsecret=s\nlisten=tcp:1\ndeadline=-1\n", "deadline '-1' is not valid"),
            ("url=http://f/x\nsecret=s\nlisten=tcp:1\ntype=xmpp\n", "unknown type 'xmpp'"),
            ("url=http://f/x\nsecret=s\nlisten=bogus=tcp:1\n", "unknown framing 'bogus'"),
            ("url=http://f/x\nsecret=s\nlisten=tcp:port\n", "not a valid endpoint"),
            ("url=http://f/x\nsecret=s\n", "nothing to listen on"),
            ("url\nsecret=s\nlisten=tcp:1\n", "url needs a value"),
        ]
        for text, message in cases:
            # The twistd plugin turns usage errors into one line and exit status 1.
            with self.assertRaises(SystemExit, msg=text) as e:
                self.parse(text)
            self.assertTrue(str(e.exception).startswith("xcauth: "), text)
            self.assertIn(message, str(e.exception), text)


class TimeoutTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseTimeout("5,10"), (5.0, 10.0))
        self.assertEqual(parseTimeout("3"), (3.0, 3.0))
        self.assertEqual(parseTimeout("0.5, 2"), (0.5, 2.0))
        # The total is never shorter than the connect timeout.
        self.assertEqual(parseTimeout("5,1"), (5.0, 5.0))

    def test_invalid(self) -> None:
        for text in ("", "x", "1,2,3", "0", "-1", "nan", "inf", "5,", ",5"):
            self.assertRaises(ConfigError, parseTimeout, text)

    @given(st.text(max_size=20))
    def test_neverCrashes(self, text: str) -> None:
        try:
            connect, total = parseTimeout(text)
        except ConfigError:
            return
        self.assertTrue(0 < connect <= total)


class ListenTests(SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(splitListen("tcp:23664:interface=127.0.0.1", "ejabberd"),
                         ("ejabberd", "tcp:23664:interface=127.0.0.1"))
        self.assertEqual(splitListen("prosody=unix:/run/x.sock:mode=660", "ejabberd"),
                         ("prosody", "unix:/run/x.sock:mode=660"))
        self.assertEqual(splitListen("ejabberd-line=tcp6:1:interface=\\:\\:1", "prosody"),
                         ("ejabberd-line", "tcp6:1:interface=\\:\\:1"))

    def test_splitErrors(self) -> None:
        self.assertRaises(ConfigError, splitListen, "nope=tcp:1", "prosody")
        self.assertRaises(ConfigError, splitListen, "prosody=", "prosody")

    def test_systemdNames(self) -> None:
        cases = {
            "systemd:domain=INET:name=ejabberd": "ejabberd",
            "systemd:domain=INET6:name=ejabberd-v6": "ejabberd",
            "systemd:domain=INET:name=ejabberd-line": "ejabberd-line",
            "systemd:domain=INET6:name=ejabberd-line-v6": "ejabberd-line",
            "systemd:domain=UNIX:name=prosody-unix": "prosody",
            "systemd:domain=INET:name=generic": "generic",
            "systemd:domain=INET:name=prosodyx": None,
            "systemd:domain=INET:name=other": None,
            "systemd:domain=INET:index=0": None,
            "tcp:1": None,
        }
        for endpoint, framing in cases.items():
            self.assertEqual(framingFromSystemdName(endpoint), framing, endpoint)
        self.assertEqual(splitListen("systemd:domain=INET:name=ejabberd-v6", "prosody"),
                         ("ejabberd", "systemd:domain=INET:name=ejabberd-v6"))
        # An explicit framing wins over the name.
        self.assertEqual(splitListen("prosody=systemd:domain=INET:name=ejabberd", "generic"),
                         ("prosody", "systemd:domain=INET:name=ejabberd"))

    def test_sampleConfigIsValid(self) -> None:
        """
        The shipped sample configuration parses, with type=ejabberd (and
        --demo, as make demo gives: it holds the demo secret).
        """
        sample = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "xcauth.conf")
        options = Options()
        options.parseOptions(["-c", sample, "--listen", "tcp:23664:interface=127.0.0.1", "--demo"])
        self.assertEqual(options.config.type, "ejabberd")
        self.assertEqual([(li.framing, li.entry) for li in options.listeners], [("ejabberd", "tcp:23664:interface=127.0.0.1")])


class ServedDomainsOptionTests(SynchronousTestCase):
    """
    C{domain=}: the domains the global backend serves.
    """

    def parse(self, *args: str, conf: str = "") -> Options:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("url=https://cloud.example.org/x\nsecret=s\n" + conf)
        options = Options()
        options.parseOptions(["-c", path, "--listen", "tcp:1:interface=127.0.0.1", *args])
        return options

    def test_repeatableAndCanonical(self) -> None:
        options = self.parse("--domain", "Example.ORG.", "--domain", "b.example,B.example")
        self.assertEqual(options.config.domains, ("example.org", "b.example"))

    def test_fromFile(self) -> None:
        options = self.parse(conf="domain=a.example, Bücher.example\ndomain=c.example\n")
        self.assertEqual(options.config.domains,
                         ("a.example", "xn--bcher-kva.example", "c.example"))
        # The command line overrides the file.
        options = self.parse("--domain", "c.example", conf="domain=a.example\n")
        self.assertEqual(options.config.domains, ("c.example",))

    def test_noneByDefault(self) -> None:
        self.assertEqual(self.parse().config.domains, ())

    def test_invalid(self) -> None:
        e = self.assertRaises(SystemExit, self.parse, "--domain", "a@b.example")
        self.assertIn("domain", str(e))

    def test_stockUserFormatNeedsList(self) -> None:
        conf = "backend=nextcloud\nservice-user=svc\nservice-password=pw\n"
        e = self.assertRaises(SystemExit, self.parse,
                              conf=conf.replace("secret=s\n", "") + "url=https://c.example\n")
        self.assertIn("domain=", str(e))
        self.assertNotIn("\n", str(e))
        self.parse("--domain", "example.org", conf=conf)
        self.parse("--login-format", "{user}@{domain}", conf=conf)


class TLSListenerTests(SynchronousTestCase):
    def test_clientCAFileChecked(self) -> None:
        """
        A TLS listener with clientCA= whose files cannot be read stops the
        start with one line.
        """
        from xcauth.daemon.listen import parseListener

        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(
            ConfigError, parseListener,
            f"ssl:1:interface=127.0.0.1:privateKey={missing}:clientCA={missing}", "prosody")
        self.assertIn("cannot read", str(e))
        self.assertNotIn("\n", str(e))
