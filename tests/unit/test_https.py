"""
Tests for https to the backend with real TLS on loopback: the certificate
checks of the pooled L{Agent} of L{xcauth.backends.http.makeAgent} (Agent's browser-like policy) and
what L{xcauth.backends.jsxc.JSXCClient} answers and logs when they fail.

A throw-away CA and server certificates are made at import time with
C{cryptography}; nothing is read from or written to disk.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from xcauth.backends.http import HTTPRequester, makeAgent
from xcauth.backends.jsxc import JSXCClient, Outcome
from xcauth.testing.fakenextcloud import API_PATH, DEMO_USERS, FakeJSXC, makeSite

SECRET = b"https-test-secret-0123456789"
PASSWORD = DEMO_USERS["alice"]
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)


class _PKI:
    """
    A CA and server certificates it signed: for C{localhost}, for another
    host name, and an expired one for C{localhost}.
    """

    def __init__(self) -> None:
        self.caKey = _key()
        self.caCert = (
            x509.CertificateBuilder()
            .subject_name(_name("xcauth test CA"))
            .issuer_name(_name("xcauth test CA"))
            .public_key(self.caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.caKey.public_key()),
                critical=False,
            )
            .sign(self.caKey, hashes.SHA256())
        )
        self.caPEM = self.caCert.public_bytes(serialization.Encoding.PEM)
        self.localhost = self.server("localhost", NOW - DAY, NOW + 30 * DAY)
        self.wrongName = self.server("cloud.example.org", NOW - DAY, NOW + 30 * DAY)
        self.expired = self.server("localhost", NOW - 30 * DAY, NOW - DAY)

    def server(
        self, host: str, notBefore: datetime.datetime, notAfter: datetime.datetime
    ) -> bytes:
        """
        The PEM key and certificate of a server named C{host}, signed by the CA.
        """
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.caCert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore)
            .not_valid_after(notAfter)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.caKey.public_key()),
                critical=False,
            )
            .sign(self.caKey, hashes.SHA256())
        )
        return _pem(key, cert)


PKI = _PKI()


class HTTPSTests(TestCase):
    """
    The JSXC fake served over TLS on 127.0.0.1, reached as C{localhost}.
    """

    def serve(self, serverPEM: bytes, trustCA: bool) -> JSXCClient:
        """
        Serve L{FakeJSXC} with C{serverPEM}; a client whose pool trusts the
        test CA (or, if not C{trustCA}, uses the default policy: the system's
        trust store).
        """
        self.resource = FakeJSXC(SECRET, dict(DEMO_USERS), reactor)
        self.wrapper = WrappingFactory(makeSite(self.resource))
        self.wrapper.noisy = False
        options = PrivateCertificate.loadPEM(serverPEM).options()
        port = reactor.listenSSL(0, self.wrapper, options, interface="127.0.0.1")
        self.addCleanup(self.stopServer, port)
        policy = (
            BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(PKI.caPEM))
            if trustCA
            else None
        )
        agent, self.pool = makeAgent(reactor, connectTimeout=5, tlsPolicy=policy)
        self.http = HTTPRequester(agent, reactor, timeout=10)
        self.addCleanup(self.pool.closeCachedConnections)
        url = f"https://localhost:{port.getHost().port}{API_PATH.decode()}"
        return JSXCClient(self.http, url, SECRET)

    @inlineCallbacks
    def stopServer(self, port: Any) -> Any:
        yield port.stopListening()
        for protocol in list(self.wrapper.protocols):
            protocol.transport.abortConnection()
        for _ in range(100):
            if not self.wrapper.protocols:
                break
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def refused(self, client: JSXCClient, *problems: str) -> Any:
        """
        C{client.auth} answers L{Outcome.UNAVAILABLE} (not an error) with a
        warning naming one of C{problems} and no secret; the server never
        receives the request.
        """
        with capturedLogs() as events:
            outcome = yield client.auth("alice", "example.org", PASSWORD)
        self.assertIs(outcome, Outcome.UNAVAILABLE)
        self.assertEqual(self.resource.requests, [])
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertTrue(
            any(p in warnings[0] for p in problems),
            f"no TLS problem named in {warnings[0]!r}",
        )
        everything = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn(PASSWORD, everything)
        self.assertNotIn(SECRET.decode(), everything)
        # The raw call fails with the one exception type callers expect.
        from xcauth.backends.jsxc import BackendUnavailable

        with self.assertRaises(BackendUnavailable):
            yield client.call("isuser", "alice", "example.org")
        return warnings[0]

    @inlineCallbacks
    def test_trustedCA(self) -> Any:
        """
        A pool trusting the CA talks to C{https://localhost:PORT/...}: the
        right password is C{YES}, a wrong one C{NO}, over one kept-alive TLS
        connection.
        """
        client = self.serve(PKI.localhost, trustCA=True)
        self.assertIs((yield client.auth("alice", "example.org", PASSWORD)), Outcome.YES)
        self.assertIs((yield client.auth("alice", "example.org", "wrong")), Outcome.NO)
        self.assertIs((yield client.isUser("nobody", "example.org")), Outcome.NO)
        self.assertEqual(len(self.resource.requests), 3)
        self.assertEqual(self.resource.requests[0]["password"], PASSWORD)
        self.assertEqual(len(self.wrapper.protocols), 1)

    @inlineCallbacks
    def test_defaultPolicyRefusesUnknownCA(self) -> Any:
        """
        With the default policy (the system's trust store) the test CA's chain
        is refused: C{UNAVAILABLE}, and a warning that says why.
        """
        client = self.serve(PKI.localhost, trustCA=False)
        yield self.refused(client, "certificate verify failed", "unable to get local issuer")

    @inlineCallbacks
    def test_wrongHostName(self) -> Any:
        """
        A certificate from the trusted CA for another host name is refused.
        """
        client = self.serve(PKI.wrongName, trustCA=True)
        yield self.refused(client, "VerificationError", "DNSMismatch", "localhost")

    @inlineCallbacks
    def test_expired(self) -> Any:
        """
        An expired certificate from the trusted CA is refused.
        """
        client = self.serve(PKI.expired, trustCA=True)
        yield self.refused(client, "certificate verify failed", "expired")

    @inlineCallbacks
    def test_plainHTTPToTLSPort(self) -> Any:
        """
        Speaking plain http to a TLS port is "unavailable", not a crash.
        """
        client = self.serve(PKI.localhost, trustCA=True)
        plain = JSXCClient(
            HTTPRequester(self.http.agent, reactor, timeout=5),
            client.url.replace("https:", "http:"),
            SECRET,
        )
        self.assertIs(
            (yield plain.auth("alice", "example.org", PASSWORD)), Outcome.UNAVAILABLE
        )
        self.assertEqual(self.resource.requests, [])
