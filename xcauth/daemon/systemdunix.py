"""
UNIX sockets handed over by systemd (C{systemd:domain=UNIX:name=...}), such as
the saslauthd socket C{/run/saslauthd/mux}.

Twisted adopts a listening UNIX socket with the port class it uses for sockets
it creates itself, which sets the file's mode to C{0666} when it starts and
removes the file when it stops.  For a socket systemd owns that is wrong three
times over: it would undo C{SocketMode=0660} (anyone on the host could then
test passwords), it fails with C{EPERM} for an unprivileged service, and after a
restart of the service the socket systemd still holds would have no path.
The endpoint type C{xcauth-systemd-unix:name=NAME} (or C{index=N}), registered
by C{twisted/plugins/xcauth_endpoints.py}, listens on such a socket with a port
that leaves the file alone; L{xcauth.daemon.listen} uses it for every
C{systemd:domain=UNIX:...} listener.

Twisted has no public way to adopt a UNIX socket without that chmod and unlink
(C{reactor.adoptStreamPort} does both): the port that leaves the file alone is
L{xcauth.twistedprivate.ForeignUNIXPort}, which works through Twisted's private
names (checked on Twisted 22.10, 24.10, 24.11 (Debian 13's), 25.5, 26.4 and
26.10 by C{tests.e2e.test_systemd_e2e}: C{make test-oldest}, with
C{TWISTED=...}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import fdesc
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from xcauth.twistedprivate import adoptForeignUNIXPort


@implementer(IStreamServerEndpoint)
class SystemdUNIXEndpoint:
    """
    Listen on an inherited, already listening UNIX socket (by descriptor)
    without touching its file.
    """

    def __init__(self, reactor: Any, fileno: int) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self._used = False

    def listen(self, factory: Any) -> Deferred[Any]:
        """
        Serve C{factory} on the socket; the descriptor itself is closed (the
        port works on a duplicate), as Twisted's adopted endpoints do.
        """
        if self._used:
            from twisted.internet.error import AlreadyListened

            return fail(AlreadyListened())
        self._used = True
        try:
            fdesc.setNonBlocking(self.fileno)
            port = adoptForeignUNIXPort(self.reactor, self.fileno, factory)
            port.startListening()
            os.close(self.fileno)
        except BaseException:
            return fail()
        return succeed(port)


def parseSystemdUNIX(reactor: Any, *args: str, **kwargs: str) -> SystemdUNIXEndpoint:
    """
    The endpoint for C{xcauth-systemd-unix:name=NAME} or C{...:index=N}: the
    UNIX socket systemd passed under that name (C{FileDescriptorName=}) or at
    that position, as Twisted's own C{systemd:domain=UNIX:...} endpoint finds
    it (Twisted reads C{LISTEN_FDS} once, when it is imported, and removes it
    from the environment).
    """
    from twisted.internet.endpoints import serverFromString

    if args or set(kwargs) - {"name", "index"} or len(kwargs) != 1:
        raise ValueError("xcauth-systemd-unix takes name=NAME or index=N")
    ((key, value),) = kwargs.items()
    adopted = serverFromString(reactor, f"systemd:domain=UNIX:{key}={value}")
    return SystemdUNIXEndpoint(reactor, adopted.fileno)
