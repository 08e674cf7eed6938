"""
Every private name of Twisted that xcauth uses, in one place.

Twisted offers no public way to do these few things; each entry says what it
does, which Twisted releases it was checked on (C{make test-oldest} runs the
suite on Twisted 22.10 and, with C{TWISTED=24.11.0}, on Debian 13's release;
C{make test} on the newest, 26.10 today) and the upstream ticket where there
is one.  C{tests.unit.test_twistedprivate} fails on a Twisted release where a
name has gone, and C{tests.unit.test_layers} fails when a private name of
Twisted is used anywhere else.

 1. L{RequestNotSent}: what a request gets from a pooled connection that died
    while idle.  Defined in C{twisted.web._newclient} and imported by
    C{twisted.web.client} without being part of its C{__all__} (22.10 to
    26.10).  No ticket.
 2. L{quietConnectionPool}: the pool's connection factory without its two
    "Starting/Stopping factory" lines per connection, through
    C{HTTPConnectionPool._factory} (22.10 to 26.10).  Ticket
    U{twisted#9330<https://github.com/twisted/twisted/issues/9330>}.
 3. L{startReportingRunner} and L{endWithTwistdSignal}: twistd's Unix runner
    (C{twisted.scripts._twistd_unix.UnixApplicationRunner}, its
    C{_waitForStart} and C{_formatChildException} hooks and its
    C{_exitSignal}, and C{twisted.application.app._exitWithSignal}), so that
    a start error reaches the terminal whole, as one line (22.10 to 26.10).
    No ticket.
 4. L{twistdLogFile}: the log file twistd writes, kept by twistd only in the
    SIGUSR1 handler it installs (C{UnixAppLogger._getLogObserver}) (22.10 to
    26.10).  No ticket.
 5. L{ForeignUNIXPort} and L{adoptForeignUNIXPort}: a listening UNIX socket
    whose file belongs to someone else (systemd), through
    C{twisted.internet.unix.Port._fromListeningDescriptor} and the attribute
    holding the socket's path (C{port} up to 26.4, C{_bindPath} from 26.10 on).
    Checked on 22.10, 24.10, 24.11, 25.5, 26.4 and 26.10.  Ticket
    U{twisted#10261<https://github.com/twisted/twisted/issues/10261>} (adopted
    UNIX sockets are chmodded; a fix was proposed in pull request 12471).
 6. L{listeningPort}: the port a L{StreamServerEndpointService} listens on
    (to log the port a C{tcp:0} listener was given), kept only in its
    C{_waitingForPort} (22.10 to 26.10).  No ticket.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import unix
from twisted.python.logfile import BaseLogFile
from twisted.web._newclient import RequestNotSent
from twisted.web.client import HTTPConnectionPool

__all__ = [
    "RequestNotSent",
    "quietConnectionPool",
    "startReportingRunner",
    "endWithTwistdSignal",
    "twistdLogFile",
    "ForeignUNIXPort",
    "adoptForeignUNIXPort",
    "listeningPort",
]


# 2. The connection pool's factory.

_PoolFactory: Any = HTTPConnectionPool._factory


class _QuietPoolFactory(_PoolFactory):
    noisy = False


def quietConnectionPool(pool: HTTPConnectionPool) -> None:
    """
    Make C{pool}'s connections log nothing when they open and close: each
    would log "Starting factory ..." and "Stopping factory ...", hundreds of
    lines after a burst of logins.
    """
    pool._factory = _QuietPoolFactory


# 3. twistd's runner.


def startReportingRunner(
    formatChildException: Callable[[BaseException], bytes],
    waitForStart: Callable[[int], int],
    beforeReraise: Callable[[Any, BaseException], None],
    reported: type[BaseException],
) -> type:
    """
    twistd's Unix application runner, with its start-up status pipe in
    xcauth's hands.

    @param formatChildException: the bytes the daemon writes to the status
        pipe for an exception raised while its services start.
    @param waitForStart: the parent's wait on the pipe's read end: returns the
        parent's exit status.
    @param beforeReraise: called with the runner's options and an exception
        of type C{reported} raised by C{postApplication}, before it goes on.
    """
    from twisted.scripts._twistd_unix import UnixApplicationRunner

    class Runner(UnixApplicationRunner):
        def _formatChildException(self, exception: BaseException) -> bytes:
            return formatChildException(exception)

        def postApplication(self) -> None:
            try:
                super().postApplication()
            except reported as e:
                beforeReraise(self.config, e)
                raise

        def _waitForStart(self, readPipe: int) -> int:
            return waitForStart(readPipe)

    return Runner


def serverOptions() -> type:
    """
    twistd's command line options on Unix (C{twistd}'s own, subclassed by
    C{xcauth-daemon}).
    """
    from twisted.scripts._twistd_unix import ServerOptions

    return ServerOptions


def endWithTwistdSignal(runner: Any) -> None:
    """
    After C{runner.run()}: end the process with the signal that stopped the
    reactor, if one did, as C{twistd} does (so that a parent sees "killed by
    SIGINT" rather than a status).
    """
    from twisted.application import app

    if runner._exitSignal is not None:
        app._exitWithSignal(runner._exitSignal)


# 4. twistd's log file.


def twistdLogFile() -> BaseLogFile | None:
    """
    The log file twistd writes (C{--logfile}), or C{None} when it logs to
    standard output or syslog: taken from the SIGUSR1 handler twistd
    installs to rotate it, the only place that keeps it.
    """
    handler = signal.getsignal(signal.SIGUSR1)
    for cell in getattr(handler, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, BaseLogFile):
            return value
    return None


# 5. UNIX sockets owned by someone else.


class ForeignUNIXPort(unix.Port):
    """
    A listening UNIX socket whose file belongs to someone else (systemd's
    C{SocketMode=}, C{SocketGroup=}, C{RemoveOnStop=}): never chmod or unlink it.

    Twisted's port skips both for sockets in the abstract namespace (a path
    starting with NUL), so the path is shown to it in that form while it starts
    and stops.
    """

    def _pathAttribute(self) -> str:
        # The attribute Twisted's Port binds, chmods and unlinks: _bindPath
        # since Twisted 26.10, port before.
        return "_bindPath" if hasattr(self, "_bindPath") else "port"

    def _asAbstract(self) -> tuple[str, Any]:
        name = self._pathAttribute()
        path = getattr(self, name)
        setattr(self, name, (b"\0" if isinstance(path, bytes) else "\0") + path)
        return name, path

    def startListening(self) -> None:
        name, path = self._asAbstract()
        try:
            super().startListening()
        finally:
            setattr(self, name, path)

    def connectionLost(self, reason: Any) -> None:
        name, path = self._asAbstract()
        try:
            super().connectionLost(reason)
        finally:
            setattr(self, name, path)


def adoptForeignUNIXPort(reactor: Any, fileno: int, factory: Any) -> ForeignUNIXPort:
    """
    A L{ForeignUNIXPort} on the listening socket C{fileno} (not yet started;
    the port works on a duplicate of the descriptor).
    """
    port: ForeignUNIXPort = ForeignUNIXPort._fromListeningDescriptor(reactor, fileno, factory)
    return port



# 6. The port of a listening service.


def listeningPort(service: Any) -> Any:
    """
    The listening port of the L{StreamServerEndpointService} C{service} once
    it listens, else C{None}.
    """
    waiting = getattr(service, "_waitingForPort", None)
    return getattr(waiting, "result", None)
