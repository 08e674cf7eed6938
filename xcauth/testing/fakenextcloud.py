"""
A small, faithful stand-in for Nextcloud's JSXC external API (ojsxc), with
fault injection.

It checks C{X-JSXC-SIGNATURE} and answers C{auth}, C{isuser} and C{sharedroster}
exactly like the real app: C{200} with C{success}/C{noauth}, and C{500} with
C{{"result":"error","data":{"msg":...}}} for every application error (bad
signature, unsupported operation, unknown user for the shared roster).

Users whose name starts with a fault prefix misbehave the way broken servers and
proxies do (the rest of the name is free, so several such users can exist):

=================  ==========================================================
C{fault-500json}   500 with the app's JSON error
C{fault-500html}   500 with an HTML error page (a proxy in front of Nextcloud)
C{fault-nonjson}   200 with an HTML page (a login page, a captive portal)
C{fault-302}       302 redirect to a login page
C{fault-hang}      never answers
C{fault-hangbody}  sends the headers and part of the body, then hangs
C{slow<N>-}        answers correctly after N milliseconds (C{slow3000-bob})
=================  ==========================================================

The C{sharedroster} answers can be changed while the fake runs: with a roster
file (C{--roster-file}, L{FakeJSXC.rosterFile}), a JSON object mapping user
names to the C{sharedRoster} value to answer for them (read on every request,
so a test rewrites it to change what Nextcloud says); users it does not name get
the default answer (every other user, in the group C{Everyone}).

Run C{python -m xcauth.testing.fakenextcloud --help} for the stand-alone server
used by the demo, the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from xcauth.testing.web import whenGone

API_PATH = b"/index.php/apps/ojsxc/ajax/externalApi.php"

#: Users of the demo and of the tests: the password of C{admin} matches the
#: telnet session in the documentation.
DEMO_USERS = {
    "admin": "good_password",
    "alice": "pa:ss w",
    "bob": "bob's secret",
    "jörg": "pässwörd",
}

_SLOW = re.compile(r"^slow(\d+)-")

#: What C{fault-hangbody} sends of its 100-byte body before hanging.
HANGBODY_START = b'{"result":'


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


class FakeJSXC(Resource):
    """
    The JSXC external API endpoint.

    @param secret: the API secret requests must be signed with.
    @param users: user name to password; the domain is not checked, as in
        Nextcloud, whose user names are global.
    @param clock: for added latency.
    @param latency: seconds added to every answer.
    @param rosterFile: the roster file (see the module's description), or
        C{None}.
    """

    isLeaf = True
    #: Whether to keep every request in L{requests} (the stand-alone server
    #: does not, so that it runs for long under load in constant memory).
    recordRequests = True

    def __init__(
        self,
        secret: bytes,
        users: dict[str, str],
        clock: IReactorTime,
        latency: float = 0.0,
        rosterFile: str | None = None,
        usersFile: str | None = None,
    ) -> None:
        super().__init__()
        self.usersFile = usersFile
        self.rosterFile = rosterFile
        self.secret = secret
        self.users = users
        self.clock = clock
        self.latency = latency
        #: Every request's operation and fields (passwords included), in order.
        self.requests: list[dict[str, str]] = []

    def _storedId(self, name: str) -> str:
        """
        The user id as stored for C{name}, compared without case; C{name} if
        there is none.
        """
        if name in self.users:
            return name
        wanted = name.lower()
        for uid in self.users:
            if uid.lower() == wanted:
                return uid
        return name

    def _readUsers(self) -> None:
        """
        With a users file (C{--users-file}: a JSON object of user names and
        passwords) that exists, its users replace the others: a test rewrites
        it to add or delete users while the fake runs.
        """
        if self.usersFile is None:
            return
        try:
            with open(self.usersFile, encoding="utf-8") as f:
                users = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(users, dict):
            self.users = {str(k): str(v) for k, v in users.items()}

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        return b"POST only\n"

    def render_POST(self, request: Request) -> Any:
        gone = whenGone(request)
        assert request.content is not None  # set once the request's body arrived
        body = request.content.read()
        delay, code, headers, answer, fault = self.respond(
            body, request.getHeader(b"x-jsxc-signature")
        )
        if fault == "fault-hang":
            return NOT_DONE_YET
        if fault == "fault-hangbody":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"100")
            request.write(HANGBODY_START)
            return NOT_DONE_YET

        def send() -> None:
            if request.finished or gone:
                return
            request.setResponseCode(code)
            for k, v in headers.items():
                request.setHeader(k, v)
            request.write(answer)
            request.finish()

        if delay > 0:
            self.clock.callLater(delay, send)
            return NOT_DONE_YET
        request.setResponseCode(code)
        for k, v in headers.items():
            request.setHeader(k, v)
        return answer

    def respond(
        self, body: bytes, signature: bytes | None
    ) -> tuple[float, int, dict[bytes, bytes], bytes, str | None]:
        """
        L{answer} plus the delay before answering (the added latency and a
        C{slow<N>-} user's); the fault left is C{fault-hang}, C{fault-hangbody}
        or C{None}.
        """
        self._readUsers()
        code, headers, answer, fault = self.answer(body, signature)
        delay = self.latency
        slow = _SLOW.match(fault or "")
        if slow:
            delay += int(slow.group(1)) / 1000.0
            fault = None
        return delay, code, headers, answer, fault

    def answer(
        self, body: bytes, signature: bytes | None
    ) -> tuple[int, dict[bytes, bytes], bytes, str | None]:
        """
        The status, headers, body and fault name (or C{None}) for one request.
        """
        jsonHeaders = {b"content-type": b"application/json; charset=utf-8"}
        expected = b"sha1=" + hmac.new(self.secret, body, hashlib.sha1).hexdigest().encode()
        if signature is None or not hmac.compare_digest(signature, expected):
            return 500, jsonHeaders, _json(_error("Signature does not match.")), None
        try:
            fields = dict(
                parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                          encoding="utf-8", errors="strict")
            )
        except (ValueError, UnicodeDecodeError):
            return 500, jsonHeaders, _json(_error("Malformed request.")), None
        if self.recordRequests:
            self.requests.append(fields)
        user = fields.get("username", "")
        operation = fields.get("operation")
        fault = user if user.startswith(("fault-", "slow")) else None
        if fault and fault.startswith("fault-"):
            kind = next(
                (k for k in ("fault-500json", "fault-500html", "fault-nonjson",
                             "fault-302", "fault-hangbody", "fault-hang")
                 if fault.startswith(k)),
                None,
            )
            if kind == "fault-500json":
                return 500, jsonHeaders, _json(_error("Internal error")), None
            if kind == "fault-500html":
                return 500, {b"content-type": b"text/html"}, b"<html><body>Internal Server Error</body></html>", None
            if kind == "fault-nonjson":
                return 200, {b"content-type": b"text/html"}, b"<html><body>Please log in</body></html>", None
            if kind == "fault-302":
                return 302, {b"location": b"/login"}, b"", None
            if kind is not None:
                return 200, jsonHeaders, b"", kind
        # Nextcloud's user backend finds a user id whatever its case (by
        # mb_strtolower in its uid_lower column) and answers the stored id.
        user = self._storedId(_baseName(user))
        if operation == "auth":
            if "password" not in fields:
                return 500, jsonHeaders, _json(_error("No password given.")), fault
            if self.users.get(user) == fields["password"]:
                result = {"result": "success", "data": {"uid": user}}
            else:
                result = {"result": "noauth"}
            return 200, jsonHeaders, _json(result), fault
        if operation == "isuser":
            isUser = user in self.users
            return 200, jsonHeaders, _json({"result": "success", "data": {"isUser": isUser}}), fault
        if operation == "sharedroster":
            if user not in self.users:
                return 500, jsonHeaders, _json(_error("User not found.")), fault
            configured = self._configuredRoster(user)
            if configured is not None:
                answer = {"result": "success", "data": {"sharedRoster": configured}}
                return 200, jsonHeaders, _json(answer), fault
            roster = {
                name: {"name": name.title(), "groups": ["Everyone"]}
                for name in sorted(self.users)
                if name != user
            }
            return 200, jsonHeaders, _json({"result": "success", "data": {"sharedRoster": roster or []}}), fault
        return 500, jsonHeaders, _json(_error("Unsupported operation.")), None


    def _configuredRoster(self, user: str) -> Any:
        """
        The C{sharedRoster} of C{user} in the roster file, or C{None}.
        """
        if self.rosterFile is None:
            return None
        try:
            with open(self.rosterFile, encoding="utf-8") as f:
                rosters = json.load(f)
        except (OSError, ValueError):
            return None
        return rosters.get(user) if isinstance(rosters, dict) else None


def _baseName(user: str) -> str:
    """
    A slow user C{slow3000-bob} has the password of C{bob}.
    """
    m = _SLOW.match(user)
    return user[m.end():] if m else user


def _error(message: str) -> dict[str, Any]:
    return {"result": "error", "data": {"msg": message}}


def makeSite(resource: FakeJSXC) -> Site:
    """
    A quiet L{Site} serving C{resource} at the JSXC API path (and at C{/}).
    """
    root = Resource()
    root.putChild(b"", resource)
    node = root
    parts = API_PATH.strip(b"/").split(b"/")
    for part in parts[:-1]:
        child = Resource()
        node.putChild(part, child)
        node = child
    node.putChild(parts[-1], resource)
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    return site


_REASONS = {200: b"OK", 302: b"Found", 404: b"Not Found", 405: b"Method Not Allowed",
            411: b"Length Required", 500: b"Internal Server Error"}


class FastJSXCProtocol(Protocol):
    """
    A minimal HTTP/1.1 server for the same API, for the benchmark: twisted.web
    costs more CPU per request than the daemon under test, so at thousands of
    requests per second it, not the daemon, would be measured.

    Every answer comes from L{FakeJSXC.respond}, the one description of the
    API's behaviour (faults and latency included).  It understands requests
    with a C{Content-Length} body (what xcauth sends), keeps the connection
    open unless asked not to, and answers one request at a time in order.
    """

    #: A request head longer than this is refused (and the connection closed).
    MAX_HEAD = 16384

    def __init__(self, resource: FakeJSXC) -> None:
        self.resource = resource
        self.buffer = b""
        self.busy = False
        self.gone = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        while not self.busy and not self.gone:
            buffer = self.buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self.MAX_HEAD:
                    self._reply(400, {}, b"", close=True)
                return
            lines = buffer[:end].split(b"\r\n")
            try:
                method, target, version = lines[0].split(b" ", 2)
            except ValueError:
                self._reply(400, {}, b"", close=True)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"transfer-encoding" in headers:
                self._reply(411, {}, b"", close=True)
                return
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                self._reply(400, {}, b"", close=True)
                return
            start = end + 4
            if len(buffer) < start + length:
                return
            body = buffer[start : start + length]
            self.buffer = buffer[start + length :]
            close = (
                version != b"HTTP/1.1"
                or headers.get(b"connection", b"").lower() == b"close"
            )
            self._handle(method, target, headers, body, close)

    def _handle(self, method: bytes, target: bytes, headers: dict[bytes, bytes],
                body: bytes, close: bool) -> None:
        path = target.split(b"?", 1)[0]
        if path not in (API_PATH, b"/"):
            self._reply(404, {}, b"Not found\n", close)
            return
        if method != b"POST":
            self._reply(405, {}, b"POST only\n", close)
            return
        delay, code, answerHeaders, answer, fault = self.resource.respond(
            body, headers.get(b"x-jsxc-signature")
        )
        if fault == "fault-hang":
            self.busy = True
            return
        if fault == "fault-hangbody":
            self.busy = True
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: 100\r\n\r\n" + HANGBODY_START
            )
            return
        if delay > 0:
            self.busy = True
            self.resource.clock.callLater(delay, self._reply, code, answerHeaders,
                                          answer, close)
        else:
            self._reply(code, answerHeaders, answer, close)

    def _reply(self, code: int, headers: dict[bytes, bytes], body: bytes,
               close: bool) -> None:
        if self.gone:
            return
        head = [b"HTTP/1.1 %d %s" % (code, _REASONS.get(code, b"Status")),
                b"content-length: %d" % (len(body),)]
        head.extend(k + b": " + v for k, v in headers.items())
        if close:
            head.append(b"connection: close")
        assert self.transport is not None  # not gone: still connected
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if close:
            self.gone = True
            self.transport.loseConnection()
            return
        if self.busy:
            self.busy = False
            self._next()

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True


if TYPE_CHECKING:
    _FastJSXCFactoryBase = ServerFactory[FastJSXCProtocol]
else:
    # ServerFactory is generic from Twisted 23.8 on; 22.10 is admitted too.
    _FastJSXCFactoryBase = ServerFactory


class FastJSXCFactory(_FastJSXCFactoryBase):
    """
    Serves L{FakeJSXC} with L{FastJSXCProtocol}.
    """

    noisy = False

    def __init__(self, resource: FakeJSXC) -> None:
        self.resource = resource

    def buildProtocol(self, addr: Any) -> FastJSXCProtocol:
        return FastJSXCProtocol(self.resource)


def benchUsers(n: int) -> dict[str, str]:
    """
    C{n} users C{userI} with the password C{passwordI}, for the benchmark's
    cache misses.
    """
    return {f"user{i}": f"password{i}" for i in range(n)}


class Options(usage.Options):
    """
    Options of the stand-alone fake Nextcloud.
    """

    optFlags = [
        ["fast", None, "Serve with a minimal HTTP/1.1 server (FastJSXCProtocol, for "
                       "the benchmark) instead of twisted.web."],
        ["stock", None, "Be a stock Nextcloud without the JSXC app (OCS API, "
                        "brute-force throttle: xcauth.testing.fakestock)."],
        ["allow-listed", None, "With --stock: put 127.0.0.1 on the brute-force "
                               "allow-list."],
    ]
    optParameters = [
        ["port", "p", "0", "TCP port on 127.0.0.1 (0: any free port)."],
        ["secret", "s", "demo-secret-change-me", "API secret."],
        ["latency", "l", "0", "Milliseconds added to every answer."],
        ["port-file", None, None, "Write the bound port number to this file."],
        ["bench-users", None, "0",
         "Also know N users userI with the password passwordI (0 <= I < N)."],
        ["processes", None, "1", "Processes accepting on the same port."],
        ["users-file", None, None,
         "JSON file of user names and passwords, read on every request: when it "
         "exists, its users replace the demo users."],
        ["roster-file", None, None,
         "JSON file of sharedRoster answers by user name, read on every request."],
        ["max-attempts", None, "10",
         "With --stock: auth.bruteforce.max-attempts (failures in 30 minutes "
         "before 429)."],
    ]


#: Listen backlog: a daemon opening hundreds of pooled connections at once must
#: not overflow it (the kernel would retry the handshakes a second later).
BACKLOG = 1024


def main(argv: list[str] | None = None) -> None:
    """
    Serve the fake API on loopback until killed.
    """
    import os
    import signal
    import socket

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise SystemExit(f"{options}\n{e}") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", int(options["port"])))
    except OSError as e:
        raise SystemExit(
            f"fake Nextcloud: cannot listen on 127.0.0.1:{options['port']}: {e.strerror}"
        ) from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    number = sock.getsockname()[1]
    # Extra processes share the listening socket; they are forked before the
    # reactor exists and end with the first process.
    children: list[int] = []
    for _ in range(int(options["processes"]) - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            _dieWithParent()
            break
        children.append(pid)

    from twisted.internet import reactor

    if options["stock"]:
        from xcauth.testing.fakestock import FakeStockNextcloud, makeStockSite

        stock = FakeStockNextcloud(reactor, maxAttempts=int(options["max-attempts"]))
        stock.recordRequests = False
        if options["allow-listed"]:
            stock.allowList("127.0.0.1")
        site: ServerFactory[Any] = makeStockSite(stock)
        IReactorSocket(reactor).adoptStreamPort(sock.fileno(), socket.AF_INET, site)
        sock.close()
        if options["port-file"]:
            with open(options["port-file"] + ".tmp", "w") as f:
                f.write(f"{number}\n")
            os.replace(options["port-file"] + ".tmp", options["port-file"])
        print(
            f"fake stock Nextcloud on http://127.0.0.1:{number}/ users: "
            f"{', '.join(sorted(stock.users))}",
            file=sys.stderr,
            flush=True,
        )
        reactor.run()
        return
    users = dict(DEMO_USERS)
    users.update(benchUsers(int(options["bench-users"])))
    resource = FakeJSXC(
        options["secret"].encode("utf-8"),
        users,
        reactor,
        latency=float(options["latency"]) / 1000.0,
        rosterFile=options["roster-file"],
        usersFile=options["users-file"],
    )
    resource.recordRequests = False
    # Site serves HTTPChannel, FastJSXCFactory FastJSXCProtocol: one type for both.
    factory: ServerFactory[Any] = (
        FastJSXCFactory(resource) if options["fast"] else makeSite(resource)
    )
    IReactorSocket(reactor).adoptStreamPort(sock.fileno(), socket.AF_INET, factory)
    sock.close()

    def stopChildren() -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    reactor.addSystemEventTrigger("before", "shutdown", stopChildren)
    if options["port-file"] and (children or int(options["processes"]) == 1):
        with open(options["port-file"] + ".tmp", "w") as f:
            f.write(f"{number}\n")
        os.replace(options["port-file"] + ".tmp", options["port-file"])
        print(
            f"fake Nextcloud JSXC API on http://127.0.0.1:{number}{API_PATH.decode()} "
            f"users: {', '.join(sorted(DEMO_USERS))}",
            file=sys.stderr,
            flush=True,
        )
    reactor.run()


def _dieWithParent() -> None:
    """
    Ask Linux to send this process SIGTERM when its parent ends.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main()

