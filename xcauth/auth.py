"""
The authentication backend every framing shares.

L{Authenticator} answers "is this password right?" and "does this user exist?" for
a user and domain.  It checks time-limited tokens locally first, then asks the
Nextcloud backend configured for the domain.  Its contract is all the framings
know about::

    authenticate(user, domain, password) -> Deferred[bool]
    isUser(user, domain) -> Deferred[bool | None]     # None: backend unavailable
    roster(user, domain) -> Deferred[bytes | None]
"""

from __future__ import annotations

from typing import Callable

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xcauth.nextcloud import NextcloudClient, Outcome
from xcauth.token import verifyToken

log = Logger()


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
    client: NextcloudClient


class Authenticator:
    """
    Tokens first, then the backend.

    @param settingsFor: returns the L{DomainSettings} for an XMPP domain, without
        blocking (a warm in-memory lookup).
    @param clock: the clock tokens are checked against; read on every request.
    """

    def __init__(
        self, settingsFor: Callable[[str], DomainSettings], clock: IReactorTime
    ) -> None:
        self._settingsFor = settingsFor
        self._clock = clock

    def checkToken(self, user: str, domain: str, password: str) -> bool:
        """
        Whether C{password} is a valid, unexpired token for C{user@domain}.
        """
        settings = self._settingsFor(domain)
        return verifyToken(password, user, domain, settings.secrets, self._clock.seconds())

    def authenticate(self, user: str, domain: str, password: str) -> Deferred[bool]:
        """
        Whether C{password} (or a token) is right for C{user@domain}.  A backend
        that is unavailable gives C{False}.
        """
        settings = self._settingsFor(domain)
        if verifyToken(password, user, domain, settings.secrets, self._clock.seconds()):
            log.debug("token accepted for {user}@{domain}", user=user, domain=domain)
            return succeed(True)
        d = settings.client.auth(user, settings.authDomain or domain, password)
        d.addCallback(lambda outcome: outcome is Outcome.YES)
        return d

    def isUser(self, user: str, domain: str) -> Deferred[bool | None]:
        """
        Whether C{user@domain} exists; C{None} when the backend is unavailable.
        """
        settings = self._settingsFor(domain)
        d = settings.client.isUser(user, settings.authDomain or domain)
        d.addCallback(_toOptionalBool)
        return d

    def roster(self, user: str, domain: str) -> Deferred[bytes | None]:
        """
        The backend's shared roster answer for C{user@domain} as one JSON line.
        """
        settings = self._settingsFor(domain)
        return settings.client.sharedRoster(user, settings.authDomain or domain)


def _toOptionalBool(outcome: Outcome) -> bool | None:
    if outcome is Outcome.UNAVAILABLE:
        return None
    return outcome is Outcome.YES
