"""
The composition root: L{buildHub} builds, in one place, everything the
listeners share (HTTP agent and pool, state database and its thread, bcrypt
threads, domain table, credential cache, authenticator) and hands it to the
L{Hub} service, which starts and stops it.
"""

from __future__ import annotations

import gc
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

import attr
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from xcauth.backends.http import HTTPRequester, makeAgent
from xcauth.backends.jsxc import JSXCClient
from xcauth.backends.ocs import OCSClient
from xcauth.backends.throttle import ThrottleWatch, ThrottleWatches
from xcauth.core.authenticator import Authenticator
from xcauth.core.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.penalty import PenaltyBox, PenaltyPolicy
from xcauth.core.sharedbudget import SharedBudget
from xcauth.daemon.config import Config
from xcauth.daemon.listen import backendRequestLimit, descriptorLimit
from xcauth.daemon.metrics import Metrics
from xcauth.daemon.rostersetup import makeRosterSync
from xcauth.framing.base import ServerContext
from xcauth.interfaces import (
    BackendSpec,
    BackendUnavailable,
    DomainSettings,
    IBackendClient,
    ICacheStorage,
    ICommandRunner,
    NoMetrics,
    StartupRefused,
)
from xcauth.roster.sync import RosterSync
from xcauth.state.budget import exchangeEvents
from xcauth.state.cache import DatabaseStorage, SharedStorage
from xcauth.state.database import Store, ThreadWorker, whenFired
from xcauth.state.domains import DomainTable

log = Logger()

#: Threads hashing and checking passwords with bcrypt (CPU-bound: about the
#: number of cores).  A burst of cache checks queues here; tokens and isuser
#: never wait for these threads.
BCRYPT_THREADS = 2

#: Options L{Hub.reload} cannot apply (the database, the cache storage and the
#: roster sync are set up once): C{(option, Config attribute)}.
RESTART_SETTINGS = (
    ("db", "db"),
    ("db-password-file", "dbPasswordFile"),
    ("cache-storage", "cacheStorage"),
    ("cache-bcrypt-rounds", "bcryptRounds"),
    ("roster-sync", "rosterSync"),
    ("roster-api-url", "rosterApiURL"),
    ("ejabberdctl", "ejabberdctl"),
    ("roster-command-timeout", "rosterCommandTimeout"),
    ("metrics", "metrics"),
)


class Gate:
    """
    Requests wait here until the start-up check has passed (or could not be
    made), so that nothing is answered by a backend that is about to be
    refused.
    """

    def __init__(self, opened: bool = False) -> None:
        self.opened = opened
        self._waiting: list[Deferred[None]] = []

    def whenOpen(self) -> Deferred[None] | None:
        """
        C{None} once open; before, a L{Deferred} firing when it opens.
        """
        if self.opened:
            return None
        d: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def open(self) -> None:
        """
        Let every waiting and later request through.
        """
        self.opened = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


@attr.s(auto_attribs=True, frozen=True, kw_only=True)
class Backends:
    """
    The backend side of one configuration, as L{buildBackends} makes it for
    the start and again for each reload.

    @ivar connectTimeout: the connect timeout C{agent} was made with.
    @ivar agent: the HTTP agent of every backend client.
    @ivar pool: its persistent connections.
    @ivar watches: the throttle watches of the stock clients made by
        C{makeClient} (a service, started by the hub).
    @ivar makeClient: builds the client of a L{BackendSpec} (see L{clientFactory}).
    @ivar globalSpec: what the global client was built from.
    @ivar globalSettings: the settings of the domains without a row.
    @ivar served: the domains the global backend serves (see L{servedDomains}).
    @ivar startupCheck: the global stock client's check of its service
        account, or C{None} (the JSXC backend).
    """

    connectTimeout: float
    agent: Any
    pool: HTTPConnectionPool
    watches: ThrottleWatches
    makeClient: Callable[..., IBackendClient]
    globalSpec: BackendSpec
    globalSettings: DomainSettings
    served: tuple[str, ...] | None
    startupCheck: Callable[[], Deferred[None]] | None


