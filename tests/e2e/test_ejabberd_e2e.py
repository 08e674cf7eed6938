"""
End to end with Debian's real ejabberd (an isolated instance, see
L{tests.e2e.ejabberd}) configured with C{auth_method: external} and
C{auth_use_cache: false}, and a real XMPP client (slixmpp, L{tests.e2e.xmpplogin})
logging in over SASL PLAIN.

Two deployments:

- C{extauth_program} is the C{xcauth} command itself, serving ejabberd's binary
  framing on its stdin/stdout;
- C{extauth_program} is C{socat STDIO TCP:127.0.0.1:PORT}, relaying to the
  running C{twistd xcauth} daemon (started before ejabberd, which spawns its
  extauth programs at boot).

In both, the right password (one with C{:} and a space, one with non-ASCII
letters) logs in, a wrong one is refused, and a valid time-limited token logs in
while an expired one does not.  A refusal must come from xcauth's answer, not
from a broken extauth program: ejabberd's log must hold no extauth errors.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time

from twisted.trial import unittest

from tests.e2e.ejabberd import EjabberdInstance, ejabberdAvailable
from tests.e2e.xmpplogin import runLoginDetailed
from tests.harness import (
    SECRET,
    XCAUTH,
    Daemon,
    freePort,
    startBackend,
)
from xcauth.core.tokens import makeToken

LOGIN_TIMEOUT = 20.0
OK, AUTHFAIL = 0, 1
WRONG = "Wr0ng-pass word"


def _skipReason() -> str | None:
    reason = ejabberdAvailable()
    if reason is not None:
        return reason
    try:
        import slixmpp  # noqa: F401
    except ImportError:
        return "slixmpp not installed (pip install -e '.[test]')"
    return None


class EjabberdExtauthMixin:
    """
    One deployment: L{extauthProgram} gives ejabberd's C{extauth_program}.
    """

    skip = _skipReason()
    #: Run against the fake stock Nextcloud (backend nextcloud) instead of JSXC.
    stock = False

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.nextcloud, self.config = startBackend(
            self,
            self.directory,
            stock=self.stock,
            type="ejabberd",
            deadline="15",
            timeout="10,15",
        )
        program = self.extauthProgram()
        self.ej = EjabberdInstance(os.path.join(self.directory, "ejabberd"), program)
        self.addCleanup(self.ej.stop)
        self.ej.start()

    def extauthProgram(self) -> str:
        raise NotImplementedError()

    def xcauthLogs(self) -> str:
        """
        Everything xcauth logged.
        """
        raise NotImplementedError()

    def login(self, user: str, password: str) -> int:
        code, message = runLoginDetailed(
            "127.0.0.1", self.ej.port, f"{user}@{self.ej.host}", password, LOGIN_TIMEOUT
        )
        self.assertIn(code, (OK, AUTHFAIL), f"{message}\n{self.ej.tail()}")
        return code

    def assertLogsIn(self, user: str, password: str) -> None:
        self.assertEqual(self.login(user, password), OK)
        self.assertEqual(self.ej.extauthErrors(), [])

    def assertRefused(self, user: str, password: str) -> None:
        self.assertEqual(self.login(user, password), AUTHFAIL)
        # Refused by xcauth's answer, not because the program failed.
        self.assertEqual(self.ej.extauthErrors(), [])

    def assertNoSecretsLogged(self, *secrets: str) -> None:
        logs = self.xcauthLogs() + self.ej.logText() + self.ej.logText("erl.out")
        for secret in (*secrets, SECRET):
            self.assertNotIn(secret, logs)

    def test_passwords(self) -> None:
        """
        Right passwords log in, a wrong one is refused.
        """
        self.assertLogsIn("alice", "pa:ss w")
        self.assertRefused("alice", WRONG)
        self.assertLogsIn("admin", "good_password")
        self.assertLogsIn("jörg", "pässwörd")
        self.assertRefused("nobody", "good_password")
        self.assertIn("auth true for alice@example.org", self.xcauthLogs())
        self.assertNoSecretsLogged("pa:ss w", WRONG, "good_password", "pässwörd")

    def test_tokens(self) -> None:
        """
        A valid time-limited token logs in; an expired one, or one made for
        another user, does not.
        """
        now = int(time.time())
        valid = makeToken(SECRET.encode(), "alice", self.ej.host, now + 3600)
        expired = makeToken(SECRET.encode(), "alice", self.ej.host, now - 60)
        self.assertLogsIn("alice", valid)
        self.assertRefused("alice", expired)
        self.assertRefused("admin", valid)
        self.assertNoSecretsLogged(valid, expired)


class StdioExtauthTests(EjabberdExtauthMixin, unittest.TestCase):
    """
    C{extauth_program: "xcauth -c CONFIG -t ejabberd"}: spawned by ejabberd.
    """

    def extauthProgram(self) -> str:
        return " ".join(
            shlex.quote(a) for a in [XCAUTH, "-c", self.config, "-t", "ejabberd"]
        )

    def xcauthLogs(self) -> str:
        # The program's standard error is the VM's.
        return self.ej.logText("erl.out")


class SocatExtauthTests(EjabberdExtauthMixin, unittest.TestCase):
    """
    C{extauth_program: "socat STDIO TCP:127.0.0.1:PORT"} relaying to the daemon.
    """

    skip = _skipReason() or (
        None if shutil.which("socat") else "socat not installed (apt-get install socat)"
    )

    def extauthProgram(self) -> str:
        port = freePort()
        self.daemon = Daemon(
            os.path.join(self.directory, "daemon"),
            ["-c", self.config, "--listen", f"ejabberd=tcp:{port}:interface=127.0.0.1"],
            waitOn=[("127.0.0.1", port)],
        )
        self.addCleanup(self.daemon.stop)
        # Before ejabberd: it starts its extauth programs at boot.
        self.daemon.start()
        return f"{shutil.which('socat')} STDIO TCP:127.0.0.1:{port}"

    def xcauthLogs(self) -> str:
        return self.daemon.output()
