"""
A stand-in for a stock Nextcloud (no JSXC app): the OCS provisioning API, the
capabilities, WebDAV's answer to a password login of a two-factor user, and
the brute-force throttle, following Nextcloud's source:

 - C{lib/private/User/Session.php} C{logClientIn}: every Basic-auth login from
   an address first waits the throttle's delay (or gets C{429} once the
   maximum is reached); a two-factor user's real password is refused without
   counting a failure; an app password works only with the login name it was
   made for; a login that looks like an e-mail address is tried as the
   address of exactly one user; a failure is counted for the address and,
   if there was no delay before, the delay is waited (or C{429}) once more.
 - C{lib/private/Security/Bruteforce/Throttler.php}: failures per address
   (IPv4 /32, IPv6 /56) in the last 12 hours; delay C{0.1 s * 2**n} capped at
   25 s; more than C{maxAttempts} (C{auth.bruteforce.max-attempts}, 10)
   failures in 30 minutes at the cap: C{429}.  Allow-listed addresses are
   never delayed.  A successful login forgets the failures registered from
   its address for its uid (C{resetDelay}, from the C{postLogin} hook of
   C{lib/OC.php}).
 - C{ocs/v1.php} and C{OC\\OCS\\ApiHelper}: a refused login is C{401} with the
   OCS status 997 in the requested format; C{429} for the maximum delay.
 - the provisioning API's answers to a service account: an administrator
   sees everyone, a group administrator the members of the groups it
   administers, anybody else only itself (C{404 User does not exist} for
   every other user, an empty user list).

Login names with a fault prefix misbehave like broken servers: C{fault-500},
C{fault-nonjson} (200 with an HTML page), C{fault-302}, C{fault-hang} (never
answers) and C{slow<N>-NAME} (NAME's answer after N milliseconds).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from typing import Any
from urllib.parse import unquote

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from xcauth.testing.web import whenGone

#: Nextcloud's defaults (Throttler.php, IThrottler).
MAX_DELAY = 25.0
FIRST_DELAY = 0.1
MAX_ATTEMPTS = 10
WINDOW = 12 * 3600.0
BLOCK_WINDOW = 30 * 60.0

_SLOW = re.compile(r"^slow(\d+)-")

#: Login names counted in L{FakeStockNextcloud.loginCounts} at most.
MAX_COUNTED = 10000


@attr.s(auto_attribs=True)
class StockUser:
    """
    One Nextcloud user.

    @ivar appPasswords: app password -> the login name it was made with.
    """

    uid: str
    password: str
    displayName: str = ""
    email: str | None = None
    groups: list[str] = attr.Factory(list)
    enabled: bool = True
    twoFactor: bool = False
    admin: bool = False
    subadminOf: list[str] = attr.Factory(list)
    appPasswords: dict[str, str] = attr.Factory(dict)


#: The service account of the tests and the demo (an administrator) and its
#: app password; C{plain} is an ordinary user with an app password too.
SERVICE_USER = "xcauth"
SERVICE_PASSWORD = "Service-App-Passw0rd"
PLAIN_SERVICE_USER = "plain"
PLAIN_SERVICE_PASSWORD = "Plain-App-Passw0rd"
GROUPADMIN_USER = "groupadmin"
GROUPADMIN_PASSWORD = "GroupAdmin-App-Passw0rd"


def demoUsers() -> list[StockUser]:
    """
    The users of the demo and the tests.
    """
    return [
        StockUser("admin", "good_password", "Administrator", "admin@example.org",
                  ["admin", "Everyone"], admin=True),
        StockUser("alice", "pa:ss w", "Alice Liddell", "alice@example.org",
                  ["Everyone", "Wonderland"]),
        StockUser("bob", "bob's secret", "Bob Builder", "bob@example.org", ["Everyone"]),
        StockUser("jörg", "pässwörd", "Jörg", None, ["Everyone"]),
        StockUser("carol", "carol-real", "Carol 2FA", "carol@example.org", ["Everyone"],
                  twoFactor=True, appPasswords={"Carol-App-Passw0rd": "carol"}),
        StockUser("dave", "dave-pass", "Dave Disabled", "dave@example.org", ["Everyone"],
                  enabled=False),
        # A user id in the form of an e-mail address (login-format
        # {user}@{domain}): no groups, so no roster changes.
        StockUser("frank@example.org", "frank-pass", "Frank", "frank@example.org"),
        StockUser("erin", "erin-pass", "Erin", "erin@example.org", ["Wonderland"],
                  appPasswords={"Erin-Mail-App-Passw0rd": "erin@example.org"}),
        StockUser(SERVICE_USER, "service-real-password", "xcauth service", None, ["admin"],
                  admin=True, appPasswords={SERVICE_PASSWORD: SERVICE_USER}),
        StockUser(PLAIN_SERVICE_USER, "plain-real", "Plain", None, [],
                  appPasswords={PLAIN_SERVICE_PASSWORD: PLAIN_SERVICE_USER}),
        StockUser(GROUPADMIN_USER, "groupadmin-real", "Group admin", None, ["Wonderland"],
                  subadminOf=["Wonderland"],
                  appPasswords={GROUPADMIN_PASSWORD: GROUPADMIN_USER}),
    ]


def subnet(ip: str) -> str:
    """
    The throttle's key of an address: IPv4 itself, IPv6 its /56.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{ip}/56", strict=False))
    return str(address)


