"""
The saslauthd C{mux} framing (C{saslauthd}), for mail servers that check
passwords through Cyrus SASL's saslauthd (Postfix, Cyrus IMAP, libsasl's
C{pwcheck_method: saslauthd}, C{testsaslauthd}).

A request is four counted strings, each a 2-byte big-endian length and that many
bytes: login, password, service, realm.  The answer is one counted string
beginning C{OK} or C{NO}.  The service is ignored.  A non-empty realm is the
domain and the login the user; with an empty realm a C{user@domain} login is
split at its last C{@}.

Real saslauthd answers one request and closes the connection; its clients
(libsasl, C{testsaslauthd}) send one request, wait for the answer without
closing their side, read it and close.  Debian's sasl2-bin 2.1.28 sends exactly
four fields (captured: C{00 05 "alice" 00 07 "pa:ss w" 00 04 "smtp" 00 0b
"example.org"}); newer cyrus-sasl may send a fifth (the client address), which
real saslauthd simply never reads.  So a request is answered as soon as its
fourth field is complete, and the optional fifth field is told from the next
request by time, not by content:

 - a field that begins while the request's answer has not yet left (or in the
   same read as the fourth field) is that request's fifth field; it is read and
   ignored (never logged);
 - once the answer has left, the next field begins a new request, so several
   requests on one connection work for a client that waits for each answer;
 - a client that sends anything more within that window (before the answer
   has left, or in the same read) is pipelining, which no saslauthd client does and which would make the
   field boundaries ambiguous (a password could be taken for a user name and
   logged): the extra bytes are dropped and the connection closes once the
   answer has left.

Bad input never breaks the connection or the daemon: a field that is not UTF-8,
an empty login or password, a login that names no domain, or a field over
L{MAX_FIELD} bytes (skipped without being buffered) make that request fail with
C{NO}.  The password is never logged, nor is the service (it is not ours to
log, and it is the field a misbehaving client could confuse with one).
"""

from __future__ import annotations

import struct
from typing import Any, Union

import attr
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl, FlowEvents
from xcauth.identity import InvalidIdentity, canonical

log = Logger()

#: Longest field accepted, in bytes.  Real saslauthd refuses anything over 256
#: bytes (C{MAX_REQ_LEN}), so no client can rely on more; a token is about 31
#: bytes.  A longer field is skipped as it arrives (never buffered) and its
#: request answered C{NO}.
MAX_FIELD = 1024

#: Counted fields in a request; a fifth may follow (see the module docstring).
FIELDS = 4


def encodeCounted(text: bytes) -> bytes:
    """
    A counted string: 2-byte big-endian length, then the bytes.
    """
    return struct.pack(">H", len(text)) + text


#: The answer for a right password (or token).
OK = encodeCounted(b"OK success")
#: The answer for a wrong password, an unknown user, a backend that is
#: unavailable or misses the deadline.
NO = encodeCounted(b"NO xcauth authentication failure")
#: The answer for a request that cannot be a valid login.
NO_INVALID = encodeCounted(b"NO xcauth invalid request")


class Oversize:
    """
    Stands for a field longer than the limit, whose bytes were skipped.
    """

    def __init__(self, length: int) -> None:
        self.length = length


Field = Union[bytes, Oversize]


class FieldReader:
    """
    Splits a byte stream into counted fields (a pure state machine: no I/O).

    Feed it bytes with L{feed}; take complete fields with L{next}.  A field over
    C{maxLength} bytes is not buffered: its bytes are skipped as they arrive and
    L{next} returns an L{Oversize} once all of them are gone.
    """

    def __init__(self, maxLength: int = MAX_FIELD) -> None:
        self.maxLength = maxLength
        self._buffer = b""
        self._skipping: Oversize | None = None
        self._skipLeft = 0

    def feed(self, data: bytes) -> None:
        """
        Add received bytes.
        """
        self._buffer += data

    def clear(self) -> None:
        """
        Forget everything received and not yet taken.
        """
        self._buffer = b""
        self._skipping = None
        self._skipLeft = 0

    @property
    def pending(self) -> bool:
        """
        Whether bytes of a field not yet complete have been received.
        """
        return bool(self._buffer) or self._skipping is not None

    def next(self) -> Field | None:
        """
        The next complete field, or C{None} if more bytes are needed.
        """
        if self._skipping is not None:
            skipped = min(self._skipLeft, len(self._buffer))
            self._buffer = self._buffer[skipped:]
            self._skipLeft -= skipped
            if self._skipLeft:
                return None
            done, self._skipping = self._skipping, None
            return done
        if len(self._buffer) < 2:
            return None
        (length,) = struct.unpack(">H", self._buffer[:2])
        if length > self.maxLength:
            self._buffer = self._buffer[2:]
            self._skipping = Oversize(length)
            self._skipLeft = length
            return self.next()
        if len(self._buffer) < 2 + length:
            return None
        field = self._buffer[2 : 2 + length]
        self._buffer = self._buffer[2 + length :]
        return field


