"""
End-to-end tests of the real C{twistd xcauth} process on loopback against the
fake Nextcloud: the telnet session of the documentation, a binary ejabberd
session, isolation between connections, start-up errors and the one-shot
command.
"""

from __future__ import annotations

import os
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import (
    TWISTD,
    XCAUTH,
    childEnv,
    connect,
    ejabberdFrame,
    recvAll,
    recvExactly,
    recvLine,
    serveOn,
    startBackend,
    writeConfig,
)
from xcauth.core.tokens import makeToken

TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"
PASSWORDS = ["good_password", "incorrect_password", "pa:ss w", "pässwörd"]


class DaemonTests(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.nextcloud, self.config = startBackend(self, self.dir, type="ejabberd", deadline="2")
        self.daemon = serveOn(
            self, os.path.join(self.dir, "daemon"), self.config, "ejabberd"
        )
        self.port = self.daemon.port

    def tearDown(self) -> None:
        log = self.daemon.output()
        for password in PASSWORDS:
            self.assertNotIn(password, log)
        self.assertNotIn("Traceback", log)

    def test_telnetSession(self) -> None:
        """
        The telnet session of PROTOCOLS.md, verbatim, on a C{type=ejabberd}
        listener.
        """
        s = connect(("127.0.0.1", self.port))
        s.sendall(b"isuser:admin:example.org\r\n")
        self.assertEqual(recvLine(s), b"1")
        s.sendall(b"auth:admin:example.org:good_password\r\n")
        self.assertEqual(recvLine(s), b"1")
        s.sendall(b"auth:admin:example.org:incorrect_password\r\n")
        self.assertEqual(recvLine(s), b"0")
        s.sendall(b"quit\r\n")
        self.assertEqual(recvAll(s), b"")
        s.close()

    def test_realTelnet(self) -> None:
        """
        The same session typed into Debian's real telnet client.
        """
        import shutil

        if shutil.which("telnet") is None:
            raise SkipTest("telnet is not installed (make test installs it)")
        p = subprocess.Popen(
            ["telnet", "127.0.0.1", str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(
            b"isuser:admin:example.org\n"
            b"auth:admin:example.org:good_password\n"
            b"auth:admin:example.org:incorrect_password\n"
            b"quit\n"
        )
        p.stdin.flush()
        # telnet ends when the daemon closes the connection after "quit".
        try:
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
        output = p.stdout.read().decode()
        p.stdin.close()
        p.stdout.close()
        answers = [line.strip() for line in output.splitlines() if line.strip() in ("0", "1")]
        self.assertEqual(answers, ["1", "1", "0"], output)
        self.assertIn("Connection closed by foreign host.", output)

    def test_binarySession(self) -> None:
        s = connect(("127.0.0.1", self.port))
        s.sendall(bytes.fromhex("001e") + b"auth:alice:example.org:pa:ss w")
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.sendall(bytes.fromhex("0018") + b"isuser:alice:example.org")
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.sendall(ejabberdFrame("isuser:nobody:example.org"))
        self.assertEqual(recvExactly(s, 4), FALSE)
        s.sendall(ejabberdFrame("auth:jörg:example.org:pässwörd"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        token = makeToken(b"e2e-secret-0123456789", "bob", "example.org", int(time.time()) + 60)
        s.sendall(ejabberdFrame(f"auth:bob:example.org:{token}"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.sendall(ejabberdFrame(b"auth:alice:example.org:\xff\xfe"))
        self.assertEqual(recvExactly(s, 4), FALSE)
        s.sendall(b"\x00\x00")
        self.assertEqual(recvAll(s), b"")
        s.close()
        log = self.daemon.output()
        self.assertIn("auth true for alice@example.org via ejabberd in", log)

    def test_pipelinedOverSocket(self) -> None:
        """
        Several requests in one write are answered in order; a half-close after
        them still gets every answer.
        """
        s = connect(("127.0.0.1", self.port))
        s.sendall(
            ejabberdFrame("auth:slow300-alice:example.org:pa:ss w")
            + ejabberdFrame("isuser:nobody:example.org")
            + ejabberdFrame("isuser:alice:example.org")
        )
        s.shutdown(1)
        self.assertEqual(recvAll(s), TRUE + FALSE + TRUE)
        s.close()

    def test_hungBackendDoesNotDelayOthers(self) -> None:
        """
        While one client waits for a backend that never answers, another
        client is served; the first gets false at the deadline.
        """
        slow = connect(("127.0.0.1", self.port))
        slow.sendall(ejabberdFrame("auth:fault-hang:example.org:pw"))
        fast = connect(("127.0.0.1", self.port))
        fast.sendall(ejabberdFrame("isuser:alice:example.org"))
        self.assertEqual(recvExactly(fast, 4), TRUE)
        # Ordering proof: the slow answer had not arrived when the fast one did.
        slow.setblocking(False)
        self.assertRaises(BlockingIOError, slow.recv, 4)
        slow.setblocking(True)
        self.assertEqual(recvExactly(slow, 4), FALSE)
        slow.close()
        fast.close()
        self.assertIn("no answer within 2", self.daemon.output())

    def test_garbageDoesNotDisturbOthers(self) -> None:
        other = connect(("127.0.0.1", self.port))
        bad = connect(("127.0.0.1", self.port))
        bad.sendall(b"\x7f\xff" + os.urandom(3000))
        bad.close()
        worse = connect(("127.0.0.1", self.port))
        worse.sendall(b"a" * 10000)
        self.assertEqual(recvAll(worse), b"")
        worse.close()
        other.sendall(ejabberdFrame("isuser:alice:example.org"))
        self.assertEqual(recvExactly(other, 4), TRUE)
        other.close()

    def test_backendFaults(self) -> None:
        s = connect(("127.0.0.1", self.port))
        for user in ("fault-500json", "fault-500html", "fault-nonjson", "fault-302"):
            s.sendall(ejabberdFrame(f"auth:{user}:example.org:pw"))
            self.assertEqual(recvExactly(s, 4), FALSE, user)
        s.sendall(ejabberdFrame("isuser:alice:example.org"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.close()


class StartupErrorTests(TestCase):
    """
    Wrong configuration stops the daemon at start, with a message saying what
    to fix and a non-zero exit status.
    """

    def run_twistd(self, *args: str, config: dict[str, str] | None = None) -> tuple[int, str]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = writeConfig(os.path.join(directory, "x.conf"),
                           "http://127.0.0.1:9/api", **(config or {}))
        p = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "xcauth", "-c", path, *args],
            capture_output=True, text=True, timeout=60, env=childEnv(), cwd=directory,
        )
        return p.returncode, p.stdout + p.stderr

    def assertFails(self, needle: str, *args: str, config: dict[str, str] | None = None) -> None:
        code, output = self.run_twistd(*args, config=config)
        self.assertNotEqual(code, 0, output)
        lastLine = output.strip().splitlines()[-1]
        self.assertIn(needle, lastLine)

    def test_unknownFraming(self) -> None:
        self.assertFails("unknown framing 'xmpp'", "--listen", "xmpp=tcp:1:interface=127.0.0.1")

    def test_malformedEndpoint(self) -> None:
        # As written (no backlog= added by xcauth), and in words.
        self.assertFails("xcauth: listen 'tcp:notaport' is not a valid endpoint: "
                         "'notaport' is not a number", "--listen", "tcp:notaport")

    def test_unknownEndpointType(self) -> None:
        self.assertFails("not a valid endpoint", "--listen", "carrierpigeon:1")

    def test_badTimeout(self) -> None:
        self.assertFails("timeout 'soon' is not valid", "--timeout", "soon", "--listen", "tcp:1")

    def test_unknownType(self) -> None:
        self.assertFails("unknown type 'jabber'", "-t", "jabber", "--listen", "tcp:1")

    def test_noListen(self) -> None:
        self.assertFails("nothing to listen on", )

    def test_missingUrl(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "x.conf")
        with open(path, "w") as f:
            f.write("secret=x\n")
        p = subprocess.run([TWISTD, "-n", "--pidfile=", "xcauth", "-c", path, "--listen", "tcp:1"],
                           capture_output=True, text=True, timeout=60, env=childEnv())
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("no backend url", (p.stdout + p.stderr).strip().splitlines()[-1])

    def test_unknownConfigKey(self) -> None:
        self.assertFails("unknown option 'secert'", "--listen", "tcp:1",
                         config={"secert": "x"})

    def test_missingSystemdName(self) -> None:
        self.assertFails("no socket named 'ejabberd'", "--listen",
                         "systemd:domain=INET:name=ejabberd")

    def test_portInUse(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            self.assertFails("Address already in use", "--listen",
                             f"tcp:{port}:interface=127.0.0.1")

    def test_legacyOptionsWarnOnly(self) -> None:
        """
        Keys of existing config files that this version does not act on are
        accepted with a warning (the daemon then fails only on the port).
        """
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            code, output = self.run_twistd(
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                config={"cache-db": "/var/cache/xcauth"},
            )
        self.assertIn("'cache-db' is not supported", output)
        self.assertIn("Address already in use", output)

    def test_helpListsEveryOption(self) -> None:
        p = subprocess.run([TWISTD, "-n", "xcauth", "--help"], capture_output=True, text=True,
                           timeout=60, env=childEnv())
        self.assertEqual(p.returncode, 0)
        for option in ("--config-file", "--type", "--url", "--secret", "--timeout", "--debug",
                       "--listen", "--deadline", "--max-in-flight", "--systemd-sockets",
                       "--log", "--db", "--cache-storage"):
            self.assertIn(option, p.stdout)


class OneShotTests(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.nextcloud, self.config = startBackend(self, self.dir)

    def xcauth(self, *args: str) -> tuple[int, str, str]:
        p = subprocess.run([XCAUTH, "-c", self.config, *args], capture_output=True, text=True,
                           timeout=60, env=childEnv())
        return p.returncode, p.stdout, p.stderr

    def test_auth(self) -> None:
        # Quiet: the answer on standard output, no log lines.
        self.assertEqual(self.xcauth("-A", "alice", "example.org", "pa:ss w"), (0, "True\n", ""))
        self.assertEqual(self.xcauth("-A", "alice", "example.org", "nope"), (1, "False\n", ""))

    def test_isuser(self) -> None:
        self.assertEqual(self.xcauth("-I", "alice", "example.org")[:2], (0, "True\n"))
        self.assertEqual(self.xcauth("-I", "nobody", "example.org")[:2], (1, "False\n"))

    def test_backendDown(self) -> None:
        self.nextcloud.stop()
        # Unavailable is status 3, apart from usage and configuration errors (2).
        code, out, err = self.xcauth("-I", "alice", "example.org")
        self.assertEqual((code, out), (3, "None\n"))
        self.assertIn("unavailable", err)
        code, out, err = self.xcauth("-A", "alice", "example.org", "pa:ss w")
        self.assertEqual((code, out), (3, "None\n"))
        self.assertNotIn("pa:ss w", err)
        self.assertTrue(err.endswith("\nxcauth: the backend is unavailable\n"), err)
        self.assertNotIn("allow-list", err)

    def test_usageError(self) -> None:
        code, out, err = self.xcauth("-A", "alice")
        self.assertEqual(code, 2)
        self.assertIn("-A needs USER DOMAIN PASSWORD", err)
