"""
Brute-force protection: how many passwords may be tried, by whom, and which
passwords always get in.

xcauth logs in to Nextcloud for all its users from one address.  An
attacker who guesses through xcauth must neither get more checks than the
limits below, nor use the limits to keep a user out, nor push Nextcloud
into throttling xcauth's address (which would keep everyone out).
L{PenaltyBox} decides every password login (tokens are decided before it):

 - B{known passwords}: a password Nextcloud or the credential cache accepted
   for a user (kept as a keyed hash, L{xcauth.core.passwordkeys}, never the password;
   L{KnownPasswords}: several per user, the least recently used forgotten
   first) gets in while the user or the backend is under a limit, or the
   backend throttles, within C{knownTTL} of the last acceptance, without
   asking Nextcloud.  Nextcloud refusing one of them forgets only that one;
 - B{per-user budget}: every check of a password new to xcauth is counted
   when it starts (L{IAttemptBudget.reserve}), before Nextcloud is asked,
   whatever the framing, connection or client address; a user has
   C{userChecks} of them, and they come back one by one over
   C{userRefill} seconds (an accepted password gives its check back at
   once).  A spent budget refuses new passwords locally (the cache may still
   vouch for one);
 - B{daemon-wide budget}: per Nextcloud, checks that failed (or are being
   made) within C{backendWindow} are kept below C{backendFailures} while
   xcauth's address is not on Nextcloud's allow-list (Nextcloud answers
   C{429} past ten), C{allowListedFailures} (C{None}: no limit) when it is.
   Beyond it, new passwords are answered "unavailable" locally;
 - B{refused pairs}: a refused C{(user, password)} is refused again locally
   for C{refusedTTL} seconds (a client retrying a stale password reaches
   Nextcloud once);
 - B{delays}: a refusal is answered after a delay that doubles with the
   recent failures of the user, and of the client's address where the
   framing knows it (Dovecot's C{rip=}), from C{baseDelay} to C{maxDelay};
   an address never opens a budget of its own.

Every count and delay is bounded; nothing here raises for any count.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from xcauth.interfaces import IAttemptBudget, NoMetrics, Throttling
from xcauth.text import printable

log = Logger()

#: Seconds between two log lines saying that a daemon-wide budget is spent.
BUDGET_LOG_INTERVAL = 60.0

#: Failures counted per user or address at most (the delay is long capped
#: before).
MAX_FAILURES = 1 << 20


@attr.s(frozen=True, auto_attribs=True)
class PenaltyPolicy:
    """
    The limits (each a configuration option; see L{xcauth.daemon.config}).
    """

    refusedTTL: float = 600.0
    baseDelay: float = 0.5
    maxDelay: float = 2.0
    #: Checks of new passwords per user at once, and the seconds in which
    #: they all come back.
    userChecks: int = 5
    userRefill: float = 900.0
    #: Failed checks toward one Nextcloud within C{backendWindow} seconds,
    #: while xcauth's address is not allow-listed, and when it is.
    backendFailures: int = 10
    backendWindow: float = 1800.0
    allowListedFailures: int | None = 100
    #: Known passwords per user, and how long after the last acceptance
    #: one gets in without Nextcloud during a limit.
    knownPasswords: int = 8
    knownTTL: float = 86400.0
    #: A user's or address's failures are forgotten this long after the last.
    forgetAfter: float = 3600.0
    #: Users, addresses and pairs remembered at most (oldest forgotten first).
    maxEntries: int = 100_000


@implementer(IAttemptBudget)
class MemoryBudget:
    """
    L{IAttemptBudget} in this process's memory.

    A user's budget is a bucket of C{checks} that refills at C{checks} per
    C{refill} seconds; a full bucket is forgotten.  At most C{maxEntries}
    users are remembered (the least recently used first forgotten; the
    daemon-wide budget still bounds what a flood of names gets).
    """

    def __init__(self, checks: int = 5, refill: float = 900.0, window: float = 1800.0,
                 maxEntries: int = 100_000) -> None:
        self.checks = max(int(checks), 1)
        self.rate = self.checks / max(float(refill), 1e-3)
        self.window = max(float(window), 0.0)
        self.maxEntries = max(int(maxEntries), 1)
        # user -> [checks spent, when last updated]
        self._spent: OrderedDict[str, list[float]] = OrderedDict()
        # backend -> times of the checks counted (oldest first)
        self._backends: dict[str, deque[float]] = {}

    def _level(self, user: str, now: float) -> float:
        entry = self._spent.get(user)
        if entry is None:
            return 0.0
        elapsed = max(now - entry[1], 0.0)
        spent = max(entry[0] - elapsed * self.rate, 0.0)
        if spent <= 0.0:
            del self._spent[user]
            return 0.0
        entry[0] = spent
        entry[1] = max(now, entry[1])
        return spent

    def _setLevel(self, user: str, spent: float, now: float) -> None:
        if spent <= 0.0:
            self._spent.pop(user, None)
            return
        entry = self._spent.pop(user, None)
        if entry is None:
            entry = [0.0, now]
        entry[0] = min(spent, float(self.checks))
        entry[1] = max(now, entry[1])
        self._spent[user] = entry
        while len(self._spent) > self.maxEntries:
            self._spent.popitem(last=False)

    def _times(self, backend: str, now: float) -> deque[float]:
        times = self._backends.get(backend)
        if times is None:
            times = self._backends[backend] = deque()
        cutoff = now - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        return times

    def _remoteLevel(self, user: str, now: float) -> float:
        """
        What other nodes spent of C{user}'s budget (none: this budget is
        the node's alone; L{xcauth.core.sharedbudget.SharedBudget} adds theirs).
        """
        return 0.0

    def _remoteCount(self, backend: str, now: float) -> int:
        """
        Checks toward C{backend} that other nodes counted within the window.
        """
        return 0

    def reserve(self, user: str, backend: str, now: float,
                backendLimit: int | None) -> str | None:
        spent = self._level(user, now)
        if spent + self._remoteLevel(user, now) + 1.0 > self.checks:
            return "user"
        if backendLimit is not None:
            times = self._times(backend, now)
            if len(times) + self._remoteCount(backend, now) >= backendLimit:
                return "backend"
            times.append(now)
        self._setLevel(user, spent + 1.0, now)
        return None

    def settle(self, user: str, backend: str, reservedAt: float, now: float,
               accepted: bool | None) -> None:
        if accepted is False:
            return
        self._setLevel(user, self._level(user, now) - 1.0, now)
        if accepted is None:
            return
        times = self._backends.get(backend)
        if times is not None:
            try:
                times.remove(reservedAt)
            except ValueError:
                pass  # not counted (no limit then), or already out of the window

    def failed(self, backend: str, now: float) -> None:
        times = self._times(backend, now)
        times.append(now)
        while len(times) > self.maxEntries:
            times.popleft()

    def limited(self, user: str, backend: str, now: float,
                backendLimit: int | None) -> bool:
        if self._level(user, now) + self._remoteLevel(user, now) >= 1.0:
            return True
        return backendLimit is not None and self.backendFailures(backend, now) >= backendLimit

    def backendFailures(self, backend: str, now: float) -> int:
        return len(self._times(backend, now)) + self._remoteCount(backend, now)

    def __len__(self) -> int:
        return len(self._spent)


class KnownPasswords:
    """
    Keyed hashes of the passwords accepted per user, with when each was last
    accepted: at most C{perUser} per user (the least recently accepted
    forgotten first) and C{maxUsers} users.
    """

    def __init__(self, perUser: int = 8, maxUsers: int = 100_000) -> None:
        self.perUser = max(int(perUser), 1)
        self.maxUsers = max(int(maxUsers), 1)
        self._users: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()

    def get(self, jid: str, key: bytes) -> float | None:
        """
        When C{key} was last accepted for C{jid}, or C{None}.
        """
        keys = self._users.get(jid)
        return None if keys is None else keys.get(key)

    def add(self, jid: str, key: bytes, now: float) -> None:
        """
        C{key} was accepted for C{jid} at C{now}.
        """
        keys = self._users.pop(jid, None)
        if keys is None:
            keys = OrderedDict()
        keys.pop(key, None)
        keys[key] = now
        while len(keys) > self.perUser:
            keys.popitem(last=False)
        self._users[jid] = keys
        while len(self._users) > self.maxUsers:
            self._users.popitem(last=False)

    def remove(self, jid: str, key: bytes) -> None:
        """
        Nextcloud refused C{key} for C{jid}: forget that one only.
        """
        keys = self._users.get(jid)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._users[jid]

    def forget(self, jid: str) -> None:
        """
        Forget every password of C{jid} (the user no longer exists).
        """
        self._users.pop(jid, None)

    def forgetWhere(self, matches: Callable[[str], bool]) -> int:
        """
        Forget the passwords of every user C{matches} is true for; how many
        users that was.
        """
        gone = [jid for jid in self._users if matches(jid)]
        for jid in gone:
            del self._users[jid]
        return len(gone)

    def count(self, jid: str) -> int:
        """
        How many passwords of C{jid} are known.
        """
        return len(self._users.get(jid) or ())


class PenaltyBox:
    """
    The brute-force protection of password logins (see the module).

    @param clock: the time of every decision and of the delays.
    @param policy: the limits.
    @param metrics: counts the logins refused, delayed or let through here.
    @param budget: where the budgets are kept (default: in memory).
    """

    def __init__(
        self, clock: IReactorTime, policy: PenaltyPolicy | None = None,
        metrics: NoMetrics | None = None, budget: IAttemptBudget | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else NoMetrics()  # metrics
        self._clock = clock
        self.policy = policy = policy or PenaltyPolicy()
        self.budget: IAttemptBudget = budget if budget is not None else MemoryBudget(
            policy.userChecks, policy.userRefill, policy.backendWindow, policy.maxEntries
        )
        self.known = KnownPasswords(policy.knownPasswords, policy.maxEntries)
        # (jid, password key) -> until when the pair is refused; insertion
        # order is expiry order (a refreshed pair moves to the end).
        self._refused: dict[tuple[str, bytes], float] = {}
        # user or "@address" -> [failures, time of the last]; least recent first.
        self._records: OrderedDict[str, list[float]] = OrderedDict()
        self._lastBudgetLog: dict[str, float] = {}

    # -- the pieces ------------------------------------------------------------

    def _expire(self) -> None:
        now = self._clock.seconds()
        limit = self.policy.maxEntries
        refused = self._refused
        while refused:
            first = next(iter(refused))
            if refused[first] > now and len(refused) <= limit:
                break
            del refused[first]
        records = self._records
        while records:
            oldest = next(iter(records))
            if now - records[oldest][1] < self.policy.forgetAfter and len(records) <= limit:
                break
            del records[oldest]

    def refused(self, jid: str, key: bytes) -> bool:
        """
        Whether this password of C{jid} was refused within C{refusedTTL}.
        """
        until = self._refused.get((jid, key))
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._refused[(jid, key)]
            return False
        return True

    def _remember(self, who: str) -> None:
        now = self._clock.seconds()
        record = self._records.pop(who, None) or [0, now]
        record[0] = min(record[0] + 1, MAX_FAILURES)
        record[1] = now
        self._records[who] = record

    def failed(self, jid: str, key: bytes, peer: str | None = None,
               known: bool = False) -> None:
        """
        Count a refusal of C{jid}'s password of key C{key} (from C{peer}).

        @param known: the pair was refused locally (already remembered): the
            delays grow, the pair is not remembered again.
        """
        if not known:
            self._refused.pop((jid, key), None)
            self._refused[(jid, key)] = self._clock.seconds() + self.policy.refusedTTL
        self._remember(jid)
        if peer:
            self._remember("@" + peer)
        self._expire()

    def succeeded(self, jid: str, peer: str | None = None) -> None:
        """
        A right password: forget the failures of C{jid} (and of C{peer}).
        """
        self._records.pop(jid, None)
        if peer:
            self._records.pop("@" + peer, None)

    def _failures(self, who: str) -> int:
        record = self._records.get(who)
        if record is None or self._clock.seconds() - record[1] >= self.policy.forgetAfter:
            return 0
        return int(record[0])

    def delay(self, jid: str, peer: str | None = None) -> float:
        """
        Seconds a refusal of C{jid} (from C{peer}) is held back, after the
        recent failures of both.
        """
        failures = self._failures(jid)
        if peer:
            failures = max(failures, self._failures("@" + peer))
        if failures <= 0:
            return 0.0
        policy = self.policy
        # 2 ** 62 times any delay is past any cap: no overflow at any count.
        return float(min(policy.baseDelay * 2.0 ** min(failures - 1, 62), policy.maxDelay))

    def holdBack(self, jid: str, peer: str | None, started: float) -> Deferred[None]:
        """
        A L{Deferred} firing when a refusal of C{jid} (from C{peer}) for a
        request that came in at C{started} may be answered (cancelling it
        cancels the wait).
        """
        wait = started + self.delay(jid, peer) - self._clock.seconds()
        if not wait > 0:
            return succeed(None)
        return deferLater(self._clock, min(wait, self.policy.maxDelay))

    def backendLimit(self, watch: Throttling | None) -> int | None:
        """
        The daemon-wide budget of failed checks toward the backend C{watch}
        watches (C{None}: no limit; a JSXC backend has none).
        """
        if watch is None:
            return None
        if watch.allowListed():
            return self.policy.allowListedFailures
        return self.policy.backendFailures

    def _budgetSpent(self, backend: str, limit: int | None) -> None:
        now = self._clock.seconds()
        last = self._lastBudgetLog.get(backend)
        if last is not None and now - last < BUDGET_LOG_INTERVAL:
            return
        self._lastBudgetLog[backend] = now
        log.warn(
            "brute-force budget of {url} spent: {failures} failed or pending checks "
            "within {window:g} s (limit {limit}); passwords new to xcauth are answered "
            "'unavailable' until failures age out, known passwords still get in",
            url=printable(backend),
            failures=self.budget.backendFailures(backend, now),
            window=self.policy.backendWindow,
            limit=limit,
        )

    # -- the decision ----------------------------------------------------------

    def gate(
        self,
        jid: str,
        key: bytes,
        check: Callable[[], Deferred[bool | None]],
        vouch: Callable[[], Deferred[bool]] | None = None,
        peer: str | None = None,
        watch: Throttling | None = None,
        shared: bool = False,
        outage: bool = False,
    ) -> Deferred[bool | None]:
        """
        Decide a login with the limits around C{check} (the cache and the
        backend).

        @param key: the keyed hash of the password.
        @param check: asks the cache and the backend.
        @param vouch: whether the credential cache alone accepts the
            password (within its verification TTL), used when a budget is
            spent; C{None}: no cache.
        @param peer: the client's address, where the framing knows it.
        @param watch: the backend's throttle (a stock Nextcloud), or C{None}.
        @param shared: an identical check is already being made: this login
            follows it without counting another check.
        @param outage: a known password may answer for an unavailable
            backend (a credential cache is configured).
        """
        started = now = self._clock.seconds()
        if self.refused(jid, key):
            self.failed(jid, key, peer, known=True)
            self.metrics.penalized("refused")  # metrics
            return self.holdBack(jid, peer, started).addCallback(lambda _: False)
        backend = watch.key() if watch is not None else ""
        limit = self.backendLimit(watch)
        knownAt = self.known.get(jid, key)
        if knownAt is not None:
            fresh = now - knownAt < self.policy.knownTTL
            if fresh and ((watch is not None and watch.throttled())
                          or self.budget.limited(jid, backend, now, limit)):
                self.metrics.bruteForce("known-let-through")  # metrics
                return succeed(True)
            return check().addCallback(
                self._knownAnswer, jid, key, peer, started, knownAt, watch, outage
            )
        if shared:
            followed: Deferred[Any] = check()
            followed.addBoth(self._answer, jid, key, peer, started, None)
            return followed
        reason = self.budget.reserve(jid, backend, now, limit)
        if reason is None:
            checked: Deferred[Any] = check()
            checked.addBoth(self._answer, jid, key, peer, started, (backend, now))
            return checked
        self.metrics.bruteForce(f"{reason}-budget")  # metrics
        if reason == "backend":
            self._budgetSpent(backend, limit)
        vouched: Deferred[bool] = vouch() if vouch is not None else succeed(False)

        def decided(ok: bool) -> bool | None | Deferred[bool | None]:
            if ok:
                self.known.add(jid, key, self._clock.seconds())
                self.metrics.bruteForce("known-let-through")  # metrics
                return True
            # Refused without asking anyone: the delays grow, the password
            # is not remembered as wrong (it was never checked).
            self.failed(jid, key, peer, known=True)
            answer: bool | None = False if reason == "user" else None
            return self.holdBack(jid, peer, started).addCallback(lambda _: answer)

        return vouched.addCallback(decided)

    def _answer(
        self, answer: Any, jid: str, key: bytes, peer: str | None,
        started: float, reserved: tuple[str, float] | None,
    ) -> Any:
        now = self._clock.seconds()
        if reserved is not None:
            # A refusal spends the check; an unavailable Nextcloud (or an
            # error) told nobody anything about the password: the user's
            # check comes back, Nextcloud's failure count may have grown.
            self.budget.settle(jid, reserved[0], reserved[1], now,
                               True if answer is True else False if answer is False else None)
        if answer is True:
            self.known.add(jid, key, now)
            self.succeeded(jid, peer)
        elif answer is False:
            self.failed(jid, key, peer)
            if self.delay(jid, peer) > 0:  # metrics
                self.metrics.penalized("delayed")  # metrics
            return self.holdBack(jid, peer, started).addCallback(lambda _: False)
        return answer

    def _knownAnswer(
        self, answer: bool | None, jid: str, key: bytes, peer: str | None, started: float,
        knownAt: float, watch: Throttling | None, outage: bool,
    ) -> bool | None | Deferred[bool | None]:
        now = self._clock.seconds()
        if answer is True:
            self.known.add(jid, key, now)
            self.succeeded(jid, peer)
            return True
        if answer is False:
            # Changed in Nextcloud: this password only stops being known.
            self.known.remove(jid, key)
            self.budget.failed(watch.key() if watch is not None else "", now)
            self.failed(jid, key, peer)
            return self.holdBack(jid, peer, started).addCallback(lambda _: False)
        if (self.known.get(jid, key) is not None and now - knownAt < self.policy.knownTTL
                and (outage or (watch is not None and watch.throttled()))):
            self.metrics.bruteForce("known-let-through")  # metrics
            return True
        return None

    def knowsUser(self, jid: str) -> bool:
        """
        Whether a password of C{jid} is known as good.
        """
        return self.known.count(jid) > 0

    def forgetDomains(self, changed: Callable[[str], bool]) -> int:
        """
        Forget the refusals, failures and known passwords of the users of
        every domain for which C{changed(domain)} is true: their backend
        changed (a domain added to or removed from the table, another URL or
        account, a reload), and what the old one refused or accepted says
        nothing about the new one.

        @return: how many entries were dropped.
        """
        refused = [pair for pair in self._refused if changed(_domainOf(pair[0]))]
        for pair in refused:
            del self._refused[pair]
        records = [who for who in self._records
                   if not who.startswith("@") and changed(_domainOf(who))]
        for who in records:
            del self._records[who]
        return len(refused) + len(records) + self.known.forgetWhere(
            lambda jid: changed(_domainOf(jid))
        )

    def forgetUser(self, jid: str) -> None:
        """
        Nextcloud says C{jid} does not exist: none of its passwords is known
        as good any longer (a user created again under the name starts
        afresh).
        """
        self.known.forget(jid)

    def __len__(self) -> int:
        return len(self._records) + len(self._refused)


def _domainOf(jid: str) -> str:
    """
    The domain of a JID.
    """
    return jid.rpartition("@")[2]
