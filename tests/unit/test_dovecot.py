"""
Tests for the C{dovecot} framing (L{xcauth.framing.dovecot}): the exchanges of
Dovecot's documentation and source, Postfix's and Prosody's
C{mod_auth_dovecot}'s literal requests, chasquid's test scripts, LOGIN's two
rounds, escaping, several requests answered out of order, bad input, and
Hypothesis for chunking and arbitrary bytes.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.unit.fakes import (
    ManualAuthenticator,
    ProtocolTestMixin,
    TableAuthenticator,
    connect,
)
from xcauth.core.tokens import makeToken
from xcauth.daemon.config import ConfigOptions
from xcauth.daemon.listen import framingFromSystemdName
from xcauth.framing import dovecot
from xcauth.framing.dovecot import (
    AuthCommand,
    DovecotProtocol,
    ProtocolError,
    decodeBase64,
    escape,
    handshake,
    parseAuth,
    parsePlain,
    splitDovecotLogin,
    unescape,
)
from xcauth.framing.registry import FRAMINGS

USERS = {"alice@example.org": "pa:ss w", "jörg@example.org": "pässwörd"}
PASSWORD = "S3cret-Pa55word"

#: What Prosody's mod_auth_dovecot and Postfix send to open a connection.
PROSODY_HELLO = b"VERSION\t1\t1\nCPID\t4242\n"
POSTFIX_HELLO = b"VERSION\t1\t0\nCPID\t31337\n"


def b64(data: str | bytes) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw)


def plain(authcid: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{authcid}\0{password}")


class PeerAuthenticator(ManualAuthenticator):
    """
    A L{ManualAuthenticator} that also records the C{peer} of each login.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str | None] = []

    def authenticate(
        self, user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        self.peers.append(peer)
        return super().authenticate(user, domain, password, peer)


class PureFunctionTests(SynchronousTestCase):
    """
    The parsing and formatting functions.
    """

    def test_handshake(self) -> None:
        """
        The server's handshake, in Dovecot 2.3's order: VERSION, the MECH
        lines, SPID, CUID, COOKIE (32 hex digits), DONE.
        """
        self.assertEqual(
            handshake(77, 3, bytes(range(16))),
            b"VERSION\t1\t2\n"
            b"MECH\tPLAIN\tplaintext\n"
            b"MECH\tLOGIN\tplaintext\n"
            b"SPID\t77\n"
            b"CUID\t3\n"
            b"COOKIE\t000102030405060708090a0b0c0d0e0f\n"
            b"DONE\n",
        )

    def test_unescape(self) -> None:
        """
        Dovecot's escapes: \\1 followed by 0, 1, t, r or n; any other
        character stands for itself; a \\1 at the end is dropped.
        """
        self.assertEqual(unescape(b"a\x01tb\x01nc\x01rd\x011e\x010f"), b"a\tb\nc\rd\x01e\0f")
        self.assertEqual(unescape(b"a\x01lb\x01xc"), b"a\nbxc")
        self.assertEqual(unescape(b"ab\x01"), b"ab")
        self.assertEqual(unescape(b"plain"), b"plain")

    def test_escape(self) -> None:
        self.assertEqual(escape(b"a\tb\nc\rd\x01e"), b"a\x01tb\x01nc\x01rd\x011e")

    @given(st.binary(max_size=60))
    def test_escapeRoundTrip(self, value: bytes) -> None:
        """
        Escaping gives a value without TAB, CR or LF that unescapes to itself.
        """
        escaped = escape(value)
        self.assertFalse(set(escaped) & {9, 10, 13})
        self.assertEqual(unescape(escaped), value)

    def test_decodeBase64(self) -> None:
        self.assertEqual(decodeBase64(b"YWI="), b"ab")
        self.assertEqual(decodeBase64(b""), b"")
        self.assertEqual(decodeBase64(b"="), b"")
        self.assertIsNone(decodeBase64(b"YW*="))
        self.assertIsNone(decodeBase64(b"YWI"))

    def test_parsePlain(self) -> None:
        self.assertEqual(parsePlain(b"\0alice\0pw"), (b"", b"alice", b"pw"))
        self.assertEqual(parsePlain(b"z\0alice\0"), (b"z", b"alice", b""))
        self.assertIsNone(parsePlain(b"alice\0pw"))
        self.assertIsNone(parsePlain(b"\0alice\0pw\0x"))

    def test_splitLogin(self) -> None:
        self.assertEqual(splitDovecotLogin("alice@example.org", None, None), ("alice", "example.org"))
        self.assertEqual(splitDovecotLogin("a@b@example.org", None, "d.example"), ("a@b", "example.org"))
        self.assertEqual(splitDovecotLogin("alice", "r.example", "d.example"), ("alice", "r.example"))
        self.assertEqual(splitDovecotLogin("alice", None, "d.example"), ("alice", "d.example"))
        self.assertIsNone(splitDovecotLogin("alice", None, None))
        self.assertIsNone(splitDovecotLogin("@example.org", None, None))
        self.assertIsNone(splitDovecotLogin("alice@", None, "d.example"))

    def test_parseAuthPostfix(self) -> None:
        """
        Postfix's request: flags and key=value fields, then resp=.
        """
        fields = (
            b"7\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.1\tsecured"
            b"\tresp=AGFsaWNlAHB3"
        ).split(b"\t")
        parsed = parseAuth(fields, 0)
        assert isinstance(parsed, AuthCommand)
        self.assertEqual((parsed.id, parsed.mechanism, parsed.service), (7, "PLAIN", "smtp"))
        self.assertEqual(parsed.params["rip"], "192.0.2.1")
        self.assertEqual(parsed.params["nologin"], "")
        self.assertEqual(parsed.response, b"AGFsaWNlAHB3")

    def test_parseAuthEmptyResponse(self) -> None:
        """
        An empty resp= is no initial response for protocol 1.0 and 1.1
        clients, an empty one for 1.2; resp== is always an empty one.
        """
        for minor, expected in ((0, None), (1, None), (2, b"")):
            parsed = parseAuth([b"1", b"PLAIN", b"service=x", b"resp="], minor)
            assert isinstance(parsed, AuthCommand)
            self.assertEqual(parsed.response, expected)
        parsed = parseAuth([b"1", b"PLAIN", b"service=x", b"resp=="], 1)
        assert isinstance(parsed, AuthCommand)
        self.assertEqual(parsed.response, b"=")

    def test_parseAuthBroken(self) -> None:
        for fields in (
            [b"1"],
            [b"0", b"PLAIN", b"service=x"],
            [b"x", b"PLAIN", b"service=x"],
            [b"1", b"CRAM-MD5", b"service=x"],
            [b"1", b"PLAIN"],
            [b"1", b"PLAIN", b"service="],
            [b"1", b"PLAIN", b"service=x", b"resp=AA==", b"secured"],
            [b"99999999999", b"PLAIN", b"service=x"],
        ):
            self.assertIsInstance(parseAuth(fields, 1), ProtocolError, fields)


class _Base(ProtocolTestMixin):
    protocolClass = DovecotProtocol
    hello = PROSODY_HELLO
    auth: ManualAuthenticator

    def setUp(self) -> None:
        self.auth = PeerAuthenticator()
        self.protocol, self.transport, self.clock = connect(self.protocolClass, self.auth)
        self.protocol.context.defaultDomain = "example.org"
        self.greeting = self.answers()
        self.send(self.hello)

    def fire(self, index: int, result: Any) -> None:
        self.auth.calls[index][2].callback(result)


class HandshakeTests(_Base, SynchronousTestCase):
    hello = b""

    def test_greeting(self) -> None:
        """
        The server greets at once, before the client has said anything.
        """
        self.assertRegex(
            self.greeting.decode("ascii"),
            r"\AVERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
            r"SPID\t\d+\nCUID\t\d+\nCOOKIE\t[0-9a-f]{32}\nDONE\n\Z",
        )

    def test_connectionNumbers(self) -> None:
        """
        CUID counts the factory's connections.
        """
        factory = self.protocol.factory
        second = factory.buildProtocol(None)
        from twisted.internet.testing import StringTransport

        t = StringTransport()
        second.makeConnection(t)
        cuids = [
            re.search(rb"CUID\t(\d+)", g).group(1)  # type: ignore[union-attr]
            for g in (self.greeting, t.value())
        ]
        self.assertEqual(int(cuids[1]), int(cuids[0]) + 1)

    def assertClosed(self, data: bytes) -> None:
        self.send(data)
        self.assertTrue(self.transport.disconnecting, data)
        self.assertEqual(self.answers(), b"")
        self.assertEqual(self.auth.calls, [])

    def test_notVersionFirst(self) -> None:
        self.assertClosed(b"CPID\t1\nVERSION\t1\t1\n")

    def test_wrongMajorVersion(self) -> None:
        self.assertClosed(b"VERSION\t2\t0\nCPID\t1\n")

    def test_brokenVersion(self) -> None:
        self.assertClosed(b"VERSION\t1\n")

    def test_authBeforeCPID(self) -> None:
        self.assertClosed(b"VERSION\t1\t1\nAUTH\t1\tPLAIN\tservice=x\tresp=" + plain("alice", "pw") + b"\n")

    def test_cpidZero(self) -> None:
        self.assertClosed(b"VERSION\t1\t1\nCPID\t0\n")

    def test_handshakeInPieces(self) -> None:
        """
        The handshake and a request may come byte by byte.
        """
        data = PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n"
        for i in range(len(data)):
            self.send(data[i : i + 1])
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pw"))


class ExchangeTests(_Base, SynchronousTestCase):
    """
    Prosody's mod_auth_dovecot (protocol 1.1) after its handshake.
    """

    def test_prosodyPlain(self) -> None:
        """
        mod_auth_dovecot's request: a login without a domain takes the default
        domain; the answer names the login as given.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pa:ss w") + b"\n")
        self.assertEqual(self.auth.calls[0][:2], ("auth", ("alice", "example.org", "pa:ss w")))
        self.assertEqual(self.answers(), b"")
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=alice\n")

    def test_fullLogin(self) -> None:
        """
        user@domain is split at its last @, and the answer is the login as
        given.
        """
        self.send(b"AUTH\t2\tPLAIN\tservice=xmpp\tresp=" + plain("jörg@example.org", "pässwörd") + b"\n")
        self.assertEqual(self.auth.calls[0][1], ("jörg", "example.org", "pässwörd"))
        self.fire(0, True)
        self.assertEqual(self.answers(), "OK\t2\tuser=jörg@example.org\n".encode())

    def test_wrongPassword(self) -> None:
        self.send(b"AUTH\t3\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "wrong") + b"\n")
        self.fire(0, False)
        self.assertEqual(self.answers(), b"FAIL\t3\tuser=alice\n")
        self.assertFalse(self.transport.disconnecting)

    def test_unavailable(self) -> None:
        """
        Backend unavailable: a temporary failure in Dovecot 2.3's (code=) and
        2.2's (temp, which mod_auth_dovecot reads) words.
        """
        self.send(b"AUTH\t4\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.fire(0, None)
        self.assertEqual(
            self.answers(),
            b"FAIL\t4\tuser=alice\tcode=temp_fail\ttemp\treason=Temporary authentication failure\n",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_deadline(self) -> None:
        """
        Work that misses the deadline is cancelled and answered as a
        temporary failure.
        """
        self.send(b"AUTH\t5\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.clock.advance(3.9)
        self.assertEqual(self.answers(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.auth.cancelled, [("alice", "example.org", "pw")])
        self.assertIn(b"FAIL\t5\tuser=alice\tcode=temp_fail\ttemp\t", self.answers())

    def test_authzDiffers(self) -> None:
        """
        A PLAIN authorization identity naming someone else is refused as
        Dovecot refuses it (mod_auth_dovecot reads "authz": invalid-authzid).
        """
        self.send(b"AUTH\t6\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw", "bob") + b"\n")
        self.assertEqual(self.auth.calls, [])
        self.assertEqual(
            self.answers(),
            b"FAIL\t6\tcode=authz_fail\tauthz\treason=Authorization identity differs from the login\n",
        )

    def test_authzSame(self) -> None:
        """
        chasquid's request: authzid equal to the login is fine.
        """
        self.send(
            b"AUTH\t1\tPLAIN\tservice=smtp\tsecured\tno-penalty\tnologin"
            b"\tresp=dXNlcm5hbWUAdXNlcm5hbWUAcGFzc3dvcmQ=\n"
        )
        self.assertEqual(self.auth.calls[0][1], ("username", "example.org", "password"))
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=username\n")

    def test_noDomain(self) -> None:
        self.protocol.context.defaultDomain = None
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.assertEqual(self.auth.calls, [])
        self.assertEqual(self.answers(), b"FAIL\t1\n")

    def test_realm(self) -> None:
        """
        A login without @ takes the domain from realm= (escapes undone),
        before the default domain.
        """
        self.protocol.context.defaultDomain = "default.example"
        self.send(
            b"AUTH\t1\tPLAIN\tservice=xmpp\trealm=e\x01xample.org\tresp="
            + plain("alice", "pw")
            + b"\n"
        )
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pw"))

    def test_plainWithoutResponse(self) -> None:
        """
        PLAIN without an initial response: an empty challenge, then the
        response in a CONT.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=smtp\n")
        self.assertEqual(self.answers(), b"CONT\t1\t\n")
        self.send(b"CONT\t1\t" + plain("alice", "pw") + b"\n")
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=alice\n")

    def test_emptyResponseIsAbsent(self) -> None:
        """
        From a protocol 1.1 client an empty resp= is no initial response.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=\n")
        self.assertEqual(self.answers(), b"CONT\t1\t\n")

    def test_equalsIsEmptyResponse(self) -> None:
        """
        resp== (what mod_auth_dovecot sends for a client's missing response)
        is an empty initial response, which PLAIN refuses.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp==\n")
        self.assertEqual(self.answers(), b"FAIL\t1\n")

    def test_login(self) -> None:
        """
        LOGIN: "Username:", then "Password:", each in a CONT round.
        """
        self.send(b"AUTH\t9\tLOGIN\tservice=smtp\n")
        self.assertEqual(self.answers(), b"CONT\t9\tVXNlcm5hbWU6\n")
        self.send(b"CONT\t9\t" + b64("alice@example.org") + b"\n")
        self.assertEqual(self.answers(), b"CONT\t9\tUGFzc3dvcmQ6\n")
        self.assertEqual(self.auth.calls, [])
        self.send(b"CONT\t9\t" + b64("pa:ss w") + b"\n")
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pa:ss w"))
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t9\tuser=alice@example.org\n")

    def test_loginInitialResponse(self) -> None:
        """
        LOGIN with an initial response: it is the user name.
        """
        self.send(b"AUTH\t9\tLOGIN\tservice=smtp\tresp=" + b64("alice") + b"\n")
        self.assertEqual(self.answers(), b"CONT\t9\tUGFzc3dvcmQ6\n")
        self.send(b"CONT\t9\t" + b64("pw") + b"\n")
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pw"))

    def test_loginEmptyUser(self) -> None:
        self.send(b"AUTH\t9\tLOGIN\tservice=smtp\n")
        self.send(b"CONT\t9\t\n")
        self.assertEqual(self.answers(), b"CONT\t9\tVXNlcm5hbWU6\nFAIL\t9\n")

    def test_controlCharacterLoginRefused(self) -> None:
        """
        A login with a TAB or a NUL is no identity: refused without asking
        anyone, and never echoed.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("a\tb", "pw") + b"\n")
        self.send(b"AUTH\t2\tLOGIN\tservice=xmpp\n")
        self.send(b"CONT\t2\t" + base64.b64encode(b"ev\0il@example.org") + b"\n")
        self.send(b"CONT\t2\t" + base64.b64encode(b"pw") + b"\n")
        self.assertEqual(self.auth.calls, [])
        answers = self.answers()
        self.assertIn(b"FAIL\t1\n", answers)
        self.assertIn(b"FAIL\t2\n", answers)
        self.assertNotIn(b"\0", answers)

    def test_canonicalAnswer(self) -> None:
        """
        The answer names the canonical identity the password was checked for.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp="
                  + plain("Bob@Other.Example.", "pw") + b"\n")
        self.assertEqual(self.auth.calls[0][1][:2], ("bob", "other.example"))
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=bob@other.example\n")

    def test_outOfOrder(self) -> None:
        """
        Several requests in flight are answered as their work completes.
        """
        for n, user in ((1, "alice"), (2, "bob"), (3, "carol")):
            self.send(f"AUTH\t{n}\tPLAIN\tservice=xmpp\tresp=".encode() + plain(user, "pw") + b"\n")
        self.assertEqual(len(self.auth.calls), 3)
        self.fire(1, True)
        self.assertEqual(self.answers(), b"OK\t2\tuser=bob\n")
        self.fire(2, False)
        self.assertEqual(self.answers(), b"FAIL\t3\tuser=carol\n")
        self.fire(0, None)
        self.assertIn(b"FAIL\t1\tuser=alice\tcode=temp_fail", self.answers())

    def test_idReusedAfterAnswer(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.fire(0, True)
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.fire(1, False)
        self.assertEqual(self.answers(), b"OK\t1\tuser=alice\nFAIL\t1\tuser=alice\n")

    def test_invalidBase64(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=AG*\n")
        self.assertEqual(
            self.answers(),
            b"FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in initial response\n",
        )
        self.send(b"AUTH\t2\tLOGIN\tservice=smtp\n")
        self.send(b"CONT\t2\t%%%\n")
        self.assertEqual(
            self.answers(),
            b"CONT\t2\tVXNlcm5hbWU6\n"
            b"FAIL\t2\tcode=invalid_base64\treason=Invalid base64 data in continued response\n",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_badPlain(self) -> None:
        for n, blob in enumerate((b64("alice\0pw"), b64("\0\0pw"), b64("\0alice\0"), b64(b"\0\xff\0pw")), 1):
            self.send(f"AUTH\t{n}\tPLAIN\tservice=xmpp\tresp=".encode() + blob + b"\n")
            self.assertEqual(self.answers(), f"FAIL\t{n}\n".encode())
        self.assertEqual(self.auth.calls, [])

    def test_contUnknownId(self) -> None:
        """
        A CONT for no request: Dovecot's answer, and the connection stays.
        """
        self.send(b"CONT\t5\tAAAA\n")
        self.assertEqual(self.answers(), b"FAIL\t5\treason=Authentication request timed out\n")
        self.assertFalse(self.transport.disconnecting)

    def test_contUnexpected(self) -> None:
        """
        A CONT for a request that asked for none fails it (its work is
        cancelled).
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.send(b"CONT\t1\tAAAA\n")
        self.assertEqual(self.answers(), b"FAIL\t1\treason=Unexpected continuation\n")
        self.assertEqual(len(self.auth.cancelled), 1)

    def test_cancel(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.send(b"CANCEL\t1\n")
        self.assertEqual(len(self.auth.cancelled), 1)
        self.assertEqual(self.answers(), b"")
        self.send(b"AUTH\t2\tLOGIN\tservice=smtp\nCANCEL\t2\nCONT\t2\tAAAA\n")
        self.assertEqual(
            self.answers(),
            b"CONT\t2\tVXNlcm5hbWU6\nFAIL\t2\treason=Authentication request timed out\n",
        )

    def assertClosed(self, data: bytes) -> None:
        self.send(b"AUTH\t100\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.send(data + b"AUTH\t101\tPLAIN\tservice=xmpp\tresp=" + plain("bob", "pw") + b"\n")
        self.assertTrue(self.transport.disconnecting, data)
        self.assertEqual(self.answers(), b"")
        # Pending work is cancelled; nothing after the bad line is read.
        self.assertEqual(len(self.auth.calls), 1)
        self.assertEqual(len(self.auth.cancelled), 1)

    def test_unknownCommand(self) -> None:
        self.assertClosed(b"HELLO\tthere\n")
        # Closed in order (answers already written still leave), not reset.
        self.assertFalse(self.transport.disconnected)

    def test_unknownCommandNotLogged(self) -> None:
        """
        A line that is no command name is not shown in the log (it might be
        a password).
        """
        with capturedLogs() as events:
            self.send(PASSWORD.encode() + b"!\n")
        self.assertTrue(self.transport.disconnecting)
        text = "".join(formatEvent(e) for e in events)
        self.assertIn("unknown command of 16 bytes (not shown)", text)
        self.assertNotIn(PASSWORD, text)

    def test_crlf(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\r\n")
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pw"))

    def test_unknownMechanism(self) -> None:
        self.assertClosed(b"AUTH\t1\tCRAM-MD5\tservice=smtp\n")

    def test_noService(self) -> None:
        self.assertClosed(b"AUTH\t1\tPLAIN\tresp=" + plain("alice", "pw") + b"\n")

    def test_missingFields(self) -> None:
        self.assertClosed(b"AUTH\t1\n")

    def test_fieldsAfterResp(self) -> None:
        self.assertClosed(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AAAA\tsecured\n")

    def test_duplicateId(self) -> None:
        """
        An id already in flight breaks the protocol (Dovecot: "BUG: ...
        sent a duplicate ID").
        """
        self.assertClosed(b"AUTH\t100\tPLAIN\tservice=xmpp\tresp=" + plain("eve", "pw") + b"\n")

    def test_brokenCont(self) -> None:
        self.assertClosed(b"CONT\tx\n")

    def test_lineTooLong(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.send(b"AUTH\t2\tPLAIN\tservice=xmpp\tresp=" + b"A" * dovecot.MAX_LINE)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.auth.cancelled), 1)

    def test_connectionLost(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw") + b"\n")
        self.send(b"AUTH\t2\tPLAIN\tservice=xmpp\tresp=" + plain("bob", "pw") + b"\n")
        self.protocol.connectionLost(None)
        self.assertEqual(len(self.auth.cancelled), 2)
        self.assertEqual(self.answers(), b"")

    def test_halfClose(self) -> None:
        """
        The client closes its side after its requests (socat, nc): the work
        in flight is answered, then the connection closes; a request waiting
        for a CONT is dropped.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("alice", "pw") + b"\n")
        self.send(b"AUTH\t2\tLOGIN\tservice=x\n")
        self.answers()
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=alice\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_halfCloseIdle(self) -> None:
        self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_writeConnectionLost(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("alice", "pw") + b"\n")
        self.protocol.writeConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.auth.cancelled), 1)

    def test_tooManyWaiting(self) -> None:
        """
        Requests left waiting for a CONT are bounded too: past the bound a
        new one fails temporarily.
        """
        limit = dovecot.MAX_OPEN_FACTOR * self.protocol.context.maxInFlight
        self.send(b"".join(b"AUTH\t%d\tLOGIN\tservice=smtp\n" % n for n in range(1, limit + 1)))
        # A share of the lines per reactor turn: let the turns pass.
        self.clock.advance(0)
        self.answers()
        self.send(b"AUTH\t999999\tLOGIN\tservice=smtp\n")
        self.assertEqual(
            self.answers(),
            b"FAIL\t999999\tcode=temp_fail\ttemp\treason=Temporary authentication failure\n",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_abandonedLogin(self) -> None:
        """
        A request nobody continues is forgotten after CONT_TIMEOUT (Prosody's
        module never cancels a LOGIN its XMPP client gave up); its id is free
        again, and a late CONT is told it timed out.
        """
        self.send(b"AUTH\t5\tLOGIN\tservice=xmpp\tresp==\n")
        self.assertEqual(self.answers(), b"CONT\t5\tVXNlcm5hbWU6\n")
        self.clock.advance(dovecot.CONT_TIMEOUT - 1)
        self.send(b"CONT\t5\t" + b64("alice") + b"\n")
        self.assertEqual(self.answers(), b"CONT\t5\tUGFzc3dvcmQ6\n")
        self.clock.advance(dovecot.CONT_TIMEOUT)
        self.assertEqual(self.protocol.session.open(), 0)
        self.send(b"CONT\t5\t" + b64("pw") + b"\n")
        self.assertEqual(self.answers(), b"FAIL\t5\treason=Authentication request timed out\n")
        self.assertEqual(self.auth.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timersStopped(self) -> None:
        """
        Answered, cancelled and closed requests leave no timer behind.
        """
        self.send(b"AUTH\t1\tLOGIN\tservice=smtp\n")
        self.send(b"CONT\t1\t" + b64("alice") + b"\n")
        self.send(b"CONT\t1\t" + b64("pw") + b"\n")
        self.fire(0, True)
        self.send(b"AUTH\t2\tLOGIN\tservice=smtp\nCANCEL\t2\n")
        self.send(b"AUTH\t3\tPLAIN\tservice=smtp\n")
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PostfixTests(_Base, SynchronousTestCase):
    """
    Postfix's smtpd (protocol 1.0) after its handshake.
    """

    hello = POSTFIX_HELLO

    def test_postfixPlain(self) -> None:
        """
        Postfix's literal request; rip= is passed as the peer.
        """
        self.send(
            b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.7\tsecured"
            b"\tresp=" + plain("alice@example.org", "pa:ss w") + b"\n"
        )
        self.assertEqual(self.auth.calls[0][1], ("alice", "example.org", "pa:ss w"))
        self.assertEqual(self.auth.peers, ["192.0.2.7"])
        self.fire(0, True)
        self.assertEqual(self.answers(), b"OK\t1\tuser=alice@example.org\n")

    def test_postfixLogin(self) -> None:
        self.send(b"AUTH\t2\tLOGIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\n")
        self.assertEqual(self.answers(), b"CONT\t2\tVXNlcm5hbWU6\n")
        self.send(b"CONT\t2\t" + b64("alice@example.org") + b"\n")
        self.send(b"CONT\t2\t" + b64("pw") + b"\n")
        self.fire(0, False)
        self.assertEqual(self.answers(), b"CONT\t2\tUGFzc3dvcmQ6\nFAIL\t2\tuser=alice@example.org\n")

    def test_unavailableCloses(self) -> None:
        """
        Postfix reads any FAIL as a wrong password (535); a temporary failure
        closes the connection instead, which Postfix answers 454.
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("alice@example.org", "pw") + b"\n")
        self.fire(0, None)
        self.assertEqual(self.answers(), b"")
        self.assertTrue(self.transport.disconnecting)
        # Reset, not closed: Postfix's next write on a closed TCP connection
        # would succeed and its next login fail as well.
        self.assertTrue(self.transport.disconnected)

    def test_deadlineCloses(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("alice@example.org", "pw") + b"\n")
        self.clock.advance(5)
        self.assertEqual(self.answers(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_emptyResponseIsAbsent(self) -> None:
        self.send(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=\n")
        self.assertEqual(self.answers(), b"CONT\t1\t\n")


class Version12Tests(_Base, SynchronousTestCase):
    """
    A client of protocol 1.2 (Dovecot's own lib-auth).
    """

    hello = b"VERSION\t1\t2\nCPID\t9\n"

    def test_emptyResponse(self) -> None:
        """
        resp= empty is an empty initial response (PLAIN refuses it; LOGIN
        asks for the user name).
        """
        self.send(b"AUTH\t1\tPLAIN\tservice=imap\tresp=\n")
        self.send(b"AUTH\t2\tLOGIN\tservice=imap\tresp=\n")
        self.assertEqual(self.answers(), b"FAIL\t1\nCONT\t2\tVXNlcm5hbWU6\n")


class FlowControlTests(SynchronousTestCase):
    def test_inFlightBound(self) -> None:
        """
        Past max-in-flight requests with work pending the connection is not
        read; it is again once answers have left.
        """
        auth = ManualAuthenticator()
        protocol, transport, clock = connect(DovecotProtocol, auth, maxInFlight=2)
        protocol.context.defaultDomain = "example.org"
        data = PROSODY_HELLO + b"".join(
            b"AUTH\t%d\tPLAIN\tservice=xmpp\tresp=" % n + plain(f"u{n}", "pw") + b"\n"
            for n in (1, 2, 3)
        )
        protocol.dataReceived(data)
        self.assertEqual(len(auth.calls), 2)
        self.assertEqual(transport.producerState, "paused")
        auth.calls[1][2].callback(True)
        clock.advance(0)
        self.assertEqual(len(auth.calls), 3)
        # Two in flight again (1 and 3).
        self.assertEqual(transport.producerState, "paused")
        auth.calls[2][2].callback(True)
        auth.calls[0][2].callback(False)
        clock.advance(0)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(
            transport.value().split(b"DONE\n")[1], b"OK\t2\tuser=u2\nOK\t3\tuser=u3\nFAIL\t1\tuser=u1\n"
        )


class IsolationTests(SynchronousTestCase):
    def test_otherConnectionsUnaffected(self) -> None:
        """
        A connection that breaks the protocol is closed; another connection
        of the same listener, with a request in flight, carries on.
        """
        auth = ManualAuthenticator()
        good, goodTransport, clock = connect(DovecotProtocol, auth)
        good.context.defaultDomain = "example.org"
        from twisted.internet.testing import StringTransport

        bad = good.factory.buildProtocol(None)
        badTransport = StringTransport()
        bad.makeConnection(badTransport)
        good.dataReceived(PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("alice", "pw") + b"\n")
        bad.dataReceived(PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("bob", "pw") + b"\n")
        bad.dataReceived(b"AUTH\t1\tPLAIN\tservice=x\n\xff\x00garbage\n")
        self.assertTrue(badTransport.disconnecting)
        bad.connectionLost(None)
        self.assertEqual(auth.cancelled, [("bob", "example.org", "pw")])
        self.assertFalse(goodTransport.disconnecting)
        auth.calls[0][2].callback(True)
        self.assertTrue(goodTransport.value().endswith(b"DONE\nOK\t1\tuser=alice\n"))


class LoggingTests(SynchronousTestCase):
    def test_noSecretsLogged(self) -> None:
        """
        Neither a password nor a base64 response appears in any log line, for
        good, bad and broken requests.
        """
        auth = TableAuthenticator({"alice@example.org": PASSWORD})
        protocol, transport, clock = connect(DovecotProtocol, auth)
        protocol.context.defaultDomain = "example.org"
        blob = plain("alice", PASSWORD)
        with capturedLogs() as events:
            protocol.dataReceived(
                PROSODY_HELLO
                + b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + blob + b"\n"
                + b"AUTH\t2\tPLAIN\tservice=xmpp\tresp=" + plain("alice", PASSWORD, "bob") + b"\n"
                + b"AUTH\t3\tPLAIN\tservice=xmpp\tresp=" + plain("nodomain@", PASSWORD) + b"\n"
                + b"AUTH\t4\tLOGIN\tservice=smtp\n"
                + b"CONT\t4\t" + b64("alice") + b"\n"
                + b"CONT\t4\t" + b64(PASSWORD) + b"\n"
                + b"AUTH\t5\tPLAIN\tservice=xmpp\tresp=" + b64(b"\0\xff\0" + PASSWORD.encode()) + b"\n"
                + b"AUTH\t6\tPLAIN\tresp=" + blob + b"\n"
            )
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"OK\t1\tuser=alice\n", transport.value())
        self.assertIn(b"OK\t4\tuser=alice\n", transport.value())
        text = "\n".join(str(formatEvent(e)) + repr(e) for e in events)
        self.assertIn("auth true for alice@example.org via dovecot", text)
        for secret in (PASSWORD, blob.decode(), b64(PASSWORD).decode()):
            self.assertNotIn(secret, text)


def session(users: dict[str, str], data: bytes, chunks: list[int]) -> bytes:
    """
    Everything the server answers after its greeting to C{data} sent in
    pieces cut at C{chunks}.
    """
    protocol, transport, clock = connect(DovecotProtocol, TableAuthenticator(users))
    protocol.context.defaultDomain = "example.org"
    transport.clear()
    cuts = sorted({c % (len(data) + 1) for c in chunks}) + [len(data)]
    start = 0
    for cut in cuts:
        if transport.disconnecting:
            break
        protocol.dataReceived(data[start:cut])
        start = cut
    clock.advance(10)
    return bytes(transport.value()) + (b"<closed>" if transport.disconnecting else b"")


_REQUEST = st.sampled_from(
    [
        b"AUTH\t1\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pa:ss w") + b"\n",
        b"AUTH\t2\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "wrong") + b"\n",
        b"AUTH\t3\tPLAIN\tservice=xmpp\tresp=" + plain("x@down.example", "pw") + b"\n",
        b"AUTH\t4\tLOGIN\tservice=smtp\nCONT\t4\t" + b64("jörg") + b"\nCONT\t4\t" + b64("pässwörd") + b"\n",
        b"AUTH\t5\tPLAIN\tservice=smtp\nCONT\t5\t" + plain("alice", "pa:ss w") + b"\n",
        b"AUTH\t6\tPLAIN\tservice=xmpp\tresp=***\n",
        b"CONT\t77\tAAAA\n",
        b"CANCEL\t5\n",
        b"AUTH\t7\tPLAIN\tservice=xmpp\tresp=" + plain("alice", "pw", "bob") + b"\n",
    ]
)


class PropertyTests(SynchronousTestCase):
    @given(st.lists(_REQUEST, max_size=8), st.lists(st.integers(0, 2000), max_size=10))
    def test_chunking(self, requests: list[bytes], chunks: list[int]) -> None:
        """
        Any chunking of the byte stream gives the same replies.
        """
        data = PROSODY_HELLO + b"".join(requests)
        self.assertEqual(session(USERS, data, chunks), session(USERS, data, []))

    @given(
        st.lists(st.sampled_from([b"AUTH\t", b"CONT\t", b"CANCEL\t", b"1", b"2", b"\t",
                                  b"PLAIN", b"LOGIN", b"service=x", b"resp=", b"AGFAYgBj",
                                  b"YQ==", b"=", b"\n", b"\x01", b"realm=r"]), max_size=40),
        st.lists(st.integers(0, 400), max_size=8),
    )
    def test_chunkingOfFragments(self, pieces: list[bytes], chunks: list[int]) -> None:
        """
        Streams built from the protocol's own words (mostly invalid) give the
        same replies however they are cut.
        """
        data = PROSODY_HELLO + b"".join(pieces)
        self.assertEqual(session(USERS, data, chunks), session(USERS, data, []))

    @given(
        st.binary(max_size=300),
        st.lists(st.integers(0, 300), max_size=6),
        st.sampled_from([b"", PROSODY_HELLO, POSTFIX_HELLO, b"VERSION\t1\t2\nCPID\t1\n"]),
    )
    def test_anyBytes(self, data: bytes, chunks: list[int], prefix: bytes) -> None:
        """
        Any bytes, before or after a valid handshake (of each protocol minor
        version), never crash: every answer is a well-formed OK, FAIL or CONT
        line.
        """
        out = session(USERS, prefix + data, chunks).removesuffix(b"<closed>")
        for line in out.split(b"\n")[:-1]:
            self.assertRegex(line, rb"\A(OK|FAIL|CONT)\t\d+(\t[^\t\n]*)*\Z")

    @given(st.text(max_size=30), st.text(max_size=30))
    def test_anyCredentials(self, login: str, password: str) -> None:
        """
        Any login and password in a PLAIN response give one answer line.
        """
        data = PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain(login, password) + b"\n"
        out = session(USERS, data, [])
        self.assertRegex(out, rb"\A(OK\t1\tuser=[^\t\n]*|FAIL\t1(\t[^\t\n]*)*)\n\Z")


class WiringTests(SynchronousTestCase):
    def test_registry(self) -> None:
        self.assertIs(FRAMINGS["dovecot"], DovecotProtocol)

    def test_socketUnits(self) -> None:
        """
        Every dovecot socket unit's FileDescriptorName= selects the framing,
        and xcauth.service is ordered after it.
        """
        import glob
        import os

        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        units = sorted(glob.glob(os.path.join(here, "systemd", "xcauth-dovecot*.socket")))
        self.assertEqual(len(units), 3)
        with open(os.path.join(here, "systemd", "xcauth.service")) as f:
            service = f.read()
        for unit in units:
            with open(unit) as f:
                text = f.read()
            name = re.search(r"^FileDescriptorName=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
            self.assertEqual(framingFromSystemdName(f"systemd:domain=UNIX:name={name}"), "dovecot")
            self.assertIn(os.path.basename(unit), service)

    def test_systemdNames(self) -> None:
        for name in ("dovecot", "dovecot-v6", "dovecot-tcp", "dovecot-tcp-v6"):
            self.assertEqual(
                framingFromSystemdName(f"systemd:domain=UNIX:name={name}"), "dovecot"
            )

    def test_defaultDomainOption(self) -> None:
        options = ConfigOptions()
        options.parseOptions(
            ["--url", "https://cloud.example/x", "--secret", "s",
             "--dovecot-default-domain", "example.org", "-c", "/dev/null"]
        )
        self.assertEqual(options.config.dovecotDefaultDomain, "example.org")
        options = ConfigOptions()
        options.parseOptions(["--url", "https://cloud.example/x", "--secret", "s", "-c", "/dev/null"])
        self.assertIsNone(options.config.dovecotDefaultDomain)

    def test_token(self) -> None:
        """
        The authenticator decides tokens; the framing passes them on as
        passwords (a token is plain text: no escaping issue).
        """
        token = makeToken(b"secret", "alice", "example.org", 2**31)
        protocol, transport, clock = connect(
            DovecotProtocol, TableAuthenticator({"alice@example.org": token})
        )
        transport.clear()
        protocol.dataReceived(
            PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("alice@example.org", token) + b"\n"
        )
        self.assertEqual(transport.value(), b"OK\t1\tuser=alice@example.org\n")

    def test_succeedAtOnce(self) -> None:
        """
        An answer known at once (a token) needs no deadline timer.
        """
        class Now(ManualAuthenticator):
            def authenticate(self, user: str, domain: str, password: str, peer: str | None = None) -> Deferred[bool | None]:
                return succeed(True)

        protocol, transport, clock = connect(DovecotProtocol, Now())
        protocol.dataReceived(
            PROSODY_HELLO + b"AUTH\t1\tPLAIN\tservice=x\tresp=" + plain("a@example.org", "p") + b"\n"
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class DovecotFairnessTests(SynchronousTestCase):
    def test_sharePerTurn(self) -> None:
        """
        One read holding many requests is worked through 32 lines per reactor
        turn, like the other framings.
        """
        from tests.unit.test_fairness import turn

        auth = ManualAuthenticator()
        protocol, transport, clock = connect(DovecotProtocol, auth, maxInFlight=500)
        protocol.dataReceived(b"VERSION\t1\t2\nCPID\t1\n")
        lines = b"".join(
            b"AUTH\t%d\tPLAIN\tservice=x\tresp=" % n + plain("alice@example.org", "pw") + b"\n"
            for n in range(1, 101)
        )
        protocol.dataReceived(lines)
        self.assertEqual(len(auth.calls), 32)
        turn(clock)
        self.assertEqual(len(auth.calls), 64)
        for _ in range(5):
            turn(clock)
        self.assertEqual(len(auth.calls), 100)


class HostileInputTests(SynchronousTestCase):
    """
    What an attacker sends to the framing: huge numbers, NULs in names, and
    a client that never reads its answers.
    """

    def connect(self) -> tuple[Any, Any, Any]:
        auth = ManualAuthenticator()
        protocol, transport, clock = connect(DovecotProtocol, auth)
        return protocol, transport, auth

    def test_hugeVersionAndCPID(self) -> None:
        """
        A VERSION minor or CPID of thousands of digits (past Python's limit
        for int()) closes the connection as a protocol error, through the
        rate-limited invalid-request log: no traceback.
        """
        for hello in (b"VERSION\t1\t" + b"9" * 5000 + b"\n",
                      b"VERSION\t" + b"1" * 5000 + b"\t2\n",
                      b"VERSION\t1\t1\nCPID\t" + b"7" * 5000 + b"\n"):
            protocol, transport, _ = self.connect()
            with capturedLogs() as events:
                protocol.dataReceived(hello)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(self.flushLoggedErrors(), [])
            text = "".join(formatEvent(e) for e in events)
            self.assertIn("invalid request", text)
            self.assertNotIn("Traceback", text)

    def test_nulEscaped(self) -> None:
        self.assertEqual(escape(b"a\0b"), b"a\x010b")
        self.assertEqual(unescape(escape(b"a\0b\x01")), b"a\0b\x01")

    def test_rejectsGoThroughRateLimitedLog(self) -> None:
        """
        Many refused requests (bad PLAIN data) write one log line, not one
        each.
        """
        protocol, transport, _ = self.connect()
        protocol.dataReceived(PROSODY_HELLO)
        with capturedLogs() as events:
            for n in range(1, 50):
                protocol.dataReceived(b"AUTH\t%d\tPLAIN\tservice=x\tresp=" % n
                                      + b64(b"no-nuls") + b"\n")
        self.assertLessEqual(len(events), 2)

    def test_stopsReadingWhenAnswersAreNotRead(self) -> None:
        """
        The framing is its transport's producer: paused (the client does not
        read), it parses no more requests; resumed, it goes on.
        """
        protocol, transport, auth = self.connect()
        self.assertIsNotNone(transport.producer)
        self.assertTrue(transport.streaming)
        protocol.dataReceived(PROSODY_HELLO)
        transport.producer.pauseProducing()
        protocol.dataReceived(b"".join(
            b"AUTH\t%d\tPLAIN\tservice=x\tresp=" % n + plain("alice@example.org", "pw") + b"\n"
            for n in range(1, 4)))
        self.assertEqual(auth.calls, [])
        transport.producer.resumeProducing()
        protocol.context.clock.advance(0)
        self.assertEqual(len(auth.calls), 3)

    def test_answersDoNotPileUp(self) -> None:
        """
        A client that sends requests and never reads the answers: once the
        transport pauses the framing's producer (its buffer of unsent answers
        is full), the framing parses nothing more, however much the client
        sends, so it writes no more answers for it (here LOGIN's challenges)
        and starts no more work; it reads again, on a later turn, once the
        answers have left.
        """
        protocol, transport, auth = self.connect()
        clock = protocol.context.clock
        producer = transport.producer
        self.assertTrue(verifyObject(IPushProducer, producer))
        self.assertTrue(transport.streaming)
        protocol.dataReceived(PROSODY_HELLO)
        transport.clear()
        protocol.dataReceived(b"AUTH\t1\tLOGIN\tservice=x\n")
        challenge = b"CONT\t1\tVXNlcm5hbWU6\n"
        self.assertEqual(transport.value(), challenge)
        producer.pauseProducing()  # what a full write buffer does
        self.assertEqual(transport.producerState, "paused")
        for chunk in range(2):
            protocol.dataReceived(b"".join(
                b"AUTH\t%d\tLOGIN\tservice=x\n" % n for n in range(2 + 100 * chunk, 102 + 100 * chunk)
            ) + b"AUTH\t%d\tPLAIN\tservice=x\tresp=" % (1000 + chunk)
              + plain("alice@example.org", "pw") + b"\n")
            clock.advance(0)
        self.assertEqual(transport.value(), challenge)
        self.assertEqual(auth.calls, [])
        self.assertEqual(transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(transport.value(), challenge)
        for _ in range(10):
            clock.advance(0)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value().count(b"CONT\t"), 201)
        self.assertEqual(len(auth.calls), 2)