def buildBackends(
    config: Config, reactor: Any, metrics: NoMetrics, previous: Backends | None = None
) -> Backends:
    """
    The backend clients of C{config}: the global one, and the factory of
    those of the domain table, with their throttle watches.  At start and for
    every reload (L{Hub.reload}), so that a reload applies a configuration as
    a start would.

    @param metrics: what counts their requests.
    @param previous: the backends in use (a reload): their agent and pool are
        kept unless the connect timeout changed.
    """
    if previous is not None and previous.connectTimeout == config.connectTimeout:
        agent, pool = previous.agent, previous.pool
    else:
        agent, pool = makeAgent(reactor, connectTimeout=config.connectTimeout)
    watches = ThrottleWatches()
    makeClient = clientFactory(
        HTTPRequester(
            agent,
            reactor,
            timeout=config.totalTimeout,
            maxRequests=backendRequestLimit(descriptorLimit()),
        ),
        reactor,
        config,
        watches,
        metrics,
    )
    spec = globalSpec(config)
    globalClient = makeClient(spec, False)
    return Backends(
        connectTimeout=config.connectTimeout,
        agent=agent,
        pool=pool,
        watches=watches,
        makeClient=makeClient,
        globalSpec=spec,
        globalSettings=DomainSettings(
            secrets=config.secrets, authDomain=None, client=globalClient
        ),
        served=servedDomains(config),
        startupCheck=(
            globalClient.checkPrivileges if isinstance(globalClient, OCSClient) else None
        ),
    )


@attr.s(auto_attribs=True, frozen=True, kw_only=True)
class Core:
    """
    What a hub builds once and keeps across reloads (see L{buildHub}).

    @ivar context: the listeners' shared context (its authenticator included).
    @ivar domains: the domain table (a service, refreshing once the schema
        is checked).
    @ivar store: the state database.
    @ivar dbWorker: the state database's thread.
    @ivar hashWorker: the bcrypt threads.
    @ivar cache: the credential cache, or C{None}.
    @ivar gate: where requests wait for the start-up check.
    @ivar rosterSync: the shared roster sync, or C{None}.
    @ivar rosterRunner: what runs its commands, or C{None}.
    @ivar metrics: the daemon's metrics (C{None}: not served, no C{--metrics}).
    """

    context: ServerContext
    domains: DomainTable
    store: Store
    dbWorker: ThreadWorker
    hashWorker: ThreadWorker
    cache: CredentialCache | None
    gate: Gate
    rosterSync: RosterSync | None = None
    rosterRunner: ICommandRunner | None = None
    metrics: Metrics | None = None


