"""
End-to-end tests of the mail framings: the real C{twistd xcauth} daemon against
the fake Nextcloud, driven by Debian's real clients, C{testsaslauthd}
(sasl2-bin) on a UNIX socket and C{postmap -q} (postfix, with its own
configuration directory; no Postfix daemon is started) on loopback TCP.
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time

from twisted.trial.unittest import TestCase

from tests.harness import (
    SECRET,
    TWISTD,
    Daemon,
    FakeNextcloud,
    Process,
    connect,
    freePort,
    recvExactly,
    recvLine,
    startBackend,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken

TESTSASLAUTHD = shutil.which("testsaslauthd") or "/usr/sbin/testsaslauthd"
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
#: Passwords the tests send; none may appear in the daemon's log.
PASSWORDS = ["pa:ss w", "pässwörd", "wrong-Passw0rd", "good_password"]


def missing(path: str, package: str) -> str | None:
    if os.access(path, os.X_OK):
        return None
    return f"{path} is not installed (Debian package {package})"


def socketGroup() -> str:
    """
    The group to give the test socket: C{sasl} as on a real system when we may
    (root), else our own primary group.
    """
    if os.geteuid() == 0:
        try:
            grp.getgrnam("sasl")
            return "sasl"
        except KeyError:
            pass
    return grp.getgrgid(os.getegid()).gr_name


def counted(data: str | bytes) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return struct.pack(">H", len(raw)) + raw


def postmap(directory: str, port: int, key: str) -> tuple[int, str, str]:
    """
    C{postmap -q KEY tcp:127.0.0.1:PORT} with a configuration directory of its
    own (a main.cf with just the compatibility level, to keep it quiet).
    """
    confdir = os.path.join(directory, "postfix")
    if not os.path.isdir(confdir):
        os.makedirs(confdir)
        with open(os.path.join(confdir, "main.cf"), "w") as f:
            f.write("compatibility_level = 3.6\n")
    result = subprocess.run(
        [POSTMAP, "-c", confdir, "-q", key, f"tcp:127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=30,
    )
    return result.returncode, result.stdout, result.stderr


def readCounted(s: socket.socket) -> bytes:
    (length,) = struct.unpack(">H", recvExactly(s, 2))
    return recvExactly(s, length)


class MailTestCase(TestCase):
    """
    The fake Nextcloud and a daemon with the listeners C{listenArgs} returns.
    """

    #: Run against the fake stock Nextcloud (backend nextcloud) instead of JSXC.
    stock = False

    def setUp(self) -> None:
        # A short directory: a UNIX socket path is limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="xcauth-mail-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.nextcloud, self.config = startBackend(
            self, self.dir, deadline="2", stock=self.stock
        )
        self.daemon = self.startDaemon()

    def startDaemon(self) -> Daemon:
        args, waitOn = self.listenArgs()
        daemon = Daemon(os.path.join(self.dir, "daemon"),
                        ["--config-file", self.config, *args], waitOn=waitOn)
        self.addCleanup(daemon.stop)
        daemon.start()
        return daemon

    def listenArgs(self) -> tuple[list[str], list[tuple[str, int] | str]]:
        raise NotImplementedError

    def tearDown(self) -> None:
        log = self.daemon.output()
        for password in PASSWORDS:
            self.assertNotIn(password, log)


class SaslauthdTests(MailTestCase):
    skip = missing(TESTSASLAUTHD, "sasl2-bin")

    def listenArgs(self) -> tuple[list[str], list[tuple[str, int] | str]]:
        self.socket = os.path.join(self.dir, "mux")
        self.group = socketGroup()
        self.tcpPort = freePort()
        return (
            ["--listen", f"saslauthd=unix:{self.socket}:mode=660:group={self.group}",
             "--listen", f"saslauthd=tcp:{self.tcpPort}:interface=127.0.0.1"],
            [self.socket, ("127.0.0.1", self.tcpPort)],
        )

    def runTestsaslauthd(self, user: str, password: str, *extra: str) -> tuple[int, str]:
        result = subprocess.run(
            [TESTSASLAUTHD, "-f", self.socket, "-u", user, "-p", password, *extra],
            capture_output=True, text=True, timeout=30,
        )
        return result.returncode, result.stdout + result.stderr

    def assertAccepted(self, user: str, password: str, *extra: str) -> None:
        status, output = self.runTestsaslauthd(user, password, *extra)
        self.assertEqual((status, output.strip()), (0, '0: OK "Success."'))

    def assertRejected(self, user: str, password: str, *extra: str) -> None:
        status, output = self.runTestsaslauthd(user, password, *extra)
        self.assertNotEqual(status, 0, output)
        self.assertIn("NO", output)

    def test_socketModeAndGroup(self) -> None:
        """
        The socket gets the mode and group of its listen entry.
        """
        st = os.stat(self.socket)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertEqual(st.st_gid, grp.getgrnam(self.group).gr_gid)

    def test_testsaslauthd(self) -> None:
        """
        Right and wrong passwords, a realm, a user@realm login, a token and a
        non-ASCII password, as Debian's client sends them.
        """
        self.assertAccepted("alice", "pa:ss w", "-r", "example.org", "-s", "smtp")
        self.assertAccepted("alice@example.org", "pa:ss w")
        self.assertRejected("alice@example.org", "wrong-Passw0rd")
        self.assertRejected("alice", "wrong-Passw0rd", "-r", "example.org")
        self.assertRejected("nobody@example.org", "pa:ss w")
        self.assertAccepted("jörg@example.org", "pässwörd")
        self.assertAccepted("jörg", "pässwörd", "-r", "example.org")
        self.assertRejected("alice", "pa:ss w")  # no realm, no @: no domain
        token = makeToken(SECRET.encode(), "bob", "example.org", int(time.time()) + 300)
        self.assertAccepted("bob@example.org", token)
        self.assertRejected("alice@example.org", token)  # another user's token
        self.assertNotIn(token, self.daemon.output())

    def test_tcpFifthFieldAndSecondRequest(self) -> None:
        """
        On TCP, a request with a fifth field is answered; the same connection
        then serves a second request.
        """
        with connect(("127.0.0.1", self.tcpPort)) as s:
            s.sendall(counted("alice") + counted("pa:ss w") + counted("imap")
                      + counted("example.org") + counted("192.0.2.1"))
            self.assertEqual(readCounted(s), b"OK success")
            s.sendall(counted("alice@example.org") + counted("wrong-Passw0rd")
                      + counted("imap") + counted(""))
            self.assertTrue(readCounted(s).startswith(b"NO "))

    def test_staleSocketAfterCrash(self) -> None:
        """
        A daemon killed without cleaning up leaves its socket and lock file;
        the next one removes the stale socket and listens again.
        """
        self.daemon.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        self.daemon.process.wait(10)  # type: ignore[union-attr]
        self.assertTrue(os.path.exists(self.socket))
        self.daemon = self.startDaemon()
        self.assertAccepted("alice@example.org", "pa:ss w")

    def test_cleanStopRemovesSocket(self) -> None:
        """
        A daemon that stops normally removes its socket and lock file.
        """
        self.daemon.stop()
        self.assertFalse(os.path.exists(self.socket))
        self.assertFalse(os.path.lexists(self.socket + ".lock"))


class PostfixTests(MailTestCase):
    skip = missing(POSTMAP, "postfix")

    def listenArgs(self) -> tuple[list[str], list[tuple[str, int] | str]]:
        self.port = freePort()
        return (["--listen", f"postfix=tcp:{self.port}:interface=127.0.0.1"],
                [("127.0.0.1", self.port)])

    def postmap(self, key: str) -> tuple[int, str, str]:
        return postmap(self.dir, self.port, key)

    def test_postmap(self) -> None:
        """
        An existing user is found (status 0, the value C{OK}); a missing one
        and an C{@domain} key are not (status 1, no output, no error); a
        non-ASCII address, which Postfix sends %-encoded, is found.
        """
        self.assertEqual(self.postmap("alice@example.org"), (0, "OK\n", ""))
        self.assertEqual(self.postmap("nobody@example.org"), (1, "", ""))
        self.assertEqual(self.postmap("@example.org"), (1, "", ""))
        self.assertEqual(self.postmap("jörg@example.org"), (0, "OK\n", ""))
        self.assertIn("isuser true for jörg@example.org via postfix",
                      self.daemon.output())

    def test_longLivedConnection(self) -> None:
        """
        One connection serves many lookups, and a request that is not C{get}
        gets a 500 without closing it.
        """
        with connect(("127.0.0.1", self.port)) as s:
            s.sendall(b"get alice@example.org\nput x y\nget j%C3%B6rg@example.org\n"
                      b"get nobody@example.org\n")
            self.assertEqual(recvLine(s), b"200 OK")
            self.assertTrue(recvLine(s).startswith(b"500 "))
            self.assertEqual(recvLine(s), b"200 OK")
            self.assertEqual(recvLine(s), b"500 No such user")
            s.sendall(b"get admin@example.org\n")
            self.assertEqual(recvLine(s), b"200 OK")

    def test_backendOutage(self) -> None:
        """
        With the backend down the answer is 400, a temporary failure: postmap
        reports a query error and exits 1 (Postfix itself defers the mail).
        """
        self.nextcloud.stop()
        with connect(("127.0.0.1", self.port)) as s:
            s.sendall(b"get alice@example.org\n")
            self.assertTrue(recvLine(s).startswith(b"400 "))
        status, out, err = self.postmap("alice@example.org")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("query error", err)


class SystemdSocketTests(TestCase):
    """
    Sockets passed the way systemd passes them (C{systemd-socket-activate},
    which needs no running systemd), selected by their descriptor names alone.
    """

    skip = (missing(SOCKET_ACTIVATE, "systemd") or missing(TESTSASLAUTHD, "sasl2-bin")
            or missing(POSTMAP, "postfix"))

    def test_namesSelectFramings(self) -> None:
        """
        C{saslauthd-unix} and C{postfix} descriptors serve their framings; the
        UNIX socket keeps the mode it was given and its file when the daemon
        stops (both are systemd's business).
        """
        directory = tempfile.mkdtemp(prefix="xcauth-sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        nextcloud = FakeNextcloud(directory)
        nextcloud.start()
        self.addCleanup(nextcloud.stop)
        config = writeConfig(os.path.join(directory, "xcauth.conf"), nextcloud.url)
        path = os.path.join(directory, "mux")
        port = freePort()
        logPath = os.path.join(directory, "xcauth.log")
        daemon = Process(
            [SOCKET_ACTIVATE, "-l", path, "--fdname=saslauthd-unix",
             "-l", f"127.0.0.1:{port}", "--fdname=postfix",
             TWISTD, "-n", "--pidfile=", f"--logfile={logPath}", "xcauth",
             "--config-file", config,
             "--listen", "systemd:domain=UNIX:name=saslauthd-unix",
             "--listen", "systemd:domain=INET:name=postfix"],
            os.path.join(directory, "activate.out"),
        )
        daemon.start()
        self.addCleanup(daemon.stop)
        waitFor(lambda: os.path.exists(path), "the socket", process=daemon.process)
        os.chmod(path, 0o660)  # what SocketMode=0660 does
        # The first connection makes systemd-socket-activate start the daemon.
        result = subprocess.run(
            [TESTSASLAUTHD, "-f", path, "-u", "alice@example.org", "-p", "pa:ss w"],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, '0: OK "Success."'))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        self.assertEqual(postmap(directory, port, "jörg@example.org"), (0, "OK\n", ""))
        self.assertEqual(postmap(directory, port, "nobody@example.org"), (1, "", ""))
        daemon.stop()
        self.assertTrue(os.path.exists(path))
        with open(logPath, encoding="utf-8") as f:
            log = f.read()
        self.assertIn("listening: saslauthd=systemd:domain=UNIX:name=saslauthd-unix", log)
        self.assertIn("listening: postfix=systemd:domain=INET:name=postfix", log)
        self.assertNotIn("pa:ss w", log)
