"""
The daemon as a service: the shared L{xcauth.hub.Hub} plus one listener per
C{--listen}; a listener that cannot start stops the daemon with a message
saying why.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger

from xcauth.config import ConfigError
from xcauth.framing.base import XcauthFactory
from xcauth.framing.registry import FRAMINGS
from xcauth.hub import Hub
from xcauth.listen import Listener, groupID, listenerService, unixSocketPath

log = Logger()


class XcauthService(MultiService):
    """
    The whole daemon: the backend plus one listener per configured endpoint.
    A listener that cannot start stops the daemon with a message saying why.
    """

    def __init__(self, hub: Hub, listeners: list[Listener], reactor: Any) -> None:
        super().__init__()
        self.hub = hub
        self.reactor = reactor
        hub.setServiceParent(self)
        self.listeners = []
        #: UNIX sockets to give to a group once they listen.
        self.socketGroups = [listener for listener in listeners if listener.group]
        for listener in listeners:
            factory = XcauthFactory(FRAMINGS[listener.framing], hub.context)
            svc = listenerService(listener, factory, reactor)
            svc.setServiceParent(self)
            self.listeners.append(svc)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            self._cannotListen(e)
        self._giveSocketsToGroups()

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            self._cannotListen(e)
        self._giveSocketsToGroups()
        for svc in self.listeners:
            log.info("listening: {listener}", listener=svc.name)
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
                raise SystemExit(
                    f"xcauth: cannot give the socket {path} to group {group}: {e}"
                ) from None
            log.info("socket {path} given to group {group}", path=path, group=group)

    def _cannotListen(self, e: Exception) -> None:
        raise SystemExit(f"xcauth: cannot start a listener: {e}")
