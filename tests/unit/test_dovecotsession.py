"""
L{xcauth.framing.dovecotsession.DovecotSession} on its own: lines in,
actions out, a L{Clock} for the C{CONT} timeout, no transport.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xcauth.framing.base import ServerContext
from xcauth.framing.dovecotsession import (
    CONT_TIMEOUT,
    MAX_OPEN_FACTOR,
    Action,
    CancelWork,
    Close,
    DovecotSession,
    NoteFailure,
    NoteInvalid,
    Reset,
    Send,
    Verify,
)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def plain(login: str, password: str) -> bytes:
    return b64(f"\0{login}\0{password}")


class Work:
    """
    Stands for the work checking a login.
    """

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SessionTests(SynchronousTestCase):
    hello = (b"VERSION\t1\t1", b"CPID\t42")

    def setUp(self) -> None:
        self.clock = Clock()
        self.context = ServerContext(
            authenticator=None,  # type: ignore[arg-type]
            clock=self.clock,
            maxInFlight=2,
            defaultDomain="example.org",
        )
        self.late: list[Action] = []
        self.session = DovecotSession(self.context, self.late.extend)
        for line in self.hello:
            self.assertEqual(self.session.receive(line), [])

    def verify(self, line: bytes) -> tuple[Verify, Work]:
        """
        Send an C{AUTH} line that asks for a check and start its work.
        """
        [verify] = self.session.receive(line)
        assert isinstance(verify, Verify)
        work = Work()
        self.session.started(verify.request, work)
        return verify, work

    def test_plain(self) -> None:
        """
        PLAIN with an initial response asks for a check of the canonical
        identity (the client's address passed on); the answer names the
        login as the client gave it.
        """
        verify, _ = self.verify(
            b"AUTH\t1\tPLAIN\tservice=smtp\trip=192.0.2.7\tresp=" + plain("Alice@Example.org", "pw")
        )
        self.assertEqual(
            (verify.user, verify.domain, verify.password, verify.peer),
            ("alice", "example.org", "pw", "192.0.2.7"),
        )
        self.assertNotIn("pw", repr(verify))
        self.assertEqual(
            self.session.workDone(verify.request, True),
            [Send(b"OK\t1\tuser=alice@example.org\n")],
        )
        self.assertEqual(self.session.open(), 0)

    def test_wrongPassword(self) -> None:
        verify, _ = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.assertEqual(verify.domain, "example.org")
        self.assertEqual(
            self.session.workDone(verify.request, False), [Send(b"FAIL\t1\tuser=bob\n")]
        )

    def test_login(self) -> None:
        """
        LOGIN asks for the user name, then the password, then the check.
        """
        self.assertEqual(
            self.session.receive(b"AUTH\t7\tLOGIN\tservice=imap"),
            [Send(b"CONT\t7\tVXNlcm5hbWU6\n")],
        )
        self.assertEqual(
            self.session.receive(b"CONT\t7\t" + b64("alice")),
            [Send(b"CONT\t7\tUGFzc3dvcmQ6\n")],
        )
        [verify] = self.session.receive(b"CONT\t7\t" + b64("secret"))
        assert isinstance(verify, Verify)
        self.assertEqual((verify.user, verify.password), ("alice", "secret"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_contTimeout(self) -> None:
        """
        A request left waiting for its C{CONT} is forgotten after
        L{CONT_TIMEOUT}, through the late actions; a later C{CONT} is told it
        timed out.
        """
        self.session.receive(b"AUTH\t3\tLOGIN\tservice=imap")
        self.clock.advance(CONT_TIMEOUT - 1)
        self.assertEqual(self.late, [])
        self.clock.advance(1)
        self.assertEqual(self.late, [NoteInvalid(f"a request forgotten: no CONT within {CONT_TIMEOUT:g} s")])
        self.assertEqual(self.session.open(), 0)
        self.assertEqual(
            self.session.receive(b"CONT\t3\t" + b64("alice")),
            [Send(b"FAIL\t3\treason=Authentication request timed out\n")],
        )

    def test_cancel(self) -> None:
        """
        C{CANCEL} gives the work up; its outcome is then no one's business.
        """
        verify, work = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.assertEqual(self.session.receive(b"CANCEL\t1"), [CancelWork(work)])
        self.assertEqual(self.session.workFailed(verify.request), [])
        self.assertEqual(self.session.open(), 0)

    def test_unexpectedContinuation(self) -> None:
        verify, work = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.assertEqual(
            self.session.receive(b"CONT\t1\t" + b64("x")),
            [Send(b"FAIL\t1\treason=Unexpected continuation\n"), CancelWork(work)],
        )

    def test_workFailed(self) -> None:
        """
        Failed work (the deadline) is a temporary failure, noted.
        """
        verify, _ = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.assertEqual(
            self.session.workFailed(verify.request),
            [
                NoteFailure(),
                Send(
                    b"FAIL\t1\tuser=bob\tcode=temp_fail\ttemp\treason=Temporary "
                    b"authentication failure\n"
                ),
            ],
        )

    def test_tooManyOpen(self) -> None:
        for n in range(1, MAX_OPEN_FACTOR * 2 + 1):
            self.session.receive(b"AUTH\t%d\tLOGIN\tservice=imap" % n)
        actions = self.session.receive(b"AUTH\t99\tLOGIN\tservice=imap")
        self.assertIsInstance(actions[0], NoteInvalid)
        self.assertEqual(actions[1:], [Send(
            b"FAIL\t99\tcode=temp_fail\ttemp\treason=Temporary authentication failure\n"
        )])

    def test_protocolError(self) -> None:
        """
        A broken line closes the connection, counted as invalid; once closed,
        the session answers nothing and leaves no timer.
        """
        self.session.receive(b"AUTH\t1\tLOGIN\tservice=imap")
        actions = self.session.receive(b"HELLO")
        self.assertEqual(
            actions,
            [NoteInvalid("broke the protocol: unknown command 'HELLO'", closed=True), Close()],
        )
        self.session.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.session.receive(b"AUTH\t2\tLOGIN\tservice=imap"), [])

    def test_endOfInput(self) -> None:
        """
        After the client's EOF the work in flight is answered, then the
        connection closes; requests waiting for a C{CONT} are dropped.
        """
        verify, _ = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.session.receive(b"AUTH\t2\tLOGIN\tservice=imap")
        self.assertEqual(self.session.endOfInput(), [])
        self.assertEqual(self.session.open(), 1)
        self.assertEqual(
            self.session.workDone(verify.request, True),
            [Send(b"OK\t1\tuser=bob\n"), Close()],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_endOfInputIdle(self) -> None:
        self.assertEqual(self.session.endOfInput(), [Close()])


class Protocol10Tests(SessionTests):
    """
    A client of protocol 1.0 (Postfix): a temporary failure resets the
    connection instead of a C{FAIL}.
    """

    hello = (b"VERSION\t1\t0", b"CPID\t42")

    def test_workFailed(self) -> None:
        verify, _ = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        self.assertEqual(self.session.workFailed(verify.request), [NoteFailure(), Reset()])

    def test_unavailable(self) -> None:
        verify, _ = self.verify(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + plain("bob", "pw"))
        result: Any = None
        self.assertEqual(self.session.workDone(verify.request, result), [Reset()])


class HandshakeTests(SynchronousTestCase):
    def test_badVersion(self) -> None:
        session = DovecotSession(ServerContext(authenticator=None, clock=Clock()), list)  # type: ignore[arg-type]
        self.assertEqual(
            session.receive(b"VERSION\t2\t0"),
            [NoteInvalid("broke the protocol: the first line is not a VERSION of major version 1",
                         closed=True), Close()],
        )
        self.assertIsNone(session.minor)
