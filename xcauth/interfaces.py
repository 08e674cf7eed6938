"""
The contracts between xcauth's parts, in a module that imports no other part.

 - L{IAuthenticator}: what every framing asks (the shared authenticator).
 - L{IBackendClient}: what the authenticator asks a Nextcloud backend (the JSXC
   app's signed API or a stock Nextcloud's OCS API), answered as an L{Outcome};
   L{BackendUnavailable} and L{StartupRefused} are its failures.
 - L{BackendSpec} (its L{LOGIN_FORMATS}) and L{DomainSettings}: what a domain's backend is built from,
   and how the authenticator serves the domain.
 - L{IWorker}: runs blocking functions (bcrypt, SQLite) off the reactor thread.
 - L{ICacheStorage}: where the credential cache keeps its L{CacheEntry}s.
 - L{IAttemptBudget}: the brute-force budgets of checks of new passwords;
   L{Throttling}: what the penalty box asks about Nextcloud's throttle;
   L{ThrottleSource}: what a throttle watch reads it from (L{ThrottleState}).
 - L{ICommandRunner}: runs ejabberd's L{Command}s for the roster sync, failing
   with L{CommandFailed}.
 - L{NoMetrics}: what can be counted, counting nothing (the default of every
   collaborator that counts); L{xcauth.daemon.metrics.Metrics} counts it all.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attr
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class Outcome(enum.Enum):
    """
    What a backend said, as far as authentication cares.
    """

    YES = "yes"
    NO = "no"
    UNAVAILABLE = "unavailable"


class BackendUnavailable(Exception):
    """
    The backend gave no usable answer; C{str()} says why, without secrets.
    """


@attr.s(frozen=True, auto_attribs=True)
class RosterEntry:
    """
    One user of a shared roster: display name and the groups shared with the
    user whose roster it is.
    """

    name: str
    groups: tuple[str, ...]


class IAuthenticator(Interface):
    """
    The shared authenticator every framing uses.  Answers are C{True},
    C{False}, or C{None} when the backend is unavailable and nothing local
    (a token, the credential cache) decides.
    """

    def authenticate(
        user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        """
        Whether C{password} (or a time-limited token) is right for
        C{user@domain}.

        @param peer: the address of the client the user logs in from, where the
            framing knows it (Dovecot's C{rip=}), for per-client penalties.
        @return: L{Deferred} firing with C{True}, C{False} or C{None}.
        """

    def isUser(user: str, domain: str) -> Deferred[bool | None]:
        """
        Whether C{user@domain} exists.

        @return: L{Deferred} firing with C{True}, C{False} or C{None}.
        """

    def roster(user: str, domain: str) -> Deferred[bytes | None]:
        """
        The shared roster of C{user@domain} as one line of JSON in the JSXC
        answer's shape (C{{"result":"success","data":{"sharedRoster":...}}}).

        @return: L{Deferred} firing with the bytes, or C{None}.
        """


class IBackendClient(Interface):
    """
    One Nextcloud backend (one URL and its credentials).
    """

    url = Attribute("The backend's URL, for log lines (never with credentials).")

    def auth(user: str, domain: str, password: str) -> Deferred[Outcome]:
        """
        Check a password.

        @return: L{Deferred} firing with an L{Outcome}: C{NO} only when the
            backend said the password is wrong.
        """

    def isUser(user: str, domain: str) -> Deferred[Outcome]:
        """
        Whether the user exists.

        @return: L{Deferred} firing with an L{Outcome}.
        """

    def sharedRoster(user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        """
        The users who share a group with C{user}, by user name.

        @return: L{Deferred} firing with a C{dict[str, RosterEntry]}, or failing
            with L{BackendUnavailable}.
        """


class IWorker(Interface):
    """
    Runs blocking functions off the reactor thread.
    """

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Call C{f(*args)} in a worker thread.

        @return: L{Deferred} with its result.
        """


class ICacheStorage(Interface):
    """
    Where the credential cache keeps one entry per JID.
    """

    def get(jid: str) -> Deferred[Any]:
        """
        @return: L{Deferred} firing with the entry of C{jid}, or C{None}.
        """

    def put(jid: str, pwhash: bytes, now: float) -> Deferred[None]:
        """
        Store a verified hash, keeping the first-success time.

        @return: L{Deferred} firing with C{None} once written.
        """

    def touch(jid: str, now: float, verified: bool) -> Deferred[None]:
        """
        Record a successful query (and a backend verification if C{verified}).

        @return: L{Deferred} firing with C{None} once written.
        """

    def delete(jid: str) -> Deferred[None]:
        """
        Forget C{jid}.

        @return: L{Deferred} firing with C{None} once written.
        """


class IAttemptBudget(Interface):
    """
    The bookkeeping of the password checks that may reach a Nextcloud (see
    L{xcauth.core.penalty}): per user, a budget of checks of passwords new to
    xcauth that refills with time; per Nextcloud, the checks that failed (or
    are still being made) within a window, daemon-wide.

    Every method answers at once, without a L{Deferred}: it is called on
    the reactor thread in every login (a shared store keeps what it needs
    in memory and writes behind).  C{now} is the caller's clock, in seconds;
    C{user} and C{backend} are opaque keys (C{user@domain} as the
    authenticator was given it, the backend's URL).  No method raises for
    any argument value or any count.
    """

    def reserve(user: str, backend: str, now: float, backendLimit: int | None) -> str | None:
        """
        Count one check of a new password of C{user} toward C{backend}
        before it is made.

        @param backendLimit: checks that may fail toward C{backend} within
            the window, or C{None} for no daemon-wide limit.
        @return: C{None} when counted (exactly one L{settle} with the same
            C{user}, C{backend} and C{now} follows), C{"user"} when the
            user's budget is spent, C{"backend"} when the daemon-wide one
            is (then nothing was counted).
        """

    def settle(
        user: str, backend: str, reservedAt: float, now: float, accepted: bool | None
    ) -> None:
        """
        A check counted by L{reserve} at C{reservedAt} is over: an accepted
        password (C{True}) gives the check back to both budgets; no answer
        (C{None}: Nextcloud unavailable, an error, a cancelled login) gives it
        back to the user's budget only (the caller learnt nothing about the
        password, but Nextcloud may have counted a failure); a refusal
        (C{False}) leaves it counted in both.
        """

    def failed(backend: str, now: float) -> None:
        """
        A check made without L{reserve} (a password known to be right) was
        refused: it counts toward C{backend}'s failures.
        """

    def limited(user: str, backend: str, now: float, backendLimit: int | None) -> bool:
        """
        Whether C{user} has checks outstanding in its budget (failures not
        refilled yet) or the daemon-wide budget of C{backend} is spent.
        """

    def backendFailures(backend: str, now: float) -> int:
        """
        The checks counted toward C{backend} within the window now.
        """


def resultLabel(result: object) -> str:
    """
    The C{result} label of a request's result: C{true} (C{True} or a roster),
    C{false}, C{unavailable} (C{None}: the backend was unavailable; or
    C{"cancelled"}, the reason L{xcauth.framing.base.RequestTimer} gives for a
    request answered without a decision: deadline missed, client gone), and
    C{error} for anything else (the work failed).
    """
    if result is True or isinstance(result, bytes):
        return "true"
    if result is False:
        return "false"
    if result is None or result == "cancelled":
        return "unavailable"
    return "error"


class NoMetrics:
    """
    Counts nothing: the default of every collaborator that can count (unit
    tests, the C{xcauth} command).  L{Metrics} overrides every method.
    """

    def now(self) -> float:
        """
        The time to measure a duration from (C{0.0}: nothing is measured).
        """
        return 0.0

    def started(self) -> None:
        """
        A request is being worked on (until L{finished}).
        """

    def finished(self) -> None:
        """
        A request L{started} has its result.
        """

    def request(self, framing: str, operation: str, result: str, seconds: float) -> None:
        """
        One request's outcome (C{result}: C{true}, C{false}, C{unavailable},
        C{error}) after C{seconds}.
        """

    def invalid(self, framing: str) -> None:
        """
        An invalid request (answered C{false} without any work).
        """

    def backend(self, outcome: Outcome, backend: str, started: float) -> Outcome:
        """
        Count C{backend}'s answer (C{yes}, C{no}, C{unavailable}) to a request
        sent at C{started} (a L{now}), and return it (a callback).
        """
        return outcome

    def cache(self, result: str) -> None:
        """
        A credential cache decision: C{hit}, C{miss}, C{stale}, C{fallback}.
        """

    def deadlineMissed(self, framing: str) -> None:
        """
        A request got no answer within the deadline.
        """

    def penalized(self, reason: str) -> None:
        """
        A login refused or delayed by the penalty box (C{reason}: C{refused},
        C{delayed}).
        """

    def bruteForce(self, event: str) -> None:
        """
        A decision of the brute-force budgets (C{event}: C{user-budget}, a
        new password refused because the user's checks are spent;
        C{backend-budget}, because the daemon-wide budget is spent;
        C{known-let-through}, a known password accepted during a limit).
        """

    def serving(self, framing: str, connections: Callable[[], int]) -> None:
        """
        A listener of C{framing} serves; C{connections} (called in the
        reactor thread) says how many connections it has open.
        """

    def throttle(self, nextcloud: str, delay: float, allowListed: bool | None) -> None:
        """
        What the Nextcloud at C{nextcloud} last said about its brute-force
        throttle for xcauth's address: the C{delay} of every login, and
        whether the address is allow-listed (C{None}: it does not say).
        """

    def storeInUse(self, calls: int) -> None:
        """
        Calls to the state database given to its pool and not answered yet.
        """

    def storeQuery(self, outcome: str, seconds: float) -> None:
        """
        One call to the state database (C{outcome}: C{ok}, C{error},
        C{timeout}) and its duration.
        """

    def storeDown(self, down: bool) -> None:
        """
        The state database became unavailable (C{True}) or available again.
        """

    def storeReconnect(self) -> None:
        """
        The state database was reached again after being unavailable.
        """

    def storeFallback(self, what: str) -> None:
        """
        Something done without the state database (C{what}: C{cache-read},
        C{cache-write}): from or into this node's memory.
        """

@attr.s(frozen=True, auto_attribs=True)
class ThrottleState:
    """
    What Nextcloud's capabilities say about its brute-force throttle for
    xcauth's address.

    @ivar delay: the delay of every login, in seconds.
    @ivar allowListed: whether the address is on the allow-list, or C{None}
        when this Nextcloud does not say.
    """

    delay: float
    allowListed: bool | None


class ThrottleSource(Protocol):
    """
    Where a throttle watch reads a stock Nextcloud's throttle state (an
    L{xcauth.backends.ocs.OCSClient}).
    """

    url: str

    def throttleState(self) -> Deferred[ThrottleState]: ...


class Throttling(Protocol):
    """
    What the penalty box asks about a stock Nextcloud's throttle (a
    L{xcauth.backends.throttle.ThrottleWatch}).
    """

    def throttled(self) -> bool: ...

    def allowListed(self) -> bool: ...

    def key(self) -> str: ...


class StartupRefused(Exception):
    """
    The backend cannot work as configured; C{str()} says what to fix.
    """


#: The login name formats of a stock Nextcloud backend (C{login-format}).
LOGIN_FORMATS = ("{user}", "{user}@{domain}")


@attr.s(frozen=True, auto_attribs=True)
class BackendSpec:
    """
    What a backend client is built from.

    @ivar backend: C{jsxc} or C{nextcloud}.
    @ivar url: the JSXC API URL, or Nextcloud's base URL.
    @ivar secret: the JSXC signing secret (C{b""} for the nextcloud backend).
    @ivar serviceUser: the nextcloud backend's service account.
    @ivar servicePassword: its app password.
    @ivar loginFormat: the nextcloud backend's login name format.
    """

    backend: str
    url: str
    secret: bytes = attr.ib(default=b"", repr=False)
    serviceUser: str | None = None
    servicePassword: str | None = attr.ib(default=None, repr=False)
    loginFormat: str = "{user}"


@attr.s(frozen=True, auto_attribs=True)
class DomainSettings:
    """
    How to authenticate users of one XMPP domain.

    @ivar secrets: the API secrets; the first signs requests, any of them may have
        made a token (key rotation).
    @ivar authDomain: the domain name the backend knows the users under.
    @ivar client: the backend client for the domain's URL and first secret.
    """

    secrets: tuple[bytes, ...]
    authDomain: str | None
    client: IBackendClient


@attr.s(frozen=True, auto_attribs=True)
class CacheEntry:
    """
    What the cache knows about one JID.
    """

    pwhash: bytes | None
    firstAuth: float
    remoteAuth: float
    anyAuth: float


@attr.s(frozen=True, auto_attribs=True)
class Command:
    """
    One ejabberd command: its name and its arguments by name, in the order
    C{ejabberdctl} takes them (ejabberd 23.01 signatures).
    """

    name: str
    args: tuple[tuple[str, str], ...]

    def argv(self) -> list[str]:
        """
        The command as C{ejabberdctl} arguments.
        """
        return [self.name] + [value for _, value in self.args]

    def __str__(self) -> str:
        return " ".join(
            json.dumps(a, ensure_ascii=False) if (" " in a or not a) else a
            for a in self.argv()
        )


class CommandFailed(Exception):
    """
    An ejabberd command failed.  C{str()} names the command, its status and
    ejabberd's first line of explanation; it holds no secret (the commands
    carry none).

    @ivar command: the command's name.
    @ivar status: the exit status, C{HTTP <code>}, C{timeout} or the reason the
        command could not be run.
    """

    def __init__(self, command: str, status: str, message: str = "") -> None:
        super().__init__(command, status, message)
        self.command = command
        self.status = status
        self.message = message

    def __str__(self) -> str:
        text = f"{self.command} failed with {self.status}"
        return f"{text}: {self.message}" if self.message else text


class ICommandRunner(Interface):
    """
    Runs ejabberd commands.
    """

    def run(command: Command) -> Any:
        """
        Run C{command}.

        @return: L{Deferred} firing with the command's result as a list of
            strings (one per line or list element; empty for a command that
            only succeeds), or failing with L{CommandFailed}.
        """

    def close() -> Any:
        """
        Release what the runner holds (connections).

        @return: L{Deferred} firing when done.
        """
