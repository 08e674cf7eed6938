"""
End-to-end proof for the Prosody module (issue 6): Debian's real Prosody 0.12
(an isolated instance, L{tests.e2e.prosody.ProsodyInstance}) with
C{prosody/mod_auth_xcauth.lua}, the real C{twistd xcauth} daemon speaking the
C{prosody} framing, the fake Nextcloud, and a real XMPP client (slixmpp,
L{tests.e2e.xmpplogin}).

What is shown:
  - logins with the right password (one containing C{:}, one non-ASCII), a
    token, and a refusal of a wrong password, over TCP and over a UNIX socket;
  - a slow backend answer (3 s) does not hold up another client's login: that
    login completes while the slow one is still waiting for its answer;
  - logins work again after the daemon is restarted (and fail promptly while
    it is down);
  - C{xcauth_timeout}: a login whose answer comes too late is refused, and the
    late answer is discarded instead of being given to the next request;
  - no password appears in Prosody's log or in the daemon's log.

Skipped only when L{tests.e2e.prosody.prosodyAvailable} says Prosody cannot run here.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.prosody import ProsodyInstance, prosodyAvailable
from tests.e2e.xmpplogin import EXIT_AUTHFAIL, EXIT_OK, commandLine, runLoginDetailed
from tests.harness import (
    REPO,
    SECRET,
    Daemon,
    FakeNextcloud,
    childEnv,
    freePort,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken

HOST = "example.org"

#: Every password used below; none may appear in any log.
PASSWORDS = [
    "good_password",
    "pa:ss w",
    "bob's secret",
    "pässwörd",
    "wrong:password",
]


def _plainBlobs(user: str, password: str) -> list[str]:
    """
    The SASL PLAIN payload for C{user}/C{password}, base64-encoded as a client
    sends it (a debug log that dumped the <auth/> element would show this).
    """
    raw = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
    return [base64.b64encode(raw).decode("ascii")]


class _ProsodyE2EBase(TestCase):
    """
    Fake Nextcloud + real daemon + isolated Prosody, started per test.

    Subclasses set L{unixSocket}: listen on a UNIX socket instead of TCP.  (No
    tests here: trial runs nothing of this class itself.)
    """

    unixSocket = False
    #: Run against the fake stock Nextcloud (backend nextcloud) instead of JSXC.
    stock = False
    #: xcauth_timeout and xcauth_connections of the Prosody started in setUp.
    prosodyTimeout = 5
    prosodyConnections: int | None = None

    def setUp(self) -> None:
        reason = prosodyAvailable()
        if reason:
            raise SkipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.secrets: list[str] = list(PASSWORDS)
        self.nextcloud = FakeNextcloud(os.path.join(self.dir, "nextcloud"), stock=self.stock)
        self.nextcloud.start()
        self.addCleanup(self.nextcloud.stop)
        # deadline 4.5 s and a backend limit of 4 s: the daemon still answers a
        # 3 s backend call truthfully, before Prosody's default 5 s timeout.
        self.config = writeConfig(
            os.path.join(self.dir, "xcauth.conf"), self.nextcloud.url, deadline="4.5",
            timeout="2,4",
            **(self.nextcloud.stockOptions() if self.stock else {}),
        )
        if self.unixSocket:
            # Short path: AF_UNIX paths are limited to ~107 bytes.
            sockDir = self.dir
            if len(os.path.join(sockDir, "xcauth.sock")) > 100:
                import tempfile

                sockDir = tempfile.mkdtemp(prefix="xcp")
                self.addCleanup(os.rmdir, sockDir)
            self.address: tuple[str, int] | str = os.path.join(sockDir, "xcauth.sock")
            self.addCleanup(self._unlinkSocket)
            self.listen = f"prosody=unix:{self.address}"
            self.xcauthSocket = self.address
        else:
            port = freePort()
            self.address = ("127.0.0.1", port)
            self.listen = f"prosody=tcp:{port}:interface=127.0.0.1"
            self.xcauthSocket = f"127.0.0.1:{port}"
        self.daemons: list[Daemon] = []
        self.daemon = self.startDaemon()
        self.prosody = self.startProsody(self.prosodyTimeout, self.prosodyConnections)

    def _unlinkSocket(self) -> None:
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def startDaemon(self) -> Daemon:
        n = len(self.daemons) + 1
        daemon = Daemon(
            os.path.join(self.dir, f"daemon{n}"),
            ["--config-file", self.config, "--listen", self.listen],
            waitOn=[self.address],
        )
        self.daemons.append(daemon)
        daemon.start()
        self.addCleanup(daemon.stop)
        return daemon

    def startProsody(
        self, timeout: float, connections: int | None = None
    ) -> ProsodyInstance:
        prosody = ProsodyInstance(
            os.path.join(self.dir, "prosody"),
            self.xcauthSocket,
            host=HOST,
            timeout=timeout,
            connections=connections,
        )
        prosody.start()
        self.addCleanup(prosody.stop)
        return prosody

    def tearDown(self) -> None:
        logs = {
            "prosody.log": self.prosody.logText(),
            "prosody console": self.prosody.consoleText(),
        }
        for daemon in self.daemons:
            logs[daemon.logPath] = daemon.output()
        for name, text in logs.items():
            for secret in self.secrets:
                self.assertNotIn(secret, text, f"a password/token leaked into {name}")
            self.assertNotIn("Traceback", text, f"a traceback in {name}")
        self.assertNotIn(
            "mod_auth_xcauth.lua:",
            logs["prosody.log"],
            "a Lua error (or a traceback from the blocking fallback) in mod_auth_xcauth",
        )

    # -- helpers ---------------------------------------------------------
    def login(self, user: str, password: str, timeout: float = 10.0) -> tuple[int, str]:
        """
        One in-process slixmpp login (blocks this thread; the daemon and
        Prosody are separate processes).
        """
        self.secrets.extend(_plainBlobs(user, password))
        code, line = runLoginDetailed(
            "127.0.0.1", self.prosody.port, f"{user}@{HOST}", password, timeout
        )
        return int(code), str(line)

    def assertLogin(self, user: str, password: str, expected: int) -> str:
        code, line = self.login(user, password)
        self.assertEqual(code, expected, f"{user}: {line}")
        return line

    def daemonLog(self) -> str:
        return "".join(d.output() for d in self.daemons)

    def checkLogins(self) -> None:
        self.assertLogin("alice", "pa:ss w", EXIT_OK)  # ':' in the password
        self.assertLogin("alice", "wrong:password", EXIT_AUTHFAIL)
        self.assertLogin("jörg", "pässwörd", EXIT_OK)
        self.assertLogin("bob", "bob's secret", EXIT_OK)
        self.assertLogin("nobody", "good_password", EXIT_AUTHFAIL)
        token = makeToken(SECRET.encode(), "alice", HOST, int(time.time()) + 3600)
        self.secrets.append(token)
        self.assertLogin("alice", token, EXIT_OK)
        # A token for another user does not open alice's account.
        other = makeToken(SECRET.encode(), "bob", HOST, int(time.time()) + 3600)
        self.secrets.append(other)
        self.assertLogin("alice", other, EXIT_AUTHFAIL)
        log = self.daemonLog()
        self.assertIn(f"auth true for alice@{HOST} via prosody", log)
        self.assertIn(f"auth false for alice@{HOST} via prosody", log)
        self.assertIn(f"auth true for jörg@{HOST} via prosody", log)

    def checkRestart(self) -> None:
        """
        Stop the daemon, check a login fails promptly while it is down, start a
        new daemon on the same address, and log in again (bounded retries).
        """
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        self.daemon.stop()
        if self.unixSocket:
            self._unlinkSocket()  # in case the old daemon left it behind
        # Down: refused (not-authorized), not hung until the client gives up.
        start = time.monotonic()
        code, line = self.login("alice", "pa:ss w", timeout=15)
        downTime = time.monotonic() - start
        self.assertEqual(code, EXIT_AUTHFAIL, line)
        self.assertLess(downTime, 10, "a login with the daemon down took too long")

        logBefore = len(self.prosody.logText())
        restarted = time.monotonic()
        self.daemon = self.startDaemon()
        # The module reconnects by itself (backoff timer), without a login
        # asking for a connection.  (A UNIX connect completes at once, so only
        # TCP logs "established".)
        marker = "Opening connection" if self.unixSocket else "established"
        waitFor(
            lambda: marker in self.prosody.logText()[logBefore:],
            "mod_auth_xcauth to reconnect to the restarted daemon",
            timeout=15,
        )
        reconnected = time.monotonic() - restarted
        deadline = time.monotonic() + 10
        attempts = []
        while True:
            code, line = self.login("alice", "pa:ss w")
            attempts.append(line)
            if code == EXIT_OK or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual(
            code,
            EXIT_OK,
            f"no login after the restart in {len(attempts)}"
            f" attempts; the last said: {line}",
        )
        self.assertIn(f"auth true for alice@{HOST} via prosody", self.daemon.output())
        # ... and it stays working.
        self.assertLogin("jörg", "pässwörd", EXIT_OK)
        self.assertLogin("alice", "wrong:password", EXIT_AUTHFAIL)
        print(
            f"\n    daemon down: refused in {downTime:.2f}s; reconnected"
            f" {reconnected:.2f}s after the restart began;"
            f" {len(attempts)} attempt(s) until a login succeeded"
        )


class ProsodyTCPTests(_ProsodyE2EBase):
    """
    Module and daemon over TCP on 127.0.0.1.
    """

    def test_logins(self) -> None:
        """
        Right password (with ':'), wrong password, unknown user, non-ASCII
        user and password, a token, a token of another user.
        """
        self.checkLogins()

    def test_slowAnswerDoesNotBlockOthers(self) -> None:
        """
        While Prosody waits 3 s for the backend's answer about slow3000-bob,
        alice logs in: her login completes before bob's answer exists (ordering,
        not timing), and then bob's login succeeds too (3 s < the 5 s timeout).
        """
        self.secrets.extend(_plainBlobs("slow3000-bob", "bob's secret"))
        # Warm up: the module's first connection is open and used.
        self.assertLogin("alice", "pa:ss w", EXIT_OK)

        slow = subprocess.Popen(
            commandLine(
                "127.0.0.1",
                self.prosody.port,
                f"slow3000-bob@{HOST}",
                "bob's secret",
                timeout=15,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=childEnv(),
            cwd=REPO,
        )

        def reap() -> None:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
            if slow.stdout is not None:
                slow.stdout.close()

        self.addCleanup(reap)
        slowStart = time.monotonic()
        # Wait until the slow request is in flight: Prosody asked the daemon.
        waitFor(
            lambda: f"Checking password of slow3000-bob@{HOST}" in self.prosody.logText(),
            "the slow login to reach mod_auth_xcauth",
            timeout=15,
            process=slow,
        )
        inFlight = time.monotonic()

        start = time.monotonic()
        code, line = self.login("alice", "pa:ss w")
        elapsed = time.monotonic() - start

        # Ordering proof: alice is in, while bob's answer has not even been
        # produced by the daemon yet and bob's client is still waiting.
        self.assertEqual(code, EXIT_OK, line)
        self.assertIsNone(slow.poll(), "the slow login finished before alice's")
        self.assertNotIn(
            f"for slow3000-bob@{HOST}",
            self.daemonLog(),
            "the daemon answered bob before alice's login completed",
        )
        # Wide margin: alice's whole login (TCP, stream, SASL, bind, session)
        # took far less than the 3 s bob waits.
        self.assertLess(elapsed, 2.0)

        out, _ = slow.communicate(timeout=20)
        slowTotal = time.monotonic() - slowStart
        self.assertEqual(slow.returncode, EXIT_OK, out.decode("utf-8", "replace"))
        self.assertGreater(slowTotal, 3.0)
        self.assertIn(f"auth true for slow3000-bob@{HOST} via prosody", self.daemonLog())
        print(
            f"\n    alice logged in in {elapsed * 1000:.0f} ms,"
            f" {inFlight - slowStart:.2f}s after the slow login started;"
            f" the slow login took {slowTotal:.2f}s"
        )

    def test_userListing(self) -> None:
        """
        Users live in Nextcloud and cannot be listed: Prosody's admin shell
        shows an empty list instead of failing.
        """
        r = subprocess.run(
            ["prosodyctl", "--config", self.prosody.configPath, "shell", "user", "list", HOST],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("Showing all 0 users", r.stdout)
        self.assertNotIn("attempt to call", r.stdout + r.stderr)

    def test_restart(self) -> None:
        """
        Logins work again after the daemon restarts on the same port.
        """
        self.checkRestart()


class ProsodyUNIXTests(_ProsodyE2EBase):
    """
    Module and daemon over a UNIX socket.
    """

    unixSocket = True

    def test_logins(self) -> None:
        self.checkLogins()

    def test_restart(self) -> None:
        self.checkRestart()


class ProsodyShortTimeoutTests(_ProsodyE2EBase):
    """
    xcauth_timeout = 1 with a 3 s backend answer: refused at the timeout; the
    module then drops the connection that has not answered for 2 timeouts, and
    later logins still work.
    """

    prosodyTimeout = 1

    def test_timeout(self) -> None:
        self.secrets.extend(_plainBlobs("slow3000-bob", "bob's secret"))
        start = time.monotonic()
        code, line = self.login("slow3000-bob", "bob's secret")
        elapsed = time.monotonic() - start
        # The backend would have said yes after 3 s: a refusal is the timeout.
        self.assertEqual(code, EXIT_AUTHFAIL, line)
        self.assertIn("not-authorized", line)
        self.assertLess(elapsed, 5.0)  # "within a few seconds"; exit 1 is the proof
        self.assertIn("did not answer a auth request within 1s", self.prosody.logText())
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        self.assertLogin("alice", "wrong:password", EXIT_AUTHFAIL)
        # After the late answer has come (or its connection was dropped), all fine.
        waitFor(
            lambda: f"for slow3000-bob@{HOST} via prosody" in self.daemonLog(),
            "the daemon's late answer to slow3000-bob",
            timeout=10,
        )
        # Meanwhile (at 2 x xcauth_timeout) the module gave up on the connection
        # that owed that answer.
        self.assertIn(
            "has not answered for 2s; dropping connection 1", self.prosody.logText()
        )
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        self.assertLogin("alice", "wrong:password", EXIT_AUTHFAIL)
        print(f"\n    slow3000-bob refused after {elapsed:.2f}s")


class ProsodyLateAnswerTests(_ProsodyE2EBase):
    """
    One connection (xcauth_connections = 1), xcauth_timeout = 2, a 3 s backend
    answer: the next request is pipelined behind the timed-out one, and the late
    "1" for bob is discarded, not taken as the answer to alice's wrong password.
    """

    prosodyTimeout = 2
    prosodyConnections = 1

    def test_lateAnswerDiscarded(self) -> None:
        self.secrets.extend(_plainBlobs("slow3000-bob", "bob's secret"))
        self.assertLogin("alice", "pa:ss w", EXIT_OK)  # the one connection is up
        code, line = self.login("slow3000-bob", "bob's secret")
        self.assertEqual(code, EXIT_AUTHFAIL, line)
        logBefore = len(self.prosody.logText())
        # Bob's "1" arrives ~1 s from now, on the connection this request queues on.
        # Alice's own timeout (2 s) leaves room for it to be answered after that.
        code, line = self.login("alice", "wrong:password")
        self.assertEqual(code, EXIT_AUTHFAIL, line)
        log = self.prosody.logText()[logBefore:]
        checking = log.find(f"Checking password of alice@{HOST}")
        discarded = log.find(
            "Discarding a late answer to a timed-out request (connection 1)"
        )
        answered = log.find("xcauth auth request on connection 1: no after")
        self.assertNotEqual(checking, -1, log)
        self.assertNotEqual(discarded, -1, log)
        self.assertNotEqual(answered, -1, log)
        # Alice's request was queued before bob's late answer came, and got its
        # own answer after it.
        self.assertLess(checking, discarded, log)
        self.assertLess(discarded, answered, log)
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
