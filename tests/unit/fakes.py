"""
Test doubles for framing tests: authenticators whose answers the test controls.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from xcauth.framing.base import ServerContext, XcauthFactory
from xcauth.interfaces import IAuthenticator


@implementer(IAuthenticator)
class ManualAuthenticator:
    """
    Every call returns a new L{Deferred} that the test fires by hand; C{calls}
    records C{(operation, args, deferred)} and C{cancelled} the cancelled ones.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], Deferred[Any]]] = []
        self.cancelled: list[tuple[str, ...]] = []

    def _call(self, operation: str, *args: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(args))
        self.calls.append((operation, args, d))
        return d

    def authenticate(
        self, user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        return self._call("auth", user, domain, password)

    def isUser(self, user: str, domain: str) -> Deferred[bool | None]:
        return self._call("isuser", user, domain)

    def roster(self, user: str, domain: str) -> Deferred[bytes | None]:
        return self._call("roster", user, domain)


@implementer(IAuthenticator)
class TableAuthenticator:
    """
    Answers at once from a table of users and passwords; C{None} for domains
    named C{down.example} (backend unavailable).
    """

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.calls: list[tuple[str, ...]] = []

    def authenticate(
        self, user: str, domain: str, password: str, peer: str | None = None
    ) -> Deferred[bool | None]:
        self.calls.append(("auth", user, domain))
        if domain == "down.example":
            return succeed(None)
        return succeed(self.users.get(f"{user}@{domain}") == password)

    def isUser(self, user: str, domain: str) -> Deferred[bool | None]:
        self.calls.append(("isuser", user, domain))
        if domain == "down.example":
            return succeed(None)
        return succeed(f"{user}@{domain}" in self.users)

    def roster(self, user: str, domain: str) -> Deferred[bytes | None]:
        self.calls.append(("roster", user, domain))
        return succeed(b'{"result":"success","data":{"sharedRoster":[]}}')


def connect(
    protocolClass: Any,
    authenticator: Any,
    clock: Clock | None = None,
    deadline: float = 4.0,
    maxInFlight: int = 64,
) -> tuple[Any, StringTransport, Clock]:
    """
    A protocol connected to a L{StringTransport}.
    """
    clock = clock or Clock()
    context = ServerContext(
        authenticator=authenticator, clock=clock, deadline=deadline, maxInFlight=maxInFlight
    )
    factory = XcauthFactory(protocolClass, context)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


class ProtocolTestMixin:
    """
    For test cases of one framing: C{protocolClass} connected to a
    L{StringTransport} and a L{ManualAuthenticator} in C{setUp}.
    """

    protocolClass: Any

    def setUp(self) -> None:
        self.auth = ManualAuthenticator()
        self.protocol, self.transport, self.clock = connect(self.protocolClass, self.auth)

    def send(self, data: bytes) -> None:
        """
        Bytes from the client.
        """
        self.protocol.dataReceived(data)

    def answers(self) -> bytes:
        """
        What the protocol wrote since the last call.
        """
        value: bytes = self.transport.value()
        self.transport.clear()
        return value


def jsxc(agent: Any, url: str, secret: bytes, clock: Any, timeout: float = 10.0) -> Any:
    """
    A JSXC client sending through C{agent} (treq's testing agent, or a wrapper
    of it), with the production request handling around it.
    """
    from xcauth.backends.http import HTTPRequester
    from xcauth.backends.jsxc import JSXCClient

    return JSXCClient(HTTPRequester(agent, clock, timeout), url, secret)