class Throttle:
    """
    Nextcloud's brute-force throttle for the action C{login}.
    """

    def __init__(self, clock: IReactorTime, maxAttempts: int = MAX_ATTEMPTS) -> None:
        self.clock = clock
        self.maxAttempts = maxAttempts
        #: subnet -> (time, login name) of each failure (the metadata
        #: C{{"user": login}} Session.php registers).
        self.attempts: dict[str, list[tuple[float, str | None]]] = {}
        #: Subnets that are never throttled (the bruteforcesettings app's list).
        self.allowListed: set[str] = set()

    def count(self, ip: str, window: float = WINDOW) -> int:
        """
        Failures from C{ip}'s subnet within C{window} seconds.
        """
        key = subnet(ip)
        if key in self.allowListed:
            return 0
        now = self.clock.seconds()
        return sum(1 for t, _ in self.attempts.get(key, []) if t > now - window)

    def delay(self, ip: str) -> float:
        """
        Seconds every login from C{ip} waits.
        """
        n = self.count(ip)
        if n == 0:
            return 0.0
        if n > self.maxAttempts:
            return MAX_DELAY
        return float(min(FIRST_DELAY * 2**n, MAX_DELAY))

    def blocked(self, ip: str) -> bool:
        """
        Whether C{sleepDelayOrThrowOnMax} throws (C{429}).
        """
        return self.delay(ip) == MAX_DELAY and self.count(ip, BLOCK_WINDOW) > self.maxAttempts

    def register(self, ip: str, login: str | None = None) -> None:
        """
        Count a failure (of the login name C{login}).
        """
        self.attempts.setdefault(subnet(ip), []).append((self.clock.seconds(), login))

    def reset(self, ip: str, uid: str) -> None:
        """
        C{resetDelay(ip, 'login', ['user' => uid])}, which C{lib/OC.php}
        calls after every successful login: the failures of the last 12 hours
        registered for that exact name from C{ip}'s subnet are forgotten
        (nothing is counted for an allow-listed address anyway).
        """
        key = subnet(ip)
        if key in self.allowListed or key not in self.attempts:
            return
        cutoff = self.clock.seconds() - WINDOW
        self.attempts[key] = [(t, who) for t, who in self.attempts[key]
                              if not (t > cutoff and who == uid)]


def _ocs(status: int, message: str, data: Any) -> bytes:
    ok = 100 <= status < 300
    meta = {"status": "ok" if ok else "failure", "statuscode": status,
            "message": "OK" if ok else message, "totalitems": "", "itemsperpage": ""}
    return json.dumps({"ocs": {"meta": meta, "data": data}}).encode("utf-8")


class _Answer(Exception):
    def __init__(self, code: int, body: bytes, headers: dict[bytes, bytes] | None = None,
                 delay: float = 0.0) -> None:
        self.code = code
        self.body = body
        self.headers = headers or {}
        self.delay = delay


def _ocsError(http: int, ocs: int, message: str, delay: float = 0.0) -> _Answer:
    headers = {b"content-type": b"application/json; charset=utf-8"}
    if http == 401:
        headers[b"www-authenticate"] = b'Basic realm="Authorisation Required"'
    return _Answer(http, _ocs(ocs, message, []), headers, delay)


