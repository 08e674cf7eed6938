"""
The authentication backend every framing shares.

L{Authenticator} answers "is this password right?" and "does this user exist?" for
a user and domain.  It checks time-limited tokens locally first, then asks the
Nextcloud backend configured for the domain, with an optional credential cache
(L{xcauth.core.cache}) around the backend call.  Concurrent logins of one user with
one password share one piece of work (one backend request, one bcrypt hash).
Its contract is all the framings know about::

    authenticate(user, domain, password) -> Deferred[bool | None]  # None: unavailable
    isUser(user, domain) -> Deferred[bool | None]     # None: backend unavailable
    roster(user, domain) -> Deferred[bytes | None]

Every public method first reduces C{user} and C{domain} to their canonical
identity (L{xcauth.identity}; the framings already did, so this changes
nothing for them) and refuses an invalid one without asking anyone.  A domain
nobody serves (C{settingsFor} gives C{None}: not in the domains table, not
listed with C{domain=}) is answered "no", counted and logged at most once a
minute.  When Nextcloud says a user does not exist, that user's cached
passwords are evicted at once (and the penalty box's known-good records, if it
keeps any: C{forgetUser(jid)}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.core.tokens import verifyToken
from xcauth.identity import canonicalOrNone
from xcauth.interfaces import (
    BackendUnavailable,
    DomainSettings,
    IAuthenticator,
    Outcome,
    RosterEntry,
)
from xcauth.text import printable

if TYPE_CHECKING:
    from xcauth.core.cache import CredentialCache
    from xcauth.core.penalty import PenaltyBox

log = Logger()

T = TypeVar("T")

#: Seconds between two log lines about requests for domains nobody serves.
UNSERVED_LOG_INTERVAL = 60.0

#: Seconds between two checks, after a refused login, of whether a user with a
#: cached password still exists (per user).
EXISTENCE_CHECK_INTERVAL = 60.0

#: Users whose existence check time is remembered, at most.
MAX_EXISTENCE_CHECKS = 10_000


@implementer(IAuthenticator)
class Authenticator:
    """
    Tokens first, then the credential cache and the backend.

    @param settingsFor: returns the L{DomainSettings} for a (canonical) XMPP
        domain, without blocking (a warm in-memory lookup), or C{None} for a
        domain that is not served.
    @param clock: the clock tokens are checked against; read on every request.
    @param passwordKey: keyed hashes of passwords, to share the work of
        identical concurrent logins without keeping the password.
    @param cache: the credential cache, or C{None} for none.
    @param ready: returns C{None} once C{settingsFor} knows every domain, or
        until then a L{Deferred} that fires when it does (requests wait for it).
    @param backendReady: like C{ready}, for the backend's start-up check:
        what needs the backend waits for it, a token never does.
    @param debug: log per-request details at debug level (twistd writes every
        level to its log, and a line per token login costs as much CPU as
        checking the token).
    @param onLogin: called with C{(user, domain)} after each successful
        authentication (token, cache or backend), before the answer is
        delivered; it must return at once (fire and forget: the roster sync
        only queues the user).  What it raises is logged, never answered.
    @param penalty: the brute-force protection (L{xcauth.core.penalty}: budgets of
        checks, known passwords, delays), or C{None} for none.
    """

    def __init__(
        self,
        settingsFor: Callable[[str], DomainSettings | None],
        clock: IReactorTime,
        passwordKey: Callable[[str], bytes],
        cache: CredentialCache | None = None,
        ready: Callable[[], Deferred[None] | None] | None = None,
        debug: bool = False,
        onLogin: Callable[[str, str], object] | None = None,
        penalty: PenaltyBox | None = None,
        backendReady: Callable[[], Deferred[None] | None] | None = None,
    ) -> None:
        self.penalty = penalty
        self._backendReady = backendReady
        self._settingsFor = settingsFor
        self._onLogin = onLogin
        self._clock = clock
        self.debug = debug
        self.cache = cache
        self._ready = ready
        self._passwordKey = passwordKey
        self._inflight: dict[tuple[str, str, bytes], _Shared] = {}
        #: Requests for domains nobody serves, since the daemon started.
        self.unserved = 0
        self._unservedLogged = 0
        self._unservedLoggedAt: float | None = None
        self._existenceChecked: dict[str, float] = {}

    def _whenReady(self, f: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        waiting = self._ready() if self._ready is not None else None
        if waiting is None:
            return f(*args)
        return waiting.addCallback(lambda _: f(*args))

    def _whenBackendReady(self, f: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        waiting = self._backendReady() if self._backendReady is not None else None
        if waiting is None:
            return f(*args)
        return waiting.addCallback(lambda _: f(*args))

    def authenticate(
        self, user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        """
        Whether C{password} (or a token) is right for C{user@domain}.  A backend
        that is unavailable gives C{None}, unless the cache vouches for the
        password.
        """
        identity = canonicalOrNone(user, domain)
        if identity is None:
            return succeed(False)
        user, domain = identity.user, identity.domain
        d = self._whenReady(self._authenticate, user, domain, password, peer)
        if self._onLogin is not None:
            d.addCallback(self._loggedIn, user, domain)
        return d

    def _loggedIn(self, result: bool | None, user: str, domain: str) -> bool | None:
        if result is True and self._onLogin is not None:
            try:
                self._onLogin(user, domain)
            except Exception:
                log.failure("the login hook failed for {user}@{domain}",
                            user=printable(user), domain=printable(domain))
        return result

    def _authenticate(
        self, user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        settings = self._settingsFor(domain)
        if settings is None:
            self._noteUnserved(domain)
            return succeed(False)
        if verifyToken(password, user, domain, settings.secrets, self._clock.seconds()):
            if self.debug:
                log.debug(
                    "token accepted for {user}@{domain}",
                    user=printable(user),
                    domain=printable(domain),
                )
            return succeed(True)
        return self._whenBackendReady(self._password, settings, user, domain, password, peer)

    def _password(
        self, settings: DomainSettings, user: str, domain: str, password: str,
        peer: str | None,
    ) -> Deferred[bool | None]:
        penalty = self.penalty
        if penalty is not None and not password:
            # Never right, and no check Nextcloud could count: no budget spent.
            return succeed(False)
        passwordKey = self._passwordKey(password)
        if penalty is not None:
            jid = f"{user}@{domain}"
            cache = self.cache
            try:
                return penalty.gate(
                    jid,
                    passwordKey,
                    lambda: self._shared(settings, user, domain, password, passwordKey),
                    None if cache is None else lambda: cache.vouches(jid, password),
                    peer=peer,
                    watch=getattr(settings.client, "watch", None),
                    shared=(user, domain, passwordKey) in self._inflight,
                    outage=cache is not None,
                )
            except Exception:
                # Never into a framing: the login is "unavailable", the
                # daemon goes on.
                log.failure("the brute-force protection failed for {jid}",
                            jid=printable(jid))
                return succeed(None)
        return self._shared(settings, user, domain, password, passwordKey)

    def _shared(
        self,
        settings: DomainSettings,
        user: str,
        domain: str,
        password: str,
        passwordKey: bytes,
    ) -> Deferred[bool | None]:
        key = (user, domain, passwordKey)
        shared = self._inflight.get(key)
        if shared is None:
            shared = _Shared(self._checkPassword(settings, user, domain, password))
            self._inflight[key] = shared
            shared.whenDone(_Forget(self._inflight, key))
        return shared.follow()

    def _checkPassword(
        self, settings: DomainSettings, user: str, domain: str, password: str
    ) -> Deferred[bool | None]:
        if self.cache is None:
            plain: Deferred[bool | None] = settings.client.auth(
                user, settings.authDomain or domain, password
            ).addCallback(_toOptionalBool)
            if self.penalty is not None:
                plain.addCallback(self._refused, settings, user, domain)
            return plain

        def askBackend() -> Deferred[Outcome]:
            return settings.client.auth(user, settings.authDomain or domain, password)

        watch = getattr(settings.client, "watch", None)
        d = self.cache.authenticate(
            f"{user}@{domain}", password, askBackend,
            None if watch is None else watch.throttled,
        )
        d.addCallback(self._refused, settings, user, domain)
        return d

    def _refused(
        self, result: bool | None, settings: DomainSettings, user: str, domain: str
    ) -> bool | None:
        """
        After a refused login: if the cache holds a password of the user, or
        the penalty box knows one as good, ask (in the background, at most
        once per user and L{EXISTENCE_CHECK_INTERVAL}) whether the user still
        exists, so that a deleted user's cached or known password stops
        working at once.  (Neither backend tells a wrong password from an
        unknown user in its login answer.)
        """
        if result is not False or (self.cache is None and self.penalty is None):
            return result
        jid = f"{user}@{domain}"
        now = self._clock.seconds()
        last = self._existenceChecked.get(jid)
        if last is not None and now - last < EXISTENCE_CHECK_INTERVAL:
            return result
        self._existenceChecked.pop(jid, None)
        self._existenceChecked[jid] = now
        while len(self._existenceChecked) > MAX_EXISTENCE_CHECKS:
            del self._existenceChecked[next(iter(self._existenceChecked))]
        cache = self.cache

        def check(held: bool) -> Deferred[None] | None:
            if not held:
                return None
            asked: Deferred[Outcome] = settings.client.isUser(
                user, settings.authDomain or domain
            )
            return asked.addCallback(self._existence, jid)

        penalty = self.penalty
        if penalty is not None and penalty.knowsUser(jid):
            holds: Deferred[bool] = succeed(True)
        elif cache is not None:
            holds = cache.holds(jid)
        else:
            return result
        background = holds.addCallback(check)
        background.addErrback(
            lambda f: log.failure("checking whether {jid} exists failed", f, jid=printable(jid))
        )
        return result

    def _existence(self, outcome: Outcome, jid: str) -> None:
        if outcome is Outcome.NO:
            self.forgetUser(jid)

    def forgetUser(self, jid: str) -> None:
        """
        Nextcloud says C{jid} does not exist: evict its cached passwords and
        whatever the penalty box knows as good for it.
        """
        if self.cache is not None:
            self.cache.forget(jid)
        if self.penalty is not None:
            self.penalty.forgetUser(jid)

    def _noteUnserved(self, domain: str) -> None:
        self.unserved += 1
        now = self._clock.seconds()
        last = self._unservedLoggedAt
        if last is None or now - last >= UNSERVED_LOG_INTERVAL:
            log.warn(
                "{count} request(s) for domains this daemon does not serve answered "
                "false; last: {domain} (serve a domain with domain= or a row of "
                "'xcauth domains add')",
                count=self.unserved - self._unservedLogged,
                domain=printable(domain),
            )
            self._unservedLoggedAt = now
            self._unservedLogged = self.unserved

    def isUser(self, user: str, domain: str) -> Deferred[bool | None]:
        """
        Whether C{user@domain} exists; C{None} when the backend is unavailable
        and the user was not seen to exist within the cache's verification TTL.
        """
        identity = canonicalOrNone(user, domain)
        if identity is None:
            return succeed(False)
        return self._whenReady(
            self._whenBackendReady, self._isUser, identity.user, identity.domain
        )

    def _isUser(self, user: str, domain: str) -> Deferred[bool | None]:
        settings = self._settingsFor(domain)
        if settings is None:
            self._noteUnserved(domain)
            return succeed(False)
        d = settings.client.isUser(user, settings.authDomain or domain).addCallback(
            _toOptionalBool
        )
        cache = self.cache
        jid = f"{user}@{domain}"
        if cache is None:
            if self.penalty is not None and hasattr(self.penalty, "forgetUser"):
                d.addCallback(self._forgetIfGone, jid)
            return d

        def fromState(answer: bool | None) -> bool | None | Deferred[bool | None]:
            if answer is False:
                self.forgetUser(jid)
                return answer
            if answer is not None:
                cache.seen(jid, answer)
                return answer

            def known(exists: bool) -> bool | None:
                if exists:
                    log.info(
                        "backend unavailable: {jid} known to exist from the cache",
                        jid=printable(jid),
                    )
                    return True
                return None

            return cache.knownUser(jid).addCallback(known)

        result: Deferred[bool | None] = d.addCallback(fromState)
        return result

    def _forgetIfGone(self, answer: bool | None, jid: str) -> bool | None:
        if answer is False:
            self.forgetUser(jid)
        return answer

    def roster(self, user: str, domain: str) -> Deferred[bytes | None]:
        """
        The backend's shared roster answer for C{user@domain} as one JSON line.
        """
        identity = canonicalOrNone(user, domain)
        if identity is None:
            return succeed(None)
        return self._whenReady(
            self._whenBackendReady, self._roster, identity.user, identity.domain
        )

    def _roster(self, user: str, domain: str) -> Deferred[bytes | None]:
        settings = self._settingsFor(domain)
        if settings is None:
            self._noteUnserved(domain)
            return succeed(None)
        d: Deferred[Any] = settings.client.sharedRoster(user, settings.authDomain or domain)
        d.addCallbacks(encodeRoster, _rosterUnavailable, errbackArgs=(user, domain))
        return d


def encodeRoster(roster: dict[str, RosterEntry]) -> bytes:
    """
    A shared roster as one line of JSON in the shape of the JSXC answer.
    """
    shared: dict[str, object] | list[object] = {
        name: {"name": entry.name, "groups": list(entry.groups)}
        for name, entry in roster.items()
    } or []
    answer = {"result": "success", "data": {"sharedRoster": shared}}
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _rosterUnavailable(f: Failure, user: str, domain: str) -> Failure | None:
    if not f.check(BackendUnavailable):
        return f
    log.warn(
        "shared roster of {user}@{domain} unavailable: {reason}",
        user=printable(user),
        domain=printable(domain),
        reason=str(f.value),
    )
    return None


class _Shared:
    """
    One piece of work several callers wait for.  Each caller gets its own
    L{Deferred} (L{follow}); cancelling it only detaches that caller.  The work
    itself is cancelled when the last caller has gone.
    """

    # One per backend login, alive as long as the login: no instance dict.
    __slots__ = ("_work", "_followers", "_done", "_result", "_onDone")

    def __init__(self, work: Deferred[Any]) -> None:
        self._work = work
        self._followers: list[Deferred[Any]] = []
        self._done = False
        self._result: Any = None
        self._onDone: list[Callable[[], Any]] = []
        work.addBoth(self._fire)

    def whenDone(self, f: Callable[[], Any]) -> None:
        """
        Call C{f} when the work is over.
        """
        if self._done:
            f()
        else:
            self._onDone.append(f)

    def _fire(self, result: Any) -> None:
        self._done = True
        self._result = result
        for f in self._onDone:
            f()
        followers, self._followers = self._followers, []
        for d in followers:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if isinstance(result, Failure) and not followers:
            if not result.check(CancelledError):
                log.failure("shared authentication work failed", result)

    def follow(self) -> Deferred[Any]:
        """
        A new L{Deferred} with the work's result.
        """
        if self._done:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)
        d: Deferred[Any] = Deferred(self._leave)
        self._followers.append(d)
        return d

    def _leave(self, d: Deferred[Any]) -> None:
        if d in self._followers:
            self._followers.remove(d)
            if not self._followers and not self._done:
                self._work.cancel()


class _Forget:
    """
    Remove C{key} from C{table} when called (a shared login is over): a small
    object instead of a closure, fewer objects per login for the garbage
    collector.
    """

    __slots__ = ("table", "key")

    def __init__(self, table: dict[Any, Any], key: Any) -> None:
        self.table = table
        self.key = key

    def __call__(self) -> None:
        self.table.pop(self.key, None)


def _toOptionalBool(outcome: Outcome) -> bool | None:
    if outcome is Outcome.UNAVAILABLE:
        return None
    return outcome is Outcome.YES
