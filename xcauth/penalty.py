"""
Failed logins, remembered so that Nextcloud's brute-force protection is not
provoked by xcauth's clients.

Nextcloud counts every failed login per client address, and xcauth is one
address for all of its users: a few clients retrying a stale saved password,
or one person guessing, would slow down (and, past ten failures in 30
minutes, block) every login of every user.  L{PenaltyBox} keeps that from
happening, in the spirit of Dovecot's authentication penalty:

 - a refused C{(user, password)} pair is remembered (under a keyed hash of the
   password, never the password) for C{refusedTTL} seconds and refused again
   locally, so a client retrying a stale password reaches Nextcloud once;
 - every failure is answered after a delay that doubles with the consecutive
   failures of the user (from C{baseDelay} up to C{maxDelay}, counted from the
   moment the request came in, so it stays within the client's deadline);
 - after C{lockoutAfter} distinct wrong passwords the user is refused locally
   for C{lockoutSeconds} (a cool-down), and again after each further distinct
   wrong password until a login succeeds;
 - a right password clears the user's record.

The authenticator lets a password that the credential cache vouches for in
during a cool-down, so a guesser cannot lock a user with a cached password out.
Failures are kept per user, or per user and client address where the framing
knows the address.
"""

from __future__ import annotations

from collections.abc import Callable

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from xcauth.metrics import NoMetrics


@attr.s(frozen=True, auto_attribs=True)
class PenaltyPolicy:
    """
    The limits (each a configuration option; see L{xcauth.config}).
    """

    refusedTTL: float = 600.0
    baseDelay: float = 0.5
    maxDelay: float = 2.0
    lockoutAfter: int = 5
    lockoutSeconds: float = 900.0
    #: A user's failures are forgotten this long after the last one.
    forgetAfter: float = 3600.0
    #: Users and pairs remembered at most (the oldest are forgotten first).
    maxEntries: int = 100_000


class _Record:
    __slots__ = ("failures", "distinct", "lockedUntil", "last")

    def __init__(self) -> None:
        self.failures = 0
        self.distinct: set[bytes] = set()
        self.lockedUntil = 0.0
        self.last = 0.0


