"""
The composition root: L{buildHub} builds, in one place, everything the
listeners share (HTTP agent and pool, state database and its thread, bcrypt
threads, domain table, credential cache, authenticator) and hands it to the
L{Hub} service, which starts and stops it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.client import HTTPConnectionPool

from xcauth.auth import Authenticator
from xcauth.cache import CachePolicy, CredentialCache, DatabaseStorage, MemoryStorage
from xcauth.config import Config
from xcauth.domains import DomainSettings, DomainTable
from xcauth.framing.base import ServerContext
from xcauth.http import HTTPRequester, makeAgent
from xcauth.jsxc import JSXCClient
from xcauth.keys import PasswordKeys
from xcauth.roster import ICommandRunner, RosterSync
from xcauth.rostersetup import makeRosterSync
from xcauth.store import Store, ThreadWorker, whenFired

#: Threads hashing and checking passwords with bcrypt (CPU-bound: about the
#: number of cores).  A burst of cache checks queues here; tokens and isuser
#: never wait for these threads.
BCRYPT_THREADS = 2

#: Options L{Hub.reload} cannot apply (the database, the cache storage and the
#: roster sync are set up once): C{(option, Config attribute)}.
RESTART_SETTINGS = (
    ("db", "db"),
    ("cache-storage", "cacheStorage"),
    ("cache-bcrypt-rounds", "bcryptRounds"),
    ("roster-sync", "rosterSync"),
    ("roster-api-url", "rosterApiURL"),
    ("ejabberdctl", "ejabberdctl"),
    ("roster-command-timeout", "rosterCommandTimeout"),
)


class Hub(Service):
    """
    Runs what every listener shares: starts the worker threads and the domain
    table's refreshes, and on stop lets pending work finish, then closes the
    database and the pooled backend connections.
    """

    def __init__(
        self,
        context: ServerContext,
        domains: DomainTable,
        store: Store,
        dbWorker: ThreadWorker,
        hashWorker: ThreadWorker,
        cache: CredentialCache | None,
        pool: HTTPConnectionPool | None,
        rosterSync: RosterSync | None = None,
        rosterRunner: ICommandRunner | None = None,
        config: Config | None = None,
        reactor: Any = None,
        agent: Any = None,
    ) -> None:
        self.context = context
        self.authenticator = context.authenticator
        self.domains = domains
        self.store = store
        self.dbWorker = dbWorker
        self.hashWorker = hashWorker
        self.cache = cache
        self.pool = pool
        self.rosterSync = rosterSync
        self.rosterRunner = rosterRunner
        #: The configuration in force (L{reload} replaces it).
        self.config = config
        self.reactor = reactor
        self.agent = agent
        #: Pools replaced by a reload, closed when the hub stops.
        self._oldPools: list[HTTPConnectionPool] = []

    def reload(self, config: Config) -> list[str]:
        """
        Apply C{config} in place, without re-binding anything or reopening the
        database: the backend clients (URL, secrets, timeouts), the global
        settings of the domain table (which is then re-read), the request
        deadline, the in-flight bound, the cache TTLs and the debug flag.
        Connections stay open; requests already started finish with the
        settings they started with.

        @return: the options whose new value needs a restart (L{RESTART_SETTINGS}:
            C{db}, the cache storage, the roster sync); they keep their old value.
        """
        old = self.config
        assert old is not None, "a hub built without its configuration cannot reload"
        restart = [
            name
            for name, attribute in RESTART_SETTINGS
            if getattr(old, attribute) != getattr(config, attribute)
        ]
        if config.connectTimeout != old.connectTimeout or self.agent is None:
            if self.pool is not None:
                self._oldPools.append(self.pool)
            self.agent, self.pool = makeAgent(self.reactor, connectTimeout=config.connectTimeout)
        makeClient = clientFactory(
            HTTPRequester(self.agent, self.reactor, timeout=config.totalTimeout)
        )
        self.domains.reconfigure(
            DomainSettings(
                secrets=config.secrets,
                authDomain=None,
                client=makeClient(config.url, config.secrets[0]),
            ),
            makeClient,
        )
        context = self.context
        context.deadline = config.deadline
        context.maxInFlight = config.maxInFlight
        context.debug = config.debug
        context.logRequests = config.logRequests
        if isinstance(self.authenticator, Authenticator):
            self.authenticator.debug = config.debug
        if self.cache is not None:
            self.cache.policy = cachePolicy(config)
            self.cache.debug = config.debug
            self.cache.setDeadline(config.deadline)
        self.config = attr.evolve(
            config, **{attribute: getattr(old, attribute) for _, attribute in RESTART_SETTINGS}
        )
        return restart

    def startService(self) -> None:
        """
        Start the worker threads and the domain table refreshes.
        """
        super().startService()
        self.dbWorker.start()
        self.hashWorker.start()
        self.domains.start()

    def stopService(self) -> Deferred[None]:
        """
        Stop refreshing, finish pending bcrypt work and database writes, close
        the database and the pooled backend connections.
        """
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.domains.stop()
        if self.rosterSync is not None:
            await self.rosterSync.stop()
        if self.rosterRunner is not None:
            await self.rosterRunner.close()
        if self.cache is not None:
            await self.cache.hashes.stop()
        await self.hashWorker.stop()
        if self.cache is not None:
            for d in list(self.cache.pending):
                await whenFired(d)
        await self.store.close()
        await self.dbWorker.stop()
        for pool in [*self._oldPools, self.pool]:
            if pool is not None:
                await pool.closeCachedConnections()


def buildHub(config: Config, reactor: Any) -> Hub:
    """
    Build the shared core of a daemon (or of one C{xcauth} command) from its
    configuration.
    """
    agent, pool = makeAgent(reactor, connectTimeout=config.connectTimeout)
    makeClient = clientFactory(HTTPRequester(agent, reactor, timeout=config.totalTimeout))

    # SQLite: one connection, used from one thread.  The file is created when
    # the cache lives in it; otherwise it is read if (once) it exists.
    dbWorker = ThreadWorker(reactor, "xcauth-db", 1)
    store = Store(
        config.db,
        dbWorker,
        create=config.cacheStorage == "db" or config.rosterSync != "none",
    )
    domains = DomainTable(
        store,
        DomainSettings(
            secrets=config.secrets,
            authDomain=None,
            client=makeClient(config.url, config.secrets[0]),
        ),
        makeClient,
        reactor,
    )
    keys = PasswordKeys()
    hashWorker = ThreadWorker(reactor, "xcauth-bcrypt", BCRYPT_THREADS)
    cache = buildCache(config, store, hashWorker, reactor, keys)
    # The shared roster sync to ejabberd (None unless configured).
    rosterSync, rosterRunner = makeRosterSync(config, reactor, domains.settingsFor, store)
    authenticator = Authenticator(
        domains.settingsFor,
        reactor,
        keys,
        cache=cache,
        ready=domains.whenReady,
        debug=config.debug,
        onLogin=None if rosterSync is None else rosterSync.onLogin,
    )
    context = ServerContext(
        authenticator=authenticator,
        clock=reactor,
        deadline=config.deadline,
        maxInFlight=config.maxInFlight,
        debug=config.debug,
        logRequests=config.logRequests,
    )
    return Hub(
        context, domains, store, dbWorker, hashWorker, cache, pool, rosterSync, rosterRunner,
        config=config, reactor=reactor, agent=agent,
    )


def clientFactory(http: HTTPRequester) -> Callable[[str, bytes], JSXCClient]:
    """
    What builds the backend client of one C{(url, secret)} over C{http}.
    """

    def makeClient(url: str, secret: bytes) -> JSXCClient:
        return JSXCClient(http, url, secret)

    return makeClient


def cachePolicy(config: Config) -> CachePolicy:
    """
    The cache TTLs of C{config}.
    """
    return CachePolicy(
        queryTTL=config.cacheQueryTTL,
        verificationTTL=config.cacheVerificationTTL,
        unreachableTTL=config.cacheUnreachableTTL,
    )


def buildCache(
    config: Config,
    store: Store,
    hasher: ThreadWorker,
    clock: Any,
    keys: Callable[[str], bytes],
) -> CredentialCache | None:
    """
    The credential cache C{cache-storage} asks for, or C{None}.
    """
    if config.cacheStorage == "none":
        return None
    persistent = config.cacheStorage == "db"
    return CredentialCache(
        DatabaseStorage(store) if persistent else MemoryStorage(),
        hasher,
        clock,
        cachePolicy(config),
        config.bcryptRounds[0 if persistent else 1],
        keys,
        deadline=config.deadline,
        concurrency=BCRYPT_THREADS,
        debug=config.debug,
    )


def tuneGarbageCollector() -> None:
    """
    Keep the garbage collector from growing with the requests in flight (run
    once, where the process starts, after its modules are loaded).

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
