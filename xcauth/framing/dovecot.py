"""
The Dovecot authentication protocol, server side (C{dovecot}), for Postfix
(C{smtpd_sasl_type = dovecot}), Prosody's C{mod_auth_dovecot} and other
clients of Dovecot's C{auth-client} socket.  Mechanisms: PLAIN and LOGIN.

Lines end in LF; fields are separated by TAB, and a value escapes TAB, CR, LF
and the byte 0x01 as 0x01 followed by C{t}, C{r}, C{n}, C{1} (Dovecot 2.3's
C{str_tabunescape}: also 0x01 C{0} for NUL; any other character after 0x01
stands for itself; C{l} for LF, from older documentation, is read too).  As
Dovecot's auth server (2.3.19) does:

 - On connect the server sends C{VERSION 1 2}, one C{MECH NAME plaintext} line
   per mechanism, C{SPID}, C{CUID}, C{COOKIE} (32 hex digits) and C{DONE},
   without waiting for the client.  The client sends C{VERSION 1 MINOR} and
   C{CPID PID}; a first line that is not a VERSION of major version 1, or a
   second line that is not a C{CPID} with a positive number, closes the
   connection.
 - C{AUTH ID MECH service=S [key=value | flag]... [resp=BASE64]} starts a
   request; C{resp=} must be the last field.  An absent C{resp=} (and an empty
   one from a client of protocol 1.0 or 1.1) is no initial response; C{resp=}
   empty (1.2) or C{resp==} is an empty one.  PLAIN without an initial response
   is answered C{CONT ID} with an empty challenge, LOGIN with
   C{CONT ID base64("Username:")}, then C{base64("Password:")}.  A PLAIN or LOGIN
   initial response is used as the first step.
 - C{CONT ID BASE64} answers a challenge; a CONT for an id that is not waiting
   for one is answered C{FAIL ID reason=...}; C{CANCEL ID} forgets a request.
 - Answers: C{OK ID user=LOGIN} (the login as the client gave it: Prosody's
   module nodepreps this name into the JID's local part), C{FAIL ID user=LOGIN}
   for a wrong password (C{FAIL ID} for data that names no login), C{FAIL ID code=authz_fail authz reason=...} when the PLAIN
   authorization identity names another user, C{FAIL ID code=invalid_base64
   reason=...} for broken base64.  (Dovecot 2.3 sends C{code=...}, 2.2 and the
   Prosody module use the bare flags C{temp} and C{authz}: both are sent.)
 - Protocol violations close the connection, as Dovecot does (it logs "BUG"):
   an unknown command, an AUTH without id, mechanism or service, an unknown
   mechanism, fields after C{resp=}, an id already in use, a line over
   L{MAX_LINE} bytes.

Several requests may be in flight on one connection; each is answered when
its work completes (the ids tell the answers apart).  A client that closes its
side (C{socat}, C{nc}) still gets the answers to the work in flight, then the
connection closes.  When the backend is
unavailable or misses the deadline the answer is a temporary failure,
C{FAIL ID user=LOGIN code=temp_fail temp reason=...}.  Postfix (3.7, and the newer
C{xsasl_dovecot_server.c} sources read) ignores both flags and would tell the mail client 535, "wrong password"; it
answers 454 "temporary failure" only when the connection to the auth server is
lost.  So for a client of protocol 1.0 (Postfix announces C{VERSION 1 0}; it
sends one request at a time per connection) a temporary failure resets the
connection (TCP RST) instead of answering.

A login C{user@domain} is split at its last C{@}; a login without C{@} takes
the domain from the request's C{realm=} field, else from the configured
default domain (C{dovecot-default-domain}); with neither it fails.  The
client's address (C{rip=}) is passed to the authenticator.  Passwords and
initial responses are never logged.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.flow import FlowControl
from xcauth.identity import InvalidIdentity, canonical
from xcauth.text import printable

log = Logger()

#: Longest line accepted, as Dovecot's C{AUTH_CLIENT_MAX_LINE_LENGTH}; a longer
#: one closes the connection, as Dovecot does.  A PLAIN response of a long
#: login and password is a few hundred bytes of base64.
MAX_LINE = 16384

#: Requests open at once per connection (most of them waiting for the client's
#: C{CONT}), as a multiple of C{--max-in-flight}; past it the client is broken
#: and its connection is closed.  Work in flight is bounded by
#: C{--max-in-flight} itself: past it the connection is not read.
MAX_OPEN_FACTOR = 4

#: Seconds a request waits for the client's C{CONT} before it is forgotten
#: (Dovecot's C{MASTER_AUTH_SERVER_TIMEOUT_SECS}); a later C{CONT} is answered
#: "Authentication request timed out".  Prosody's module never cancels a
#: LOGIN that its XMPP client abandons after the first challenge.
CONT_TIMEOUT = 150.0

#: The protocol version this server speaks.
MAJOR_VERSION = 1
MINOR_VERSION = 2

#: The mechanisms offered, with Dovecot's security flags for them.
MECHANISMS = (("PLAIN", "plaintext"), ("LOGIN", "plaintext"))

#: LOGIN's challenges, as Dovecot's mech-login.c sends them.
LOGIN_USER_PROMPT = b"Username:"
LOGIN_PASSWORD_PROMPT = b"Password:"

#: Reasons sent with failures (shown to the user by some clients).
TEMP_REASON = "Temporary authentication failure"
AUTHZ_REASON = "Authorization identity differs from the login"

# 0x01 "l" is LF in the protocol's older documentation (Dovecot 2.3's
# unescaping reads it as "l"); no client escapes a plain "l", so both are LF.
_UNESCAPES = {
    ord("0"): b"\0",
    ord("1"): b"\1",
    ord("t"): b"\t",
    ord("r"): b"\r",
    ord("n"): b"\n",
    ord("l"): b"\n",
}


def unescape(value: bytes) -> bytes:
    """
    Undo Dovecot's tab escaping (0x01 followed by C{0 1 t r n}, or C{l} for
    LF as older documentation has it; any other character after 0x01 stands
    for itself; a 0x01 at the end is dropped).
    """
    if b"\1" not in value:
        return value
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c != 1:
            out.append(c)
            i += 1
            continue
        if i + 1 < n:
            nxt = value[i + 1]
            out += _UNESCAPES.get(nxt, bytes([nxt]))
        i += 2
    return bytes(out)


def escape(value: bytes) -> bytes:
    """
    Dovecot's tab escaping of one value (C{\\1}, TAB, CR, LF, and NUL as
    Dovecot 2.3's C{str_tabescape} writes it, 0x01 C{0}).
    """
    return (
        value.replace(b"\1", b"\x011")
        .replace(b"\0", b"\x010")
        .replace(b"\t", b"\x01t")
        .replace(b"\r", b"\x01r")
        .replace(b"\n", b"\x01n")
    )


def splitFields(line: bytes) -> list[bytes]:
    """
    The TAB-separated, unescaped fields of a line.
    """
    return [unescape(f) for f in line.split(b"\t")]


def formatLine(*fields: bytes) -> bytes:
    """
    One line of TAB-separated, escaped fields (the first is the command).
    """
    return b"\t".join([fields[0], *(escape(f) for f in fields[1:])]) + b"\n"


def handshake(spid: int, cuid: int, cookie: bytes) -> bytes:
    """
    What the server sends on connect, in Dovecot's order.
    """
    lines = [b"VERSION\t%d\t%d\n" % (MAJOR_VERSION, MINOR_VERSION)]
    lines += [b"MECH\t%s\t%s\n" % (m.encode(), f.encode()) for m, f in MECHANISMS]
    lines.append(b"SPID\t%d\n" % spid)
    lines.append(b"CUID\t%d\n" % cuid)
    lines.append(b"COOKIE\t" + binascii.hexlify(cookie) + b"\n")
    lines.append(b"DONE\n")
    return b"".join(lines)


def parseVersion(line: bytes) -> tuple[int, int] | None:
    """
    C{(major, minor)} of a client's C{VERSION} line, or C{None}.
    """
    fields = line.split(b"\t")
    if len(fields) < 3 or fields[0] != b"VERSION":
        return None
    major, minor = fields[1], fields[2]
    if not (_isNumber(major) and _isNumber(minor)):
        return None
    return int(major), int(minor)


def parseCPID(line: bytes) -> int | None:
    """
    The client's process id from its C{CPID} line (positive), or C{None}.
    """
    command, tab, value = line.partition(b"\t")
    if command != b"CPID" or not tab or not _isNumber(value) or int(value) == 0:
        return None
    return int(value)


#: Digits of a number field at most (a process id, a version, a request id
#: fit in 10): longer ones are refused before C{int()}, which would raise on
#: thousands of digits.
MAX_DIGITS = 10


def _isNumber(text: bytes) -> bool:
    """
    Whether C{text} is 1 to L{MAX_DIGITS} ASCII digits.
    """
    return 0 < len(text) <= MAX_DIGITS and text.isdigit()


_NAME = re.compile(rb"\A[A-Za-z0-9_-]{1,32}\Z")


def _safeName(name: bytes) -> str:
    """
    A command or mechanism name for a log line, quoted, if it looks like one;
    anything else (which a confused client might fill with a password) is
    described, not shown.
    """
    if _NAME.match(name):
        return repr(name.decode("ascii"))
    return f"of {len(name)} bytes (not shown)"


def _parseId(text: bytes) -> int | None:
    if not _isNumber(text):
        return None
    value = int(text)
    return value if 0 < value < 2**32 else None


def decodeBase64(text: bytes) -> bytes | None:
    """
    Strict base64 (C{None} if it is not); C{=} alone stands for empty data.
    """
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


@attr.s(frozen=True, auto_attribs=True)
class AuthCommand:
    """
    A parsed C{AUTH} line.

    @ivar response: the initial response's base64 text (C{None}: none given).
    """

    id: int
    mechanism: str
    service: str
    params: dict[str, str] = attr.ib(repr=False)
    response: bytes | None = attr.ib(repr=False)


@attr.s(frozen=True, auto_attribs=True)
class ProtocolError:
    """
    A line that breaks the protocol: the connection is closed.  The reason is
    safe to log.
    """

    reason: str


def parseAuth(fields: Sequence[bytes], minor: int) -> AuthCommand | ProtocolError:
    """
    Parse the fields of an C{AUTH} line (after the command), for a client of
    protocol version 1.C{minor}.
    """
    if len(fields) < 2:
        return ProtocolError("AUTH without id and mechanism")
    requestId = _parseId(fields[0])
    if requestId is None:
        return ProtocolError("AUTH with an invalid id")
    try:
        mechanism = fields[1].decode("ascii")
    except UnicodeDecodeError:
        return ProtocolError("AUTH with a mechanism name that is not ASCII")
    if mechanism.upper() not in {m for m, _ in MECHANISMS}:
        return ProtocolError(f"unsupported mechanism {_safeName(fields[1])}")
    params: dict[str, str] = {}
    response: bytes | None = None
    rest = list(fields[2:])
    while rest:
        field = rest.pop(0)
        name, eq, value = field.partition(b"=")
        if name == b"resp" and eq:
            response = value
            if rest:
                return ProtocolError("AUTH parameters after resp")
            break
        params[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    service = params.get("service")
    if not service:
        return ProtocolError("AUTH without service")
    if response is not None and response == b"" and minor < 2:
        # Protocol 1.1 and older: an empty resp= means "no initial response"
        # (Exim, Prosody's module send it so).
        response = None
    return AuthCommand(requestId, mechanism.upper(), service, params, response)


def parsePlain(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """
    PLAIN's C{authzid NUL authcid NUL password}, or C{None} if it does not
    have exactly two NULs.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def splitDovecotLogin(login: str, realm: str | None, defaultDomain: str | None) -> tuple[str, str] | None:
    """
    The user and domain of a login: C{user@domain} split at the last C{@}; a
    login without C{@} in the realm, else the default domain.  C{None} if no
    domain can be found or a part is empty.
    """
    user, at, domain = login.rpartition("@")
    if not at:
        user, domain = login, realm or defaultDomain or ""
    if not user or not domain:
        return None
    return user, domain