class PenaltyBox:
    """
    The failures of recent logins.

    @param clock: the time of every decision and of the delays.
    @param policy: the limits.
    @param metrics: counts the logins refused or delayed here.
    """

    def __init__(
        self, clock: IReactorTime, policy: PenaltyPolicy | None = None,
        metrics: NoMetrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else NoMetrics()  # metrics
        self._clock = clock
        self.policy = policy or PenaltyPolicy()
        # (jid, password key) -> until when the pair is refused; insertion
        # order is expiry order (a refreshed pair moves to the end).
        self._refused: dict[tuple[str, bytes], float] = {}
        # who -> record; the least recently failed first.
        self._records: dict[str, _Record] = {}

    @staticmethod
    def who(jid: str, peer: str | None) -> str:
        """
        The key of a user's failures: the JID, with the client's address
        where it is known.
        """
        return jid if not peer else f"{jid} {peer}"

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
            record = records[oldest]
            stale = (now - record.last >= self.policy.forgetAfter
                     and record.lockedUntil <= now)
            if not stale and len(records) <= limit:
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

    def lockedOut(self, who: str) -> bool:
        """
        Whether C{who} is in a cool-down.
        """
        record = self._records.get(who)
        return record is not None and record.lockedUntil > self._clock.seconds()

    def failed(self, who: str, jid: str, key: bytes, known: bool = False) -> None:
        """
        Count a refused login of C{who} with the password of key C{key}.

        @param known: the pair was refused locally (already remembered): it
            makes the delay grow but is not a new distinct password.
        """
        now = self._clock.seconds()
        policy = self.policy
        pair = (jid, key)
        self._refused.pop(pair, None)
        self._refused[pair] = now + policy.refusedTTL
        record = self._records.pop(who, None) or _Record()
        self._records[who] = record
        record.failures += 1
        record.last = now
        if not known and key not in record.distinct:
            record.distinct.add(key)
            if len(record.distinct) >= policy.lockoutAfter:
                record.lockedUntil = now + policy.lockoutSeconds
        self._expire()

    def _failedLocally(self, who: str) -> None:
        # A refusal during a cool-down that Nextcloud was not asked about:
        # the delay grows, but the password is not remembered as wrong.
        record = self._records.pop(who, None) or _Record()
        self._records[who] = record
        record.failures += 1
        record.last = self._clock.seconds()

    def gate(
        self,
        jid: str,
        who: str,
        key: bytes,
        check: Callable[[], Deferred[bool | None]],
        vouch: Callable[[], Deferred[bool]] | None = None,
    ) -> Deferred[bool | None]:
        """
        Decide a login with the penalties around C{check} (the cache and the
        backend).

        @param who: see L{who}.
        @param key: the keyed hash of the password.
        @param check: asks the cache and the backend.
        @param vouch: during a cool-down, whether the credential cache vouches
            for the password (without the backend); C{None}: no cache.
        """
        started = self._clock.seconds()

        def refuse(reason: str = "delayed") -> Deferred[bool | None]:
            if reason != "delayed" or self.delay(who) > 0:  # metrics
                self.metrics.penalized(reason)  # metrics
            return self.holdBack(who, started).addCallback(lambda _: False)

        if self.refused(jid, key):
            self.failed(who, jid, key, known=True)
            return refuse("refused")
        if self.lockedOut(who):
            vouched: Deferred[bool] = vouch() if vouch is not None else succeed(False)

            def decided(ok: bool) -> bool | Deferred[bool | None]:
                if ok:
                    self.succeeded(who)
                    return True
                self._failedLocally(who)
                return refuse("locked-out")

            return vouched.addCallback(decided)

        def result(answer: bool | None) -> bool | None | Deferred[bool | None]:
            if answer is True:
                self.succeeded(who)
            elif answer is False:
                self.failed(who, jid, key)
                return refuse()
            return answer

        return check().addCallback(result)

    def succeeded(self, who: str) -> None:
        """
        A right password: forget C{who}'s failures.
        """
        self._records.pop(who, None)

    def forgetDomains(self, changed: Callable[[str], bool]) -> int:
        """
        Forget the refusals and failures of the users of every domain for
        which C{changed(domain)} is true: their backend changed (a domain
        added to or removed from the table, another URL or account, a reload),
        and what the old one refused says nothing about the new one.

        @return: how many entries were dropped.
        """
        refused = [pair for pair in self._refused if changed(_domainOf(pair[0]))]
        for pair in refused:
            del self._refused[pair]
        records = [who for who in self._records if changed(_domainOf(who))]
        for who in records:
            del self._records[who]
        return len(refused) + len(records)

    def delay(self, who: str) -> float:
        """
        Seconds a refusal of C{who} is held back, after its failures so far.
        """
        record = self._records.get(who)
        if record is None or record.failures == 0:
            return 0.0
        policy = self.policy
        return float(min(policy.baseDelay * 2 ** (record.failures - 1), policy.maxDelay))

    def holdBack(self, who: str, started: float) -> Deferred[None]:
        """
        A L{Deferred} firing when a refusal of C{who} for a request that came
        in at C{started} may be answered (cancelling it cancels the wait).
        """
        wait = started + self.delay(who) - self._clock.seconds()
        if wait <= 0:
            return succeed(None)
        return deferLater(self._clock, wait)

    def __len__(self) -> int:
        return len(self._records) + len(self._refused)


def _domainOf(who: str) -> str:
    """
    The domain of a JID or of a L{PenaltyBox.who} key (C{JID} or C{JID PEER}).
    """
    return who.rpartition("@")[2].split(" ", 1)[0]
