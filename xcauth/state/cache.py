"""
The credential cache's entries in the state database (L{ICacheStorage}).
"""

from __future__ import annotations

from collections import OrderedDict

import attr
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.interfaces import CacheEntry, ICacheStorage, NoMetrics
from xcauth.state import database as store

log = Logger()


@implementer(ICacheStorage)
class DatabaseStorage:
    """
    Cache entries in the C{authcache} table of the state database.

    With a C{clock}, entries read or written are also kept in memory for
    L{READ_SECONDS} (changes made with C{xcauth cache ...} apply within that
    time, as domain changes do), and a successful query within
    L{TOUCH_SECONDS} of the last one recorded is recorded in memory only: a
    cache hit then costs no trip to the database thread.
    """

    #: Seconds an entry read from the database is used without reading it again.
    READ_SECONDS = 5.0
    #: Seconds within which a new "last successful query" is not written.
    TOUCH_SECONDS = 60.0
    #: Entries kept in memory, at most.
    MAX_KEPT = 100_000

    def __init__(self, db: store.Store, clock: IReactorTime | None = None) -> None:
        self._db = db
        self._clock = clock
        # jid -> (when read or written, the entry then).
        self._kept: OrderedDict[str, tuple[float, CacheEntry | None]] = OrderedDict()

    def _keep(self, jid: str, entry: CacheEntry | None) -> None:
        if self._clock is None:
            return
        self._kept[jid] = (self._clock.seconds(), entry)
        self._kept.move_to_end(jid)
        if len(self._kept) > self.MAX_KEPT:
            self._kept.popitem(last=False)

    def _recent(self, jid: str) -> tuple[float, CacheEntry | None] | None:
        kept = self._kept.get(jid)
        if kept is None or self._clock is None:
            return None
        if self._clock.seconds() - kept[0] >= self.READ_SECONDS:
            del self._kept[jid]
            return None
        return kept

    def get(self, jid: str) -> Deferred[CacheEntry | None]:
        """
        The entry of C{jid}, or C{None}.
        """
        kept = self._recent(jid)
        if kept is not None:
            return succeed(kept[1])

        def convert(row: store.CacheRow | None) -> CacheEntry | None:
            if row is None:
                entry = None
            else:
                pwhash = row.pwhash.encode("ascii", "replace") if row.pwhash else None
                entry = CacheEntry(pwhash, row.firstAuth, row.remoteAuth, row.anyAuth)
            self._keep(jid, entry)
            return entry

        return self._db.run(store.getCacheEntry, jid).addCallback(convert)

    def put(self, jid: str, pwhash: bytes, now: float) -> Deferred[None]:
        """
        Store a verified hash, keeping the first-success time.
        """
        self._kept.pop(jid, None)
        return self._db.run(store.putCacheEntry, jid, pwhash.decode("ascii"), now)

    def touch(self, jid: str, now: float, verified: bool) -> Deferred[None]:
        """
        Record a successful query (and a backend verification if C{verified}).
        """
        kept = self._recent(jid)
        if kept is not None and kept[1] is not None:
            entry = kept[1]
            if not verified and now - entry.anyAuth < self.TOUCH_SECONDS:
                return succeed(None)
            self._keep(
                jid,
                attr.evolve(entry, anyAuth=now, remoteAuth=now if verified else entry.remoteAuth),
            )
        return self._db.run(store.touchCacheEntry, jid, now, verified)

    def delete(self, jid: str) -> Deferred[None]:
        """
        Forget C{jid}.
        """
        self._kept.pop(jid, None)
        return self._db.run(store.deleteCacheEntry, jid).addCallback(lambda _: None)