class FakeStockNextcloud(Resource):
    """
    The stock Nextcloud's OCS and WebDAV endpoints (serve with L{makeStockSite}).

    @param clock: the throttle's clock and the delays'.
    @param users: the accounts (default L{demoUsers}).
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime, users: list[StockUser] | None = None,
                 maxAttempts: int = MAX_ATTEMPTS) -> None:
        super().__init__()
        self.clock = clock
        self.users = {u.uid: u for u in (users if users is not None else demoUsers())}
        self.throttle = Throttle(clock, maxAttempts)
        #: (method, path, login name or None) of every request, in order
        #: (not kept by the stand-alone server: it runs long in constant memory).
        self.requests: list[tuple[str, str, str | None]] = []
        self.recordRequests = True
        #: Basic-auth logins that reached the password check or the throttle.
        self.logins = 0
        #: Answers 429 given.
        self.tooMany = 0
        #: Requests per login name (also in the stand-alone server, which
        #: serves them at C{/fake/counts}, for the end-to-end tests; at most
        #: L{MAX_COUNTED} names).
        self.loginCounts: dict[str, int] = {}
        #: Logins refused (wrong password or no such user) per login name,
        #: served with the others (at most L{MAX_COUNTED} names).
        self.refusedCounts: dict[str, int] = {}

    # -- what the tests look at ------------------------------------------------

    def loginsOf(self, login: str) -> int:
        """
        Requests that tried to log in as C{login}.
        """
        return sum(1 for _, _, who in self.requests if who == login)

    def allowList(self, ip: str = "127.0.0.1") -> None:
        """
        Put C{ip} on the brute-force allow-list.
        """
        self.throttle.allowListed.add(subnet(ip))

    # -- twisted.web -----------------------------------------------------------

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace")
        # Nextcloud may live under a sub-path (https://example.org/nextcloud).
        for marker in ("/ocs/", "/remote.php/"):
            if marker in path:
                path = path[path.index(marker):]
                break
        ip = getattr(request.getClientAddress(), "host", "") or ""
        try:
            self._route(request, path, ip)
        except _Answer as answer:
            return self._send(request, answer)
        raise AssertionError("no answer")  # pragma: no cover

    def _send(self, request: Request, answer: _Answer) -> Any:
        gone = whenGone(request)
        if answer.code == -1:
            return NOT_DONE_YET

        def send() -> None:
            if request.finished or gone:
                return
            request.setResponseCode(answer.code)
            for k, v in answer.headers.items():
                request.setHeader(k, v)
            request.write(answer.body)
            request.finish()

        if answer.delay > 0:
            self.clock.callLater(answer.delay, send)
            return NOT_DONE_YET
        request.setResponseCode(answer.code)
        for k, v in answer.headers.items():
            request.setHeader(k, v)
        return answer.body

    def _credentials(self, request: Request) -> tuple[str, str] | None:
        header = request.getHeader(b"authorization") or b""
        if not header.lower().startswith(b"basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        login, sep, password = decoded.partition(":")
        if not sep or not login or not password:
            return None
        return login, password

    def _route(self, request: Request, path: str, ip: str) -> None:
        method = request.method.decode("ascii", "replace")
        credentials = self._credentials(request)
        if self.recordRequests:
            self.requests.append((method, path, credentials[0] if credentials else None))
        if credentials is not None:
            counts = self.loginCounts
            if credentials[0] in counts or len(counts) < MAX_COUNTED:
                counts[credentials[0]] = counts.get(credentials[0], 0) + 1
        if path == "/fake/counts":
            # Not Nextcloud's: what the tests read from the outside.
            raise _Answer(200, json.dumps({
                "logins": self.logins, "tooMany": self.tooMany,
                "failures30m": self.throttle.count(ip, BLOCK_WINDOW),
                "failures12h": self.throttle.count(ip),
                "loginsOf": self.loginCounts,
                "refusedOf": self.refusedCounts,
            }).encode(), {b"content-type": b"application/json"})
        if path.startswith("/remote.php/dav/"):
            self._dav(method, credentials, ip)
        prefix = "/ocs/v2.php/"
        if not path.startswith(prefix):
            raise _Answer(404, b"Not found\n")
        route = [unquote(p) for p in path[len(prefix):].strip("/").split("/")]
        if route == ["cloud", "capabilities"]:
            self._capabilities(ip)
        if credentials is None:
            raise _ocsError(401, 997, "Current user is not logged in")
        self._fault(credentials[0])
        user, delay = self._logClientIn(credentials[0], credentials[1], ip, "ocs")
        if request.getHeader(b"ocs-apirequest") != b"true":
            # No CSRF token and no OCS-APIRequest header: the login does not
            # count for the OCS controller.
            raise _ocsError(401, 997, "Current user is not logged in", delay)
        if method != "GET":
            raise _Answer(405, b"", delay=delay)
        self._provisioning(user, route, request, delay)

    def _fault(self, login: str) -> None:
        if login.startswith("fault-500"):
            raise _Answer(500, _ocs(996, "Internal Server Error\n", []),
                          {b"content-type": b"application/json; charset=utf-8"})
        if login.startswith("fault-nonjson"):
            raise _Answer(200, b"<html><body>Please log in</body></html>",
                          {b"content-type": b"text/html"})
        if login.startswith("fault-302"):
            raise _Answer(302, b"", {b"location": b"/login"})
        if login.startswith("fault-hang"):
            raise _Answer(-1, b"")

    def _logClientIn(self, login: str, password: str, ip: str,
                     via: str) -> tuple[StockUser, float]:
        self.logins += 1
        slow = _SLOW.match(login)
        extra = 0.0
        asked = login
        if slow:
            extra = int(slow.group(1)) / 1000.0
            login = login[slow.end():]
        throttle = self.throttle
        if throttle.blocked(ip):
            self.tooMany += 1
            raise _ocsError(429, 429, "Reached maximum delay")
        delay = throttle.delay(ip) + extra
        token = self._appPassword(password)
        if token is None:
            target = self._byLogin(login)
            if target is not None and target.twoFactor:
                # PasswordLoginForbiddenException: no failure counted.
                raise self._forbidden(via, delay)
        user = self._login(login, password, token)
        if user is None:
            throttle.register(ip, login)
            refused = self.refusedCounts
            if login in refused or len(refused) < MAX_COUNTED:
                refused[login] = refused.get(login, 0) + 1
            if delay == 0:
                if throttle.blocked(ip):
                    self.tooMany += 1
                    raise _ocsError(429, 429, "Reached maximum delay")
                delay = throttle.delay(ip)
            raise self._unauthorised(via, delay)
        if not user.enabled:
            # LoginException("User disabled"), no failure counted.
            raise self._unauthorised(via, delay)
        # The postLogin hook of lib/OC.php.
        throttle.reset(ip, user.uid)
        if slow:
            # A slow user is an account of its own (with NAME's password).
            user = attr.evolve(user, uid=asked)
        return user, delay

    def _forbidden(self, via: str, delay: float) -> _Answer:
        if via == "dav":
            return _Answer(401, _davError("Sabre\\DAV\\Exception\\NotAuthenticated",
                                          "Password login forbidden"),
                           {b"content-type": b"application/xml; charset=utf-8"}, delay)
        return _ocsError(401, 997, "Current user is not logged in", delay)

    def _unauthorised(self, via: str, delay: float) -> _Answer:
        if via == "dav":
            return _Answer(401, _davError("Sabre\\DAV\\Exception\\NotAuthenticated",
                                          "Username or password was incorrect"),
                           {b"content-type": b"application/xml; charset=utf-8",
                            b"www-authenticate": b'Basic realm="Nextcloud"'}, delay)
        return _ocsError(401, 997, "Unauthorised", delay)

    def _appPassword(self, password: str) -> tuple[StockUser, str] | None:
        for user in self.users.values():
            if password in user.appPasswords:
                return user, user.appPasswords[password]
        return None

    def _user(self, uid: str) -> StockUser | None:
        """
        The user C{uid}, compared as Nextcloud's user backend does: by
        C{mb_strtolower()} (its C{uid_lower} column).
        """
        user = self.users.get(uid)
        if user is not None:
            return user
        wanted = uid.lower()
        for candidate in self.users.values():
            if candidate.uid.lower() == wanted:
                return candidate
        return None

    def _byLogin(self, login: str) -> StockUser | None:
        user = self._user(login)
        if user is not None:
            return user
        matches = [u for u in self.users.values()
                   if u.email and u.email.lower() == login.lower()]
        return matches[0] if len(matches) == 1 else None

    def _login(self, login: str, password: str,
               token: tuple[StockUser, str] | None) -> StockUser | None:
        if token is not None:
            owner, loginName = token
            return owner if loginName.lower() == login.lower() else None
        user = self._user(login)
        if user is not None and user.password == password:
            return user
        if "@" not in login:
            return None
        matches = [u for u in self.users.values()
                   if u.email and u.email.lower() == login.lower()]
        if len(matches) == 1 and matches[0].password == password:
            return matches[0]
        return None

    def _dav(self, method: str, credentials: tuple[str, str] | None, ip: str) -> None:
        if credentials is None:
            raise _Answer(401, _davError("Sabre\\DAV\\Exception\\NotAuthenticated",
                                         "No public access to this resource."),
                          {b"www-authenticate": b'Basic realm="Nextcloud"'})
        self._logClientIn(credentials[0], credentials[1], ip, "dav")
        raise _Answer(207, b'<?xml version="1.0"?><d:multistatus xmlns:d="DAV:"/>',
                      {b"content-type": b"application/xml; charset=utf-8"})

    def _capabilities(self, ip: str) -> None:
        data = {
            "version": {"major": 30, "minor": 0, "micro": 0, "string": "30.0.0"},
            "capabilities": {
                "bruteforce": {
                    "delay": int(self.throttle.delay(ip) * 1000),
                    "allow-listed": subnet(ip) in self.throttle.allowListed,
                },
            },
        }
        raise _Answer(200, _ocs(200, "OK", data),
                      {b"content-type": b"application/json; charset=utf-8"})

    # -- the provisioning API --------------------------------------------------

    def _sees(self, viewer: StockUser, target: StockUser) -> bool:
        if viewer.admin or viewer.uid == target.uid:
            return True
        return bool(set(viewer.subadminOf) & set(target.groups))

    def _userData(self, user: StockUser) -> dict[str, Any]:
        return {"id": user.uid, "enabled": user.enabled, "displayname": user.displayName,
                "email": user.email, "groups": list(user.groups)}

    def _ok(self, data: Any, delay: float) -> _Answer:
        return _Answer(200, _ocs(200, "OK", data),
                       {b"content-type": b"application/json; charset=utf-8"}, delay)

    def _provisioning(self, me: StockUser, route: list[str], request: Request,
                      delay: float) -> None:
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if route == ["cloud", "user"]:
            data = self._userData(me)
            data["display-name"] = data.pop("displayname")
            raise self._ok(data, delay)
        if route[:2] == ["cloud", "users"] and len(route) in (2, 3) and (
            len(route) == 2 or route[2] == "details"
        ):
            search = args.get("search", "").lower()
            if me.admin:
                visible = list(self.users.values())
            else:
                visible = [u for u in self.users.values()
                           if set(me.subadminOf) & set(u.groups)]
            found = [u for u in visible if not search or search in u.uid.lower()
                     or search in u.displayName.lower()
                     or search in (u.email or "").lower()]
            if len(route) == 2:
                raise self._ok({"users": [u.uid for u in found]}, delay)
            raise self._ok({"users": {u.uid: self._userData(u) for u in found}}, delay)
        if route[:2] == ["cloud", "users"] and len(route) in (3, 4):
            target = self._user(route[2])
            if target is None or not self._sees(me, target):
                raise _ocsError(404, 404, "User does not exist", delay)
            if len(route) == 3:
                raise self._ok(self._userData(target), delay)
            if route[3] == "groups":
                raise self._ok({"groups": list(target.groups)}, delay)
        if route[:2] == ["cloud", "groups"] and len(route) == 5 and route[3:] == [
            "users", "details"
        ]:
            gid = route[2]
            if not any(gid in u.groups for u in self.users.values()):
                raise _ocsError(404, 404, "The requested group could not be found", delay)
            if not me.admin and gid not in me.subadminOf:
                raise _ocsError(403, 403, "", delay)
            members = {u.uid: self._userData(u) for u in self.users.values()
                       if gid in u.groups}
            raise self._ok({"users": members}, delay)
        raise _ocsError(404, 998, "Invalid query", delay)


def _davError(exception: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<d:error xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns">\n'
        f"  <s:exception>{exception}</s:exception>\n"
        f"  <s:message>{message}</s:message>\n"
        "</d:error>\n"
    ).encode("utf-8")


def makeStockSite(resource: FakeStockNextcloud) -> Site:
    """
    A quiet L{Site} with C{resource} answering every path.
    """
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    return site

