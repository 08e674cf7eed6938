"""
Unit tests of running as a system daemon: L{Hub.reload}, the L{Reloader},
the signal handlers, draining connections at a stop, the twistd plugin's
service tree and start-up checks, and the start errors passed to twistd's
waiting parent.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from xcauth.daemon.config import Config, ConfigError
from xcauth.daemon.drain import drainConnections
from xcauth.daemon.hub import Hub, buildHub
from xcauth.daemon.main import StartError, formatStartError, statusMessage
from xcauth.daemon.reload import Reloader, SignalService
from xcauth.daemon.service import XcauthService
from xcauth.daemon.tap import Options, loadAgain, makeService
from xcauth.state import database as store

BASE = "url=http://old.example/api\nsecret=old-secret\nlisten=tcp:0:interface=127.0.0.1\n"


class ConfigFiles:
    """
    Write config files in a test's temporary directory and parse them as the
    twistd plugin does.
    """

    mktemp: Any

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def options(self, text: str, *args: str) -> Options:
        options = Options()
        options.parseOptions(["-c", self.write(text), *args])
        return options

    def config(self, text: str) -> Config:
        return self.options(text).config


class HubReloadTests(ConfigFiles, SynchronousTestCase):
    """
    L{Hub.reload} swaps what can change in place.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.hub = buildHub(self.config(BASE + "cache-storage=memory\n"), self.reactor)

    def test_everySwappablePart(self) -> None:
        context, domains, cache = self.hub.context, self.hub.domains, self.hub.cache
        assert cache is not None
        oldClient = domains.settingsFor("example.org").client
        restart = self.hub.reload(self.config(
            "url=http://new.example/api\nsecret=new-secret,old-secret\n"
            "listen=tcp:0:interface=127.0.0.1\ncache-storage=memory\ntimeout=2,3\n"
            "deadline=1.5\nmax-in-flight=7\ncache-query-ttl=2m\n"
            "cache-verification-ttl=3h\ncache-unreachable-ttl=4d\ndebug\n"
        ))
        self.assertEqual(restart, [])
        settings = domains.settingsFor("example.org")
        self.assertEqual(settings.secrets, (b"new-secret", b"old-secret"))
        client: Any = settings.client
        self.assertIsNot(client, oldClient)
        self.assertEqual(client.url, "http://new.example/api")
        self.assertEqual(client._http.timeout, 3.0)
        self.assertIs(self.hub.context, context)
        self.assertEqual((context.deadline, context.maxInFlight, context.debug), (1.5, 7, True))
        self.assertIs(self.hub.cache, cache)
        self.assertEqual(
            (cache.policy.queryTTL, cache.policy.verificationTTL, cache.policy.unreachableTTL),
            (120.0, 3 * 3600.0, 4 * 86400.0),
        )
        self.assertTrue(cache.debug)
        authenticator: Any = self.hub.authenticator
        self.assertTrue(authenticator.debug)

    def test_connectTimeoutNewPool(self) -> None:
        """
        A new connect timeout needs a new agent; the old pool is kept to be
        closed when the hub stops.
        """
        pool = self.hub.pool
        self.hub.reload(self.config(BASE + "cache-storage=memory\ntimeout=2,20\n"))
        self.assertIs(self.hub.pool, pool)
        self.hub.reload(self.config(BASE + "cache-storage=memory\ntimeout=1,20\n"))
        self.assertIsNot(self.hub.pool, pool)
        self.assertEqual(self.hub._oldPools, [pool])

    def test_domainsRebuilt(self) -> None:
        """
        Domains of the table without their own URL or secret follow the new
        global settings; their own settings stay.
        """
        self.hub.domains.apply([
            store.DomainRow("plain.org", None, None, None),
            store.DomainRow("own.org", "own-secret", "http://own.example/api", "o.org"),
        ])
        self.hub.reload(self.config(
            "url=http://new.example/api\nsecret=new-secret\n"
            "listen=tcp:0:interface=127.0.0.1\ncache-storage=memory\n"
        ))
        plain: Any = self.hub.domains.settingsFor("plain.org")
        own: Any = self.hub.domains.settingsFor("own.org")
        self.assertEqual((plain.client.url, plain.secrets),
                         ("http://new.example/api", (b"new-secret",)))
        self.assertEqual((own.client.url, own.secrets, own.authDomain),
                         ("http://own.example/api", (b"own-secret",), "o.org"))

    def test_restartSettings(self) -> None:
        """
        The database, the cache storage and its bcrypt costs need a restart:
        they are reported and keep their running value.
        """
        restart = self.hub.reload(self.config(
            BASE + "cache-storage=none\ndb=/tmp/other.sqlite3\ncache-bcrypt-rounds=10\n"
        ))
        self.assertEqual(restart, ["db", "cache-storage", "cache-bcrypt-rounds"])
        assert self.hub.config is not None
        self.assertEqual(self.hub.config.cacheStorage, "memory")
        self.assertEqual(self.hub.config.db, "/var/lib/xcauth/xcauth.sqlite3")


