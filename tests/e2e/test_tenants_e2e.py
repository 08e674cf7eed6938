"""
End-to-end tests of the identity an answer is given for, with the real
C{twistd xcauth} and the fake Nextclouds on loopback: several tenants over
every framing, the stock backend's e-mail logins, a deleted user, the roster
sync's tenant, and the TLS listener with client certificates (socat's OPENSSL
client).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

from tests.e2e.test_admin_cli import xcauth
from tests.e2e.test_mail_e2e import POSTMAP, postmap
from tests.harness import (
    SECRET,
    Daemon,
    FakeNextcloud,
    connect,
    ejabberdFrame,
    freePort,
    recvExactly,
    recvLine,
    startBackend,
    waitFor,
    writeConfig,
)
from xcauth.testing.fakenextcloud import DEMO_USERS

SOCAT = shutil.which("socat")

#: The framings a daemon of these tests serves, each on a port of its own.
FRAMINGS = ("prosody", "ejabberd", "saslauthd", "postfix", "dovecot")


def counted(data: str) -> bytes:
    raw = data.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def lineAsk(port: int, line: str) -> bytes:
    with connect(("127.0.0.1", port)) as s:
        s.sendall(line.encode("utf-8") + b"\n")
        return recvLine(s)


def ejabberdAsk(port: int, text: str) -> bytes:
    with connect(("127.0.0.1", port)) as s:
        s.sendall(ejabberdFrame(text))
        return recvExactly(s, 4)


def saslAsk(port: int, login: str, password: str, realm: str = "") -> bytes:
    with connect(("127.0.0.1", port)) as s:
        s.sendall(counted(login) + counted(password) + counted("smtp") + counted(realm))
        (length,) = struct.unpack(">H", recvExactly(s, 2))
        return recvExactly(s, length)


def dovecotAsk(port: int, login: str, password: str) -> bytes:
    """
    One PLAIN login over the Dovecot protocol: the OK or FAIL line.
    """
    with connect(("127.0.0.1", port)) as s:
        response = base64.b64encode(f"\0{login}\0{password}".encode())
        s.sendall(b"VERSION\t1\t1\nCPID\t4242\nAUTH\t1\tPLAIN\tservice=xmpp\tresp="
                  + response + b"\n")
        while True:
            line = recvLine(s)
            if not line or line.startswith((b"OK\t", b"FAIL\t")):
                return line


def startDaemon(test: TestCase, directory: str, config: str, *extra: str) -> dict[str, int]:
    """
    The real daemon with C{config}, serving every framing of L{FRAMINGS} on a
    port of its own; returns the ports by framing.
    """
    ports = {framing: freePort() for framing in FRAMINGS}
    listen: list[str] = []
    for framing, port in ports.items():
        listen += ["--listen", f"{framing}=tcp:{port}:interface=127.0.0.1"]
    daemon = Daemon(directory, ["--config-file", config, *listen, *extra],
                    waitOn=[("127.0.0.1", p) for p in ports.values()])
    test.addCleanup(daemon.stop)
    daemon.start()
    test.daemon = daemon  # type: ignore[attr-defined]
    return ports


class MultiTenantTests(TestCase):
    """
    A stock Nextcloud serves example.org (listed with domain=); other.example
    has its own JSXC Nextcloud (a row of the domains table).  bob exists in
    both, with different passwords.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.db = os.path.join(self.dir, "state.sqlite3")
        os.makedirs(self.dir)
        other = FakeNextcloud(os.path.join(self.dir, "other"))
        self.addCleanup(other.stop)
        other.start()
        # The row written as an operator might type it: any spelling serves.
        r = xcauth("domains", "add", "Other.Example", "--url", other.url,
                   "--secret", SECRET, "--db", self.db)
        self.assertEqual(r.returncode, 0, r.stderr)
        _, config = startBackend(self, os.path.join(self.dir, "global"), stock=True,
                                 db=self.db, domain="example.org")
        self.ports = startDaemon(self, os.path.join(self.dir, "daemon"), config)

    def auth(self, user: str, domain: str, password: str) -> dict[str, bytes]:
        """
        The same login over every framing that carries a password.
        """
        p = self.ports
        return {
            "prosody": lineAsk(p["prosody"], f"auth:{user}:{domain}:{password}"),
            "ejabberd": ejabberdAsk(p["ejabberd"], f"auth:{user}:{domain}:{password}"),
            "saslauthd": saslAsk(p["saslauthd"], user, password, domain),
            "saslauthd@": saslAsk(p["saslauthd"], f"{user}@{domain}", password),
            "dovecot": dovecotAsk(p["dovecot"], f"{user}@{domain}", password),
        }

    def assertAllNo(self, answers: dict[str, bytes]) -> None:
        self.assertEqual(answers["prosody"], b"0")
        self.assertEqual(answers["ejabberd"], b"\x00\x02\x00\x00")
        self.assertTrue(answers["saslauthd"].startswith(b"NO"), answers)
        self.assertTrue(answers["saslauthd@"].startswith(b"NO"), answers)
        self.assertTrue(answers["dovecot"].startswith(b"FAIL\t1"), answers)

    def assertAllYes(self, answers: dict[str, bytes]) -> None:
        self.assertEqual(answers["prosody"], b"1")
        self.assertEqual(answers["ejabberd"], b"\x00\x02\x00\x01")
        self.assertEqual(answers["saslauthd"], b"OK success")
        self.assertEqual(answers["saslauthd@"], b"OK success")
        self.assertTrue(answers["dovecot"].startswith(b"OK\t1"), answers)

    def test_caseAndTrailingDotStayInTenant(self) -> None:
        """
        Case 1: a global user (erin) with her password at OTHER.EXAMPLE or
        other.example. is asked of the other tenant: no.  The other tenant's
        bob logs in under every spelling, and Dovecot's answer names the
        canonical identity.
        """
        # erin exists only in the global (stock) tenant.
        for domain in ("OTHER.EXAMPLE", "Other.Example", "other.example.", "OTHER.EXAMPLE."):
            self.assertAllNo(self.auth("erin", domain, "erin-pass"))
        answers = self.auth("BOB", "Other.Example.", DEMO_USERS["bob"])
        self.assertAllYes(answers)
        self.assertEqual(answers["dovecot"], b"OK\t1\tuser=bob@other.example")
        self.assertAllYes(self.auth("erin", "example.org", "erin-pass"))
        self.assertEqual(postmap(self.dir, self.ports["postfix"], "erin@Other.Example."),
                         (1, "", ""))
        self.assertEqual(postmap(self.dir, self.ports["postfix"], "erin@EXAMPLE.ORG."),
                         (0, "OK\n", ""))

    def test_unservedDomain(self) -> None:
        """
        Case 2: a domain nobody serves is no (Postfix 500), without asking
        the global backend (whose login format drops the domain).
        """
        self.assertAllNo(self.auth("erin", "not-served.invalid", "erin-pass"))
        self.assertEqual(lineAsk(self.ports["prosody"], "isuser:erin:not-served.invalid"), b"0")
        self.assertEqual(postmap(self.dir, self.ports["postfix"], "erin@not-served.invalid"),
                         (1, "", ""))
        log = self.daemon.output()  # type: ignore[attr-defined]
        self.assertIn("does not serve", log)
        self.assertNotIn("Traceback", log)

    def test_invalidIdentities(self) -> None:
        """
        An @ or : in a domain, a control character: no, unasked.
        """
        p = self.ports
        self.assertEqual(ejabberdAsk(p["ejabberd"], "auth:erin:example.org@x:erin-pass"),
                         b"\x00\x02\x00\x00")
        self.assertTrue(saslAsk(p["saslauthd"], "erin", "erin-pass", "a:b").startswith(b"NO"))
        self.assertTrue(dovecotAsk(p["dovecot"], "er\x01in@example.org", "erin-pass")
                        .startswith(b"FAIL"))


