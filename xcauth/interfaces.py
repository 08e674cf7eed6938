"""
The contracts between xcauth's parts, in a module that imports no other part.

 - L{IAuthenticator}: what every framing asks (the shared authenticator).
 - L{IBackendClient}: what the authenticator asks a Nextcloud backend (the JSXC
   app's signed API or a stock Nextcloud's OCS API), answered as an L{Outcome}.
 - L{IWorker}: runs blocking functions (bcrypt, SQLite) off the reactor thread.
 - L{ICacheStorage}: where the credential cache keeps its entries.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    L{xcauth.penalty}): per user, a budget of checks of passwords new to
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
