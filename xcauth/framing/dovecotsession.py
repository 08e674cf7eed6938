"""
The requests of one Dovecot authentication connection, without I/O: a state
machine fed the client's lines (the handshake, C{AUTH}, C{CONT}, C{CANCEL})
and the results of the work it asked for, returning what is to be done
(L{Send} a line, L{Verify} a login, L{CancelWork}, L{NoteInvalid}, L{Close},
L{Reset}).  Its only outside contact is the clock, for the time a request
waits for the client's C{CONT}.  L{xcauth.framing.dovecot.DovecotProtocol}
drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, Union

import attr
from twisted.internet.interfaces import IDelayedCall

from xcauth.framing.base import ServerContext
from xcauth.framing.dovecotcodec import (
    AUTHZ_REASON,
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USER_PROMPT,
    MAJOR_VERSION,
    AuthCommand,
    ProtocolError,
    contLine,
    decodeBase64,
    failLine,
    okLine,
    parseAuth,
    parseCPID,
    parseId,
    parsePlain,
    parseVersion,
    safeName,
    splitDovecotLogin,
    splitFields,
    tempFailLine,
    unescape,
)
from xcauth.identity import InvalidIdentity, canonical
from xcauth.text import printable

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


class Cancellable(Protocol):
    """
    The work checking a login, as the session keeps it (a L{Deferred}).
    """

    def cancel(self) -> None:
        """
        Give the work up.
        """


@attr.s(auto_attribs=True, eq=False)
class Request:
    """
    A request in flight: waiting for the client (C{CONT}) or for the work.
    """

    command: AuthCommand
    #: LOGIN's user name, once the client sent it.
    user: bytes | None = attr.ib(default=None, repr=False)
    #: The login being checked (for the answer).
    login: str | None = None
    waitingForClient: bool = False
    work: Cancellable | None = None
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


@attr.s(frozen=True, auto_attribs=True)
class Send:
    """
    Write C{data} to the client.
    """

    data: bytes


@attr.s(frozen=True, auto_attribs=True)
class Verify:
    """
    Check a login: start the work, hand it to L{DovecotSession.started}, and
    its outcome to L{DovecotSession.workDone} or L{DovecotSession.workFailed}.
    """

    request: Request
    user: str
    domain: str
    password: str = attr.ib(repr=False)
    #: The client's address (C{rip=}), if it gave one.
    peer: str | None = None


@attr.s(frozen=True, auto_attribs=True)
class CancelWork:
    """
    Cancel work whose answer is no longer wanted.
    """

    work: Cancellable


@attr.s(frozen=True, auto_attribs=True)
class NoteInvalid:
    """
    Count an invalid request (and, with C{closed}, a connection closed for
    it) in the daemon's rate-limited log; the reason is safe to log.
    """

    reason: str
    closed: bool = False


@attr.s(frozen=True, auto_attribs=True)
class Close:
    """
    Close the connection (and call L{DovecotSession.close}).
    """


@attr.s(frozen=True, auto_attribs=True)
class Reset:
    """
    A temporary failure for a client of protocol 1.0 (Postfix, which reads
    any C{FAIL} as a wrong password): reset the connection instead of
    answering (and call L{DovecotSession.close}).
    """


@attr.s(frozen=True, auto_attribs=True)
class NoteFailure:
    """
    Count and log the failure of the work (the deadline, or an error) whose
    outcome was just reported.
    """


Action = Union[Send, Verify, CancelWork, NoteInvalid, Close, Reset, NoteFailure]


class DovecotSession:
    """
    The state of one connection's requests.

    @param context: the server context, for the clock (the C{CONT} timeout),
        C{maxInFlight} (the bound on open requests) and C{defaultDomain}, read
        when needed; nothing else of it is used.
    @param late: receives what is to be done when a timer expires (outside
        any call of the session's).
    """

    def __init__(
        self, context: ServerContext, late: Callable[[list[Action]], None]
    ) -> None:
        self.context = context
        self._late = late
        self._requests: dict[int, Request] = {}
        self._out: list[Action] = []
        self._minor: int | None = None
        self._cpid: int | None = None
        self._closed = False
        #: The client closed its side.
        self._eof = False
        #: Requests whose work is in flight.
        self._working = 0

    @property
    def minor(self) -> int | None:
        """
        The client's protocol minor version, once it sent its C{VERSION}.
        """
        return self._minor

    def open(self) -> int:
        """
        The requests open: waiting for the client or for their work.
        """
        return len(self._requests)

    def _collect(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # -- the client's lines --------------------------------------------------
    def receive(self, line: bytes) -> list[Action]:
        """
        One line from the client (without its LF).
        """
        if not self._closed:
            self._receive(line)
        return self._collect()

    def _receive(self, line: bytes) -> None:
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
            self._protocolError(f"unknown command {safeName(command)}")

    def violation(self, reason: str) -> list[Action]:
        """
        The client broke the protocol outside a line (a line too long).
        """
        self._protocolError(reason)
        return self._collect()

    def _protocolError(self, reason: str) -> None:
        # Counted into one log line a minute for the whole daemon: a client
        # that reconnects and breaks the protocol again and again must not
        # flood the log.
        self._out += [NoteInvalid(f"broke the protocol: {reason}", closed=True), Close()]

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
            self._out.append(NoteInvalid(
                f"a client has {len(self._requests)} requests open (most waiting "
                "for its CONT); another refused for now"
            ))
            self._out.append(Send(tempFailLine(parsed.id)))
            return
        request = Request(parsed)
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
        requestId = parseId(idText)
        if requestId is None or not tab:
            self._protocolError("broken CONT line")
            return
        request = self._requests.get(requestId)
        if request is None:
            self._out.append(Send(failLine(requestId, "reason=Authentication request timed out")))
            return
        if not request.waitingForClient:
            work, request.work = request.work, None
            self._answer(request, failLine(requestId, "reason=Unexpected continuation"))
            if work is not None:
                self._out.append(CancelWork(work))
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
        requestId = parseId(rest)
        if requestId is None:
            self._protocolError("broken CANCEL line")
            return
        request = self._requests.pop(requestId, None)
        if request is not None:
            request.stopWaiting()
        if request is not None and request.work is not None:
            work, request.work = request.work, None
            self._out.append(CancelWork(work))

    # -- mechanisms --------------------------------------------------------
    def _step(self, request: Request, data: bytes | None, initial: bool = True) -> None:
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
                self._out.append(NoteInvalid(
                    "request refused: the authorization identity differs from the login"
                ))
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

    def _challenge(self, request: Request, challenge: bytes) -> None:
        request.waitingForClient = True
        request.timer = self.context.clock.callLater(CONT_TIMEOUT, self._abandoned, request)
        self._out.append(Send(contLine(request.command.id, challenge)))

    def _abandoned(self, request: Request) -> None:
        request.timer = None
        if self._current(request):
            # A client can leave many requests waiting: counted into the
            # once-a-minute invalid-request line, not one line each.
            del self._requests[request.command.id]
            self._late([NoteInvalid(f"a request forgotten: no CONT within {CONT_TIMEOUT:g} s")])

    def _reject(self, request: Request, reason: str) -> None:
        # Counted (and so in the metrics) into one log line a minute for the
        # whole daemon, like every other invalid request.
        self._out.append(NoteInvalid(f"answered FAIL: {reason}"))
        self._answer(request, failLine(request.command.id))

    def _verify(self, request: Request, authcid: bytes, password: bytes) -> None:
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
        request.login = identity.jid if "@" in login else user
        self._out.append(
            Verify(request, user, domain, passwordText, command.params.get("rip") or None)
        )

    # -- the work's outcome --------------------------------------------------
    def started(self, request: Request, work: Cancellable) -> None:
        """
        The work of a L{Verify} has started (its outcome follows, at once or
        later).
        """
        request.work = work
        self._working += 1

    def _current(self, request: Request) -> bool:
        """
        Whether C{request} is still owed an answer (not cancelled, the
        connection not closed).
        """
        return not self._closed and self._requests.get(request.command.id) is request

    def workDone(self, request: Request, result: Any) -> list[Action]:
        """
        The work of C{request} fired with C{result}: C{True}, C{False} or
        C{None} (unavailable).
        """
        request.work = None
        self._working -= 1
        if not self._current(request):
            self._closeIfDone()
            return self._collect()
        requestId = request.command.id
        login = request.login
        assert login is not None
        if result is True:
            self._answer(request, okLine(requestId, login))
        elif result is None:
            self._tempFail(request)
        else:
            # The protocol says user= "should always be sent if the userid is
            # known"; Dovecot does.
            self._answer(request, failLine(requestId, "user=" + login))
        return self._collect()

    def workFailed(self, request: Request) -> list[Action]:
        """
        The work of C{request} failed (the deadline, an error, a
        cancellation).
        """
        request.work = None
        self._working -= 1
        if not self._current(request):
            self._closeIfDone()
            return self._collect()
        self._out.append(NoteFailure())
        self._tempFail(request)
        return self._collect()

    def _tempFail(self, request: Request) -> None:
        if self._minor == 0:
            # Postfix reads any FAIL as "wrong password" (535); only a lost
            # connection makes it answer 454, "try again later".
            self._out.append(Reset())
            return
        self._answer(request, tempFailLine(request.command.id, request.login))

    def _answer(self, request: Request, line: bytes) -> None:
        if self._closed:
            return
        if self._requests.get(request.command.id) is request:
            del self._requests[request.command.id]
        request.stopWaiting()
        self._out.append(Send(line))
        self._closeIfDone()

    # -- the end ---------------------------------------------------------------
    def endOfInput(self) -> list[Action]:
        """
        The client closed its side: the requests being worked on are still
        answered, then the connection closes.  Requests waiting for a
        C{CONT} can get none and are dropped.
        """
        self._eof = True
        for requestId, request in list(self._requests.items()):
            if request.work is None:
                request.stopWaiting()
                del self._requests[requestId]
        self._closeIfDone()
        return self._collect()

    def _closeIfDone(self) -> None:
        if self._eof and not self._working and not self._closed:
            self._out.append(Close())

    def close(self) -> None:
        """
        The connection is closing or lost: no request is owed an answer any
        more, and no timer is left (the work is cancelled with the
        connection's other pending work).
        """
        self._closed = True
        for r in self._requests.values():
            r.stopWaiting()
        self._requests.clear()
