"""
The credential cache: bcrypt hashes of passwords the backend confirmed, so that
logins keep working quickly and through backend outages.

Per JID it keeps the hash and three timestamps: first success, last backend
verification (C{remoteAuth}) and last successful query (C{anyAuth}).  A cached
password is accepted

 - before asking the backend, if the last query is younger than the query TTL
   and the last verification younger than the verification TTL;
 - when the backend is unavailable, if the last verification is younger than
   the unreachable TTL.

A backend C{success} refreshes the entry; C{noauth} for the cached password
evicts it (a wrong guess by someone else leaves it alone).  Storage is a
dict (L{MemoryStorage}) or the C{authcache} table (L{DatabaseStorage}).  bcrypt
runs in the hashing worker threads, never on the reactor thread, and at most
one hash is made at a time for one user and password.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth import store
from xcauth.hashing import HashQueue, QueueFull
from xcauth.interfaces import ICacheStorage, IWorker, Outcome
from xcauth.metrics import NoMetrics
from xcauth.text import printable

log = Logger()

#: bcrypt uses at most this many bytes of a password; longer ones are never
#: cached (bcrypt would silently compare only their beginning).
BCRYPT_MAX_PASSWORD = 72

#: Users remembered as existing (for isuser during outages), at most.
MAX_SEEN = 100_000

#: Users whose cached password was confirmed since the daemon started (see
#: L{CredentialCache}), at most.
MAX_VERIFIED = 100_000

#: Seconds before the client's deadline at which a password the cache vouches
#: for is accepted while the backend has still not answered.
FALLBACK_MARGIN = 1.5


@attr.s(frozen=True, auto_attribs=True)
class CachePolicy:
    """
    The cache's time limits in seconds.
    """

    queryTTL: float = 3600.0
    verificationTTL: float = 86400.0
    unreachableTTL: float = 7 * 86400.0


@attr.s(frozen=True, auto_attribs=True)
class CacheEntry:
    """
    What the cache knows about one JID.
    """

    pwhash: bytes | None
    firstAuth: float
    remoteAuth: float
    anyAuth: float


@implementer(ICacheStorage)
class MemoryStorage:
    """
    Cache entries in a dict, lost on restart.
    """

    def __init__(self) -> None:
        self.entries: dict[str, CacheEntry] = {}

    def get(self, jid: str) -> Deferred[CacheEntry | None]:
        """
        The entry of C{jid}, or C{None}.
        """
        return succeed(self.entries.get(jid))

    def put(self, jid: str, pwhash: bytes, now: float) -> Deferred[None]:
        """
        Store a verified hash, keeping the first-success time.
        """
        old = self.entries.get(jid)
        first = old.firstAuth if old is not None else now
        self.entries[jid] = CacheEntry(pwhash, first, now, now)
        return succeed(None)

    def touch(self, jid: str, now: float, verified: bool) -> Deferred[None]:
        """
        Record a successful query (and a backend verification if C{verified}).
        """
        old = self.entries.get(jid)
        if old is not None:
            self.entries[jid] = attr.evolve(
                old, anyAuth=now, remoteAuth=now if verified else old.remoteAuth
            )
        return succeed(None)

    def delete(self, jid: str) -> Deferred[None]:
        """
        Forget C{jid}.
        """
        self.entries.pop(jid, None)
        return succeed(None)


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


class CredentialCache:
    """
    The decision logic of the cache around one backend call.

    @param storage: L{MemoryStorage} or L{DatabaseStorage}.
    @param hasher: the bounded worker bcrypt runs in.
    @param clock: read for every timestamp.
    @param policy: the TTLs.
    @param rounds: the bcrypt cost of new hashes.
    @param passwordKey: keyed hashes of passwords, to index hashes being made
        without keeping the password.
    @param deadline: seconds within which the client needs its answer: a
        backend that has not answered L{FALLBACK_MARGIN} seconds before it is
        treated as unavailable for a password the cache vouches for.
    @param concurrency: bcrypt jobs run at once (the hasher's threads).
    @param debug: log debug details (C{--debug}).
    @param metrics: counts hits, misses, stale entries and fallbacks.

    In front of the bcrypt hashes, a fast verifier: for each user whose
    cached password was confirmed since the daemon started (by bcrypt or by
    the backend), a keyed hash of that password (L{xcauth.keys}, a key that
    exists only in this process's memory) next to the bcrypt hash it matched.
    While the entry still holds that bcrypt hash, a login is decided in
    microseconds: the same password matches, any other does not.
    """

    def __init__(
        self,
        storage: ICacheStorage,
        hasher: IWorker,
        clock: IReactorTime,
        policy: CachePolicy,
        rounds: int,
        passwordKey: Callable[[str], bytes],
        deadline: float = 4.0,
        concurrency: int = 2,
        debug: bool = False,
        metrics: NoMetrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else NoMetrics()  # metrics
        self.storage = storage
        self.hashes = HashQueue(hasher, concurrency)
        self.setDeadline(deadline)
        self._clock = clock
        self.policy = policy
        self._rounds = rounds
        self.passwordKey = passwordKey
        self.debug = debug
        # jid -> {password key: marker} for hashes being made; an eviction
        # drops the jid, so a hash finishing later is not stored.
        self._hashing: dict[str, dict[bytes, object]] = {}
        # jid -> when the backend last said the user exists.
        self._seen: dict[str, float] = {}
        # jid -> (key of the confirmed password, the bcrypt hash it matches).
        self._verified: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        # jid -> evictions of unknown users not yet written: no lookup finds it.
        self._forgetting: dict[str, int] = {}
        #: Background writes not finished yet (tests wait for them).
        self.pending: set[Deferred[Any]] = set()

    def setDeadline(self, deadline: float) -> None:
        """
        The seconds within which clients need their answer (see C{deadline}).
        """
        self._fallbackAfter = max(deadline - FALLBACK_MARGIN, deadline / 2)

    def _fresh(self, entry: CacheEntry, now: float) -> bool:
        return (
            now - entry.anyAuth < self.policy.queryTTL
            and now - entry.remoteAuth < self.policy.verificationTTL
        )

    def _matches(self, jid: str, entry: CacheEntry, password: str) -> Deferred[bool]:
        """
        Whether C{password} is the one C{entry} holds: from the fast verifier
        if it knows the entry's hash, else with bcrypt (a check that finds no
        room in the bcrypt queue is "no match": the backend decides).
        """
        data = password.encode("utf-8")
        pwhash = entry.pwhash
        if pwhash is None or len(data) > BCRYPT_MAX_PASSWORD:
            return succeed(False)
        key = self.passwordKey(password)
        known = self._verified.get(jid)
        if known is not None and known[1] == pwhash:
            self._verified.move_to_end(jid)
            return succeed(known[0] == key)

        def checked(matched: bool) -> None:
            # Also when the login that asked has gone (its deadline passed):
            # the next login of this user is then decided in microseconds.
            if matched:
                self._confirmed(jid, key, pwhash)

        def noRoom(f: Failure) -> bool:
            f.trap(QueueFull)
            return False

        d = self.hashes.check(jid, data, pwhash, checked)
        return d.addErrback(noRoom)

    def _confirmed(self, jid: str, key: bytes, pwhash: bytes) -> None:
        self._verified[jid] = (key, pwhash)
        self._verified.move_to_end(jid)
        if len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)

    def authenticate(
        self, jid: str, password: str, askBackend: Callable[[], Deferred[Outcome]],
        throttled: Callable[[], bool] | None = None,
    ) -> Deferred[bool | None]:
        """
        Decide a login: a fresh cache entry, else the backend (which refreshes
        or evicts the entry), else, if the backend is unavailable, an entry
        verified within the unreachable TTL.  C{None}: the backend is
        unavailable and the cache does not vouch for the password.

        @param throttled: whether the backend throttles xcauth's address
            (C{429} or brute-force delays, which anyone guessing may
            provoke): then an entry vouches only within the verification
            TTL, so that a provoked throttle never brings an old password
            back.
        """
        return ensureDeferred(self._authenticate(jid, password, askBackend, throttled))

    def _vouchTTL(self, throttled: Callable[[], bool] | None) -> float:
        if throttled is not None and throttled():
            return min(self.policy.verificationTTL, self.policy.unreachableTTL)
        return self.policy.unreachableTTL

    async def _authenticate(
        self, jid: str, password: str, askBackend: Callable[[], Deferred[Outcome]],
        throttled: Callable[[], bool] | None = None,
    ) -> bool | None:
        started = self._clock.seconds()
        entry = await self._lookup(jid)
        matched: bool | None = None
        if entry is None:
            self.metrics.cache("miss")  # metrics
        elif not self._fresh(entry, self._clock.seconds()):
            self.metrics.cache("stale")  # metrics
        else:
            matched = await self._matches(jid, entry, password)
            self.metrics.cache("hit" if matched else "miss")  # metrics
            if matched:
                if self.debug:
                    log.debug("auth from cache for {jid}", jid=printable(jid))
                self._background(self.storage.touch(jid, self._clock.seconds(), False))
                return True
        backend = askBackend()
        outcome: Outcome | None = None
        if self._canVouch(entry, started, self._vouchTTL(throttled)):
            spent = self._clock.seconds() - started
            outcome = await self._answerOrLate(backend, self._fallbackAfter - spent)
            if outcome is None:
                # No answer shortly before the client's deadline: the cache
                # decides if it can (unless the backend answered meanwhile).
                assert entry is not None
                if matched is None:
                    matched = await self._matches(jid, entry, password)
                if matched and not backend.called:
                    backend.addErrback(_ignoreCancelled)
                    backend.cancel()
                    self.metrics.cache("fallback")  # metrics
                    log.info(
                        "backend slow: {jid} accepted from the cache after {seconds} s",
                        jid=printable(jid),
                        seconds=round(self._clock.seconds() - started, 2),
                    )
                    self._background(self.storage.touch(jid, self._clock.seconds(), False))
                    return True
        if outcome is None:
            outcome = await backend
        now = self._clock.seconds()
        if outcome is Outcome.YES:
            self._seen[jid] = now
            self._remember(jid, password, now, entry if matched else None)
            return True
        if outcome is Outcome.NO:
            # The refused password stops working at once if it is the cached
            # one (the password was changed); someone else's wrong guess
            # leaves the real user's entry alone.
            key = self.passwordKey(password)
            hashing = self._hashing.get(jid)
            if hashing is not None and key in hashing:
                del hashing[key]  # a hash of it being made is not stored
                if not hashing:
                    del self._hashing[jid]
            if entry is not None:
                if matched is None:
                    matched = await self._matches(jid, entry, password)
                if matched:
                    self.evict(jid)
            return False
        if entry is None or now - entry.remoteAuth >= self._vouchTTL(throttled):
            return None
        if matched is None:
            matched = await self._matches(jid, entry, password)
        if matched:
            self.metrics.cache("fallback")  # metrics
            log.info(
                "backend unavailable: {jid} accepted from the cache", jid=printable(jid)
            )
            self._background(self.storage.touch(jid, self._clock.seconds(), False))
        return True if matched else None

    def _canVouch(self, entry: CacheEntry | None, now: float, ttl: float) -> bool:
        return (
            entry is not None
            and entry.pwhash is not None
            and now - entry.remoteAuth < ttl
        )

    def _answerOrLate(self, backend: Deferred[Outcome], delay: float) -> Deferred[Outcome | None]:
        """
        C{backend}'s outcome, or C{None} if it has none after C{delay} seconds;
        then C{backend} goes on, and its outcome stays for whoever awaits it.
        Cancelling the result cancels C{backend}.
        """
        if backend.called:
            answered: Deferred[Outcome | None] = backend.addCallback(lambda o: o)
            return answered
        timer: list[Any] = []

        def cancel(_: Deferred[Outcome | None]) -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            backend.addErrback(_ignoreCancelled)
            backend.cancel()

        result: Deferred[Outcome | None] = Deferred(cancel)
        timer.append(self._clock.callLater(max(delay, 0.0), result.callback, None))

        def observe(outcome: Any) -> Any:
            if result.called:
                return outcome  # late: kept for a later await
            if timer[0].active():
                timer[0].cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            return None  # handed over

        backend.addBoth(observe)
        return result

    def vouches(self, jid: str, password: str) -> Deferred[bool]:
        """
        Whether the cache alone accepts C{password} for C{jid}: the entry
        matches and was verified by the backend within the verification TTL
        (used while a brute-force budget is spent, without asking the
        backend: a password cached after a restart is still known).
        """
        return ensureDeferred(self._vouches(jid, password))

    async def _vouches(self, jid: str, password: str) -> bool:
        entry = await self._lookup(jid)
        now = self._clock.seconds()
        ttl = min(self.policy.verificationTTL, self.policy.unreachableTTL)
        if entry is None or now - entry.remoteAuth >= ttl:
            return False
        return bool(await self._matches(jid, entry, password))

    async def _lookup(self, jid: str) -> CacheEntry | None:
        """
        The entry of C{jid}; a storage that fails (a damaged or locked
        database) is logged and treated as having no entry, so logins still
        reach the backend.
        """
        if jid in self._forgetting:
            return None
        try:
            entry: CacheEntry | None = await self.storage.get(jid)
        except Exception:
            log.failure("credential cache lookup for {jid} failed", jid=printable(jid))
            return None
        return entry

    def _remember(
        self, jid: str, password: str, now: float, matching: CacheEntry | None
    ) -> None:
        if matching is not None:
            # The cached hash is this password: no new hash needed.
            if matching.pwhash is not None:
                self._confirmed(jid, self.passwordKey(password), matching.pwhash)
            self._background(self.storage.touch(jid, now, True))
            return
        data = password.encode("utf-8")
        if len(data) > BCRYPT_MAX_PASSWORD:
            return
        key = self.passwordKey(password)
        hashing = self._hashing.setdefault(jid, {})
        if key in hashing:
            return
        marker = object()
        hashing[key] = marker

        def store(pwhash: bytes) -> Deferred[None] | None:
            current = self._hashing.get(jid)
            if current is None or current.get(key) is not marker:
                return None  # evicted while hashing
            del current[key]
            if not current:
                del self._hashing[jid]
            self._confirmed(jid, key, pwhash)
            written: Deferred[None] = self.storage.put(jid, pwhash, now)
            return written

        def failed(f: Failure) -> None:
            current = self._hashing.get(jid)
            if current is not None and current.get(key) is marker:
                del current[key]
                if not current:
                    del self._hashing[jid]
            if f.check(QueueFull):
                return  # not cached this time; logged by the queue
            log.failure("cannot cache the password of {jid}", f, jid=printable(jid))

        d = self.hashes.hash(data, self._rounds)
        d.addCallback(store)
        d.addErrback(failed)
        self._background(d)

    def evict(self, jid: str) -> None:
        """
        Forget the entry of C{jid} (and any hash of it still being made).
        """
        self._hashing.pop(jid, None)
        self._verified.pop(jid, None)
        log.info("evicting the cached password of {jid}", jid=printable(jid))
        self._background(self.storage.delete(jid))

    def forget(self, jid: str) -> None:
        """
        The backend says C{jid} does not exist: its entry (if any) is evicted,
        and until that is written no lookup finds it, so a login that follows
        at once is decided by the backend.
        """
        self._hashing.pop(jid, None)
        self._verified.pop(jid, None)
        self._seen.pop(jid, None)
        self._forgetting[jid] = self._forgetting.get(jid, 0) + 1

        def gone(entry: CacheEntry | None) -> Deferred[None] | None:
            if entry is None:
                return None
            log.info(
                "evicting the cached password of {jid}: the backend says the user "
                "does not exist",
                jid=printable(jid),
            )
            return self.storage.delete(jid)

        def done(result: Any) -> Any:
            left = self._forgetting.get(jid, 1) - 1
            if left:
                self._forgetting[jid] = left
            else:
                self._forgetting.pop(jid, None)
            return result

        d = self.storage.get(jid).addCallback(gone)
        d.addBoth(done)
        self._background(d)

    def holds(self, jid: str) -> Deferred[bool]:
        """
        Whether the cache holds a password of C{jid}.
        """
        return ensureDeferred(self._lookup(jid)).addCallback(
            lambda entry: entry is not None and entry.pwhash is not None
        )

    def _background(self, d: Deferred[Any]) -> None:
        self.pending.add(d)

        def done(result: Any) -> None:
            self.pending.discard(d)
            if isinstance(result, Failure):
                log.failure("credential cache write failed", result)

        d.addBoth(done)

    def seen(self, jid: str, exists: bool) -> None:
        """
        Record the backend's answer to "does C{jid} exist?".
        """
        if not exists:
            self._seen.pop(jid, None)
            return
        self._seen.pop(jid, None)
        self._seen[jid] = self._clock.seconds()
        if len(self._seen) > MAX_SEEN:
            del self._seen[next(iter(self._seen))]

    def knownUser(self, jid: str) -> Deferred[bool]:
        """
        Whether C{jid} was seen to exist within the verification TTL: the
        backend said so, or confirmed its password.
        """
        now = self._clock.seconds()
        seenAt = self._seen.get(jid)
        if seenAt is not None and now - seenAt < self.policy.verificationTTL:
            return succeed(True)

        def check(entry: CacheEntry | None) -> bool:
            return (
                entry is not None
                and now - entry.remoteAuth < self.policy.verificationTTL
            )

        return ensureDeferred(self._lookup(jid)).addCallback(check)


def _ignoreCancelled(f: Failure) -> None:
    f.trap(CancelledError)


class SharedStorage(DatabaseStorage):
    """
    Cache entries in the C{authcache} table of a state database shared by
    several nodes (PostgreSQL, L{xcauth.pgstore.PgStore}), with this node's
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
        from xcauth.pgstore import StoreUnavailable

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
