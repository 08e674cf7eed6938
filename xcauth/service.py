"""
The daemon's services: L{Backend} owns the HTTP connection pool and the
authenticator; L{XcauthService} runs it and one listener per C{--listen}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.application.strports import service as strportsService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)

from xcauth.auth import Authenticator, DomainSettings
from xcauth.config import Config
from xcauth.framing.base import ServerContext, XcauthFactory
from xcauth.framing.registry import FRAMINGS
from xcauth.nextcloud import NextcloudClient

log = Logger()

#: Idle connections kept per backend host.  Each waiting login holds one
#: connection, so this is sized for hundreds of concurrent logins.
POOL_SIZE = 512
#: Seconds an idle pooled connection is kept.  A server closing it first is
#: handled by one retry of the request.
POOL_IDLE_SECONDS = 55


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory without a log line per backend connection.
    """

    noisy = False


class Backend(Service):
    """
    The shared authentication backend and the resources it owns.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = POOL_SIZE
        self.pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietHTTP11ClientFactory
        self.agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(),
            connectTimeout=config.connectTimeout,
            pool=self.pool,
        )
        client = NextcloudClient(
            self.agent, config.url, config.secrets[0], reactor, config.totalTimeout
        )
        self.globalSettings = DomainSettings(
            secrets=config.secrets, authDomain=None, client=client
        )
        self.authenticator = Authenticator(self.settingsFor, reactor)
        self.context = ServerContext(
            authenticator=self.authenticator,
            clock=reactor,
            deadline=config.deadline,
            maxInFlight=config.maxInFlight,
            debug=config.debug,
        )

    def settingsFor(self, domain: str) -> DomainSettings:
        """
        The settings for an XMPP domain: the global url and secret.
        """
        return self.globalSettings

    def stopService(self) -> Deferred[object]:
        """
        Close the pooled backend connections.
        """
        super().stopService()
        return self.pool.closeCachedConnections()


class XcauthService(MultiService):
    """
    The whole daemon: the backend plus one listener per configured endpoint.
    A listener that cannot start stops the daemon with a message saying why.
    """

    def __init__(self, config: Config, listeners: list[tuple[str, str]], reactor: Any):
        super().__init__()
        self.backend = Backend(config, reactor)
        self.backend.setServiceParent(self)
        self.listeners = []
        for framing, endpoint in listeners:
            factory = XcauthFactory(FRAMINGS[framing], self.backend.context)
            svc = strportsService(endpoint, factory, reactor=reactor)
            svc.setName(f"{framing}={endpoint}")
            svc.setServiceParent(self)
            self.listeners.append(svc)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            self._cannotListen(e)

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            self._cannotListen(e)
        for svc in self.listeners:
            log.info("listening: {listener}", listener=svc.name)

    def _cannotListen(self, e: Exception) -> None:
        raise SystemExit(f"xcauth: cannot start a listener: {e}")