@attr.s(frozen=True, auto_attribs=True)
class SaslRequest:
    """
    A login to check, its user and domain in their canonical form.
    """

    user: str
    domain: str
    password: str = attr.ib(repr=False)


@attr.s(frozen=True, auto_attribs=True)
class InvalidMuxRequest:
    """
    A request answered C{NO} without any work; the reason is safe to log.
    """

    reason: str


def splitSaslauthdLogin(login: str, realm: str) -> tuple[str, str] | None:
    """
    The user and domain of a saslauthd login: a non-empty realm is the domain;
    with an empty realm, C{user@domain} is split at the last C{@}.  C{None} if
    either part would be empty.
    """
    if realm:
        user, domain = login, realm
    else:
        user, at, domain = login.rpartition("@")
        if not at:
            return None
    if not user or not domain:
        return None
    return user, domain


def parseFields(fields: list[Field]) -> SaslRequest | InvalidMuxRequest:
    """
    Turn a request's four fields (login, password, service, realm) into a
    login to check, or the reason it is invalid.
    """
    login, password, _service, realm = fields
    names = ("login", "password", "service", "realm")
    for name, field in zip(names, fields, strict=True):
        if isinstance(field, Oversize):
            return InvalidMuxRequest(f"{name} of {field.length} bytes (limit {MAX_FIELD})")
    assert isinstance(login, bytes)
    assert isinstance(password, bytes)
    assert isinstance(realm, bytes)
    try:
        loginText = login.decode("utf-8")
        realmText = realm.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidMuxRequest("login or realm is not valid UTF-8")
    if not loginText:
        return InvalidMuxRequest("empty login")
    try:
        passwordText = password.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidMuxRequest("password is not valid UTF-8")
    if not passwordText:
        return InvalidMuxRequest("empty password")
    split = splitSaslauthdLogin(loginText, realmText)
    if split is None:
        return InvalidMuxRequest("login names no domain (no realm and no @)")
    try:
        identity = canonical(*split)
    except InvalidIdentity as e:
        return InvalidMuxRequest(f"invalid identity: {e}")
    return SaslRequest(identity.user, identity.domain, passwordText)


def encodeSaslAnswer(result: object) -> bytes:
    """
    C{OK} for a right password, C{NO} otherwise.
    """
    return OK if result is True else NO


@implementer(IHalfCloseableProtocol)
class SaslauthdProtocol(FlowEvents, Protocol):
    """
    A saslauthd client (libsasl, C{testsaslauthd}).
    """

    framing = "saslauthd"

    _reader: FieldReader
    _fields: list[Field]
    #: The last request's answer may still be followed by its fifth field.
    _window = False
    #: The fifth field of the last request was read.
    _fifthSeen = False
    #: The last request's answer has left.
    _answered = True
    _paused = False

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)
        self._reader = FieldReader()
        self._fields = []

    def dataReceived(self, data: bytes) -> None:
        self.flow.newTurn()
        if self.flow.stopped:
            return
        if self._window and self._answered and not self._reader.pending:
            # The answer left before these bytes: they begin a new request.
            self._window = False
        self._reader.feed(data)
        self._process()

    def _process(self) -> None:
        while not (self._paused or self.flow.stopped):
            if self._window and self._fifthSeen and self._reader.pending:
                log.warn(
                    "{framing} client sent more than one request without waiting "
                    "for the answer; closing the connection after the answer",
                    framing=self.framing,
                )
                self._reader.clear()
                self.flow.closeWhenAnswered()
                return
            field = self._reader.next()
            if field is None:
                return
            if self._window and not self._fifthSeen:
                # The optional fifth field (client address): read and ignored.
                self._fifthSeen = True
                continue
            self._fields.append(field)
            if len(self._fields) == FIELDS:
                fields, self._fields = self._fields, []
                self._window = True
                self._fifthSeen = False
                self._answered = False
                self._handle(fields)

    def _handle(self, fields: list[Field]) -> None:
        parsed = parseFields(fields)
        if isinstance(parsed, InvalidMuxRequest):
            self.flow.noteInvalid(parsed.reason)
            self.flow.startAnswered(NO_INVALID)
            self._answered = True
            return
        timer = self.context.timer(self.framing, "auth", parsed.user, parsed.domain)
        work = timer.observe(
            self.context.authenticator.authenticate(
                parsed.user, parsed.domain, parsed.password
            )
        )
        self.flow.startRequest(work, encodeSaslAnswer, NO)
        work.addBoth(self._answerLeft)

    def _answerLeft(self, result: Any) -> None:
        self._answered = True

    def pauseProducing(self) -> None:
        """
        Stop reading (the transport and the buffered fields).
        """
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Read again, starting with the buffered fields.
        """
        self._paused = False
        self.transport.resumeProducing()
        self._process()
