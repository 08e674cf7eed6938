"""
End to end, the real twistd on loopback against the fake Nextcloud: SIGHUP
reloads the configuration (connections stay open) and reopens the log file,
an invalid new file keeps the running configuration, SIGTERM answers the
requests in flight and exits 0, and a start error in daemon mode (without
C{-n}) reaches the terminal with a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

from twisted.trial.unittest import TestCase

from tests.harness import (
    BIN,
    SECRET,
    TWISTD,
    Daemon,
    childEnv,
    connect,
    ejabberdFrame,
    freePort,
    recvAll,
    recvExactly,
    serveOn,
    startBackend,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken

TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"
NEW_SECRET = "rotated-secret-9876543210"
XCAUTH_DAEMON = os.path.join(BIN, "xcauth-daemon")


def token(secret: str, user: str = "bob") -> bytes:
    """
    An ejabberd auth frame with a token for C{user@example.org}.
    """
    text = makeToken(secret.encode(), user, "example.org", int(time.time()) + 300)
    return ejabberdFrame(f"auth:{user}:example.org:{text}")


class ReloadTests(TestCase):
    """
    SIGHUP re-reads the config file and applies it without a restart.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.nextcloud, self.config = startBackend(self, self.dir, type="ejabberd")
        self.daemon = serveOn(
            self, os.path.join(self.dir, "daemon"), self.config, "ejabberd"
        )
        self.port = self.daemon.port

    def hangup(self, needle: str, count: int = 1) -> None:
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        waitFor(lambda: self.daemon.output().count(needle) >= count, needle,
                process=self.daemon.process)

    def test_newSecret(self) -> None:
        """
        A token made with the new secret is accepted after the HUP, on a
        connection opened before it; the daemon did not restart.
        """
        s = connect(("127.0.0.1", self.port))
        s.sendall(token(NEW_SECRET))
        self.assertEqual(recvExactly(s, 4), FALSE)
        s.sendall(token(SECRET))
        self.assertEqual(recvExactly(s, 4), TRUE)
        writeConfig(self.config, self.nextcloud.url, secret=NEW_SECRET, type="ejabberd")
        self.hangup("configuration reloaded from")
        s.sendall(token(NEW_SECRET))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.sendall(token(SECRET))
        self.assertEqual(recvExactly(s, 4), FALSE)
        s.close()
        assert self.daemon.process is not None
        self.assertIsNone(self.daemon.process.poll())
        self.assertEqual(self.daemon.output().count("xcauth ready:"), 1)
        self.assertNotIn(NEW_SECRET, self.daemon.output())

    def test_invalidFileKeepsRunningConfig(self) -> None:
        """
        A config file that does not validate is reported exactly, and the
        running configuration keeps serving.
        """
        writeConfig(self.config, self.nextcloud.url, secret=NEW_SECRET, type="ejabberd",
                    timeout="soon")
        self.hangup("reload failed")
        log = self.daemon.output()
        self.assertIn(
            "reload failed, the running configuration stays in force: timeout 'soon' is "
            "not valid", log,
        )
        s = connect(("127.0.0.1", self.port))
        s.sendall(token(SECRET))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.sendall(token(NEW_SECRET))
        self.assertEqual(recvExactly(s, 4), FALSE)
        s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.close()

    def test_listenerChangeNeedsRestart(self) -> None:
        """
        A changed listener (the file's, for a daemon started without
        --listen) is logged as needing a restart and served as before; the
        rest of the new file applies.
        """
        config = os.path.abspath(os.path.join(self.dir, "listen.conf"))
        writeConfig(config, self.nextcloud.url, type="ejabberd",
                    listen="tcp:0:interface=127.0.0.1")
        daemon = Daemon(os.path.join(self.dir, "daemon2"), ["--config-file", config])
        daemon.start()
        self.addCleanup(daemon.stop)
        port = daemon.port
        writeConfig(config, self.nextcloud.url, secret=NEW_SECRET, type="ejabberd",
                    listen="tcp:1:interface=127.0.0.1")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "configuration reloaded" in daemon.output(), "reload",
                process=daemon.process)
        self.assertIn("the listeners changed", daemon.output())
        s = connect(("127.0.0.1", port))
        s.sendall(token(NEW_SECRET))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.close()

    def test_logRequestsChanged(self) -> None:
        """
        log-requests=failures after a HUP: a yes is no longer logged, a no is.
        """
        s = connect(("127.0.0.1", self.port))
        s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        writeConfig(self.config, self.nextcloud.url, type="ejabberd", log_requests="failures")
        self.hangup("configuration reloaded from")
        s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w")
                  + ejabberdFrame("auth:alice:example.org:wrong"))
        self.assertEqual(recvExactly(s, 8), TRUE + FALSE)
        s.close()
        waitFor(lambda: "auth false for alice@example.org" in self.daemon.output(),
                "the failure logged")
        self.assertEqual(self.daemon.output().count("auth true for alice@example.org"), 1)

    def test_logReopened(self) -> None:
        """
        After logrotate moved the log file away, SIGHUP makes the daemon log
        to a new file of the old name.
        """
        logPath = self.daemon.daemonLog
        os.rename(logPath, logPath + ".1")
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        waitFor(lambda: os.path.exists(logPath), "a new log file", process=self.daemon.process)
        waitFor(lambda: "configuration reloaded" in open(logPath).read(), "reload logged")
        s = connect(("127.0.0.1", self.port))
        s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.close()
        waitFor(lambda: "auth true for alice@example.org" in open(logPath).read(),
                "the request logged in the new file")
        with open(logPath + ".1") as f:
            old = f.read()
        self.assertIn("reopening the log file", old)
        self.assertNotIn("auth true for alice@example.org", old)