class EmailLoginTests(TestCase):
    """
    Case 3: the stock backend with login-format={user}@{domain}: Nextcloud
    also logs an account in by its e-mail address, which its owner sets.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        _, config = startBackend(self, os.path.join(self.dir, "nc"), stock=True,
                                 login_format="{user}@{domain}", domain=None)
        self.ports = startDaemon(self, os.path.join(self.dir, "daemon"), config)

    def test_onlyTheAccountAskedFor(self) -> None:
        """
        alice's account has the e-mail alice@example.org but is not the
        account alice@example.org: her password is no on every framing; the
        account whose id is frank@example.org logs in.
        """
        p = self.ports
        for user, password, expected in (("alice", "pa:ss w", False),
                                         ("frank", "frank-pass", True)):
            line = lineAsk(p["prosody"], f"auth:{user}:example.org:{password}")
            frame = ejabberdAsk(p["ejabberd"], f"auth:{user}:example.org:{password}")
            sasl = saslAsk(p["saslauthd"], user, password, "example.org")
            dovecot = dovecotAsk(p["dovecot"], f"{user}@example.org", password)
            self.assertEqual(line, b"1" if expected else b"0", user)
            self.assertEqual(frame, b"\x00\x02\x00\x01" if expected else b"\x00\x02\x00\x00")
            self.assertEqual(sasl.startswith(b"OK"), expected, sasl)
            self.assertEqual(dovecot.startswith(b"OK"), expected, dovecot)
        self.assertEqual(postmap(self.dir, p["postfix"], "alice@example.org"), (1, "", ""))
        self.assertEqual(postmap(self.dir, p["postfix"], "frank@example.org"), (0, "OK\n", ""))
        self.assertIn("not the account asked for", self.daemon.output())  # type: ignore[attr-defined]


class StockNeedsDomainsTests(TestCase):
    def test_refusedWithoutList(self) -> None:
        """
        The stock backend with login-format={user} and no domain list does
        not start: one line saying what to fix.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = writeConfig(os.path.join(directory, "x.conf"), "http://127.0.0.1:9/nc",
                             backend="nextcloud", service_user="svc",
                             service_password="pw")
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
             f"--logfile={directory}/x.log", "xcauth", "-c", config,
             "--listen", f"tcp:{freePort()}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("domain=", lines[0])


