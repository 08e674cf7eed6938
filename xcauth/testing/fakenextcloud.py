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

Run C{python -m xcauth.testing.fakenextcloud --help} for the stand-alone server
used by the demo, the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

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
    """

    isLeaf = True

    def __init__(
        self,
        secret: bytes,
        users: dict[str, str],
        clock: IReactorTime,
        latency: float = 0.0,
    ) -> None:
        super().__init__()
        self.secret = secret
        self.users = users
        self.clock = clock
        self.latency = latency
        #: Every request's operation and fields (passwords included), in order.
        self.requests: list[dict[str, str]] = []

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        return b"POST only\n"

    def render_POST(self, request: Request) -> Any:
        body = request.content.read()
        code, headers, answer, fault = self.answer(
            body, request.getHeader(b"x-jsxc-signature")
        )
        delay = self.latency
        slow = _SLOW.match(fault or "")
        if slow:
            delay += int(slow.group(1)) / 1000.0
            fault = None
        if fault == "fault-hang":
            return NOT_DONE_YET
        if fault == "fault-hangbody":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"100")
            request.write(b'{"result":')
            return NOT_DONE_YET

        def send() -> None:
            if request.finished or request._disconnected:
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
        if operation == "auth":
            if "password" not in fields:
                return 500, jsonHeaders, _json(_error("No password given.")), fault
            if self.users.get(_baseName(user)) == fields["password"]:
                result = {"result": "success", "data": {"uid": _baseName(user)}}
            else:
                result = {"result": "noauth"}
            return 200, jsonHeaders, _json(result), fault
        if operation == "isuser":
            isUser = _baseName(user) in self.users
            return 200, jsonHeaders, _json({"result": "success", "data": {"isUser": isUser}}), fault
        if operation == "sharedroster":
            if _baseName(user) not in self.users:
                return 500, jsonHeaders, _json(_error("User not found.")), fault
            roster = {
                name: {"name": name.title(), "groups": ["Everyone"]}
                for name in sorted(self.users)
                if name != _baseName(user)
            }
            return 200, jsonHeaders, _json({"result": "success", "data": {"sharedRoster": roster or []}}), fault
        return 500, jsonHeaders, _json(_error("Unsupported operation.")), None


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


class Options(usage.Options):
    """
    Options of the stand-alone fake Nextcloud.
    """

    optParameters = [
        ["port", "p", "0", "TCP port on 127.0.0.1 (0: any free port)."],
        ["secret", "s", "demo-secret-change-me", "API secret."],
        ["latency", "l", "0", "Milliseconds added to every answer."],
        ["port-file", None, None, "Write the bound port number to this file."],
    ]


def main(argv: list[str] | None = None) -> None:
    """
    Serve the fake API on loopback until killed.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise SystemExit(f"{options}\n{e}")
    from twisted.internet import reactor

    resource = FakeJSXC(
        options["secret"].encode("utf-8"),
        dict(DEMO_USERS),
        reactor,
        latency=float(options["latency"]) / 1000.0,
    )
    port = reactor.listenTCP(int(options["port"]), makeSite(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
    number = port.getHost().port
    if options["port-file"]:
        with open(options["port-file"] + ".tmp", "w") as f:
            f.write(f"{number}\n")
        import os

        os.replace(options["port-file"] + ".tmp", options["port-file"])
    print(
        f"fake Nextcloud JSXC API on http://127.0.0.1:{number}{API_PATH.decode()} "
        f"users: {', '.join(sorted(DEMO_USERS))}",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
