"""
Answering what is in flight when the daemon stops.

L{drainConnections} asks every open connection to read nothing more, to send
the answers of the requests it has read (each is answered within the
deadline, whatever the backend does) and then to close; it fires as soon as
the last has closed (each connection's C{connectionLost} fires its
L{whenClosed}), or after a timeout, when the remaining connections are
aborted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime


def isClosed(connection: Any) -> bool:
    """
    Whether C{connection}'s transport is gone (C{connectionLost} ran).
    """
    transport = getattr(connection, "transport", None)
    return transport is None or bool(getattr(transport, "disconnected", False))


def whenClosed(connection: Any) -> Deferred[None]:
    """
    A L{Deferred} firing once C{connection}'s C{connectionLost} has run (the
    protocol's own, then this one, put in front of it on the instance: the
    transport calls the protocol's C{connectionLost} as it finds it then).
    """
    closed: Deferred[None] = Deferred()
    lost = connection.connectionLost

    def connectionLost(reason: Any = None) -> Any:
        try:
            return lost(reason)
        finally:
            if not closed.called:
                closed.callback(None)

    connection.connectionLost = connectionLost
    return closed


def finish(connection: Any) -> None:
    """
    Ask C{connection} to answer what it has read, then close.  A connection
    that delegates to an inner protocol (C{EjabberdAutoProtocol}) is asked
    through it; one that has not read a request yet is closed.
    """
    target = getattr(connection, "inner", connection)
    closeWhenAnswered = getattr(target, "closeWhenAnswered", None)
    if closeWhenAnswered is not None:
        closeWhenAnswered()
    else:
        connection.transport.loseConnection()


def drainConnections(
    connections: Iterable[Any], clock: IReactorTime, timeout: float
) -> Deferred[int]:
    """
    Finish every connection in C{connections} (see L{finish}) and wait until
    all have closed, for at most C{timeout} seconds; the ones still open then
    are aborted.

    @return: fires, as soon as the last connection has closed or at the
        timeout, with the number of connections that had to be aborted.
    """
    pending = [c for c in connections if not isClosed(c)]
    closed = [whenClosed(c) for c in pending]
    done: Deferred[int] = Deferred()

    def allClosed(_: object) -> None:
        if timer.active():  # not at the timeout, whose aborts close the rest
            timer.cancel()
            done.callback(0)

    def abort() -> None:
        stillOpen = [c for c, d in zip(pending, closed, strict=True) if not d.called]
        for connection in stillOpen:
            transport = connection.transport
            getattr(transport, "abortConnection", transport.loseConnection)()
        done.callback(len(stillOpen))

    if not pending:
        done.callback(0)
        return done
    timer = clock.callLater(timeout, abort)
    for connection in pending:
        finish(connection)
    DeferredList(closed).addCallback(allClosed)
    return done
