"""
The daemon as a service: the shared L{xcauth.daemon.hub.Hub} plus one listener per
C{--listen}; a listener that cannot start stops the daemon with a message
saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from xcauth.daemon.config import ConfigError
from xcauth.daemon.drain import drainConnections
from xcauth.daemon.hub import Hub, tuneGarbageCollector
from xcauth.daemon.listen import (
    Listener,
    connectionLimit,
    descriptorLimit,
    groupID,
    listenerService,
    plainRemoteWarning,
    unixSocketPath,
)
from xcauth.daemon.main import StartError
from xcauth.daemon.metrics import METRICS_MAX_CONNECTIONS, metricsService
from xcauth.framing.base import XcauthFactory
from xcauth.framing.registry import FRAMINGS
from xcauth.state.database import whenFired
from xcauth.twistedprivate import listeningPort

log = Logger()

#: Seconds a stop waits, beyond the request deadline, for answered
#: connections to close (sending their last answers).
DRAIN_MARGIN = 2.0


class XcauthService(MultiService):
    """
    The whole daemon: the backend plus one listener per configured endpoint.
    A listener that cannot start stops the daemon with a message saying why.
    """

    def __init__(self, hub: Hub, listeners: list[Listener], reactor: Any) -> None:
        super().__init__()
        self.hub = hub
        self.reactor = reactor
        self.listeners = []
        self.factories: list[XcauthFactory] = []
        #: UNIX sockets to give to a group once they listen.
        self.socketGroups = [listener for listener in listeners if listener.group]
        serveMetrics = hub.metrics is not None and hub.config is not None and bool(
            hub.config.metrics
        )
        descriptors = descriptorLimit()
        hub.setServiceParent(self)
        # The hub stops once the connections are answered (L{drain}).
        hub.beforeStop = self.drain
        #: Fires when L{drain} has ended.
        self.drained: Deferred[None] = Deferred()
        #: The metrics listener (C{--metrics}), started with the others and
        #: serving until the drain has ended.
        self.metricsListener = None
        self._metricsParent = None
        if serveMetrics:
            assert hub.metrics is not None and hub.config is not None
            assert hub.config.metrics is not None
            # The metrics listener's connections come out of the same budget.
            descriptors -= METRICS_MAX_CONNECTIONS
            self.metricsListener = metricsService(
                hub.metrics, hub.config.metrics, reactor,
                maxConnections=METRICS_MAX_CONNECTIONS,
            )
            self._metricsParent = StoppedAfter(lambda: whenFired(self.drained))
            self._metricsParent.setName(self.metricsListener.name)
            self.metricsListener.setServiceParent(self._metricsParent)
            self._metricsParent.setServiceParent(self)
        #: Warnings about plain listeners off loopback, logged at start.
        self.warnings = [w for w in map(plainRemoteWarning, listeners) if w]
        for listener in listeners:
            factory = XcauthFactory(
                FRAMINGS[listener.framing],
                hub.context,
                connectionLimit(hub.config.maxConnections if hub.config else None,
                                len(listeners), descriptors),
            )
            self.factories.append(factory)
            # The framing label its requests are counted under ("generic": prosody).
            label = getattr(FRAMINGS[listener.framing], "framing", listener.framing)
            hub.context.metrics.serving(label, factory.openConnections)
            svc = listenerService(listener, factory, reactor)
            svc.setServiceParent(self)
            self.listeners.append(svc)

    def privilegedStartService(self) -> None:
        """
        Tune the process's garbage collector (L{tuneGarbageCollector}: the
        daemon's process, which twistd starts this way, not a process that
        only builds the service), then start the children as
        L{MultiService} does, one at a time: a failure names its listener.
        """
        tuneGarbageCollector()
        Service.privilegedStartService(self)
        for svc in self:
            try:
                svc.privilegedStartService()
            except Exception as e:
                self._cannotListen(e, svc)
        self._giveSocketsToGroups()

    def startService(self) -> None:
        Service.startService(self)
        for svc in self:
            try:
                svc.startService()
            except Exception as e:
                self._cannotListen(e, svc)
        self._giveSocketsToGroups()
        for svc in [*self.listeners, *filter(None, [self.metricsListener])]:
            log.info("listening: {listener}{bound}", listener=svc.name, bound=_bound(svc))
        for warning in self.warnings:
            log.warn("{warning}", warning=warning)
        self.reactor.callWhenRunning(
            log.info, "xcauth ready: serving {count} listeners", count=len(self.listeners)
        )

    def _giveSocketsToGroups(self) -> None:
        """
        Give each listening UNIX socket with a C{group=} to its group, once and
        as early as possible: twistd starts listening before it drops root
        privileges (C{--uid}/C{--gid}), and only root may give a file to a
        group it is not in.
        """
        pending, self.socketGroups = self.socketGroups, []
        for listener in pending:
            path, group = unixSocketPath(listener.endpoint), listener.group
            assert group is not None
            try:
                os.chown(path, -1, groupID(listener.entry, group))
            except (ConfigError, OSError) as e:
                raise StartError(
                    f"xcauth: cannot give the socket {path} to group {group}: {e}"
                ) from None
            log.info("socket {path} given to group {group}", path=path, group=group)

    def _cannotListen(self, e: Exception, svc: Any = None) -> None:
        if svc is not None and (svc in self.listeners or svc is self._metricsParent):
            raise StartError(f"xcauth: cannot start the listener {svc.name}: {e}") from None
        raise StartError(f"xcauth: cannot start a listener: {e}") from None

    def stopService(self) -> Deferred[None]:
        """
        Stop through L{MultiService}: the children newest first (the signal
        handlers, then the listeners: nothing new is accepted), the hub, whose
        stop first waits for L{drain}: the open connections answer what they
        have read (within the deadline) and close; the metrics listener once
        the drain has ended.
        """
        d: Deferred[object] = super().stopService()
        return d.addCallback(lambda _: log.info("xcauth stopped"))

    def drain(self) -> Deferred[None]:
        """
        Let the connections of every listener answer what they have read and
        close (the listeners have stopped listening); those still open after
        the deadline and L{DRAIN_MARGIN} are aborted.
        """
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        connections = [c for f in self.factories for c in list(f.connections)]
        log.info(
            "stopped listening; answering what {count} open connection(s) asked",
            count=len(connections),
        )
        try:
            aborted = await drainConnections(
                connections, self.reactor, self.hub.context.deadline + DRAIN_MARGIN
            )
            if aborted:
                log.warn("{count} connection(s) did not close in time", count=aborted)
        finally:
            if not self.drained.called:
                self.drained.callback(None)


class StoppedAfter(MultiService):
    """
    Services that stop only once C{until()} has fired: the metrics listener
    goes on serving while the daemon answers what is in flight.
    """

    def __init__(self, until: Callable[[], Deferred[Any]]) -> None:
        super().__init__()
        self.until = until

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.until()
        await super().stopService()


def _bound(svc: Any) -> str:
    """
    Where a TCP listener listens, for its log line: C{" on HOST port N"} (the
    port a C{tcp:0} endpoint was given, for tests and for operators), or
    nothing for other listeners.
    """
    try:
        address = listeningPort(svc).getHost()
    except Exception:
        return ""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return ""
    return f" on {address.host} port {address.port}"
