"""
Endpoint type C{xcauth-systemd-unix:name=NAME}: a UNIX socket passed by systemd,
served without changing its mode or removing its file (L{xcauth.systemdunix}).
Imports nothing heavy.
"""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _SystemdUNIXParser:
    prefix = "xcauth-systemd-unix"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        from xcauth.systemdunix import parseSystemdUNIX

        return parseSystemdUNIX(reactor, *args, **kwargs)


xcauthSystemdUNIX = _SystemdUNIXParser()
