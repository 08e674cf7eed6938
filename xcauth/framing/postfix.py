"""
Postfix's C{tcp_table} lookup framing (C{postfix}), for
C{virtual_mailbox_maps = tcp:127.0.0.1:23665} and similar maps: does a mail
address belong to a user of the backend?

A request is a line C{get KEY\\n}; Postfix %XX-encodes the key (C{%}, space,
control characters and every non-ASCII byte).  Answers are one line each:

 - C{200 OK}: the user exists;
 - C{500 No such user}: the user does not exist, and also any key that cannot
   be one (not C{local@domain}, such as the C{@domain} lookups Postfix makes,
   or a key whose %XX encoding or UTF-8 is broken: no user can be called that,
   so a permanent "not found" is the right answer), without a backend call;
 - C{400 ...}: temporary failure, when the backend is unavailable or misses the
   deadline, so that Postfix defers the mail instead of bouncing it.

Anything that is not a C{get} request gets a C{500} line and the connection
stays open; Postfix keeps it open across lookups for as long as it likes.
"""

from __future__ import annotations

import re
from typing import Union

import attr
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl, FlowEvents
from xcauth.identity import InvalidIdentity, canonical
from xcauth.text import printable

log = Logger()

#: The user exists.
FOUND = b"200 OK\n"
#: The user does not exist (or the key cannot be a user's address).
NOT_FOUND = b"500 No such user\n"
#: Temporary failure: Postfix defers the mail and asks again later.
TEMPFAIL = b"400 backend unavailable\n"
#: A line that is not a C{get} request.
UNSUPPORTED = b"500 only get requests are supported\n"
#: A request line over the limit.
TOO_LONG = b"500 request too long\n"

#: Every reply must stay below Postfix's 4096-byte limit; ours are constant.
MAX_REPLY = 4096
assert all(len(r) < MAX_REPLY for r in (FOUND, NOT_FOUND, TEMPFAIL, UNSUPPORTED, TOO_LONG))

_ESCAPE = re.compile(rb"%(.?.?)")
_HEX = frozenset(b"0123456789abcdefABCDEF")


@attr.s(frozen=True, auto_attribs=True)
class Lookup:
    """
    A key to look up: C{user@domain}, in its canonical form.
    """

    user: str
    domain: str


@attr.s(frozen=True, auto_attribs=True)
class Answered:
    """
    A request answered without backend work; the reason is safe to log.
    C{invalid} for a request no Postfix sends (a key that is not an address,
    such as the C{@domain} lookups Postfix makes, is a valid request).
    """

    answer: bytes
    reason: str
    invalid: bool = True


Parsed = Union[Lookup, Answered]


def decodeKey(key: bytes) -> str | None:
    """
    Undo Postfix's %XX encoding of a key and decode it as UTF-8, strictly:
    C{None} for a C{%} not followed by two hex digits, or bytes that are not
    UTF-8.
    """

    def unescape(match: re.Match[bytes]) -> bytes:
        digits = match.group(1)
        if len(digits) != 2 or not set(digits) <= _HEX:
            raise ValueError("bad escape")
        return bytes([int(digits, 16)])

    try:
        return _ESCAPE.sub(unescape, key).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def parseQuery(line: bytes) -> Parsed:
    """
    Parse one request line (without its C{\\n}).
    """
    command, space, key = line.partition(b" ")
    if command != b"get" or not space:
        return Answered(UNSUPPORTED, "not a get request")
    text = decodeKey(key)
    if text is None:
        return Answered(NOT_FOUND, "key is not valid %XX-encoded UTF-8")
    user, at, domain = text.rpartition("@")
    if not at or not user or not domain:
        return Answered(NOT_FOUND, f"key {printable(text)!r} is not local@domain", False)
    try:
        identity = canonical(user, domain)
    except InvalidIdentity as e:
        return Answered(NOT_FOUND, f"key {printable(text)!r}: {e}", False)
    return Lookup(identity.user, identity.domain)


def encodeLookupAnswer(result: bool | None) -> bytes:
    """
    C{200}, C{500} or, when the backend is unavailable (C{None}), C{400}.
    """
    if result is None:
        return TEMPFAIL
    return FOUND if result else NOT_FOUND


@implementer(IHalfCloseableProtocol)
class PostfixProtocol(FlowEvents, LineReceiver):
    """
    A Postfix C{tcp_table} client.
    """

    framing = "postfix"
    delimiter = b"\n"
    # An address is at most 254 bytes, three times that when every byte is
    # %-encoded: 4 KiB is plenty.  A longer line gets a 500 and is skipped up to
    # its end; the connection stays usable.
    MAX_LENGTH = 4096

    _discarding = False
    _again: bytes | None = None

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)

    def dataReceived(self, data: bytes) -> None:
        while True:
            if self._discarding:
                end = data.find(self.delimiter)
                if end < 0:
                    return
                self._discarding = False
                data = data[end + 1 :]
            self._again = None
            self.flow.newTurn()
            super().dataReceived(data)
            if self._again is None:
                return
            data, self._again = self._again, None

    def lineReceived(self, line: bytes) -> None:
        # Every trailing CR, as the line framings of xcauth strip them.
        parsed = parseQuery(line.rstrip(b"\r"))
        if isinstance(parsed, Answered):
            if parsed.invalid:
                self.flow.noteInvalid(f"answered {parsed.answer[:3].decode('ascii')}: {parsed.reason}")
            elif self.context.debug:
                log.debug("{framing}: {reason}", framing=self.framing, reason=parsed.reason)
            self.flow.startAnswered(parsed.answer)
            return
        timer = self.context.timer(self.framing, "isuser", parsed.user, parsed.domain)
        work = timer.observe(self.context.authenticator.isUser(parsed.user, parsed.domain))
        self.flow.startRequest(work, encodeLookupAnswer, TEMPFAIL)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn(
            "{framing} client sent a line over {limit} bytes; answered 500",
            framing=self.framing,
            limit=self.MAX_LENGTH,
        )
        self.flow.startAnswered(TOO_LONG)
        # LineReceiver hands over the long line and everything buffered after
        # it, and stops parsing: skip to the end of the long line and have
        # dataReceived parse the rest.
        end = line.find(self.delimiter)
        if end < 0:
            self._discarding = True
        else:
            self._again = line[end + 1 :]