def okLine(requestId: int, login: str) -> bytes:
    """
    C{OK ID user=LOGIN}.
    """
    return formatLine(b"OK", b"%d" % requestId, b"user=" + login.encode("utf-8"))


def failLine(requestId: int, *extra: str) -> bytes:
    """
    C{FAIL ID [extra...]}.
    """
    return formatLine(b"FAIL", b"%d" % requestId, *(e.encode("utf-8") for e in extra))


def tempFailLine(requestId: int, login: str | None = None) -> bytes:
    """
    A temporary failure, in Dovecot 2.3's and 2.2's words (with the login,
    when known, as Dovecot sends it).
    """
    user = [] if login is None else ["user=" + login]
    return failLine(requestId, *user, "code=temp_fail", "temp", "reason=" + TEMP_REASON)


def contLine(requestId: int, challenge: bytes) -> bytes:
    """
    C{CONT ID BASE64}.
    """
    return b"CONT\t%d\t%s\n" % (requestId, base64.b64encode(challenge))


@attr.s(auto_attribs=True)
class _Request:
    """
    A request in flight: waiting for the client (C{CONT}) or for the work.
    """

    command: AuthCommand
    #: LOGIN's user name, once the client sent it.
    user: bytes | None = None
    #: The login being checked (for the answer).
    login: str | None = None
    waitingForClient: bool = False
    work: Deferred[Any] | None = None
    timer: IDelayedCall | None = None

    def stopWaiting(self) -> None:
        """
        The client answered (or the request is over): no more timeout.
        """
        self.waitingForClient = False
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None


