"""
L{xcauth.twistedprivate}: each private name of Twisted that xcauth relies on
still does what xcauth needs, on the Twisted installed (C{make test-oldest}
runs these on the oldest release setup.cfg admits and on Debian 13's).
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from xcauth import twistedprivate


class _RecordingEndpoint:
    """
    A client endpoint that records the factory it is asked to connect.
    """

    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


class ConnectionPoolTests(SynchronousTestCase):
    def test_newConnectionsQuiet(self) -> None:
        """
        A pool made quiet connects with a factory that does not log its
        start and stop; an untouched pool's factory does (so the test would
        notice a Twisted release where the switch stopped working).
        """
        for quiet in (True, False):
            pool = HTTPConnectionPool(MemoryReactorClock(), persistent=True)
            if quiet:
                twistedprivate.quietConnectionPool(pool)
            endpoint = _RecordingEndpoint()
            pool.getConnection(("http", b"127.0.0.1", 80), endpoint)
            (factory,) = endpoint.factories
            self.assertEqual(factory.noisy, not quiet)

    def test_requestNotSentIsTheOneTwistedRaises(self) -> None:
        """
        The C{RequestNotSent} offered is the class Twisted's HTTP client
        raises for a request on a connection that died while idle.
        """
        from twisted.web import _newclient

        self.assertIs(twistedprivate.RequestNotSent, _newclient.RequestNotSent)
        source = inspect.getsource(_newclient.HTTP11ClientProtocol.request)
        self.assertIn("RequestNotSent", source)


class RunnerTests(SynchronousTestCase):
    def test_hooksOverrideTwistdsOwn(self) -> None:
        """
        The runner's hooks replace methods twistd's Unix runner has (a
        release that renamed them would make the overrides dead code).
        """
        from twisted.scripts._twistd_unix import UnixApplicationRunner

        Runner = twistedprivate.startReportingRunner(
            lambda e: b"1 x", lambda fd: 0, lambda options, e: None, SystemExit)
        for name in ("_formatChildException", "_waitForStart", "postApplication"):
            self.assertTrue(callable(getattr(UnixApplicationRunner, name, None)), name)
            self.assertIsNot(getattr(Runner, name), getattr(UnixApplicationRunner, name))

    def test_waitForStartCalledWithThePipe(self) -> None:
        """
        twistd's parent process calls the wait hook with the status pipe's
        read end, and its status is what the hook returns.
        """
        from twisted.scripts._twistd_unix import UnixApplicationRunner

        self.assertIn("_waitForStart(", inspect.getsource(UnixApplicationRunner.daemonize))
        seen: list[int] = []
        Runner = twistedprivate.startReportingRunner(
            lambda e: b"", lambda fd: seen.append(fd) or 7, lambda o, e: None, SystemExit)
        runner = Runner(twistedprivate.serverOptions()())
        self.assertEqual(runner._waitForStart(42), 7)
        self.assertEqual(seen, [42])

    def test_noSignalNoExit(self) -> None:
        """
        After a run that no signal ended, nothing happens; the name twistd
        uses to end with the signal exists.
        """
        from twisted.application import app

        class Ran:
            _exitSignal = None

        twistedprivate.endWithTwistdSignal(Ran())
        self.assertTrue(callable(app._exitWithSignal))
        self.assertIn("_exitSignal", inspect.getsource(app.ApplicationRunner.startReactor))


class LogFileTests(SynchronousTestCase):
    def test_twistdsOwnHandler(self) -> None:
        """
        The log file twistd opens for C{--logfile} (its Unix logger, as
        twistd runs it) is found.
        """
        from twisted.scripts._twistd_unix import UnixAppLogger

        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = os.path.abspath(self.mktemp())
        UnixAppLogger({"logfile": path, "nodaemon": False})._getLogObserver()
        logFile = twistedprivate.twistdLogFile()
        self.assertIsInstance(logFile, LogFile)
        assert logFile is not None
        self.addCleanup(logFile.close)
        self.assertEqual(os.path.abspath(logFile.path), path)

    def test_noneWithoutHandler(self) -> None:
        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        self.assertIsNone(twistedprivate.twistdLogFile())


class ForeignUNIXPortTests(SynchronousTestCase):
    def listening(self) -> tuple[str, socket.socket]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "s")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(5)
        return path, s

    def test_fileLeftAlone(self) -> None:
        """
        Started and stopped, the port neither changes the socket file's mode
        nor removes the file (Twisted's own port does both).
        """
        from twisted.internet import reactor

        path, s = self.listening()
        port = twistedprivate.adoptForeignUNIXPort(reactor, s.fileno(), Factory.forProtocol(Protocol))
        port.startListening()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        port.stopListening()
        self.assertTrue(os.path.exists(path))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_twistdsPortWouldChmod(self) -> None:
        """
        The control: Twisted's own adopted port makes the file world-writable,
        which is what the foreign port prevents (if a Twisted release stops
        doing so, the workaround can go).
        """
        from twisted.internet import reactor, unix

        path, s = self.listening()
        port = unix.Port._fromListeningDescriptor(reactor, s.fileno(), Factory.forProtocol(Protocol))
        port.startListening()
        self.addCleanup(port.stopListening)
        if os.stat(path).st_mode & 0o777 != 0o666:
            raise SkipTest("this Twisted leaves adopted UNIX sockets' modes alone "
                           "(twisted#10261 fixed): ForeignUNIXPort is no longer needed")


class ListeningPortTests(SynchronousTestCase):
    def test_portOfAListeningService(self) -> None:
        """
        A started endpoint service's port is found (its address is what the
        daemon logs); before it starts, there is none.
        """
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint

        service = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), Factory.forProtocol(Protocol))
        self.assertIsNone(twistedprivate.listeningPort(service))
        service.privilegedStartService()
        port = twistedprivate.listeningPort(service)
        self.assertIsNotNone(port)
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        self.assertNotEqual(port.getHost().port, 0)