class DrainTests(TestCase):
    """
    SIGTERM: stop accepting, answer what is in flight, exit 0.
    """

    def test_requestsInFlightAnswered(self) -> None:
        directory = self.mktemp()
        nextcloud, config = startBackend(self, directory, type="ejabberd", deadline="20",
                                         timeout="10,15")
        # Both listeners on port 0: the daemon logs the ports it got.
        daemon = Daemon(
            os.path.join(directory, "daemon"),
            ["--config-file", config, "--listen", "tcp:0:interface=127.0.0.1",
             "--metrics", "tcp:0:interface=127.0.0.1"],
        )
        daemon.start()
        self.addCleanup(daemon.stop)
        ports = daemon.ports()
        port = ports["ejabberd=tcp:0:interface=127.0.0.1"]
        metricsPort = ports["metrics=tcp:0:interface=127.0.0.1"]
        connections, perConnection = 40, 5
        sockets = [connect(("127.0.0.1", port), timeout=60) for _ in range(connections)]
        for s in sockets:
            s.sendall(ejabberdFrame("auth:slow3000-alice:example.org:pa:ss w") * perConnection)
        # SIGTERM once the daemon has read every request (in flight, or
        # answered already on a slow machine), however long that takes.
        waitFor(lambda: requestsRead(metricsPort) >= connections * perConnection,
                "every request read", timeout=60, process=daemon.process)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        waitFor(lambda: "stopped listening" in daemon.output(), "listeners stopped",
                process=daemon.process)
        self.assertRaises(OSError, connect, ("127.0.0.1", port), 5)
        answers = [recvAll(s) for s in sockets]
        for s in sockets:
            s.close()
        self.assertEqual(answers, [TRUE * perConnection] * connections)
        # Within the deadline (20 s) and the drain's margin, with room to spare.
        self.assertEqual(daemon.process.wait(60), 0)
        log = daemon.output()
        self.assertIn(f"answering what {connections} open connection(s) asked", log)
        self.assertIn("xcauth stopped", log)
        self.assertNotIn("Traceback", log)


