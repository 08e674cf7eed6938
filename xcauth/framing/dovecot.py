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

import os
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.framing.base import ServerContext
from xcauth.framing.dovecotcodec import (
    MAX_LINE,
    AuthCommand,
    ProtocolError,
    decodeBase64,
    escape,
    handshake,
    parseAuth,
    parsePlain,
    splitDovecotLogin,
    unescape,
)
from xcauth.framing.dovecotsession import (
    CONT_TIMEOUT,
    MAX_OPEN_FACTOR,
    Action,
    CancelWork,
    Close,
    DovecotSession,
    NoteFailure,
    NoteInvalid,
    Request,
    Reset,
    Send,
    Verify,
)
from xcauth.framing.flow import FlowControl

__all__ = [
    "CONT_TIMEOUT",
    "MAX_LINE",
    "MAX_OPEN_FACTOR",
    "AuthCommand",
    "DovecotProtocol",
    "ProtocolError",
    "decodeBase64",
    "escape",
    "handshake",
    "parseAuth",
    "parsePlain",
    "splitDovecotLogin",
    "unescape",
]

log = Logger()


@implementer(IHalfCloseableProtocol)
class DovecotProtocol(LineReceiver):
    """
    A client of Dovecot's authentication protocol (Postfix, Prosody's
    C{mod_auth_dovecot}): the lines go to its L{DovecotSession}, what the
    session asks for is done here, and its L{FlowControl} bounds the work in
    flight and stops reading while the answers are not read.
    """

    framing = "dovecot"
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    context: ServerContext
    factory: Any
    transport: Any

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.flow = FlowControl(context, self.framing, self)
        self.session = DovecotSession(context, self._run)

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

    def dataReceived(self, data: bytes) -> None:
        self.flow.newTurn()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.flow.stopped:
            return
        self.flow.count()
        self._run(self.session.receive(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._run(self.session.violation(f"a line over {self.MAX_LENGTH} bytes"))

    # -- what the session asks for ---------------------------------------------
    def _run(self, actions: list[Action], failure: Failure | None = None) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.transport.write(action.data)
            elif isinstance(action, Verify):
                self._verify(action)
            elif isinstance(action, CancelWork):
                action.work.cancel()
            elif isinstance(action, NoteInvalid):
                self.context.noteInvalid(self.framing, action.reason, closed=action.closed)
            elif isinstance(action, NoteFailure):
                assert failure is not None
                self.flow.noteFailure(failure)
            elif isinstance(action, Reset):
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
            else:
                assert isinstance(action, Close)
                self._close()

    def _verify(self, verify: Verify) -> None:
        timer = self.context.timer(self.framing, "auth", verify.user, verify.domain)
        work = timer.observe(
            self.context.authenticator.authenticate(
                verify.user, verify.domain, verify.password, peer=verify.peer
            )
        )
        self.session.started(verify.request, work)
        self.flow.track(work).addCallbacks(
            self._workDone,
            self._workFailed,
            callbackArgs=(verify.request,),
            errbackArgs=(verify.request,),
        )

    def _workDone(self, result: bool | None, request: Request) -> None:
        self._run(self.session.workDone(request, result))

    def _workFailed(self, f: Failure, request: Request) -> None:
        self._run(self.session.workFailed(request), f)

    # -- the end ---------------------------------------------------------------
    def _close(self, abort: bool = False) -> None:
        if self.flow.stopped:
            return
        self.flow.stopReading()
        self.clearLineBuffer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
        self._cancelAll()

    def _cancelAll(self) -> None:
        self.session.close()
        self.flow.cancelPending()

    def readConnectionLost(self) -> None:
        """
        The client closed its side (C{socat}, C{nc} after a pasted session):
        answer the requests being worked on, then close.  Requests waiting for
        a C{CONT} can get none and are dropped.
        """
        self._run(self.session.endOfInput())

    def writeConnectionLost(self) -> None:
        """
        Nobody reads the answers any more: give up.
        """
        self._close()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancelAll()
