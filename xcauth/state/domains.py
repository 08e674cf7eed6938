"""
Per-domain settings from the C{domains} table of the state database.

L{DomainTable} keeps the table in a dict, re-read in the database thread when
it starts and every L{REFRESH_SECONDS} seconds while it runs (a
L{TimerService}), so a lookup is a dict access and changes made with
C{xcauth domains ...} take effect within seconds, without a restart.

Domains are compared in their canonical form (L{xcauth.identity}): a row for
C{Other.Example} serves C{other.example}, C{OTHER.EXAMPLE.} and so on.  A
domain without a row is served by the global backend only if it is in the
served list (C{domain=}), or if there is no list at all (C{served=None}: the
JSXC backend, or a stock Nextcloud whose login names carry the domain);
otherwise it is not served: L{DomainTable.settingsFor} gives C{None}.
On a database shared by several nodes (PostgreSQL) a change made on any node
is also announced (C{NOTIFY}) and read at once; the periodic read stays as the
safety net.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.identity import InvalidIdentity, canonicalDomain
from xcauth.interfaces import BackendSpec, DomainSettings, IBackendClient
from xcauth.state import database as store
from xcauth.text import splitSecrets, validateURL

log = Logger()

#: Seconds between two reads of the C{domains} table.
REFRESH_SECONDS = 5.0


class DomainTable(TimerService):
    """
    The domain settings, refreshed from the database: a service reading the
    table when it starts and every C{interval} seconds on C{clock}.

    @param db: the state database.
    @param globalSettings: the settings of domains that are not listed.
    @param makeClient: builds a backend client for a L{BackendSpec}.
    @param clock: schedules the refreshes.
    @param interval: seconds between refreshes.
    @param globalSpec: what the global client was built from (default: the
        JSXC backend at the global client's URL with the first global secret).
    @param served: the (canonical) domains the global backend serves without
        a row, or C{None} for any domain.
    """

    def __init__(
        self,
        db: store.Store,
        globalSettings: DomainSettings,
        makeClient: Callable[[BackendSpec], IBackendClient],
        clock: IReactorTime,
        interval: float = REFRESH_SECONDS,
        globalSpec: BackendSpec | None = None,
        served: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(interval, self.refresh)
        self.clock = clock
        self._db = db
        self.served = None if served is None else frozenset(served)
        self.globalSettings = globalSettings
        if globalSpec is None:
            globalSpec = BackendSpec(
                "jsxc", globalSettings.client.url, (globalSettings.secrets or (b"",))[0]
            )
        self.globalSpec = globalSpec
        self._makeClient = makeClient
        self._settings: dict[str, DomainSettings] = {}
        self._rows: list[store.DomainRow] | None = None
        self._clients: dict[BackendSpec, IBackendClient] = {}
        self._loaded = False
        self._waiting: list[Deferred[None]] = []
        self._lastError: str | None = None
        #: The backend of each domain of the table as last applied, and the
        #: global one then (C{None}: nothing applied yet).
        self._specs: dict[str, BackendSpec] = {}
        self._appliedGlobal: BackendSpec | None = None
        #: Called with a client no domain uses any more (its throttle watch
        #: must stop).
        self.onClientDropped: Callable[[IBackendClient], object] | None = None
        #: Called, when the backend of some domains changed, with what tells
        #: whether a domain's did (what the old backend refused must go).
        self.onBackendChanged: Callable[[Callable[[str], bool]], object] | None = None
        # Reads started and the last one applied: a read finishing after a
        # newer one is not applied.
        self._reads = 0
        self._applied = 0
        # A shared database (PostgreSQL) tells of changes made on any node.
        db.subscribe(store.DOMAINS_CHANNEL, self._changed)
        db.onReconnect(self._reconnected)

    def _changed(self, domain: str | None) -> Deferred[None] | None:
        """
        A domain changed on some node (or notifications may have been missed):
        read the table now rather than at the next refresh (while the
        table refreshes at all: it runs).
        """
        if not self.running:
            return None
        return self.refresh()

    def _reconnected(self) -> Deferred[None] | None:
        return self._changed(None)

    def settingsFor(self, domain: str) -> DomainSettings | None:
        """
        The settings of the canonical C{domain} (a dict lookup), or C{None}
        if it is not served.
        """
        settings = self._settings.get(domain)
        if settings is not None:
            return settings
        if self.served is None or domain in self.served:
            return self.globalSettings
        return None

    def whenReady(self) -> Deferred[None] | None:
        """
        C{None} once the table was read (or found missing) the first time;
        before, a new L{Deferred} firing then.
        """
        if self._loaded:
            return None
        d: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def stopService(self) -> None:
        """
        Stop refreshing, at once: unlike L{TimerService}'s, this stop does not
        wait for a read in progress.  A table is not started again.
        """
        if self.running:
            super().stopService()
            Service.stopService(self)

    def reconfigure(
        self,
        globalSettings: DomainSettings,
        makeClient: Callable[[BackendSpec], IBackendClient],
        globalSpec: BackendSpec,
        served: tuple[str, ...] | None = None,
    ) -> None:
        """
        Use new global settings, served domains and a new client factory (a
        configuration reload): the domains read so far are rebuilt with them
        at once.
        """
        self.served = None if served is None else frozenset(served)
        self.globalSettings = globalSettings
        self.globalSpec = globalSpec
        self._makeClient = makeClient
        self._clients = {}
        rows, self._rows = self._rows, None
        if rows is not None:
            self.apply(rows)

    def refresh(self) -> Deferred[None]:
        """
        Read the table once and apply changes (first checking that the
        database file is still the one in use).
        """
        self._db.checkFile()
        self._reads += 1
        read = self._reads

        def latest(rows: list[store.DomainRow]) -> None:
            if read < self._applied:
                return  # a newer read was applied already
            self._applied = read
            self.apply(rows)

        d = self._db.run(store.listDomains)
        return d.addCallbacks(latest, self._failed).addBoth(self._markLoaded)

    def _failed(self, f: Failure) -> None:
        if f.check(store.NoDatabase):
            # No state database (yet): every domain uses the global settings.
            self.apply([])
            return
        message = str(f.value)
        if message != self._lastError:
            self._lastError = message
            log.error(
                "cannot read the domains table, keeping the previous settings: "
                "{error}",
                error=message,
            )

    def _markLoaded(self, result: Any) -> None:
        if isinstance(result, Failure):
            log.failure("applying the domains table failed", result)
        if not self._loaded:
            self._loaded = True
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def apply(self, rows: list[store.DomainRow]) -> None:
        """
        Make C{rows} the current domain settings (if they changed).
        """
        self._lastError = None
        if rows == self._rows:
            return
        self._rows = rows
        settings: dict[str, DomainSettings] = {}
        clients: dict[BackendSpec, IBackendClient] = {}
        specs: dict[str, BackendSpec] = {}
        g = self.globalSettings
        for row in rows:
            secrets = splitSecrets(row.authsecret or "") or g.secrets
            try:
                domain = canonicalDomain(row.xmppdomain or "")
            except InvalidIdentity as e:
                log.error(
                    "domain {domain!r} in the database is ignored: {error}",
                    domain=row.xmppdomain,
                    error=str(e),
                )
                continue
            try:
                key = rowSpec(row, self.globalSpec, secrets)
                client = clients.get(key) or self._clients.get(key)
                if client is None:
                    client = self._makeClient(key)
            except ValueError as e:
                log.error(
                    "domain {domain} in the database is ignored: {error}",
                    domain=row.xmppdomain,
                    error=str(e),
                )
                continue
            clients[key] = client
            specs[domain] = key
            settings[domain] = DomainSettings(
                secrets=secrets, authDomain=row.authdomain or None, client=client
            )
        kept = {id(c) for c in clients.values()}
        dropped = [c for c in self._clients.values() if id(c) not in kept]
        self._clients = clients
        self._settings = settings
        self._backendsApplied(specs)
        if self.onClientDropped is not None:
            for client in dropped:
                self.onClientDropped(client)
        log.info(
            "domain settings loaded: {count} domain(s) with their own backend",
            count=len(settings),
        )

    def _backendsApplied(self, specs: dict[str, BackendSpec]) -> None:
        oldSpecs, lastGlobal = self._specs, self._appliedGlobal
        newGlobal = self.globalSpec
        self._specs, self._appliedGlobal = specs, newGlobal
        if lastGlobal is None or (lastGlobal == newGlobal and oldSpecs == specs):
            return
        oldGlobal: BackendSpec = lastGlobal

        def changed(domain: str) -> bool:
            return oldSpecs.get(domain, oldGlobal) != specs.get(domain, newGlobal)

        if self.onBackendChanged is not None:
            self.onBackendChanged(changed)


def rowSpec(
    row: store.DomainRow, g: BackendSpec, secrets: tuple[bytes, ...]
) -> BackendSpec:
    """
    The backend of a C{domains} row: its own columns, the global settings for
    those it leaves empty.  A row with a URL but no backend (written before
    there was a choice) is the JSXC app's.

    @raise ValueError: the row cannot work (what to fix).
    """
    backend = row.backend or ("jsxc" if row.authurl else g.backend)
    if backend not in ("jsxc", "nextcloud"):
        raise ValueError(f"unknown backend {backend!r}")
    sameKind = backend == g.backend
    url = row.authurl or (g.url if sameKind else "")
    if not url:
        raise ValueError(f"backend {backend} needs a url")
    validateURL(url)
    if backend == "jsxc":
        if not secrets:
            raise ValueError("backend jsxc needs a secret")
        return BackendSpec("jsxc", url, secrets[0])
    user = row.serviceuser or (g.serviceUser if sameKind else None)
    password = row.servicepassword or (g.servicePassword if sameKind else None)
    if not user or not password:
        raise ValueError("backend nextcloud needs a service user and its app password")
    loginFormat = row.loginformat or (g.loginFormat if sameKind else "{user}")
    return BackendSpec("nextcloud", url, b"", user, password, loginFormat)