class DeletedUserTests(TestCase):
    """
    A user deleted in Nextcloud is refused at once, although the credential
    cache holds the password.
    """

    def test_deletedUserRefused(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        usersFile = os.path.join(directory, "users.json")
        with open(usersFile, "w") as f:
            json.dump(DEMO_USERS, f)
        nextcloud = FakeNextcloud(os.path.join(directory, "nc"),
                                  extraArgs=["--users-file", usersFile])
        self.addCleanup(nextcloud.stop)
        nextcloud.start()
        config = writeConfig(os.path.join(directory, "xcauth.conf"), nextcloud.url,
                             cache_storage="memory")
        metricsPort = freePort()
        ports = startDaemon(self, os.path.join(directory, "daemon"), config,
                            "--metrics", f"tcp:{metricsPort}:interface=127.0.0.1")
        login = f"auth:bob:example.org:{DEMO_USERS['bob']}"

        def cacheHits() -> float:
            url = f"http://127.0.0.1:{metricsPort}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            match = re.search(r'^xcauth_cache_decisions_total\{result="hit"\} (\S+)$',
                              text, re.M)
            return float(match.group(1)) if match else 0.0

        # Logged in until the cache answers from its entry (the bcrypt hash
        # is made in a thread after the first login's answer).
        def cached() -> bool:
            self.assertEqual(lineAsk(ports["prosody"], login), b"1")
            return cacheHits() > 0

        waitFor(cached, "bob's password cached", timeout=60)
        users = dict(DEMO_USERS)
        del users["bob"]
        with open(usersFile + ".tmp", "w") as f:
            json.dump(users, f)
        os.replace(usersFile + ".tmp", usersFile)
        # The cache still vouches (Nextcloud is not asked within the query TTL)...
        self.assertEqual(lineAsk(ports["prosody"], login), b"1")
        # ... until Nextcloud says the user does not exist.
        self.assertEqual(postmap(directory, ports["postfix"], "bob@example.org"), (1, "", ""))
        self.assertEqual(lineAsk(ports["prosody"], login), b"0")
        self.assertEqual(ejabberdAsk(ports["ejabberd"], login), b"\x00\x02\x00\x00")
        self.assertTrue(dovecotAsk(ports["dovecot"], "bob@example.org", DEMO_USERS["bob"])
                        .startswith(b"FAIL"))