@implementer(IHalfCloseableProtocol)
class DovecotProtocol(LineReceiver):
    """
    A client of Dovecot's authentication protocol (Postfix, Prosody's
    C{mod_auth_dovecot}).
    """

    framing = "dovecot"
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    context: ServerContext
    factory: Any
    transport: Any

    _minor: int | None = None
    _cpid: int | None = None
    #: The client closed its side.
    _eof = False

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)
        self._requests: dict[int, _Request] = {}

    @property
    def _closed(self) -> bool:
        return self.flow.closing or self.flow.lost

    def connectionMade(self) -> None:
        self.flow.connect(self.transport)
        self.transport.write(handshake(os.getpid(), self._connectionNumber(), os.urandom(16)))

    def _connectionNumber(self) -> int:
        # CUID: connections of this listener counted on its factory, as Dovecot
        # counts them per process (only unique, never interpreted).
        factory = getattr(self, "factory", None)
        number = getattr(factory, "dovecotConnections", 0) + 1
        if factory is not None:
            factory.dovecotConnections = number
        return int(number)

    # -- input -----------------------------------------------------------
    def lineReceived(self, line: bytes) -> None:
        if self._closed:
            return
        self.flow.count()
        if line.endswith(b"\r"):
            # Dovecot's line reader accepts CRLF too.
            line = line[:-1]
        if self._minor is None:
            version = parseVersion(line)
            if version is None or version[0] != MAJOR_VERSION:
                self._protocolError("the first line is not a VERSION of major version 1")
                return
            self._minor = version[1]
            return
        if self._cpid is None:
            cpid = parseCPID(line)
            if cpid is None:
                self._protocolError("the handshake has no valid CPID line")
                return
            self._cpid = cpid
            return
        command, _, rest = line.partition(b"\t")
        if command == b"AUTH":
            self._auth(rest)
        elif command == b"CONT":
            self._cont(rest)
        elif command == b"CANCEL":
            self._cancel(rest)
        else:
            self._protocolError(f"unknown command {_safeName(command)}")

    def _auth(self, rest: bytes) -> None:
        assert self._minor is not None
        parsed = parseAuth(splitFields(rest), self._minor)
        if isinstance(parsed, ProtocolError):
            self._protocolError(parsed.reason)
            return
        if parsed.id in self._requests:
            self._protocolError(f"AUTH with id {parsed.id}, which is already in use")
            return
        if len(self._requests) >= MAX_OPEN_FACTOR * self.context.maxInFlight:
            self.context.noteInvalid(
                self.framing,
                f"a client has {len(self._requests)} requests open (most waiting "
                "for its CONT); another refused for now",
            )
            self.transport.write(tempFailLine(parsed.id))
            return
        request = _Request(parsed)
        self._requests[parsed.id] = request
        if parsed.response is None:
            self._step(request, None)
            return
        data = decodeBase64(parsed.response)
        if data is None:
            self._answer(
                request,
                failLine(parsed.id, "code=invalid_base64", "reason=Invalid base64 data in initial response"),
            )
            return
        self._step(request, data)

    def _cont(self, rest: bytes) -> None:
        idText, tab, data = rest.partition(b"\t")
        requestId = _parseId(idText)
        if requestId is None or not tab:
            self._protocolError("broken CONT line")
            return
        request = self._requests.get(requestId)
        if request is None:
            self.transport.write(failLine(requestId, "reason=Authentication request timed out"))
            return
        if not request.waitingForClient:
            work, request.work = request.work, None
            self._answer(request, failLine(requestId, "reason=Unexpected continuation"))
            if work is not None:
                work.cancel()
            return
        request.stopWaiting()
        decoded = decodeBase64(unescape(data))
        if decoded is None:
            self._answer(
                request,
                failLine(requestId, "code=invalid_base64", "reason=Invalid base64 data in continued response"),
            )
            return
        self._step(request, decoded, initial=False)

    def _cancel(self, rest: bytes) -> None:
        requestId = _parseId(rest)
        if requestId is None:
            self._protocolError("broken CANCEL line")
            return
        request = self._requests.pop(requestId, None)
        if request is not None:
            request.stopWaiting()
        if request is not None and request.work is not None:
            work, request.work = request.work, None
            work.cancel()

    # -- mechanisms --------------------------------------------------------
    def _step(self, request: _Request, data: bytes | None, initial: bool = True) -> None:
        """
        One step of the request's mechanism with the client's data: the
        initial response (C{None}: none given) or a C{CONT}'s data.
        """
        command = request.command
        if command.mechanism == "PLAIN":
            if data is None:
                self._challenge(request, b"")
                return
            plain = parsePlain(data)
            if plain is None:
                self._reject(request, "PLAIN response is not authzid NUL authcid NUL password")
                return
            authzid, authcid, password = plain
            if authzid and authzid != authcid:
                self.context.noteInvalid(
                    self.framing,
                    "request refused: the authorization identity differs from the login",
                )
                self._answer(
                    request,
                    failLine(command.id, "code=authz_fail", "authz", "reason=" + AUTHZ_REASON),
                )
                return
            self._verify(request, authcid, password)
            return
        # LOGIN: the user name (in the initial response or the first round),
        # then the password; an empty initial response is no user name.
        if request.user is None:
            if initial and not data:
                self._challenge(request, LOGIN_USER_PROMPT)
                return
            if not data:
                self._reject(request, "LOGIN with an empty user name")
                return
            request.user = data
            self._challenge(request, LOGIN_PASSWORD_PROMPT)
            return
        self._verify(request, request.user, data or b"")

    def _challenge(self, request: _Request, challenge: bytes) -> None:
        request.waitingForClient = True
        request.timer = self.context.clock.callLater(CONT_TIMEOUT, self._abandoned, request)
        self.transport.write(contLine(request.command.id, challenge))

    def _abandoned(self, request: _Request) -> None:
        request.timer = None
        if self._current(request):
            # A client can leave many requests waiting: counted into the
            # once-a-minute invalid-request line, not one line each.
            self.context.noteInvalid(
                self.framing, f"a request forgotten: no CONT within {CONT_TIMEOUT:g} s"
            )
            del self._requests[request.command.id]

    def _reject(self, request: _Request, reason: str) -> None:
        # Counted (and so in the metrics) into one log line a minute for the
        # whole daemon, like every other invalid request.
        self.context.noteInvalid(self.framing, f"answered FAIL: {reason}")
        self._answer(request, failLine(request.command.id))

    def _verify(self, request: _Request, authcid: bytes, password: bytes) -> None:
        command = request.command
        try:
            login = authcid.decode("utf-8")
            passwordText = password.decode("utf-8")
        except UnicodeDecodeError:
            self._reject(request, "login or password is not valid UTF-8")
            return
        if not login or not passwordText:
            self._reject(request, "empty login or password")
            return
        split = splitDovecotLogin(login, command.params.get("realm"), self.context.defaultDomain)
        if split is None:
            self._reject(
                request,
                f"login {printable(login)!r} names no domain (no @, no realm= and "
                "no dovecot-default-domain)",
            )
            return
        try:
            identity = canonical(*split)
        except InvalidIdentity as e:
            self._reject(request, f"invalid identity: {e}")
            return
        user, domain = identity.user, identity.domain
        # Answers name the canonical identity, in the form the client used.
        login = identity.jid if "@" in login else user
        request.login = login
        timer = self.context.timer(self.framing, "auth", user, domain)
        work = timer.observe(
            self.context.authenticator.authenticate(
                user, domain, passwordText, peer=command.params.get("rip") or None
            )
        )
        request.work = work
        self.flow.track(work).addCallbacks(
            self._workDone,
            self._workFailed,
            callbackArgs=(request, login),
            errbackArgs=(request,),
        )

    def _current(self, request: _Request) -> bool:
        """
        Whether C{request} is still owed an answer (not cancelled, the
        connection not closed).
        """
        return not self._closed and self._requests.get(request.command.id) is request

    def _workDone(self, result: bool | None, request: _Request, login: str) -> None:
        request.work = None
        if not self._current(request):
            self._closeIfDone()
            return
        requestId = request.command.id
        if result is True:
            self._answer(request, okLine(requestId, login))
        elif result is None:
            self._tempFail(request)
        else:
            # The protocol says user= "should always be sent if the userid is
            # known"; Dovecot does.
            self._answer(request, failLine(requestId, "user=" + login))

    def _workFailed(self, f: Failure, request: _Request) -> None:
        request.work = None
        if not self._current(request):
            self._closeIfDone()
            return
        self.flow.noteFailure(f)
        self._tempFail(request)

    def _tempFail(self, request: _Request) -> None:
        if self._minor == 0:
            # Postfix reads any FAIL as "wrong password" (535); only a lost
            # connection makes it answer 454, "try again later".
            # Aborted (a TCP reset), not closed: after a plain close Postfix's
            # next write on the dead TCP connection would still succeed, its
            # read see the end, and the next login fail too.  After a reset
            # the write fails and Postfix reconnects at once.
            log.info(
                "temporary failure via {framing}: closing the connection of a "
                "protocol 1.0 client (Postfix) so that it fails temporarily",
                framing=self.framing,
            )
            self._close(abort=True)
            return
        self._answer(request, tempFailLine(request.command.id, request.login))

    # -- output and flow control ---------------------------------------------
    def _answer(self, request: _Request, line: bytes) -> None:
        if self._closed:
            return
        if self._requests.get(request.command.id) is request:
            del self._requests[request.command.id]
        request.stopWaiting()
        self.transport.write(line)
        self._closeIfDone()

    def dataReceived(self, data: bytes) -> None:
        self.flow.newTurn()
        super().dataReceived(data)

    def _protocolError(self, reason: str) -> None:
        # Counted into one log line a minute for the whole daemon: a client
        # that reconnects and breaks the protocol again and again must not
        # flood the log.
        self.context.noteInvalid(self.framing, f"broke the protocol: {reason}", closed=True)
        self._close()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocolError(f"a line over {self.MAX_LENGTH} bytes")

    def _close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self.flow.stopReading()
        self.clearLineBuffer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
        self._cancelAll()

    def _cancelAll(self) -> None:
        for r in self._requests.values():
            r.stopWaiting()
        self._requests.clear()
        self.flow.cancelPending()

    def readConnectionLost(self) -> None:
        """
        The client closed its side (C{socat}, C{nc} after a pasted session):
        answer the requests being worked on, then close.  Requests waiting for
        a C{CONT} can get none and are dropped.
        """
        self._eof = True
        for requestId, request in list(self._requests.items()):
            if request.work is None:
                request.stopWaiting()
                del self._requests[requestId]
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        """
        Nobody reads the answers any more: give up.
        """
        self._close()

    def _closeIfDone(self) -> None:
        if self._eof and not self.flow.inFlight():
            self._close()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancelAll()