class Hub(MultiService):
    """
    Runs what every listener shares.  Its child services are the throttle
    watches of the backends in use and, once the state database's schema is
    checked, the domain table's refresh; it starts the worker threads, and on
    stop (after L{beforeStop}) stops its children, lets pending work finish,
    then closes the database and the pooled backend connections.

    @param core: what is built once (L{Core}).
    @param backends: the backends of C{config} (L{buildBackends}).
    @param config: the configuration in force.
    @param reactor: the reactor (also the clock of the children).
    @param refuse: stops the daemon with what to fix (C{None}: nothing stops).
    """

    def __init__(
        self,
        core: Core,
        backends: Backends,
        config: Config,
        reactor: Any,
        refuse: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.context = core.context
        self.authenticator = core.context.authenticator
        self.domains = core.domains
        self.store = core.store
        self.dbWorker = core.dbWorker
        self.hashWorker = core.hashWorker
        self.cache = core.cache
        self.gate = core.gate
        self.rosterSync = core.rosterSync
        self.rosterRunner = core.rosterRunner
        #: The daemon's metrics (C{None}: not counted, no C{--metrics}).
        self.metrics = core.metrics
        #: The timer of the shared budgets' exchanges, once the domains are read.
        self._budgetExchanges: TimerService | None = None
        #: The backends in use (L{reload} replaces them).
        self.backends = backends
        backends.watches.setServiceParent(self)
        self.domains.onClientDropped = backends.watches.discard
        self.startupCheck = backends.startupCheck
        self.refuse = refuse
        #: The configuration in force (L{reload} replaces it).
        self.config = config
        self.reactor = reactor
        #: Waited for before the hub stops (the daemon answers what its
        #: connections asked), or C{None}.
        self.beforeStop: Callable[[], Deferred[Any]] | None = None
        #: Pools replaced by a reload, closed when the hub stops.
        self._oldPools: list[HTTPConnectionPool] = []

    @property
    def agent(self) -> Any:
        """
        The HTTP agent of the backends in use.
        """
        return self.backends.agent

    @property
    def pool(self) -> HTTPConnectionPool:
        """
        The persistent connections of the backends in use.
        """
        return self.backends.pool

    @property
    def watches(self) -> ThrottleWatches:
        """
        The throttle watches of the backends in use.
        """
        return self.backends.watches

    def reload(self, config: Config) -> list[str]:
        """
        Apply C{config} in place, without re-binding anything or reopening the
        database: the backends are built again as at start (L{buildBackends}:
        clients, secrets, timeouts, throttle watches), the domain table gets
        the new global settings (and is then re-read), and the request
        deadline, the in-flight bound, the cache TTLs and the debug flag
        change.  Connections stay open; requests already started finish with
        the settings they started with.

        @return: the options whose new value needs a restart (L{RESTART_SETTINGS}:
            C{db}, the cache storage, the roster sync); they keep their old value.
        """
        old = self.config
        restart = [
            name
            for name, attribute in RESTART_SETTINGS
            if getattr(old, attribute) != getattr(config, attribute)
        ]
        previous = self.backends
        backends = buildBackends(config, self.reactor, self.context.metrics, previous)
        if backends.pool is not previous.pool:
            self._oldPools.append(previous.pool)
        # The old watches stop; the new ones run if the hub does.
        previous.watches.disownServiceParent()
        self.backends = backends
        self.domains.onClientDropped = backends.watches.discard
        self.domains.reconfigure(
            backends.globalSettings, backends.makeClient, backends.globalSpec, backends.served
        )
        backends.watches.setServiceParent(self)
        self._recheckGlobal()
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

    def _recheckGlobal(self) -> None:
        # The global stock client of the new configuration (another account
        # perhaps, or the same one with other rights by now): its service
        # account is checked again, as at start.  A refusal cannot stop a
        # running daemon: it is logged, with what to fix.
        check = self.backends.startupCheck
        if check is not None:
            self.startupCheck = check
            check().addErrback(
                _domainCheckFailed, self.backends.globalSettings.client.url,
                "the global backend (after a reload)",
            )

    def startService(self) -> None:
        """
        Start the worker threads and the child services; the domain table
        refreshes once the schema is checked.
        """
        self.dbWorker.start()
        self.hashWorker.start()
        super().startService()
        # The domains are read once the schema is there (a new PostgreSQL
        # database gets its tables first: its pool runs calls in parallel).
        self.checkSchema().addCallback(self._startDomains)
        self.runStartupCheck()

    def _startDomains(self, _: object = None) -> None:
        if self.running:
            # A child from now on: stopped with the others.
            if self.domains.parent is None:
                self.domains.setServiceParent(self)
            budget = self.sharedBudget()
            if budget is not None and self._budgetExchanges is None:
                # Every INTERVAL seconds, on the hub's clock; stopped with
                # the other children (after the exchange in progress).
                self._budgetExchanges = TimerService(SharedBudget.INTERVAL, budget.exchange)
                self._budgetExchanges.clock = self.reactor
                self._budgetExchanges.setName("shared brute-force budgets")
                self._budgetExchanges.setServiceParent(self)
    def sharedBudget(self) -> SharedBudget | None:
        """
        The brute-force budgets shared with the other nodes (a PostgreSQL
        store), or C{None}.
        """
        budget = getattr(getattr(self.authenticator, "penalty", None), "budget", None)
        return budget if isinstance(budget, SharedBudget) else None

    def checkSchema(self) -> Deferred[None]:
        """
        Bring the state database's schema up to date (L{xcauth.state.schema}), and
        listen to the other nodes' changes (PostgreSQL).  A schema newer
        than this version's stops the daemon with one line; a database that
        cannot be reached now is only warned about (logins go on, and the
        schema is checked again when it is reached).
        """
        from xcauth.state.database import DatabaseError, NoDatabase, ensureSchema
        from xcauth.state.postgres import StoreUnavailable
        from xcauth.state.schema import SchemaTooNew

        def failed(f: Failure) -> None:
            if f.check(SchemaTooNew):
                if self.refuse is not None:
                    self.refuse(str(f.value))
                return
            if f.check(NoDatabase):
                return
            if f.check(StoreUnavailable, DatabaseError):
                log.warn("cannot check the state database's schema now: {reason}",
                         reason=str(f.value))
                return
            log.failure("checking the state database's schema failed", f)

        if self.store.engine == "postgresql" and not getattr(self, "_schemaWatch", False):
            self._schemaWatch = True
            self.store.onReconnect(self.checkSchema)
        self.store.startListening()
        d: Deferred[None] = self.store.run(ensureSchema)
        return d.addErrback(failed)

    def runStartupCheck(self) -> Deferred[None] | None:
        """
        Run the backend's start-up check (if any): a refusal calls C{refuse}
        with what to fix; an unavailable backend is only warned about.
        """
        if self.startupCheck is None:
            self._open()
            return None
        d = self.startupCheck()
        d.addCallback(lambda _: self._open())
        return d.addErrback(self._checkFailed)

    def _open(self) -> None:
        if self.gate is not None:
            self.gate.open()

    def _checkFailed(self, f: Failure) -> None:
        if f.check(StartupRefused):
            # The gate stays shut: nothing is answered from this backend.
            if self.refuse is not None:
                self.refuse(str(f.value))
            return
        self._open()
        if f.check(BackendUnavailable):
            log.warn(
                "cannot check the Nextcloud service account at start-up: {reason}",
                reason=str(f.value),
            )
            return
        log.failure("the start-up check failed", f)

    def stopService(self) -> Deferred[None]:
        """
        After L{beforeStop}, stop the children (the domain refresh, the
        throttle watches), finish pending bcrypt work and database writes,
        close the database and the pooled backend connections.
        """
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.beforeStop is not None:
            await self.beforeStop()
        await super().stopService()
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
        budget = self.sharedBudget()
        if budget is not None:
            # One last write of what this node counted.
            written = budget.exchange()
            if written is not None:
                await whenFired(written)
        await self.store.close()
        await self.dbWorker.stop()
        for pool in [*self._oldPools, self.pool]:
            await pool.closeCachedConnections()


def buildHub(config: Config, reactor: Any) -> Hub:
    """
    Build the shared core of a daemon (or of one C{xcauth} command) from its
    configuration.
    """
    # Counted only when served (--metrics): otherwise every count is a no-op.
    metrics = Metrics(reactor, backends=(config.backend,)) if config.metrics is not None else None
    counts: NoMetrics = metrics if metrics is not None else NoMetrics()
    backends = buildBackends(config, reactor, counts)

    # SQLite: one connection, used from one thread.  The file is created when
    # the cache lives in it; otherwise it is read if (once) it exists.
    # PostgreSQL: a pool of connections on threads of its own (xcauth.state.postgres).
    dbWorker = ThreadWorker(reactor, "xcauth-db", 1)
    store = makeStore(config, reactor, dbWorker, counts)
    domains = DomainTable(
        store,
        backends.globalSettings,
        backends.makeClient,
        reactor,
        globalSpec=backends.globalSpec,
        served=backends.served,
    )
    gate = Gate(opened=backends.startupCheck is None)
    keys = PasswordKeys()
    hashWorker = ThreadWorker(reactor, "xcauth-bcrypt", BCRYPT_THREADS)
    cache = buildCache(config, store, hashWorker, reactor, keys, counts)
    # The shared roster sync to ejabberd (None unless configured).
    rosterSync, rosterRunner = makeRosterSync(config, reactor, domains.settingsFor, store)
    authenticator = Authenticator(
        domains.settingsFor,
        reactor,
        keys,
        cache=cache,
        # Tokens need the domain table, never Nextcloud's start-up check.
        ready=domains.whenReady,
        backendReady=gate.whenOpen,
        debug=config.debug,
        onLogin=None if rosterSync is None else rosterSync.onLogin,
        penalty=PenaltyBox(
            reactor,
            PenaltyPolicy(
                refusedTTL=config.refusedTTL,
                baseDelay=config.penaltyDelay,
                # Within the client's deadline, with time left for the backend.
                maxDelay=min(config.penaltyMaxDelay, config.deadline / 2),
                userChecks=config.penaltyUserChecks,
                userRefill=config.penaltyUserRefill,
                backendFailures=config.penaltyBackendFailures,
                backendWindow=config.penaltyBackendWindow,
                allowListedFailures=config.penaltyAllowListedFailures or None,
                knownPasswords=config.knownPasswords,
                knownTTL=config.knownPasswordTTL,
                forgetAfter=config.penaltyForget,
                maxEntries=config.penaltyMaxEntries,
            ),
            metrics=counts,
            budget=sharedBudget(store, reactor, config),
        ),
    )
    forgetRefusalsOnBackendChange(domains, authenticator.penalty)
    context = ServerContext(
        authenticator=authenticator,
        clock=reactor,
        deadline=config.deadline,
        maxInFlight=config.maxInFlight,
        debug=config.debug,
        logRequests=config.logRequests,
        defaultDomain=config.dovecotDefaultDomain,
        metrics=counts,
    )
    core = Core(
        context=context, domains=domains, store=store, dbWorker=dbWorker,
        hashWorker=hashWorker, cache=cache, gate=gate, rosterSync=rosterSync,
        rosterRunner=rosterRunner, metrics=metrics,
    )
    return Hub(core, backends, config, reactor, refuse=lambda m: refuseToRun(reactor, m))


def servedDomains(config: Config) -> tuple[str, ...] | None:
    """
    The domains the global backend serves without a row of the domains table
    (C{domain=}), or C{None}: any domain (no list given).
    """
    return config.domains or None


def forgetRefusalsOnBackendChange(domains: DomainTable, penalty: PenaltyBox | None) -> None:
    """
    When the backend of some domains changes (the domain table, a reload),
    the refusals and failures the penalty box remembers for their users go:
    the old backend's "no" says nothing about the new one.
    """
    if penalty is None:
        return

    def changed(isChanged: Callable[[str], bool]) -> None:
        dropped = penalty.forgetDomains(isChanged)
        if dropped:
            log.info(
                "backend of some domains changed: {count} remembered refusal(s), "
                "failure record(s) and users' known passwords forgotten",
                count=dropped,
            )

    domains.onBackendChanged = changed
def makeStore(config: Config, reactor: Any, dbWorker: ThreadWorker, metrics: NoMetrics) -> Store:
    """
    The state database of C{config}: a SQLite file, or PostgreSQL shared with
    other nodes, whose calls are bounded well within the requests' deadline.
    """
    from xcauth.state.postgres import PgStore, isPostgres

    if isPostgres(config.db):
        return PgStore(
            config.db, config.dbPassword, reactor, timeout=storeTimeout(config.deadline),
            metrics=metrics,
        )
    return Store(
        config.db,
        dbWorker,
        create=config.cacheStorage == "db" or config.rosterSync != "none",
    )


def storeTimeout(deadline: float) -> float:
    """
    Seconds a call to a shared state database may take: a quarter of the
    requests' deadline (1 s of the default 4 s), at most 2 s, so a login
    that waits for it still has its backend's time.
    """
    return max(0.2, min(deadline / 4, 2.0))


def sharedBudget(store: Store, reactor: Any, config: Config) -> SharedBudget | None:
    """
    The brute-force budgets of a store shared by several nodes (PostgreSQL),
    or C{None}: the penalty box keeps them in memory.
    """
    if getattr(store, "engine", "sqlite") != "postgresql":
        return None
    def exchange(node: str, events: list[tuple[str, str, float]], since: float,
                 before: float) -> Deferred[list[tuple[str, str, float]]]:
        return store.run(exchangeEvents, node, events, since, before)

    return SharedBudget(
        exchange, reactor, uuid.uuid4().hex, config.penaltyUserChecks,
        config.penaltyUserRefill, config.penaltyBackendWindow, config.penaltyMaxEntries,
    )


def globalSpec(config: Config) -> BackendSpec:
    """
    What the global backend client (of domains not in the table) is built from.
    """
    return BackendSpec(
        config.backend,
        config.url,
        (config.secrets or (b"",))[0],
        config.serviceUser,
        config.servicePassword,
        config.loginFormat,
    )


def clientFactory(
    http: HTTPRequester, reactor: Any, config: Config, watches: ThrottleWatches,
    metrics: NoMetrics | None = None,
) -> Callable[..., IBackendClient]:
    """
    What builds the backend client of one L{BackendSpec} over C{http}: the
    JSXC client, or the OCS client of a stock Nextcloud with its throttle
    watch.  A client built for a domain of the table (C{forDomain}) checks its
    service account and logs what is wrong: it cannot stop the daemon.
    """

    def makeClient(spec: BackendSpec, forDomain: bool = True) -> IBackendClient:
        if spec.backend == "jsxc":
            return JSXCClient(http, spec.url, spec.secret, metrics)
        assert spec.serviceUser is not None and spec.servicePassword is not None
        client = OCSClient(
            http, spec.url, spec.serviceUser, spec.servicePassword, spec.loginFormat,
            reactor, metrics=metrics,
        )
        watch = ThrottleWatch(
            client, reactor, config.throttleCheckInterval, config.throttleWarnDelay,
            metrics=metrics,
        )
        client.onLogin = watch.loginSeen
        client.watch = watch
        watches.add(watch)
        if forDomain:
            client.checkPrivileges().addErrback(_domainCheckFailed, client.url)
        return client

    return makeClient


def _domainCheckFailed(f: Failure, url: str, what: str = "a domain's backend") -> None:
    if f.check(StartupRefused):
        log.error("{what} will not work: {reason}", what=what, reason=str(f.value))
    elif f.check(BackendUnavailable):
        log.warn("cannot check the service account of {url}: {reason}", url=url,
                 reason=str(f.value))
    else:
        log.failure("checking the service account of {url} failed", f, url=url)


def refuseToRun(reactor: Any, message: str, status: int = 1, logged: bool = True) -> None:
    """
    Stop the daemon (or command) because it cannot work as configured: one
    line C{xcauth: ...} on standard error and (if C{logged}) in the log, exit
    status C{status}.

    twistd offers no exit status for a service that fails after the reactor
    started, so the process ends with C{os._exit(1)} once the reactor has
    shut down (the services have stopped and the log is written).
    """
    if logged:
        log.critical("xcauth: {message}", message=message)
    # twistd sends sys.stderr to its log: write to the process's own stderr.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"xcauth: {message}\n")
    stream.flush()
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


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
    metrics: NoMetrics | None = None,
) -> CredentialCache | None:
    """
    The credential cache C{cache-storage} asks for, or C{None}.
    """
    if config.cacheStorage == "none":
        return None
    persistent = config.cacheStorage == "db"
    storage: ICacheStorage = MemoryStorage()
    if persistent:
        shared = store.engine == "postgresql"
        storage = SharedStorage(store, clock, metrics) if shared else DatabaseStorage(store, clock)
    return CredentialCache(
        storage,
        hasher,
        clock,
        cachePolicy(config),
        config.bcryptRounds[0 if persistent else 1],
        keys,
        deadline=config.deadline,
        concurrency=BCRYPT_THREADS,
        debug=config.debug,
        metrics=metrics,
    )


def tuneGarbageCollector() -> None:
    """
    Keep the garbage collector from growing with the requests in flight (run
    once, where the process starts, after its modules are loaded: the
    daemon's L{xcauth.daemon.service.XcauthService.privilegedStartService},
    the C{xcauth} command's stdio mode; never where a service is only built).

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