#: An ejabberdctl that records its argv and keeps shared roster groups in a
#: file, answering srg_list, srg_get_info and srg_get_members as ejabberd does
#: (one item a line).
RECORDER = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({path!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
state = {path!r} + ".groups"
groups = json.load(open(state)) if os.path.exists(state) else {{}}
name = argv[0]
if name == "srg_create":
    groups.setdefault(argv[1] + "@" + argv[2], [])
elif name == "srg_list":
    print("\\n".join(g.split("@")[0] for g in groups if g.endswith("@" + argv[1])))
elif name == "srg_get_info" and argv[1] + "@" + argv[2] in groups:
    print("label\\t" + argv[1])
elif name == "srg_get_members":
    print("\\n".join(groups.get(argv[1] + "@" + argv[2], [])))
elif name == "srg_user_add":
    groups.setdefault(argv[3] + "@" + argv[4], []).append(argv[1] + "@" + argv[2])
with open(state, "w") as f:
    json.dump(groups, f)
"""


class RosterTenantTests(TestCase):
    """
    The roster sync against an ejabberdctl that records its argv.
    """

    def test_ownDomainOnlyAndNulName(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        argvFile = os.path.join(directory, "argv.jsonl")
        recorder = os.path.join(directory, "ejabberdctl")
        with open(recorder, "w") as f:
            f.write(RECORDER.format(python=sys.executable, path=argvFile))
        os.chmod(recorder, 0o755)
        rosterFile = os.path.join(directory, "roster.json")
        with open(rosterFile, "w") as f:
            json.dump({"bob": {
                "ceo@victim.example": {"name": "Fake CEO", "groups": ["Staff"]},
                "alice": {"name": "Ali\u0000ce", "groups": ["Staff"]},
                "admin": {"name": "Admin", "groups": ["Staff"]},
                "jörg": {"name": "Jörg", "groups": ["Staff"]},
            }}, f)
        db = os.path.join(directory, "state.sqlite3")
        # victim.example has a Nextcloud of its own (never asked here).
        r = xcauth("domains", "add", "victim.example", "--url",
                   "http://127.0.0.1:9/index.php/apps/ojsxc/ajax/externalApi.php",
                   "--secret", "victim-secret", "--db", db)
        self.assertEqual(r.returncode, 0, r.stderr)
        nextcloud = FakeNextcloud(os.path.join(directory, "nc"),
                                  extraArgs=["--roster-file", rosterFile])
        self.addCleanup(nextcloud.stop)
        nextcloud.start()
        config = writeConfig(os.path.join(directory, "xcauth.conf"), nextcloud.url,
                             db=db, roster_sync="ejabberdctl", ejabberdctl=recorder)
        ports = startDaemon(self, os.path.join(directory, "daemon"), config)
        self.assertEqual(lineAsk(ports["prosody"], f"auth:bob:example.org:{DEMO_USERS['bob']}"),
                         b"1")

        def commands() -> list[list[str]]:
            try:
                with open(argvFile) as f:
                    return [json.loads(line) for line in f]
            except FileNotFoundError:
                return []

        def added() -> set[str]:
            return {c[1] for c in commands() if c[0] == "srg_user_add"}

        waitFor(lambda: added() >= {"alice", "admin", "jörg"}, "the roster sync's commands",
                timeout=60)
        argvs = commands()
        self.assertFalse([c for c in argvs if "victim.example" in c or "ceo" in c], argvs)
        hosts = {c[2] for c in argvs if c[0] in ("set_vcard", "srg_user_add")}
        self.assertEqual(hosts, {"example.org"})
        self.assertIn(["set_vcard", "alice", "example.org", "FN", "Ali ce"], argvs)
        log = self.daemon.output()  # type: ignore[attr-defined]
        self.assertIn("left out 1 member", log)
        self.assertNotIn("Traceback", log)


def _makeCertificates(directory: str) -> dict[str, str]:
    """
    A CA, a server certificate for 127.0.0.1, a client certificate of that
    CA, and another CA with a client certificate of its own, as PEM files
    (made for this test, never kept).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, str] = {}

    def write(name: str, data: bytes) -> str:
        path = paths[name] = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def keyPEM(k: Any) -> bytes:
        return bytes(k.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))

    def certificate(subject: str, k: Any, issuer: Any, issuerKey: Any, ca: bool,
                    san: list[Any] | None = None) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder()
                   .subject_name(name)
                   .issuer_name(issuer.subject if issuer is not None else name)
                   .public_key(k.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuerKey if issuerKey is not None else k, hashes.SHA256())

    def pem(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.PEM))

    for prefix in ("", "other-"):
        caKey = key()
        ca = certificate(f"xcauth test {prefix}CA", caKey, None, None, True)
        write(f"{prefix}ca.pem", pem(ca))
        clientKey = key()
        write(f"{prefix}client.key", keyPEM(clientKey))
        write(f"{prefix}client.pem", pem(certificate("ejabberd node", clientKey, ca, caKey,
                                                     False)))
        if not prefix:
            serverKey = key()
            write("server.key", keyPEM(serverKey))
            write("server.pem", pem(certificate(
                "127.0.0.1", serverKey, ca, caKey, False,
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")])))
    return paths


class MutualTLSTests(TestCase):
    """
    A TLS listener that requires client certificates of a configured CA,
    against socat's OPENSSL client.
    """

    def setUp(self) -> None:
        if SOCAT is None:
            raise self.skipTest("socat is not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = _makeCertificates(self.dir)
        _, config = startBackend(self, os.path.join(self.dir, "nc"))
        self.port = freePort()
        c = self.certs
        daemon = Daemon(os.path.join(self.dir, "daemon"), [
            "--config-file", config, "--listen",
            f"prosody=ssl:{self.port}:interface=127.0.0.1:privateKey={c['server.key']}"
            f":certKey={c['server.pem']}:clientCA={c['ca.pem']}",
        ], waitOn=[("127.0.0.1", self.port)])
        self.addCleanup(daemon.stop)
        daemon.start()
        self.daemon = daemon

    def socat(self, *options: str) -> tuple[bytes, int]:
        """
        One request through C{socat STDIO OPENSSL:...}: the answer line (or
        what came before socat gave up) and socat's exit status.
        """
        address = ",".join([f"OPENSSL:127.0.0.1:{self.port}", f"cafile={self.certs['ca.pem']}",
                            *options])
        p = subprocess.Popen([SOCAT, "-T", "20", "STDIO", address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdin is not None and p.stdout is not None
        try:
            try:
                p.stdin.write(b"isuser:admin:example.org\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass
            answer = b""
            while not answer.endswith(b"\n"):
                ready, _, _ = select.select([p.stdout], [], [], 20)
                if not ready:
                    break
                chunk = os.read(p.stdout.fileno(), 100)
                if not chunk:
                    break
                answer += chunk
            try:
                p.stdin.close()
            except BrokenPipeError:
                pass
            status = p.wait(20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            p.stdout.close()
        return answer, status

    def test_clientCertificates(self) -> None:
        c = self.certs
        right = (f"cert={c['client.pem']}", f"key={c['client.key']}")
        self.assertEqual(self.socat(*right)[0], b"1\n")
        # Without a certificate, or with one of another CA, the handshake
        # fails (with TLS 1.3 the client learns it from the server's alert
        # after its own side is done, so socat's exit status says nothing):
        # no answer, and the request is never read.
        self.assertEqual(self.socat()[0], b"")
        self.assertEqual(self.socat(f"cert={c['other-client.pem']}",
                                    f"key={c['other-client.key']}")[0], b"")
        # Still serving the right client.
        self.assertEqual(self.socat(*right)[0], b"1\n")
        log = self.daemon.output()
        self.assertEqual(log.count("isuser true for admin@example.org"), 2, log)
        self.assertNotIn("Traceback", log)

    def test_plainListenerOffLoopbackWarned(self) -> None:
        """
        The warning for a plain TCP listener off loopback names the risk
        (checked on the description: these tests bind loopback only).
        """
        from xcauth.daemon.listen import Listener, plainRemoteWarning

        for endpoint in ("tcp:23662", "tcp:23662:interface=0.0.0.0",
                         "tcp6:23662:interface=\\:\\:"):
            warning = plainRemoteWarning(Listener("ejabberd", endpoint, endpoint))
            assert warning is not None
            self.assertIn("passwords in the clear", warning)
        for endpoint in ("tcp:23662:interface=127.0.0.1", "tcp6:23662:interface=\\:\\:1",
                         "unix:/run/x.sock", f"ssl:{self.port}:privateKey=x"):
            self.assertIsNone(plainRemoteWarning(Listener("ejabberd", endpoint, endpoint)))


if not os.path.exists(POSTMAP):  # pragma: no cover
    MultiTenantTests.skip = EmailLoginTests.skip = "postmap is not installed"  # type: ignore
