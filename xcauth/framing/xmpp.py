"""
The request language the XMPP framings share: C{OP:USER:DOMAIN[:PASSWORD]},
split on C{:} at most three times so the password may contain C{:}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl
from xcauth.identity import InvalidIdentity, canonical
from xcauth.text import printable

log = Logger()

#: Operations that change accounts; xcauth never does, so they answer false.
UNSUPPORTED = frozenset(
    {"setpass", "tryregister", "removeuser", "removeuser3", "register"}
)
CLOSE_OPERATIONS = frozenset({"quit", "exit"})


@attr.s(frozen=True, auto_attribs=True)
class Request:
    """
    One parsed request, its user and domain in their canonical form
    (L{xcauth.identity}).  C{password} is C{None} except for C{auth}.
    """

    operation: str
    user: str
    domain: str
    password: str | None = attr.ib(default=None, repr=False)


class Close:
    """
    The client asked to end the session (C{quit} or C{exit}).
    """


class Invalid:
    """
    A request that gets C{false}: the reason is safe to log.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason


Parsed = Union[Request, Close, Invalid]

# Field counts after splitting at most three times.
_FIELDS = {"auth": 4, "isuser": 3, "roster": 3}


def parseRequest(data: bytes) -> Parsed:
    """
    Parse one request's bytes (without framing).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Invalid("request is not valid UTF-8")
    fields = text.split(":", 3)
    operation = fields[0]
    if operation in CLOSE_OPERATIONS:
        return Close()
    if operation in UNSUPPORTED:
        return Invalid(f"unsupported operation {operation}")
    expected = _FIELDS.get(operation)
    if expected is None:
        return Invalid(f"unknown operation {printable(operation[:30])!r}")
    if len(fields) != expected:
        return Invalid(f"{operation} with {len(fields)} fields instead of {expected}")
    if not fields[1] or not fields[2]:
        return Invalid(f"{operation} with an empty user or domain")
    try:
        identity = canonical(fields[1], fields[2])
    except InvalidIdentity as e:
        return Invalid(f"{operation} with an invalid identity: {e}")
    return Request(operation, identity.user, identity.domain, *fields[3:])


def answerRequest(
    context: ServerContext, framing: str, request: Request, roster: bool = False
) -> Deferred[bool | bytes | None]:
    """
    Start the work for one request and log its outcome.

    @param roster: whether this framing answers C{roster} (line framings only);
        elsewhere it is answered false.
    """
    auth = context.authenticator
    timer = context.timer(framing, request.operation, request.user, request.domain)
    if request.operation == "auth":
        assert request.password is not None
        # Deferred[bool], Deferred[bool | None] or Deferred[bytes | None]: the
        # three are not one type (Deferred is invariant), their results are.
        d: Deferred[Any] = auth.authenticate(request.user, request.domain, request.password)
    elif request.operation == "isuser":
        d = auth.isUser(request.user, request.domain)
    elif roster:
        d = auth.roster(request.user, request.domain)
    else:
        d = succeed(False)
    return timer.observe(d)


@attr.s(auto_attribs=True)
class XMPPRequests:
    """
    The XMPP framings' requests on one connection: one request's bytes turned
    into work and an answer queued on the connection's L{FlowControl}.

    @ivar flow: the connection's flow control.
    @ivar encode: turns a result into the answer's bytes.
    @ivar false: the "no" answer.
    @ivar roster: whether this framing answers C{roster}.
    """

    flow: FlowControl
    encode: Callable[[Any], bytes]
    false: bytes
    roster: bool = False

    def handle(self, data: bytes) -> None:
        """
        Parse C{data} and answer it, in order with the connection's other
        requests.
        """
        flow = self.flow
        parsed = parseRequest(data)
        if isinstance(parsed, Close):
            flow.closeWhenAnswered()
        elif isinstance(parsed, Invalid):
            flow.noteInvalid(parsed.reason)
            flow.startAnswered(self.false)
        else:
            work = answerRequest(flow.context, flow.framing, parsed, roster=self.roster)
            flow.startRequest(work, self.encode, self.false)
