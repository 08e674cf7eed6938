"""
Endpoint types C{xcauth-systemd-unix:name=NAME}: a UNIX socket passed by systemd,
served without changing its mode or removing its file (L{xcauth.daemon.systemdunix});
and C{xcauth-tls:PORT:...:clientCA=CA}: a TLS listener that requires a client
certificate (L{xcauth.daemon.tls}).  Imports nothing heavy.
"""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _SystemdUNIXParser:
    prefix = "xcauth-systemd-unix"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        from xcauth.daemon.systemdunix import parseSystemdUNIX

        return parseSystemdUNIX(reactor, *args, **kwargs)


xcauthSystemdUNIX = _SystemdUNIXParser()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _MutualTLSParser:
    prefix = "xcauth-tls"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        from xcauth.daemon.tls import parseMutualTLS

        return parseMutualTLS(reactor, *args, **kwargs)


xcauthMutualTLS = _MutualTLSParser()
