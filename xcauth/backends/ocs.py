"""
Client for a stock Nextcloud (no app needed): its OCS API.

 - password check: C{GET {base}/ocs/v2.php/cloud/user} with the user's login
   and password (or app password) as HTTP Basic credentials: C{200} with the
   user's data is "yes", C{401} (OCS status 997) is "no";
 - user exists: C{GET {base}/ocs/v2.php/cloud/users/{uid}} with the service
   account (an administrator or group administrator, with an app password):
   C{200} or C{404};
 - shared roster: the user's groups, then each group's members with their
   display names, with the service account.

Every request carries C{OCS-APIRequest: true} (without it Nextcloud fails the
CSRF check and answers as if nobody had logged in).  Only a C{401} is "wrong
password"; C{429} (Nextcloud's brute-force maximum), 5xx, non-JSON answers,
redirects and timeouts mean "unavailable", so the credential cache's outage
fallback applies.  A two-factor user's real password is refused by Nextcloud
like a wrong one, but with the OCS message C{Current user is not logged in}
instead of C{Unauthorised}: after such a refusal the client asks WebDAV once
(per user and hour), whose refusal says C{password login forbidden} in that
case, and logs that the user needs an app password.

A "yes" counts only for the account asked for: Nextcloud also logs a login
name in by the e-mail address an account has set (which its owner chooses),
so the user id it answers (C{data.id}) must be the login name itself, compared
as Nextcloud compares user ids (lower-cased, see L{xcauth.identity}); any
other account is a "no", logged with both names.  The same holds for the
account C{isuser} finds.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hyperlink import URL
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from xcauth.backends.http import Answer, HTTPRequester, parseJSON, unavailableOutcome
from xcauth.interfaces import (
    LOGIN_FORMATS,
    BackendUnavailable,
    IBackendClient,
    NoMetrics,
    Outcome,
    RosterEntry,
    StartupRefused,
    ThrottleState,
)
from xcauth.text import printable, validateURL

log = Logger()

#: The largest OCS answer read: a big group's member details, and for every
#: other request a user's details or the capabilities.
MAX_BODY = 8 * 1024 * 1024
MAX_ANSWER = 256 * 1024

#: Seconds between two "needs an app password" lines (and WebDAV checks) for
#: one user.
APP_PASSWORD_HINT_INTERVAL = 3600.0

#: Users remembered for the hint above at most (the oldest are forgotten).
MAX_HINTS = 10000

USER_AGENT = [b"xcauth"]


def basicAuth(login: str, password: str) -> bytes:
    """
    The C{Authorization} header value for HTTP Basic credentials (UTF-8).
    """
    raw = f"{login}:{password}".encode()
    return b"Basic " + base64.b64encode(raw)


def _ocsData(answer: Answer) -> Any:
    parsed = parseJSON(answer.body)
    ocs = parsed.get("ocs") if isinstance(parsed, dict) else None
    if not isinstance(ocs, dict):
        raise BackendUnavailable(f"HTTP {answer.code} with a body that is not an OCS answer")
    return ocs.get("data")


def _ocsMessage(answer: Answer) -> str:
    parsed = parseJSON(answer.body)
    ocs = parsed.get("ocs") if isinstance(parsed, dict) else None
    meta = ocs.get("meta") if isinstance(ocs, dict) else None
    message = meta.get("message") if isinstance(meta, dict) else None
    return str(message)[:200] if message else ""


def _unexpected(answer: Answer) -> BackendUnavailable:
    code = answer.code
    if 300 <= code < 400:
        return BackendUnavailable(f"HTTP {code} redirect (not followed): check the url setting")
    if code == 429:
        return BackendUnavailable(
            "HTTP 429: Nextcloud's brute-force protection blocks xcauth's address"
        )
    message = _ocsMessage(answer)
    return BackendUnavailable(f"HTTP {code} {message}".rstrip())


@implementer(IBackendClient)
class OCSClient:
    """
    A stock Nextcloud's OCS API.

    @param http: sends the requests.
    @param url: Nextcloud's base URL (C{https://cloud.example.org} or with a
        sub-path, C{https://example.org/nextcloud}).
    @param serviceUser: the service account's login name.
    @param servicePassword: its app password.
    @param loginFormat: how the login name is made from the XMPP user and the
        domain sent to the backend: C{{user}} or C{{user}@{domain}}.
    @param clock: for the once-per-hour hint and measured delays.
    @param onLogin: called with C{(seconds, status)} after every password
        check (for the throttle watch); may be set later as C{onLogin}.
    @param metrics: counts the answers to C{auth} and C{isuser} by outcome.
    """

    def __init__(
        self,
        http: HTTPRequester,
        url: str,
        serviceUser: str,
        servicePassword: str,
        loginFormat: str = "{user}",
        clock: IReactorTime | None = None,
        onLogin: Callable[[float, int], None] | None = None,
        metrics: NoMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else NoMetrics()  # metrics
        self._http = http
        self.url = validateURL(url)
        base = URL.from_text(url.rstrip("/")).to_uri().to_text()
        self._base = base.encode("ascii")
        self._serviceUser = serviceUser
        self._serviceAuth = basicAuth(serviceUser, servicePassword)
        if loginFormat not in LOGIN_FORMATS:
            raise ValueError(
                f"login-format {loginFormat!r} is not valid: use " + " or ".join(LOGIN_FORMATS)
            )
        self.loginFormat = loginFormat
        self._clock = clock
        self.onLogin = onLogin
        #: The throttle watch of this Nextcloud (L{xcauth.backends.throttle}),
        #: which the brute-force protection asks; set by the hub.
        self.watch: Any = None
        self._hinted: dict[str, float] = {}

    # -- requests --------------------------------------------------------------

    def _url(self, path: str, query: str = "format=json") -> bytes:
        return self._base + path.encode("ascii") + (b"?" + query.encode("ascii") if query else b"")

    def _get(self, path: str, authorization: bytes | None, method: bytes = b"GET",
             extra: dict[bytes, list[bytes]] | None = None,
             query: str = "format=json", maxBody: int = MAX_ANSWER) -> Deferred[Answer]:
        raw: dict[bytes, list[bytes]] = {
            b"user-agent": USER_AGENT,
            b"ocs-apirequest": [b"true"],
            b"accept": [b"application/json"],
        }
        if authorization is not None:
            raw[b"authorization"] = [authorization]
        if extra:
            raw.update(extra)
        return self._http.request(method, self._url(path, query), Headers(raw), None, maxBody)

    def login(self, user: str, domain: str) -> str:
        """
        The Nextcloud login name of C{user} (of the backend's C{domain}).
        """
        return self.loginFormat.format(user=user, domain=domain)

    # -- IBackendClient --------------------------------------------------------

    def auth(self, user: str, domain: str, password: str) -> Deferred[Outcome]:
        """
        Check a password (or app password) with Nextcloud's Basic-auth login.
        """
        if not password:
            # Nextcloud ignores Basic credentials without a password.
            return succeed(Outcome.NO)
        login = self.login(user, domain)
        started = self._clock.seconds() if self._clock is not None else 0.0
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/user", basicAuth(login, password))
        d.addCallback(self._authAnswer, login, password, started)
        d.addErrback(unavailableOutcome, "auth", user, domain)
        d.addCallback(self._metrics.backend, "nextcloud", self._metrics.now())  # metrics
        return d

    def _authAnswer(self, answer: Answer, login: str, password: str,
                    started: float) -> Outcome | Deferred[Outcome]:
        if self._clock is not None and self.onLogin is not None:
            self.onLogin(self._clock.seconds() - started, answer.code)
        if answer.code == 200:
            data = _ocsData(answer)
            if not isinstance(data, dict) or not isinstance(data.get("id"), str):
                raise BackendUnavailable("HTTP 200 without the user's id")
            return self._sameAccount(login, data["id"], "auth")
        if answer.code == 401:
            # Nextcloud answers a wrong password (or a disabled user) with the
            # message "Unauthorised" (a LoginException in ocs/v1.php); a login
            # it did not even try (a two-factor user's real password, a
            # password where app passwords are enforced) is "Current user is
            # not logged in".  Only the latter is worth WebDAV's explanation
            # (whose failed login would count against the throttle too).
            if _ocsMessage(answer) != "Unauthorised":
                self._maybeHint(login, password)
            return Outcome.NO
        raise _unexpected(answer)

    def _sameAccount(self, login: str, uid: str, operation: str) -> Outcome:
        """
        C{YES} if C{uid} (what Nextcloud answered) is the account of C{login}
        (the login name asked for), else C{NO}, logged with both names.
        """
        if uid.lower() == login.lower():
            return Outcome.YES
        log.warn(
            "Nextcloud answered {operation} for login {login} with the account "
            "{uid} (an e-mail address or another name of that account): not the "
            "account asked for, answered no",
            operation=operation,
            login=printable(login),
            uid=printable(uid),
        )
        return Outcome.NO

    def _maybeHint(self, login: str, password: str) -> None:
        """
        After a refusal, ask WebDAV (at most once per user and hour) whether
        the refusal was "needs an app password", and log it.
        """
        if self._clock is None:
            return
        now = self._clock.seconds()
        last = self._hinted.get(login)
        if last is not None and now - last < APP_PASSWORD_HINT_INTERVAL:
            return
        self._hinted.pop(login, None)
        self._hinted[login] = now
        while len(self._hinted) > MAX_HINTS:
            del self._hinted[next(iter(self._hinted))]
        path = "/remote.php/dav/files/" + quote(login, safe="") + "/"
        d: Deferred[Any] = self._get(path, basicAuth(login, password), method=b"PROPFIND",
                      extra={b"depth": [b"0"]}, query="")
        d.addCallback(self._hintAnswer, login)
        d.addErrback(lambda f: None)

    def _hintAnswer(self, answer: Answer, login: str) -> None:
        if answer.code == 401 and b"password login forbidden" in answer.body.lower():
            log.info(
                "Nextcloud refused the password of {login}: the account needs an app "
                "password (two-factor authentication or enforced app passwords); the "
                "user can create one under Settings > Security > Devices & sessions",
                login=printable(login),
            )

    def isUser(self, user: str, domain: str) -> Deferred[Outcome]:
        """
        Whether the user exists, asked with the service account.
        """
        login = self.login(user, domain)
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/users/" + quote(login, safe=""), self._serviceAuth)
        d.addCallback(self._isUserAnswer, login)
        d.addErrback(unavailableOutcome, "isuser", user, domain)
        d.addCallback(self._metrics.backend, "nextcloud", self._metrics.now())  # metrics
        return d

    def _isUserAnswer(self, answer: Answer, login: str) -> Outcome | Deferred[Outcome]:
        if answer.code == 200:
            data = _ocsData(answer)
            uid = data.get("id") if isinstance(data, dict) else None
            if isinstance(uid, str):
                return self._sameAccount(login, uid, "isuser")
            return Outcome.YES
        if answer.code == 404:
            _ocsData(answer)
            # An account that only has this address as its e-mail is not the
            # account of this login name (see the module docstring).
            return Outcome.NO
        raise _unexpected(answer)

    def sharedRoster(self, user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        """
        The users who share a group with C{user}, with their display names.
        """
        uid = self.login(user, domain)
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/users/" + quote(uid, safe="") + "/groups",
                      self._serviceAuth)
        d.addCallback(self._groupsAnswer, uid)
        return d

    def _groupsAnswer(self, answer: Answer, uid: str) -> Deferred[dict[str, RosterEntry]]:
        if answer.code != 200:
            raise _unexpected(answer)
        data = _ocsData(answer)
        groups = data.get("groups") if isinstance(data, dict) else None
        if not isinstance(groups, list):
            raise BackendUnavailable("unexpected groups answer")
        gids = [g for g in groups if isinstance(g, str)]
        requests = [
            self._get("/ocs/v2.php/cloud/groups/" + quote(gid, safe="") + "/users/details",
                      self._serviceAuth, maxBody=MAX_BODY).addCallback(self._membersAnswer)
            for gid in gids
        ]
        d = DeferredList(requests, consumeErrors=True)
        return d.addCallback(self._merge, gids, uid)

    def _membersAnswer(self, answer: Answer) -> dict[str, str]:
        if answer.code != 200:
            raise _unexpected(answer)
        users = _usersOf(answer, "group members")
        names = {}
        for uid, entry in users.items():
            display = entry.get("displayname") if isinstance(entry, dict) else None
            names[str(uid)] = display if isinstance(display, str) and display else str(uid)
        return names

    def _merge(self, results: list[tuple[bool, Any]], gids: list[str],
               uid: str) -> dict[str, RosterEntry]:
        names: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for gid, (ok, value) in zip(gids, results, strict=True):
            if not ok:
                failure: Failure = value
                failure.raiseException()
            for member, display in value.items():
                if member == uid:
                    continue
                names[member] = display
                groups.setdefault(member, []).append(gid)
        return {m: RosterEntry(name=names[m], groups=tuple(groups[m])) for m in sorted(names)}

    # -- start-up and the throttle ---------------------------------------------

    def checkPrivileges(self) -> Deferred[None]:
        """
        Check that the service account can log in and see other users.

        @return: L{Deferred} firing with C{None}, or failing with
            L{StartupRefused} (what to fix) or L{BackendUnavailable}.
        """
        me = quote(self._serviceUser, safe="")
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/users/" + me, self._serviceAuth)
        d.addCallback(self._ownEntry)
        return d

    def _ownEntry(self, answer: Answer) -> Deferred[None]:
        who = self._serviceUser
        if answer.code == 401:
            raise StartupRefused(
                f"Nextcloud at {self.url} refused the service account {who!r}: check "
                "service-user and service-password (an app password made by that "
                "login name)"
            )
        if answer.code != 200:
            raise _unexpected(answer)
        _ocsData(answer)
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/users", self._serviceAuth, query="format=json&limit=2")
        return d.addCallback(self._listAnswer)

    def _listAnswer(self, answer: Answer) -> None:
        if answer.code != 200:
            raise _unexpected(answer)
        data = _ocsData(answer)
        users = data.get("users") if isinstance(data, dict) else None
        if not users:
            raise StartupRefused(
                f"the service account {self._serviceUser!r} cannot see other users of "
                f"Nextcloud at {self.url} (every user would look nonexistent): make it "
                "an administrator, or the group administrator of the groups whose "
                "users log in to XMPP"
            )

    def throttleState(self) -> Deferred[ThrottleState]:
        """
        The brute-force delay and allow-listing of xcauth's address, from the
        (public) capabilities.
        """
        d: Deferred[Any] = self._get("/ocs/v2.php/cloud/capabilities", None)
        d.addCallback(self._capabilitiesAnswer)
        return d

    def _capabilitiesAnswer(self, answer: Answer) -> ThrottleState:
        if answer.code != 200:
            raise _unexpected(answer)
        data = _ocsData(answer)
        caps = data.get("capabilities") if isinstance(data, dict) else None
        brute = caps.get("bruteforce") if isinstance(caps, dict) else None
        if not isinstance(brute, dict):
            return ThrottleState(delay=0.0, allowListed=None)
        delay = brute.get("delay")
        listed = brute.get("allow-listed")
        return ThrottleState(
            delay=float(delay) / 1000.0 if isinstance(delay, (int, float)) else 0.0,
            allowListed=listed if isinstance(listed, bool) else None,
        )

    # -- failures ----------------------------------------------------------------


def noCheck() -> Deferred[None]:
    """
    A start-up check that has nothing to check (the JSXC backend).
    """
    return succeed(None)


def _usersOf(answer: Answer, what: str) -> dict[str, Any]:
    """
    The C{users} object of an OCS answer listing users (PHP encodes an empty
    one as C{[]}).
    """
    data = _ocsData(answer)
    users = data.get("users") if isinstance(data, dict) else None
    if isinstance(users, list) and not users:
        return {}
    if not isinstance(users, dict):
        raise BackendUnavailable(f"unexpected {what} answer")
    return users
