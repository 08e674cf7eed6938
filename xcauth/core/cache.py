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
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.core.hashing import HashQueue, QueueFull
from xcauth.interfaces import CacheEntry, ICacheStorage, IWorker, NoMetrics, Outcome
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
    the backend), a keyed hash of that password (L{xcauth.core.passwordkeys}, a key that
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