class ReloaderTests(ConfigFiles, SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.options = self.options(BASE)
        self.hub = buildHub(self.options.config, self.reactor)
        self.reopened: list[bool] = []
        self.refreshed: list[bool] = []
        # The table is re-read in the database thread: not here.
        self.patch(self.hub.domains, "refresh", lambda: self.refreshed.append(True))
        self.path = self.options["config-file"]

    def reloader(self) -> Reloader:
        return Reloader(
            self.hub, lambda: loadAgain(self.options.argv), self.options.listeners,
            reopenLog=lambda: self.reopened.append(True),
        )

    def rewrite(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_applies(self) -> None:
        self.rewrite(BASE.replace("old-secret", "new-secret"))
        with capturedLogs() as events:
            self.assertTrue(self.reloader().reload())
        self.assertEqual(self.hub.domains.settingsFor("x").secrets, (b"new-secret",))
        self.assertEqual((self.reopened, self.refreshed), ([True], [True]))
        self.assertIn(f"configuration reloaded from {self.path}",
                      [e["log_format"].format(**e) for e in events])
        self.assertFalse(any("new-secret" in repr(e) for e in events))

    def test_invalidKeepsRunning(self) -> None:
        self.rewrite(BASE.replace("old-secret", "new-secret") + "deadline=never\n")
        with capturedLogs() as events:
            self.assertFalse(self.reloader().reload())
        self.assertEqual(self.hub.domains.settingsFor("x").secrets, (b"old-secret",))
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(
            errors[0]["log_format"].format(**errors[0]),
            "reload failed, the running configuration stays in force: "
            "deadline 'never' is not valid: give a positive number of seconds",
        )
        # The log file is reopened even when the configuration is wrong.
        self.assertEqual((self.reopened, self.refreshed), ([True], []))

    def test_demoSecretRefused(self) -> None:
        self.rewrite(BASE.replace("old-secret", "demo-secret-change-me"))
        with capturedLogs():
            self.assertFalse(self.reloader().reload())
        self.assertEqual(self.hub.domains.settingsFor("x").secrets, (b"old-secret",))

    def test_listenersChanged(self) -> None:
        self.rewrite(BASE.replace("tcp:0:", "tcp:1:"))
        with capturedLogs() as events:
            self.assertTrue(self.reloader().reload())
        warnings = [e["log_format"].format(**e) for e in events
                    if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("the listeners changed (now: generic=tcp:1:interface=127.0.0.1)",
                      warnings[0])
        self.assertIn("until a restart", warnings[0])

    def test_missingFile(self) -> None:
        os.unlink(self.path)
        with capturedLogs() as events:
            self.assertFalse(self.reloader().reload())
        self.assertIn("cannot read config file", repr(events))


class FakeSignalReactor:
    def __init__(self) -> None:
        self.whenRunning: list[Any] = []
        self.fromThread: list[Any] = []
        self.stops = 0

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        self.whenRunning.append((f, a))

    def callFromThread(self, f: Any, *a: Any) -> None:
        self.fromThread.append((f, a))

    def stop(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()


class SignalServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeSignalReactor()
        self.installed: dict[int, Any] = {}
        self.reloads: list[bool] = []
        self.service = SignalService(
            self.reactor, lambda: self.reloads.append(True),
            install=lambda signum, handler: self.installed.__setitem__(signum, handler),
        )

    def test_installedWhenRunning(self) -> None:
        self.service.startService()
        self.assertEqual(self.installed, {})
        for f, a in self.reactor.whenRunning:
            f(*a)
        self.assertEqual(sorted(self.installed), sorted([signal.SIGHUP, signal.SIGTERM]))

    def test_handlersOnlySchedule(self) -> None:
        """
        A handler does no work: it schedules it on the reactor thread.
        """
        self.service._install()
        with capturedLogs():
            self.installed[signal.SIGHUP](signal.SIGHUP, None)
            self.assertEqual(self.reloads, [])
            self.installed[signal.SIGTERM](signal.SIGTERM, None)
            self.assertEqual(self.reactor.stops, 0)
            for f, a in self.reactor.fromThread:
                f(*a)
            self.assertEqual(self.reloads, [True])
            self.assertEqual(self.reactor.stops, 1)
            # A second SIGTERM while stopping is harmless.
            self.installed[signal.SIGTERM](signal.SIGTERM, None)
            f, a = self.reactor.fromThread[-1]
            f(*a)
        self.assertEqual(self.reactor.stops, 2)


class Transport(StringTransport):
    disconnected = False
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class Connection:
    def __init__(self) -> None:
        self.transport = Transport()
        self.asked = 0
        self.lost = 0

    def closeWhenAnswered(self) -> None:
        self.asked += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.transport.disconnected = True
        self.lost += 1


class Auto:
    """
    Like C{EjabberdAutoProtocol} before its first byte: no inner protocol.
    """

    inner = None

    def __init__(self) -> None:
        self.transport = Transport()

    def connectionLost(self, reason: Any = None) -> None:
        self.transport.disconnected = True


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.results: list[int] = []

    def drain(self, connections: list[Any], timeout: float = 6) -> None:
        drainConnections(connections, self.clock, timeout).addCallback(self.results.append)

    def test_waitsForEveryConnection(self) -> None:
        a, b = Connection(), Connection()
        self.drain([a, b])
        self.assertEqual((a.asked, b.asked), (1, 1))
        self.clock.advance(1)
        a.connectionLost()
        self.clock.advance(1)
        self.assertEqual(self.results, [])
        b.connectionLost()
        self.assertEqual(self.results, [0])
        self.assertFalse(a.transport.aborted or b.transport.aborted)
        # The protocol's own connectionLost ran, once.
        self.assertEqual((a.lost, b.lost), (1, 1))

    def test_doneWhenLastCloses(self) -> None:
        """
        The drain fires when the last connection's connectionLost runs, in
        whatever order they close, without the clock moving; its timeout is
        cancelled.
        """
        a, b, c = Connection(), Connection(), Connection()
        self.drain([a, b, c])
        for connection in (b, c):
            connection.connectionLost()
            self.assertEqual(self.results, [])
        a.connectionLost()
        self.assertEqual(self.results, [0])
        self.assertEqual(self.clock.seconds(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedOnesIgnored(self) -> None:
        closed = Connection()
        closed.transport.disconnected = True
        self.drain([closed])
        self.assertEqual((closed.asked, self.results), (0, [0]))

    def test_timeoutAborts(self) -> None:
        a, b = Connection(), Connection()
        self.drain([a, b], timeout=6)
        a.connectionLost()
        self.clock.pump([1] * 5)
        self.assertEqual(self.results, [])
        self.clock.advance(1)
        self.assertEqual(self.results, [1])
        self.assertTrue(b.transport.aborted)
        self.assertFalse(a.transport.aborted)

    def test_idleAutoProtocolClosed(self) -> None:
        auto = Auto()
        self.drain([auto])
        self.assertTrue(auto.transport.disconnecting)
        auto.connectionLost()
        self.assertEqual(self.results, [0])

    def test_realProtocol(self) -> None:
        """
        With the real ejabberd protocol: the answer in flight is sent, then
        the connection closes; nothing more is read.
        """
        from xcauth.framing.base import ServerContext, XcauthFactory
        from xcauth.framing.ejabberd import EjabberdProtocol

        work: Deferred[bool | None] = Deferred()

        class Authenticator:
            def authenticate(self, *a: Any, **k: Any) -> Deferred[bool | None]:
                return work

        factory = XcauthFactory(
            EjabberdProtocol, ServerContext(Authenticator(), self.clock)  # type: ignore[arg-type]
        )
        p = factory.buildProtocol(None)
        transport = Transport()
        p.makeConnection(transport)
        self.assertEqual(list(factory.connections), [p])
        p.dataReceived(b"\x00\x0fauth:a:b.org:pw")
        self.drain(list(factory.connections))
        self.assertFalse(transport.disconnecting)
        work.callback(True)
        self.assertEqual(transport.value(), b"\x00\x02\x00\x01")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.results, [])
        # The transport closes: the drain is over at once.
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.results, [0])


class MakeServiceTests(ConfigFiles, SynchronousTestCase):
    """
    The twistd plugin's service tree, like twisted.web's test_tap.
    """

    def test_tree(self) -> None:
        options = self.options(
            BASE + "listen=postfix=tcp:0:interface=127.0.0.1\n", "--listen",
            "ejabberd=tcp:0:interface=127.0.0.1", "--listen", "prosody=tcp6:0:interface=\\:\\:1",
        )
        service = makeService(options, reactor=MemoryReactorClock())
        self.assertIsInstance(service, XcauthService)
        assert isinstance(service, XcauthService)
        names = [IService(s).name for s in service]
        self.assertEqual(names, [None, "ejabberd=tcp:0:interface=127.0.0.1",
                                 "prosody=tcp6:0:interface=\\:\\:1", "signals"])
        self.assertIsInstance(list(service)[0], Hub)
        self.assertIs(service.hub.config, options.config)
        self.assertEqual([f.protocol.__name__ for f in service.factories],
                         ["EjabberdAutoProtocol", "XMPPLineProtocol"])
        signals = service.getServiceNamed("signals")
        assert isinstance(signals, SignalService)
        # SIGHUP reloads the file of these options, with the same command line.
        reloader: Any = signals.onHangup.__self__
        self.assertIsInstance(reloader, Reloader)
        self.assertEqual(reloader.listeners, options.listeners)

    def test_argvKept(self) -> None:
        options = self.options(BASE, "--deadline", "3")
        self.assertEqual(options.argv[-2:], ["--deadline", "3"])
        config, listeners = loadAgain(options.argv)
        self.assertEqual(config.deadline, 3.0)
        self.assertEqual(listeners, options.listeners)


class OptionTests(ConfigFiles, SynchronousTestCase):
    def test_demoSecret(self) -> None:
        text = BASE.replace("old-secret", "demo-secret-change-me")
        with self.assertRaises(SystemExit) as e:
            self.options(text)
        self.assertIn("xcauth: secret is the demo secret of the sample config file: set "
                      "secret=", str(e.exception))
        self.assertEqual(self.options(text, "--demo").config.secrets,
                         (b"demo-secret-change-me",))

    def test_rotatingAwayFromDemoSecret(self) -> None:
        with self.assertRaises(SystemExit):
            self.options(BASE.replace("old-secret", "new,demo-secret-change-me"))

    def test_missingSocketDirectory(self) -> None:
        missing = os.path.abspath(self.mktemp())
        with self.assertRaises(SystemExit) as e:
            self.options(BASE, "--listen", f"prosody=unix:{missing}/prosody.sock:mode=660")
        self.assertEqual(
            str(e.exception),
            f"xcauth: listen 'unix:{missing}/prosody.sock:mode=660': the directory "
            f"{missing} does not exist (create it, or with systemd set RuntimeDirectory=)",
        )

    def test_loadAgainRaisesConfigError(self) -> None:
        self.assertRaises(ConfigError, loadAgain, ["-c", "/nonexistent/xcauth.conf"])


class StartErrorTests(SynchronousTestCase):
    def test_bothKinds(self) -> None:
        """
        twistd's start reports an L{Exception} through its status pipe; the
        process ends with the message of a L{SystemExit}.
        """
        e = StartError("xcauth: cannot start a listener: boom")
        self.assertIsInstance(e, Exception)
        self.assertIsInstance(e, SystemExit)
        self.assertEqual(str(e), "xcauth: cannot start a listener: boom")

    def test_statusPipe(self) -> None:
        data = formatStartError(StartError("xcauth: cannot start a listener: " + "x" * 300))
        self.assertTrue(data.startswith(b"1 xcauth: cannot start"))
        self.assertEqual(statusMessage(data), "xcauth: cannot start a listener: " + "x" * 300)
        self.assertIsNone(statusMessage(b"0"))
        self.assertEqual(statusMessage(formatStartError(ValueError("bad"))),
                         "xcauth: ValueError: bad")
        self.assertIn("ended during its start", statusMessage(b"") or "")

    def test_listenerErrorIsStartError(self) -> None:
        service = XcauthService.__new__(XcauthService)
        with self.assertRaises(StartError) as e:
            service._cannotListen(OSError("in use"))
        self.assertEqual(str(e.exception), "xcauth: cannot start a listener: in use")


class LogRequestsTests(ConfigFiles, SynchronousTestCase):
    """
    C{--log-requests all|failures|none}: which requests get their info line.
    """

    def logged(self, which: str, results: list[object]) -> list[str]:
        from xcauth.framing.base import RequestTimer

        with capturedLogs() as events:
            for result in results:
                RequestTimer(Clock(), "ejabberd", "auth", "alice", "example.org", which)(result)
        return [e["log_format"].format(**e).split(" via ")[0] for e in events]

    def test_wholeLine(self) -> None:
        """
        The line as twisted.logger formats it, with a user name holding what
        a format string would read as fields (taken literally) and control
        characters (escaped); the fields are in the event too.
        """
        from twisted.logger import formatEvent

        from xcauth.framing.base import RequestTimer

        clock = Clock()
        with capturedLogs() as events:
            timer = RequestTimer(clock, "prosody", "auth", "{user}\x1b[2J", "example.org")
            clock.advance(0.0123)
            timer(False)
        [event] = events
        self.assertEqual(formatEvent(event),
                         "auth false for {user}\\x1b[2J@example.org via prosody in 12.3 ms")
        self.assertEqual((event["operation"], event["result"], event["domain"], event["ms"]),
                         ("auth", "false", "example.org", 12.3))

    def test_modes(self) -> None:
        results: list[object] = [True, False, None, b"[]", "error", "cancelled"]
        self.assertEqual(self.logged("all", results), [
            "auth true for alice@example.org", "auth false for alice@example.org",
            "auth unavailable for alice@example.org", "auth 2 bytes for alice@example.org",
            "auth error for alice@example.org", "auth cancelled for alice@example.org",
        ])
        self.assertEqual(self.logged("failures", results), [
            "auth false for alice@example.org", "auth unavailable for alice@example.org",
            "auth error for alice@example.org", "auth cancelled for alice@example.org",
        ])
        self.assertEqual(self.logged("none", results), [])

    def test_option(self) -> None:
        self.assertEqual(self.config(BASE).logRequests, "failures")
        config = self.config(BASE + "log-requests=all\n")
        self.assertEqual(config.logRequests, "all")
        hub = buildHub(config, MemoryReactorClock())
        self.assertEqual(hub.context.logRequests, "all")
        self.assertEqual(hub.context.timer("prosody", "auth", "a", "b").which, "all")
        hub.reload(self.config(BASE + "log-requests=none\n"))
        self.assertEqual(hub.context.timer("prosody", "auth", "a", "b").which, "none")
        with self.assertRaises(SystemExit) as e:
            self.config(BASE + "log-requests=some\n")
        self.assertIn("log-requests 'some' is not valid: use one of all, failures, none",
                      str(e.exception))


class ReopenLogTests(SynchronousTestCase):
    """
    The log file twistd opened for C{--logfile}, found through its SIGUSR1
    handler, is reopened under its name.
    """

    def installTwistdHandler(self, path: str) -> Any:
        from twisted.python.logfile import LogFile

        logFile = LogFile.fromFullPath(path)
        self.addCleanup(logFile.close)

        def rotateLog(signum: int, frame: Any) -> None:  # as twistd's UnixAppLogger
            logFile.rotate()

        previous = signal.signal(signal.SIGUSR1, rotateLog)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        return logFile

    def test_reopened(self) -> None:
        from xcauth.daemon.reload import reopenTwistdLog
        from xcauth.twistedprivate import twistdLogFile

        path = os.path.abspath(self.mktemp())
        logFile = self.installTwistdHandler(path)
        self.assertIs(twistdLogFile(), logFile)
        logFile.write("before\n")
        os.rename(path, path + ".1")
        with capturedLogs():
            self.assertEqual(reopenTwistdLog(), path)
        logFile.write("after\n")
        logFile.flush()
        with open(path) as f:
            self.assertEqual(f.read(), "after\n")
        with open(path + ".1") as f:
            self.assertEqual(f.read(), "before\n")

    def test_noLogFile(self) -> None:
        from xcauth.daemon.reload import reopenTwistdLog

        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        self.assertIsNone(reopenTwistdLog())

    def test_reloadFailureLogged(self) -> None:
        """
        An unexpected error while applying is logged; the reload reports failure.
        """

        class Hub:
            def reload(self, config: Any) -> list[str]:
                raise RuntimeError("boom")

        reloader = Reloader(Hub(), lambda: (object(), []), [],  # type: ignore[arg-type]
                            reopenLog=lambda: None)
        with capturedLogs() as events:
            self.assertFalse(reloader.reload())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("applying the new configuration failed", repr(events))


class BoundedLogTests(SynchronousTestCase):
    def test_rotatedFilesCapped(self) -> None:
        """
        twistd's log file keeps at most LOG_FILES_KEPT rotated files, so a
        flood of log lines cannot fill the disk.
        """
        import signal

        from twisted.python.logfile import LogFile

        from xcauth.daemon import reload
        directory = self.mktemp()
        os.makedirs(directory)
        logFile = LogFile("xcauth.log", directory, rotateLength=100)
        self.addCleanup(logFile.close)

        def rotate(signum: int, frame: Any) -> None:
            logFile.rotate()

        old = signal.signal(signal.SIGUSR1, rotate)
        self.addCleanup(signal.signal, signal.SIGUSR1, old)
        reload.boundTwistdLog()
        self.assertEqual(logFile.maxRotatedFiles, reload.LOG_FILES_KEPT)
        for _ in range(3 * reload.LOG_FILES_KEPT):
            logFile.write("x" * 150 + "\n")
        self.assertLessEqual(len(os.listdir(directory)), reload.LOG_FILES_KEPT + 1)
