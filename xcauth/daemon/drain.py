"""
Answering what is in flight when the daemon stops.

L{drainConnections} asks every open connection to read nothing more, to send
the answers of the requests it has read (each is answered within the
deadline, whatever the backend does) and then to close; it fires once all
have closed, or after a timeout, when the remaining connections are aborted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

#: Seconds between two looks at the connections being drained.
POLL_INTERVAL = 0.05


def isClosed(connection: Any) -> bool:
    """
    Whether C{connection}'s transport is gone (C{connectionLost} ran).
    """
    transport = getattr(connection, "transport", None)
    return transport is None or bool(getattr(transport, "disconnected", False))


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
    connections: Iterable[Any],
    clock: IReactorTime,
    timeout: float,
    interval: float = POLL_INTERVAL,
) -> Deferred[int]:
    """
    Finish every connection in C{connections} (see L{finish}) and wait until
    all have closed, for at most C{timeout} seconds; the ones still open then
    are aborted.

    @return: fires with the number of connections that had to be aborted.
    """
    pending = [c for c in connections if not isClosed(c)]
    for connection in pending:
        finish(connection)
    done: Deferred[int] = Deferred()
    started = clock.seconds()

    def check() -> None:
        nonlocal pending
        pending = [c for c in pending if not isClosed(c)]
        if pending and clock.seconds() - started < timeout:
            return
        loop.stop()
        for connection in pending:
            transport = connection.transport
            getattr(transport, "abortConnection", transport.loseConnection)()
        done.callback(len(pending))

    loop = LoopingCall(check)
    loop.clock = clock
    loop.start(interval, now=True)
    return done