class SharedStorage(DatabaseStorage):
    """
    Cache entries in the C{authcache} table of a state database shared by
    several nodes (PostgreSQL, L{xcauth.state.postgres.PgStore}), with this node's
    memory in front of it and behind it.

     - In front: every entry this node read or wrote is kept (at most
       L{DatabaseStorage.MAX_KEPT}) and, while the store's listener is
       connected, a lookup is answered from it without waiting for the
       database: a node that changes an entry (a new password, an eviction)
       notifies every other, which drops its copy.  Timestamps other nodes
       refresh are not announced, so the kept ones can only be older: the
       cache's freshness checks stay on the safe side.
     - Behind: while the database is unavailable or slow, lookups are
       answered from that memory and writes go only there (logged once per
       outage, counted as fallbacks).  Evictions are written again once the
       database is back (a refused password must stop working on every
       node); new hashes are not (one written late could bring back a
       password another node evicted meanwhile): the next login verified by
       the backend stores it.
    """

    def __init__(self, db: store.Store, clock: IReactorTime, metrics: NoMetrics | None = None) -> None:
        super().__init__(db, clock)
        self.metrics = metrics if metrics is not None else NoMetrics()
        self._local: OrderedDict[str, CacheEntry] = OrderedDict()
        #: JIDs whose eviction is still to be written.
        self.evictions: OrderedDict[str, None] = OrderedDict()
        self._fellBack = False
        db.subscribe(store.CACHE_CHANNEL, self._changed)
        db.onReconnect(self.reconnected)

    def _changed(self, jid: str | None) -> None:
        """
        Another node changed the entry of C{jid} (every entry for C{""}), or
        notifications may have been missed (C{None}).
        """
        if jid:
            self._kept.pop(jid, None)
            self._local.pop(jid, None)
        else:
            self._kept.clear()
            self._local.clear()

    def _remember(self, jid: str, entry: CacheEntry | None) -> None:
        if entry is None:
            self._local.pop(jid, None)
            return
        self._local[jid] = entry
        self._local.move_to_end(jid)
        if len(self._local) > self.MAX_KEPT:
            self._local.popitem(last=False)

    def _fallback(self, what: str, f: Failure) -> None:
        from xcauth.state.postgres import StoreUnavailable

        f.trap(StoreUnavailable, store.DatabaseError)
        self.metrics.storeFallback(what)
        if not self._fellBack:
            self._fellBack = True
            log.warn(
                "credential cache: the state database is unavailable ({reason}); "
                "using this node's memory until it is back",
                reason=str(f.value),
            )

    def reconnected(self) -> Deferred[None]:
        """
        The database is back: forget what may have changed meanwhile, write
        the evictions made without it.
        """
        self._fellBack = False
        self._kept.clear()
        pending = list(self.evictions)
        ds = [self._evict(jid) for jid in pending]
        return gatherResults(ds).addCallback(lambda _: None)

    def _evict(self, jid: str) -> Deferred[None]:
        def done(_: object) -> None:
            self.evictions.pop(jid, None)

        def failed(f: Failure) -> None:
            self._fallback("cache-write", f)
            self.evictions[jid] = None

        d = self._db.run(store.deleteCacheEntry, jid)
        return d.addCallbacks(done, failed)

    def get(self, jid: str) -> Deferred[CacheEntry | None]:
        """
        The entry of C{jid}: from memory while notifications keep it current
        (or the database is unavailable), else from the database.
        """
        local = self._local.get(jid)
        if local is not None and getattr(self._db, "listening", False):
            self._local.move_to_end(jid)
            return succeed(local)

        def read(entry: CacheEntry | None) -> CacheEntry | None:
            self._remember(jid, entry)
            return entry

        def failed(f: Failure) -> CacheEntry | None:
            self._fallback("cache-read", f)
            return self._local.get(jid)

        return super().get(jid).addCallbacks(read, failed)

    def put(self, jid: str, pwhash: bytes, now: float) -> Deferred[None]:
        """
        Store a verified hash, keeping the first-success time.
        """
        old = self._local.get(jid)
        first = old.firstAuth if old is not None else now
        self._remember(jid, CacheEntry(pwhash, first, now, now))

        def written(_: object) -> None:
            # The new hash replaced the evicted one: nothing left to delete.
            # (Not before it is written: a failed write leaves the old hash.)
            self.evictions.pop(jid, None)

        return super().put(jid, pwhash, now).addCallbacks(
            written, lambda f: self._fallback("cache-write", f)
        )

    def touch(self, jid: str, now: float, verified: bool) -> Deferred[None]:
        """
        Record a successful query (and a backend verification if C{verified}).
        """
        old = self._local.get(jid)
        if old is not None:
            if not verified and now - old.anyAuth < self.TOUCH_SECONDS:
                # A cache hit: recorded in memory only (as L{DatabaseStorage}
                # does), no trip to the database.
                return succeed(None)
            self._remember(
                jid, attr.evolve(old, anyAuth=now, remoteAuth=now if verified else old.remoteAuth)
            )
        self._kept.pop(jid, None)
        d: Deferred[None] = self._db.run(store.touchCacheEntry, jid, now, verified)
        return d.addErrback(lambda f: self._fallback("cache-write", f))

    def delete(self, jid: str) -> Deferred[None]:
        """
        Forget C{jid}, on every node (written again later if the database is
        unavailable now).
        """
        self._local.pop(jid, None)
        self._kept.pop(jid, None)
        self.evictions[jid] = None
        return self._evict(jid)
