"""
TLS listeners that require a client certificate (mutual TLS), for a client on
another host: C{ssl:PORT:privateKey=KEY:certKey=CERT:clientCA=CA} (Twisted's
C{ssl:} arguments plus C{clientCA=}, a PEM file of the certificate authorities
whose client certificates are accepted).  L{xcauth.daemon.listen} turns such a
description into the endpoint type C{xcauth-tls:...}, registered by
C{twisted/plugins/xcauth_endpoints.py}, which builds Twisted's own
C{SSL4ServerEndpoint} with the options of
L{twisted.internet.ssl.PrivateCertificate.options}: the client must present a
certificate signed by one of those authorities, or the handshake fails before a
single request is read.  pyOpenSSL does the TLS; nothing here touches bytes.

A remote ejabberd node then connects with
C{socat STDIO OPENSSL:HOST:PORT,cert=CLIENT.pem,key=CLIENT.key,cafile=SERVER-CA.pem}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint

#: The listen backlog when the description gives none (as L{xcauth.daemon.listen}).
DEFAULT_BACKLOG = 1024

_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None


def loadAuthorities(path: str) -> list[Any]:
    """
    The certificates of a PEM file of certificate authorities.

    @raise ValueError: the file cannot be read or holds no certificate.
    """
    from OpenSSL.crypto import Error as OpenSSLError
    from twisted.internet.ssl import Certificate

    text = _read(path, "clientCA file")
    blocks = [_PEM_CERTIFICATE + b for b in text.split(_PEM_CERTIFICATE)[1:]]
    if not blocks:
        raise ValueError(f"clientCA {path} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(block.encode("ascii")) for block in blocks]
    except OpenSSLError as e:
        raise ValueError(f"clientCA {path} is not a valid certificate file: {e}") from None


def mutualTLSOptions(privateKey: str, certKey: str, clientCA: str) -> Any:
    """
    Server TLS options that require a client certificate signed by one of the
    authorities in C{clientCA}.

    @raise ValueError: a file cannot be read or is not valid.
    """
    from OpenSSL.crypto import Error as OpenSSLError
    from twisted.internet.ssl import PrivateCertificate

    pem = _read(certKey, "certificate") + "\n" + _read(privateKey, "private key")
    try:
        server = PrivateCertificate.loadPEM(pem)
    except OpenSSLError as e:
        raise ValueError(
            f"certKey {certKey} and privateKey {privateKey} are not a certificate and "
            f"its key: {e}"
        ) from None
    return server.options(*loadAuthorities(clientCA))


def parseMutualTLS(
    reactor: Any,
    port: str | None = None,
    *args: str,
    **kwargs: str,
) -> IStreamServerEndpoint:
    """
    The endpoint of C{xcauth-tls:PORT:privateKey=KEY[:certKey=CERT]:clientCA=CA
    [:interface=ADDRESS][:backlog=N]} (C{certKey} defaults to C{privateKey}, as
    for Twisted's C{ssl:}).

    @raise ValueError: an argument is missing, unknown or its file not valid.
    """
    port = kwargs.pop("port", port)
    if args or port is None or not port.isdigit():
        raise ValueError("xcauth-tls needs a port number and key=value arguments")
    known = {"privateKey", "certKey", "clientCA", "interface", "backlog"}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(sorted(unknown))} of a listener with "
            "clientCA= (known: " + ", ".join(sorted(known)) + ")"
        )
    privateKey = kwargs.get("privateKey")
    clientCA = kwargs.get("clientCA")
    if not privateKey or not clientCA:
        raise ValueError("a TLS listener with clientCA= needs privateKey= (and certKey=)")
    options = mutualTLSOptions(privateKey, kwargs.get("certKey") or privateKey, clientCA)
    backlog = kwargs.get("backlog", str(DEFAULT_BACKLOG))
    if not backlog.isdigit():
        raise ValueError(f"backlog {backlog!r} is not a number")
    return SSL4ServerEndpoint(
        reactor, int(port), options, backlog=int(backlog), interface=kwargs.get("interface", "")
    )
