"""
End-to-end tests of the C{dovecot} framing with Debian's real clients: the real
C{twistd xcauth} daemon against the fake Nextcloud, and

 - an isolated Postfix (its own configuration directory, queue directory and
   log under the test's temporary directory; one C{smtpd} on a free loopback
   port, started with C{postfix -c DIR start} and stopped in cleanup) with
   C{smtpd_sasl_type = dovecot}, driven by Python's C{smtplib}: AUTH PLAIN and
   AUTH LOGIN over the UNIX socket C{private/xcauth-auth} of its queue
   directory (the path a chrooted smtpd sees) and over C{inet:127.0.0.1:PORT};
 - an isolated Prosody (L{tests.e2e.prosody.ProsodyInstance}) with
   C{authentication = "dovecot"} (C{mod_auth_dovecot} of Debian's
   C{prosody-modules}), a real XMPP client (slixmpp, L{tests.e2e.xmpplogin})
   logging in over the UNIX socket and over TCP;
 - Debian's C{systemd-socket-activate} passing sockets named as the
   C{xcauth-dovecot*.socket} units name them.

Skipped only when Postfix (or Prosody with mod_auth_dovecot) is not installed,
or Postfix cannot be started for want of root.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.prosody import ProsodyInstance, prosodyAvailable
from tests.e2e.xmpplogin import EXIT_AUTHFAIL, EXIT_OK, runLoginDetailed
from tests.harness import (
    SECRET,
    Daemon,
    FakeNextcloud,
    freePort,
    startBackend,
    waitFor,
)
from xcauth.core.tokens import makeToken

POSTFIX = "/usr/sbin/postfix"
#: Where Debian's prosody-modules installs mod_auth_dovecot (Prosody's loader
#: finds C{mod_NAME/NAME/mod_NAME.lua} in its module directory).
MOD_AUTH_DOVECOT_DIR = "/usr/lib/prosody/modules/mod_auth_dovecot/auth_dovecot"
HOST = "example.org"
#: Passwords the tests send; none may appear in any log.
PASSWORDS = ["pa:ss w", "pässwörd", "wrong-Passw0rd", "bob's secret"]


#: The check by hand the README shows (password "pa:ss w").
CHECK_BY_HAND = (
    "printf 'VERSION\\t1\\t1\\nCPID\\t1\\nAUTH\\t1\\tPLAIN\\tservice=smtp\\tresp=%s\\n' "
    "\"$(printf '\\0alice@example.org\\0pa:ss w' | base64)\" "
    "| socat - UNIX-CONNECT:/run/xcauth-sockets/dovecot-auth"
)


def _scripted(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """
    Run a Postfix command with a pseudo-terminal as its standard error: only
    then does it print its messages (otherwise they go to syslog only).
    """
    return subprocess.run(
        ["script", "-qec", " ".join(argv), "/dev/null"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


class PostfixInstance:
    """
    An isolated Postfix: C{DIR/conf} (main.cf, master.cf with one smtpd on
    127.0.0.1:C{port} and the log service), C{DIR/queue}, C{DIR/data},
    C{DIR/maillog}.  The system's Postfix is never touched.
    """

    def __init__(self, directory: str, saslPath: str, port: int, chroot: bool = False) -> None:
        self.dir = os.path.abspath(directory)
        self.conf = os.path.join(self.dir, "conf")
        self.queue = os.path.join(self.dir, "queue")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "maillog")
        self.saslPath = saslPath
        self.port = port
        self.chroot = chroot
        self.started = False

    def write(self) -> None:
        for d in (self.conf, self.queue, self.data):
            os.makedirs(d, exist_ok=True)
        shutil.chown(self.data, "postfix")
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(
                "compatibility_level = 3.6\n"
                f"queue_directory = {self.queue}\n"
                f"data_directory = {self.data}\n"
                "mail_owner = postfix\n"
                "myhostname = mx.example.org\n"
                "mydestination =\n"
                "alias_maps =\n"
                "alias_database =\n"
                "local_recipient_maps =\n"
                "inet_interfaces = 127.0.0.1\n"
                "inet_protocols = ipv4\n"
                f"maillog_file = {self.log}\n"
                f"maillog_file_prefixes = {self.dir}\n"
                "smtpd_tls_security_level = none\n"
                # What the README documents.
                "smtpd_sasl_auth_enable = yes\n"
                "smtpd_sasl_type = dovecot\n"
                f"smtpd_sasl_path = {self.saslPath}\n"
            )
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(
                f"127.0.0.1:{self.port} inet n - {'y' if self.chroot else 'n'} - - smtpd\n"
                "postlog unix-dgram n - n - 1 postlogd\n"
                # smtpd looks up local recipients (and more) through these.
                "proxymap unix - - n - - proxymap\n"
                "anvil unix - - n - 1 anvil\n"
            )

    def start(self) -> None:
        self.write()
        result = _scripted([POSTFIX, "-c", self.conf, "start"])
        self.started = True
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}{self.logText()}")
        try:
            waitFor(self._listening, f"Postfix smtpd on 127.0.0.1:{self.port}")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.logText()}") from None

    def _listening(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                smtp.ehlo("probe")
            return True
        except (OSError, smtplib.SMTPException):
            return False

    def masterPid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """
        C{postfix stop}; the master and its children are killed if they have
        not gone after 20 s.
        """
        if not self.started:
            return
        self.started = False
        pid = self.masterPid()
        _scripted([POSTFIX, "-c", self.conf, "stop"])
        if pid is None:
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        try:
            waitFor(gone, "Postfix to stop", timeout=20)
        except RuntimeError:
            os.killpg(pid, signal.SIGKILL)

    def logText(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


class _PostfixBase:
    """
    The fake Nextcloud, xcauth with a C{dovecot} listener, and Postfix using
    it; subclasses (with L{TestCase}) say where the listener is.
    """

    #: Run smtpd chrooted in the queue directory, as Debian does.
    chroot = False

    def setUp(self) -> None:
        if not os.access(POSTFIX, os.X_OK):
            raise SkipTest(f"{POSTFIX} is not installed (Debian package postfix)")
        if os.geteuid() != 0:
            raise SkipTest("an isolated Postfix must be started as root")
        # Short: a UNIX socket path is limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="xcauth-dc-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        # Postfix's unprivileged processes must reach their directories.
        os.chmod(self.dir, 0o755)
        self.nextcloud, self.config = startBackend(self, os.path.join(self.dir, "nc"), deadline="2")
        self.secrets = list(PASSWORDS)
        self.postfix = PostfixInstance(self.dir, self.saslPath(), freePort(), self.chroot)
        private = os.path.join(self.postfix.queue, "private")
        os.makedirs(private, mode=0o700, exist_ok=True)
        shutil.chown(private, "postfix")
        self.daemon = Daemon(
            os.path.join(self.dir, "daemon"),
            ["--config-file", self.config, "--listen", self.listen()],
            waitOn=[self.address()],
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        self.addCleanup(self.postfix.stop)
        self.postfix.start()

    def saslPath(self) -> str:
        raise NotImplementedError

    def listen(self) -> str:
        raise NotImplementedError

    def address(self) -> tuple[str, int] | str:
        raise NotImplementedError

    def tearDown(self) -> None:
        for name, text in (("xcauth", self.daemon.output()), ("maillog", self.postfix.logText())):
            for secret in self.secrets:
                self.assertNotIn(secret, text, f"a password or token leaked into {name}")
            self.assertNotIn("Traceback", text, name)

    def authPlain(self, user: str, password: str) -> tuple[int, bytes]:
        self.secrets.append(_plain(user, password))
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            self.assertIn("PLAIN", smtp.esmtp_features.get("auth", ""))
            return smtp.docmd("AUTH", "PLAIN " + _plain(user, password))

    def authLogin(self, user: str, password: str, rounds: bool = False) -> tuple[int, bytes]:
        """
        AUTH LOGIN without an initial response: two 334 rounds (required with
        C{rounds}; otherwise an answer to AUTH LOGIN itself is returned).
        """
        encode = lambda s: base64.b64encode(s.encode()).decode("ascii")  # noqa: E731
        self.secrets.append(encode(password))
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            code, prompt = smtp.docmd("AUTH", "LOGIN")
            if code != 334 and not rounds:
                return code, prompt
            self.assertEqual(code, 334, prompt)
            self.assertEqual(base64.b64decode(prompt), b"Username:")
            code, prompt = smtp.docmd(encode(user))
            self.assertEqual((code, base64.b64decode(prompt)), (334, b"Password:"))
            return smtp.docmd(encode(password))

    def test_plainAndLogin(self) -> None:
        """
        235 for the right password and a token, 535 for a wrong one, with
        AUTH PLAIN and AUTH LOGIN; what the daemon logged.
        """
        self.assertEqual(self.authPlain("alice@example.org", "pa:ss w")[0], 235)
        self.assertEqual(self.authPlain("jörg@example.org", "pässwörd")[0], 235)
        self.assertEqual(self.authPlain("alice@example.org", "wrong-Passw0rd")[0], 535)
        self.assertEqual(self.authLogin("bob@example.org", "bob's secret")[0], 235)
        self.assertEqual(self.authLogin("bob@example.org", "wrong-Passw0rd")[0], 535)
        token = makeToken(SECRET.encode(), "alice", HOST, int(time.time()) + 3600)
        self.secrets.append(token)
        self.assertEqual(self.authPlain("alice@example.org", token)[0], 235)
        self.assertEqual(self.authLogin("alice@example.org", token)[0], 235)
        # No domain and no dovecot-default-domain: refused.
        self.assertEqual(self.authPlain("alice", "pa:ss w")[0], 535)
        log = self.daemon.output()
        self.assertIn("auth true for alice@example.org via dovecot", log)
        self.assertIn("auth true for jörg@example.org via dovecot", log)
        self.assertIn("auth false for bob@example.org via dovecot", log)
        # (235 also proves the OK line's user= was read: without it Postfix
        # fails the login, "missing Dovecot server OK username field".)
        # Postfix's log is written by postlogd, a little later.
        waitFor(lambda: "SASL LOGIN authentication failed" in self.postfix.logText(),
                "Postfix to log the failed LOGIN", timeout=10)

    def test_deadlineAndFaults(self) -> None:
        """
        A backend answer later than the deadline (2 s), a hanging backend and
        a broken one are temporary failures (454); a login right after is
        answered normally.
        """
        started = time.monotonic()
        code, message = self.authPlain("slow5000-alice@example.org", "pa:ss w")
        self.assertEqual(code, 454, message)
        self.assertLess(time.monotonic() - started, 4.5)
        self.assertEqual(self.authPlain("fault-hang@example.org", "pa:ss w")[0], 454)
        self.assertEqual(self.authPlain("fault-500html@example.org", "pa:ss w")[0], 454)
        self.assertEqual(self.authPlain("alice@example.org", "pa:ss w")[0], 235)
        self.assertIn("dovecot request got no answer within 2.0 s", self.daemon.output())

    def test_backendDown(self) -> None:
        """
        454 (temporary) while the backend is down, and logins work again once
        it is back, on the same smtpd.
        """
        self.assertEqual(self.authPlain("alice@example.org", "pa:ss w")[0], 235)
        self.nextcloud.stop()
        code, message = self.authPlain("alice@example.org", "pa:ss w")
        self.assertEqual(code, 454, message)
        # The next login on the same smtpd gets through to xcauth (both LOGIN
        # rounds): the reset connection does not fail it by itself.
        code, message = self.authLogin("bob@example.org", "bob's secret", rounds=True)
        self.assertEqual(code, 454, message)
        # Back, on the same port: the same smtpd processes log in again.
        port = self.nextcloud.port
        self.nextcloud = FakeNextcloud(os.path.join(self.dir, "nc2"), port=port)
        self.addCleanup(self.nextcloud.stop)
        self.nextcloud.start()
        results = [self.authPlain("alice@example.org", "pa:ss w")[0] for _ in range(3)]
        self.assertEqual(results, [235, 235, 235])


class PostfixUNIXTests(_PostfixBase, TestCase):
    """
    smtpd_sasl_path = private/xcauth-auth: the socket in Postfix's queue
    directory, given to group postfix; smtpd runs chrooted in the queue
    directory, as Debian's master.cf has it.
    """

    chroot = True

    def saslPath(self) -> str:
        return "private/xcauth-auth"

    def socketPath(self) -> str:
        return os.path.join(self.postfix.queue, "private", "xcauth-auth")

    def listen(self) -> str:
        return f"dovecot=unix:{self.socketPath()}:mode=660:group=postfix"

    def address(self) -> str:
        return self.socketPath()

    def test_socketGroup(self) -> None:
        import grp
        import stat

        st = os.stat(self.socketPath())
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertEqual(grp.getgrgid(st.st_gid).gr_name, "postfix")
        # The smtpd that answered the start-up probe (and waits for the next
        # client) is chrooted in the queue directory.
        self.assertEqual(self.authPlain("alice@example.org", "pa:ss w")[0], 235)
        waitFor(lambda: "postfix/smtpd[" in self.postfix.logText(), "smtpd's log lines", timeout=10)
        pids = set(re.findall(r"postfix/smtpd\[(\d+)\]", self.postfix.logText()))
        roots = set()
        for pid in pids:
            try:
                roots.add(os.readlink(f"/proc/{pid}/root"))
            except OSError:
                pass
        self.assertIn(self.postfix.queue, roots)


class PostfixTCPTests(_PostfixBase, TestCase):
    """
    smtpd_sasl_path = inet:127.0.0.1:PORT.
    """

    def saslPath(self) -> str:
        self.saslPort = freePort()
        return f"inet:127.0.0.1:{self.saslPort}"

    def listen(self) -> str:
        return f"dovecot=tcp:{self.saslPort}:interface=127.0.0.1"

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.saslPort)


def modAuthDovecotAvailable() -> str | None:
    """
    C{None} if Prosody with Debian's mod_auth_dovecot can run here, else why not.
    """
    reason = prosodyAvailable()
    if reason:
        return reason
    if not os.path.exists(os.path.join(MOD_AUTH_DOVECOT_DIR, "mod_auth_dovecot.lua")):
        return "mod_auth_dovecot is not installed (Debian package prosody-modules)"
    return None


class _ProsodyBase(TestCase):
    """
    The fake Nextcloud, xcauth with a C{dovecot} listener, and an isolated
    Prosody with C{authentication = "dovecot"}.
    """

    #: Extra Prosody settings of the VirtualHost.
    extraHost = ""
    #: Extra xcauth options (the config file).
    xcauthOptions: dict[str, str] = {}

    def setUp(self) -> None:
        reason = modAuthDovecotAvailable()
        if reason:
            raise SkipTest(reason)
        self.dir = tempfile.mkdtemp(prefix="xcauth-dp-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.nextcloud, self.config = startBackend(
            self, os.path.join(self.dir, "nc"), deadline="3", **self.xcauthOptions
        )
        self.secrets = list(PASSWORDS)
        listen, address, settings = self.where()
        self.daemon = Daemon(
            os.path.join(self.dir, "daemon"),
            ["--config-file", self.config, "--listen", listen],
            waitOn=[address],
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        # mod_auth_dovecot connects when it loads: xcauth must be up first.
        self.prosody = ProsodyInstance(
            os.path.join(self.dir, "prosody"),
            "unused",
            host=HOST,
            # Prosody finds mod_auth_dovecot/auth_dovecot/mod_auth_dovecot.lua
            # in its own module directory, where Debian installs it.
            extraGlobal='authentication = "dovecot"\n' + settings,
            extraHost=self.extraHost,
        )
        self.prosody.start()
        self.addCleanup(self.prosody.stop)

    def where(self) -> tuple[str, tuple[str, int] | str, str]:
        raise NotImplementedError

    def tearDown(self) -> None:
        for name, text in (
            ("xcauth", self.daemon.output()),
            ("prosody.log", self.prosody.logText()),
            ("prosody console", self.prosody.consoleText()),
        ):
            for secret in self.secrets:
                self.assertNotIn(secret, text, f"a password or token leaked into {name}")
            self.assertNotIn("Traceback", text, name)

    def login(self, user: str, password: str) -> tuple[int, str]:
        self.secrets.append(_plain(user, password))
        code, line = runLoginDetailed("127.0.0.1", self.prosody.port, f"{user}@{HOST}", password, 15)
        return int(code), str(line)

    def assertLogin(self, user: str, password: str, expected: int) -> None:
        code, line = self.login(user, password)
        self.assertEqual(code, expected, f"{user}: {line}")

    def checkLogins(self) -> None:
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        self.assertLogin("alice", "wrong-Passw0rd", EXIT_AUTHFAIL)
        self.assertLogin("jörg", "pässwörd", EXIT_OK)
        token = makeToken(SECRET.encode(), "alice", HOST, int(time.time()) + 3600)
        self.secrets.append(token)
        self.assertLogin("alice", token, EXIT_OK)
        log = self.daemon.output()
        self.assertIn(f"auth true for alice@{HOST} via dovecot", log)
        self.assertIn(f"auth false for alice@{HOST} via dovecot", log)
        self.assertIn(f"auth true for jörg@{HOST} via dovecot", log)


class ProsodyUNIXDefaultDomainTests(_ProsodyBase):
    """
    dovecot_auth_socket, and logins without a domain completed by
    dovecot-default-domain (mod_auth_dovecot sends the bare user name).
    """

    xcauthOptions = {"dovecot_default_domain": HOST}

    def where(self) -> tuple[str, tuple[str, int] | str, str]:
        path = os.path.join(self.dir, "auth.sock")
        return f"dovecot=unix:{path}:mode=660", path, f'dovecot_auth_socket = "{path}"\n'

    def test_logins(self) -> None:
        self.checkLogins()

    def test_backendDown(self) -> None:
        """
        With the backend down the login fails temporarily
        (temporary-auth-failure), and the connection stays usable.
        """
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        port = self.nextcloud.port
        self.nextcloud.stop()
        code, line = self.login("alice", "pa:ss w")
        self.assertEqual(code, EXIT_AUTHFAIL, line)
        self.assertIn("temporary-auth-failure", line)
        self.nextcloud = FakeNextcloud(os.path.join(self.dir, "nc2"), port=port)
        self.addCleanup(self.nextcloud.stop)
        self.nextcloud.start()
        self.assertLogin("alice", "pa:ss w", EXIT_OK)
        # One connection all along: mod_auth_dovecot reconnects only after an error.
        self.assertEqual(self.daemon.output().count("auth true for alice@"), 2)
        self.assertEqual(self.prosody.logText().count("sending handshake to dovecot"), 1)


class ProsodyTCPAppendHostTests(_ProsodyBase):
    """
    dovecot_auth_host/dovecot_auth_port, with auth_append_host = true: the
    module sends user@host, no default domain needed.
    """

    extraHost = "auth_append_host = true\n"

    def where(self) -> tuple[str, tuple[str, int] | str, str]:
        port = freePort()
        return (
            f"dovecot=tcp:{port}:interface=127.0.0.1",
            ("127.0.0.1", port),
            f'dovecot_auth_host = "127.0.0.1"\ndovecot_auth_port = "{port}"\n',
        )

    def test_logins(self) -> None:
        self.checkLogins()


class SystemdDovecotSocketsTests(TestCase):
    """
    C{--systemd-sockets} with the socket units' names (C{dovecot} on a UNIX
    socket, C{dovecot-tcp} on loopback), passed by Debian's real
    C{systemd-socket-activate}: both serve the dovecot framing.
    """

    def test_socketNames(self) -> None:
        from tests.e2e.test_systemd_e2e import ACTIVATE, SocketActivated
        from tests.harness import connect, recvAll

        if ACTIVATE is None:
            raise SkipTest("systemd-socket-activate not installed (apt-get install systemd)")
        directory = tempfile.mkdtemp(prefix="xcauth-ds-")
        self.addCleanup(shutil.rmtree, directory, True)
        nextcloud, config = startBackend(self, os.path.join(directory, "nc"))
        unixPath = os.path.join(directory, "dovecot-auth")
        tcp = ("127.0.0.1", freePort())
        p = SocketActivated(
            directory,
            [(unixPath, "dovecot"), (f"{tcp[0]}:{tcp[1]}", "dovecot-tcp")],
            ["-c", config, "--systemd-sockets"],
        )
        self.addCleanup(p.stop)
        p.start()
        waitFor(lambda: p.output().count("Listening on") == 2, "systemd-socket-activate listening",
                process=p.process)
        for address in (unixPath, tcp):
            with connect(address, 30) as s:
                s.sendall(b"VERSION\t1\t1\nCPID\t7\nAUTH\t1\tPLAIN\tservice=smtp\tresp="
                          + _plain("alice@example.org", "pa:ss w").encode() + b"\n")
                # Like socat or nc after a pasted session: the requests are
                # still answered, then the server closes.
                s.shutdown(socket.SHUT_WR)
                lines = recvAll(s).split(b"\n")
                self.assertEqual(lines[0], b"VERSION\t1\t2")
                self.assertIn(b"DONE", lines)
                self.assertEqual(lines[-2:], [b"OK\t1\tuser=alice@example.org", b""])
        # The README's check by hand, with Debian's socat.
        if shutil.which("socat"):
            command = CHECK_BY_HAND.replace("/run/xcauth-sockets/dovecot-auth", unixPath)
            result = subprocess.run(["sh", "-c", command], capture_output=True, timeout=30)
            self.assertTrue(
                result.stdout.endswith(b"DONE\nOK\t1\tuser=alice@example.org\n"), result
            )
        log = p.daemonOutput()
        self.assertIn("listening: dovecot=systemd:domain=UNIX:name=dovecot", log)
        self.assertIn("listening: dovecot=systemd:domain=INET:name=dovecot-tcp", log)
        self.assertNotIn("pa:ss w", log)