def requestsRead(metricsPort: int) -> int:
    """
    The requests the daemon has read (in flight plus answered), from its
    metrics.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("xcauth_in_flight", "xcauth_requests_total")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class DaemonModeStartErrorTests(TestCase):
    """
    Without C{-n}, twistd forks into the background before the listeners
    start: their errors still reach the terminal, with a non-zero exit.
    """

    def start(self, program: str, *args: str) -> tuple[int, str, str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = writeConfig(os.path.join(directory, "x.conf"), "http://127.0.0.1:9/api")
        pidfile = os.path.join(directory, "twistd.pid")
        p = subprocess.run(
            [program, f"--pidfile={pidfile}", f"--logfile={directory}/x.log", "xcauth",
             "-c", config, *args],
            capture_output=True, text=True, timeout=30, env=childEnv(), cwd=directory,
        )
        self.assertFalse(os.path.exists(pidfile), "the pid file of a daemon that never ran")
        return p.returncode, p.stdout, p.stderr

    def portInUse(self, program: str) -> tuple[int, str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            started = time.monotonic()
            code, out, err = self.start(program, "--listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertLess(time.monotonic() - started, 20)
        self.assertNotEqual(code, 0)
        return port, err

    def test_xcauthDaemonPortInUse(self) -> None:
        """
        C{xcauth-daemon} prints the same one line as in the foreground.
        """
        port, err = self.portInUse(XCAUTH_DAEMON)
        self.assertEqual(
            err.strip().splitlines()[-1],
            f"xcauth: cannot start the listener generic=tcp:{port}:interface=127.0.0.1: "
            f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.",
        )

    def test_foregroundWithLogFile(self) -> None:
        """
        In the foreground with --logfile=FILE (standard error goes to the log),
        the failed start's line reaches the terminal too.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = writeConfig(os.path.join(directory, "x.conf"), "http://127.0.0.1:9/api")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            p = subprocess.run(
                [XCAUTH_DAEMON, "-n", "--pidfile=", f"--logfile={directory}/x.log",
                 "xcauth", "-c", config, "--listen", f"tcp:{port}:interface=127.0.0.1"],
                capture_output=True, text=True, timeout=30, env=childEnv(), cwd=directory,
            )
        self.assertEqual(p.returncode, 1)
        line = (f"xcauth: cannot start the listener generic=tcp:{port}:interface=127.0.0.1: "
                f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.")
        self.assertEqual(p.stderr, line + "\n")
        with open(os.path.join(directory, "x.log")) as f:
            self.assertIn(line, f.read())

    def test_twistdPortInUse(self) -> None:
        """
        Plain twistd exits non-zero at once and prints the start of the
        message (its parent reads 100 bytes of it).
        """
        port, err = self.portInUse(TWISTD)
        self.assertIn("xcauth: cannot start the listener ", err)

    def test_optionErrorDaemonMode(self) -> None:
        code, out, err = self.start(XCAUTH_DAEMON, "--listen", "tcp:notaport")
        self.assertNotEqual(code, 0)
        self.assertTrue(err.strip().splitlines()[-1].startswith("xcauth: listen 'tcp:notaport"))

    def test_missingSocketDirectory(self) -> None:
        """
        The README's Prosody example without /run/xcauth: the message names
        the missing directory (not a lock file).
        """
        missing = os.path.abspath(self.mktemp())
        code, out, err = self.start(
            XCAUTH_DAEMON, "--listen", f"prosody=unix:{missing}/prosody.sock:mode=660"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(
            err.strip().splitlines()[-1],
            f"xcauth: listen 'unix:{missing}/prosody.sock:mode=660': the directory "
            f"{missing} does not exist (create it, or with systemd set RuntimeDirectory=)",
        )

    def test_demoSecretRefused(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = writeConfig(os.path.join(directory, "x.conf"), "http://127.0.0.1:9/api",
                             secret="demo-secret-change-me")
        p = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "xcauth", "-c", config, "--listen",
             f"tcp:{freePort()}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=30, env=childEnv(), cwd=directory,
        )
        self.assertEqual(p.returncode, 1)
        self.assertTrue(p.stderr.strip().splitlines()[-1].startswith(
            "xcauth: secret is the demo secret of the sample config file: set secret="))


class DaemonModeTests(TestCase):
    def test_backgroundStartAndStop(self) -> None:
        """
        C{xcauth-daemon} without C{-n}: the command returns 0 once the daemon
        listens; the daemon serves, and SIGTERM stops it and removes its pid
        file.
        """
        directory = os.path.abspath(self.mktemp())
        nextcloud, config = startBackend(self, directory, type="ejabberd")
        port = freePort()
        pidfile = os.path.join(directory, "xcauth.pid")
        p = subprocess.run(
            [XCAUTH_DAEMON, f"--pidfile={pidfile}", f"--logfile={directory}/x.log", "xcauth",
             "-c", config, "--listen", f"tcp:{port}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=30, env=childEnv(), cwd=directory,
        )
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        with open(pidfile) as f:
            pid = int(f.read())

        def stop() -> None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        self.addCleanup(stop)
        s = connect(("127.0.0.1", port))
        s.sendall(ejabberdFrame("isuser:alice:example.org"))
        self.assertEqual(recvExactly(s, 4), TRUE)
        s.close()
        os.kill(pid, signal.SIGTERM)
        waitFor(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to end", timeout=20)
        self.assertFalse(os.path.exists(pidfile))
        with open(f"{directory}/x.log") as f:
            self.assertIn("xcauth stopped", f.read())
