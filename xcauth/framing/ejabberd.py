"""
ejabberd's extauth framing: a 2-byte unsigned big-endian length, then the request
text; every answer is the 4 bytes C{00 02 00 01} (true) or C{00 02 00 00} (false).
A zero length ends the session.

On an C{ejabberd} listener, a connection whose first byte is a lowercase ASCII
letter is a person typing (telnet): it is served line-based instead
(L{EjabberdAutoProtocol}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl, FlowEvents
from xcauth.framing.lines import EjabberdLineProtocol
from xcauth.framing.xmpp import XMPPRequests

log = Logger()

TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"


def encodeBinaryAnswer(result: Any) -> bytes:
    """
    The 4-byte answer for a result (C{None}, backend unavailable, is false).
    """
    return TRUE if result is True else FALSE


@implementer(IHalfCloseableProtocol)
class EjabberdProtocol(FlowEvents, Int16StringReceiver):
    """
    ejabberd's binary extauth framing.
    """

    framing = "ejabberd"
    # A 16-bit prefix allows 65535 bytes, but a real request (user, domain and a
    # password or token) is far below 4 KiB.  A longer frame is not a request: log
    # it and close rather than buffer it.
    MAX_LENGTH = 4096

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)
        self.requests = XMPPRequests(self.flow, encodeBinaryAnswer, FALSE)

    def dataReceived(self, data: bytes) -> None:
        self.flow.newTurn()
        super().dataReceived(data)

    def stringReceived(self, data: bytes) -> None:
        if not data:
            self.flow.closeWhenAnswered()
            return
        self.requests.handle(data)

    def lengthLimitExceeded(self, length: int) -> None:
        log.warn(
            "ejabberd client announced a {length}-byte frame (limit {limit}); "
            "closing the connection",
            length=length,
            limit=self.MAX_LENGTH,
        )
        self.flow.closeWhenAnswered()


@implementer(IHalfCloseableProtocol)
class EjabberdAutoProtocol(Protocol):
    """
    Serve a connection on an C{ejabberd} listener in the framing its first byte
    shows: a lowercase ASCII letter means a person typing lines, anything else a
    binary ejabberd client (whose first byte is the high byte of a length).
    """

    inner: Any = None
    factory: Any

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def dataReceived(self, data: bytes) -> None:
        if self.inner is None:
            if not data:
                return
            line = b"a"[0] <= data[0] <= b"z"[0]
            inner = (EjabberdLineProtocol if line else EjabberdProtocol)(self.context)
            inner.factory = self.factory
            self.inner = inner
            inner.makeConnection(self.transport)
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.inner is None:
            assert self.transport is not None  # called only while connected
            self.transport.loseConnection()
        else:
            self.inner.readConnectionLost()

    def writeConnectionLost(self) -> None:
        if self.inner is None:
            assert self.transport is not None  # called only while connected
            self.transport.loseConnection()
        else:
            self.inner.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
