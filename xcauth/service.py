"""
The daemon's services: L{Backend} owns the HTTP connection pool, the state
database with its thread, the bcrypt threads, the domain table, the credential
cache and the authenticator; L{XcauthService} runs it and one listener per C{--listen}.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.application.strports import service as strportsService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from xcauth.auth import Authenticator, DomainSettings
from xcauth.cache import CachePolicy, CredentialCache, DatabaseStorage, MemoryStorage
from xcauth.config import Config, ConfigError
from xcauth.domains import DomainTable
from xcauth.framing.base import ServerContext, XcauthFactory
from xcauth.framing.registry import FRAMINGS
from xcauth.httpclient import HTTPClientPool
from xcauth.nextcloud import NextcloudClient
from xcauth.store import Store, ThreadWorker, whenFired
from xcauth.systemdunix import keepSystemdUNIXSocket
from xcauth.tap import groupID, splitUnixGroup, unixSocketPath

log = Logger()

#: Idle connections kept per backend host.  Each waiting login holds one
#: connection, so this is sized for hundreds of concurrent logins.
POOL_SIZE = 512
#: Seconds an idle pooled connection is kept.  A server closing it first is
#: handled by one retry of the request.
POOL_IDLE_SECONDS = 55
#: Threads hashing and checking passwords with bcrypt (CPU-bound: about the
#: number of cores).  A burst of cache checks queues here; tokens and isuser
#: never wait for these threads.
BCRYPT_THREADS = 2


class Backend(Service):
    """
    The shared authentication backend and the resources it owns.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        # xcauth's own lean HTTP/1.1 client (see xcauth.httpclient for why not
        # twisted.web's Agent), with Agent's default certificate checks.
        self.pool = HTTPClientPool(
            reactor,
            connectTimeout=config.connectTimeout,
            maxIdle=POOL_SIZE,
            idleTimeout=POOL_IDLE_SECONDS,
        )
        self.globalSettings = DomainSettings(
            secrets=config.secrets,
            authDomain=None,
            client=self.makeClient(config.url, config.secrets[0]),
        )
        # SQLite: one connection, used from one thread.  The file is created
        # when the cache lives in it; otherwise it is read if (once) it exists.
        self.dbWorker = ThreadWorker(reactor, "xcauth-db", 1)
        self.store = Store(
            config.db, self.dbWorker, create=config.cacheStorage == "db"
        )
        self.domains = DomainTable(
            self.store, self.globalSettings, self.makeClient, reactor
        )
        self.hashWorker = ThreadWorker(reactor, "xcauth-bcrypt", BCRYPT_THREADS)
        self.cache: CredentialCache | None = None
        if config.cacheStorage != "none":
            persistent = config.cacheStorage == "db"
            storage = DatabaseStorage(self.store) if persistent else MemoryStorage()
            self.cache = CredentialCache(
                storage,
                self.hashWorker,
                reactor,
                CachePolicy(
                    queryTTL=config.cacheQueryTTL,
                    verificationTTL=config.cacheVerificationTTL,
                    unreachableTTL=config.cacheUnreachableTTL,
                ),
                config.bcryptRounds[0 if persistent else 1],
            )
        self.authenticator = Authenticator(
            self.settingsFor,
            reactor,
            cache=self.cache,
            ready=self.domains.whenReady,
            debug=config.debug,
        )
        if self.cache is not None:
            self.cache.debug = config.debug
        self.context = ServerContext(
            authenticator=self.authenticator,
            clock=reactor,
            deadline=config.deadline,
            maxInFlight=config.maxInFlight,
            debug=config.debug,
            defaultDomain=config.dovecotDefaultDomain,
        )

    def makeClient(self, url: str, secret: bytes) -> NextcloudClient:
        """
        A backend client for C{url} signing with C{secret}, sharing the pool.
        """
        return NextcloudClient(
            self.pool, url, secret, self.reactor, self.config.totalTimeout
        )

    def settingsFor(self, domain: str) -> DomainSettings:
        """
        The settings for an XMPP domain: its row of the domains table, or the
        global url and secret.
        """
        return self.domains.settingsFor(domain)

    def startService(self) -> None:
        """
        Start the worker threads and the domain table refreshes.
        """
        super().startService()
        self.dbWorker.start()
        self.hashWorker.start()
        self.domains.start()

    def stopService(self) -> Deferred[object]:
        """
        Stop refreshing, finish pending bcrypt work and database writes, close
        the database and the pooled backend connections.
        """
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.domains.stop()
        await self.hashWorker.stop()
        if self.cache is not None:
            await _settled(list(self.cache.pending))
        await self.store.close()
        await self.dbWorker.stop()
        await self.pool.close()


async def _settled(pending: list[Deferred[Any]]) -> None:
    for d in pending:
        await whenFired(d)


def tuneGarbageCollector() -> None:
    """
    Keep the garbage collector from growing with the requests in flight (run
    once, by the daemon, after start-up).

    Every object of a request in flight (Deferreds, callbacks, slots) lives
    as long as the request; with hundreds in flight they survive the young
    generations and make full collections frequent, each traversing the
    whole heap.  Profiled at 500 concurrent backend logins, that was 10-20%
    of the daemon's CPU and pauses of 20-30 ms (p99 latency).  Two standard
    remedies: C{gc.freeze()} moves what start-up built (modules, classes,
    about 50,000 objects that never become garbage) out of every later
    collection, and a first-generation threshold of 10,000 instead of 700
    lets a request's objects die by reference counting before a collection
    looks at them.  Reference cycles are still collected, a little later.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 10_000), gen1, gen2)


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
        #: UNIX sockets to give to a group once they listen: (path, listen
        #: entry, group).
        self.socketGroups: list[tuple[str, str, str]] = []
        for framing, endpoint in listeners:
            factory = XcauthFactory(FRAMINGS[framing], self.backend.context)
            bare, group = splitUnixGroup(endpoint)
            svc = strportsService(bare, factory, reactor=reactor)
            # A UNIX socket from systemd keeps the mode and path systemd gave it.
            svc.endpoint = keepSystemdUNIXSocket(svc.endpoint)
            svc.setName(f"{framing}={endpoint}")
            svc.setServiceParent(self)
            self.listeners.append(svc)
            if group is not None:
                self.socketGroups.append((unixSocketPath(bare), endpoint, group))

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
        tuneGarbageCollector()
        self.backend.reactor.callWhenRunning(
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
        for path, endpoint, group in pending:
            try:
                os.chown(path, -1, groupID(endpoint, group))
            except (ConfigError, OSError) as e:
                raise SystemExit(
                    f"xcauth: cannot give the socket {path} to group {group}: {e}"
                ) from None
            log.info("socket {path} given to group {group}", path=path, group=group)

    def _cannotListen(self, e: Exception) -> None:
        raise SystemExit(f"xcauth: cannot start a listener: {e}")
