"""
The line framings: C{prosody} (alias C{generic}) and line-based C{ejabberd-line}.

One request per line ending in C{\\n} (every trailing C{\\r} is stripped, as the
replaced program did, so telnet works, even from a script that writes C{\\r\\n});
answers are C{1\\n} or C{0\\n}.  C{roster} answers the backend's shared roster
JSON on one line.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl, FlowEvents
from xcauth.framing.xmpp import XMPPRequests

log = Logger()

TRUE = b"1\n"
FALSE = b"0\n"


def encodeLineAnswer(result: Any) -> bytes:
    """
    C{1}/C{0} for a boolean (C{None}, backend unavailable, is C{0}); a roster's
    JSON bytes as a line.
    """
    if isinstance(result, bytes):
        return result + b"\n"
    return TRUE if result else FALSE


@implementer(IHalfCloseableProtocol)
class XMPPLineProtocol(FlowEvents, LineReceiver):
    """
    A line-based XMPP auth client (Prosody's external auth, telnet tests).
    """

    framing = "prosody"
    delimiter = b"\n"
    # Prosody caps a query at 1000 bytes; a user, a domain and even a long password
    # fit well within 4 KiB.  A longer line is not a request: log it and close.
    MAX_LENGTH = 4096

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)
        self.requests = XMPPRequests(self.flow, encodeLineAnswer, FALSE, roster=True)

    def dataReceived(self, data: bytes) -> None:
        self.flow.newTurn()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self.requests.handle(line.rstrip(b"\r"))

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn(
            "{framing} client sent a line over {limit} bytes; closing the connection",
            framing=self.framing,
            limit=self.MAX_LENGTH,
        )
        self.flow.closeWhenAnswered()


class EjabberdLineProtocol(XMPPLineProtocol):
    """
    ejabberd's operations as text lines, for testing an ejabberd listener by hand.
    """

    framing = "ejabberd-line"
