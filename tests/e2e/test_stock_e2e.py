"""
End-to-end tests of the stock Nextcloud backend: the real C{twistd xcauth}
against the fake stock Nextcloud (C{python -m xcauth.testing.fakenextcloud
--stock}) as child processes, and each real client the suite drives
(ejabberd, Prosody, testsaslauthd, postmap) once over this backend.
"""

from __future__ import annotations

import os
import subprocess
import time

from twisted.trial.unittest import TestCase

import tests.e2e.test_ejabberd_e2e as ejabberd_e2e
import tests.e2e.test_mail_e2e as mail_e2e
import tests.e2e.test_prosody_e2e as prosody_e2e
from tests.harness import (
    SECRET,
    TWISTD,
    Daemon,
    childEnv,
    connect,
    freePort,
    recvLine,
    serveOn,
    startBackend,
    writeConfig,
)
from xcauth.core.tokens import makeToken
from xcauth.testing.fakestock import (
    PLAIN_SERVICE_PASSWORD,
    PLAIN_SERVICE_USER,
    SERVICE_PASSWORD,
)


def ask(address: tuple[str, int], *lines: str) -> list[bytes]:
    """
    Send C{lines} on one connection of the line framing; the answers.
    """
    with connect(address, timeout=20) as s:
        answers = []
        for line in lines:
            s.sendall(line.encode("utf-8") + b"\n")
            answers.append(recvLine(s))
        return answers


class DaemonTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.port = freePort()
        self.nextcloud, self.config = startBackend(
            self, os.path.join(self.dir, "nc"), stock=True, deadline="6",
            service_password_file=self.passwordFile(SERVICE_PASSWORD),
            service_password=None,
        )

    def passwordFile(self, password: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "service-password")
        with open(path, "w") as f:
            f.write(password + "\n")
        return path

    def startDaemon(self, config: str) -> Daemon:
        daemon = serveOn(self, os.path.join(self.dir, "daemon"), config, "generic")
        self.port = daemon.port
        return daemon

    def test_answers(self) -> None:
        """
        Passwords, an app password, a two-factor user's real password, a
        disabled user, isuser, a token and the shared roster over the real
        daemon; no secret in its log; the allow-list warning is logged.
        """
        daemon = self.startDaemon(self.config)
        token = makeToken(SECRET.encode(), "bob", "example.org", int(time.time()) + 300)
        answers = ask(
            ("127.0.0.1", self.port),
            "auth:alice:example.org:pa:ss w",
            "auth:alice:example.org:wrong",
            "auth:carol:example.org:Carol-App-Passw0rd",
            "auth:carol:example.org:carol-real",
            "auth:dave:example.org:dave-pass",
            "isuser:alice:example.org",
            "isuser:nobody:example.org",
            f"auth:bob:example.org:{token}",
            "roster:alice:example.org",
        )
        self.assertEqual(answers[:8], [b"1", b"0", b"1", b"0", b"0", b"1", b"0", b"1"])
        self.assertIn(b'"bob":{"name":"Bob Builder","groups":["Everyone"]}', answers[8])
        log = daemon.output()
        for secret in ("pa:ss w", "Carol-App-Passw0rd", "carol-real", SERVICE_PASSWORD, token):
            self.assertNotIn(secret, log)
        self.assertIn("not on the brute-force allow-list", log)
        self.assertIn("carol", log.split("needs an app password")[0].rsplit("\n", 1)[-1])

    def test_unprivilegedServiceAccount(self) -> None:
        """
        With a service account that cannot see other users, the daemon
        refuses to start: one line saying what to fix, exit status 1.
        """
        config = writeConfig(
            os.path.join(self.dir, "plain.conf"), self.nextcloud.url,
            backend="nextcloud", service_user=PLAIN_SERVICE_USER,
            service_password=PLAIN_SERVICE_PASSWORD, domain="example.org",
        )
        log = os.path.join(self.dir, "refused.log")
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", f"--logfile={log}", "xcauth", "-c", config,
             "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60, env=childEnv(),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("xcauth: the service account 'plain' cannot "
                                            "see other users"), lines[0])
        self.assertNotIn(PLAIN_SERVICE_PASSWORD, result.stderr)


def _coveredElsewhere(self: TestCase) -> None:
    """
    Covered by the JSXC variant of this class.
    """


_coveredElsewhere.skip = "covered by the JSXC variant"  # type: ignore[attr-defined]


class StockSocatExtauthTests(ejabberd_e2e.SocatExtauthTests):
    """
    ejabberd through socat to the daemon, over the stock backend (passwords
    and tokens).
    """

    stock = True


class StockProsodyTests(prosody_e2e._ProsodyE2EBase):
    """
    Prosody's module and the daemon over TCP, over the stock backend.
    """

    stock = True

    def test_logins(self) -> None:
        """
        Right and wrong passwords, unknown user, non-ASCII, tokens.
        """
        self.checkLogins()


class StockSaslauthdTests(mail_e2e.SaslauthdTests):
    """
    Debian's testsaslauthd over the stock backend.
    """

    stock = True
    test_socketModeAndGroup = _coveredElsewhere
    test_tcpFifthFieldAndSecondRequest = _coveredElsewhere
    test_staleSocketAfterCrash = _coveredElsewhere
    test_cleanStopRemovesSocket = _coveredElsewhere


class StockPostfixTests(mail_e2e.MailTestCase):
    """
    postmap -q over the stock backend.
    """

    stock = True
    skip = mail_e2e.PostfixTests.skip
    listenArgs = mail_e2e.PostfixTests.listenArgs
    postmap = mail_e2e.PostfixTests.postmap
    test_postmap = mail_e2e.PostfixTests.test_postmap
