"""
Tests for L{xcauth.daemon.tap.makeService} and the composition root
L{xcauth.daemon.hub.buildHub}: what a parsed command line turns into, without
starting anything.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import writeConfig
from xcauth.backends.jsxc import JSXCClient
from xcauth.core.cache import MemoryStorage
from xcauth.daemon import service as serviceModule
from xcauth.daemon.hub import Hub, buildHub
from xcauth.daemon.reload import SignalService
from xcauth.daemon.service import XcauthService
from xcauth.daemon.tap import Options, makeService
from xcauth.framing.ejabberd import EjabberdAutoProtocol
from xcauth.framing.postfix import PostfixProtocol
from xcauth.state.cache import DatabaseStorage

URL = "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"


class MakeServiceTests(SynchronousTestCase):
    def options(self, *args: str, **config: Any) -> Options:
        path = writeConfig(self.mktemp(), URL, "s3cret", **config)
        options = Options()
        options.parseOptions(["-c", path, *args])
        return options

    def test_serviceTree(self) -> None:
        """
        One L{Hub} and one endpoint service per C{--listen}, named after it,
        each serving its framing with the hub's shared context.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        sock = os.path.join(directory, "postfix.sock")
        options = self.options(
            "--listen", "ejabberd=tcp:0:interface=127.0.0.1",
            "--listen", f"postfix=unix:{sock}:mode=600",
            deadline="3",
        )
        service = makeService(options)
        self.assertIsInstance(service, XcauthService)
        assert isinstance(service, XcauthService)
        children = list(service)
        self.assertIs(children[0], service.hub)
        self.assertIsInstance(service.hub, Hub)
        listeners = children[1:-1]
        # Last, the SIGHUP (reload) and SIGTERM (drain) handlers.
        self.assertIsInstance(children[-1], SignalService)
        self.assertEqual(
            [s.name for s in listeners],
            ["ejabberd=tcp:0:interface=127.0.0.1", f"postfix=unix:{sock}:mode=600"],
        )
        for svc, protocol in zip(listeners, (EjabberdAutoProtocol, PostfixProtocol), strict=True):
            assert isinstance(svc, StreamServerEndpointService)
            self.assertIs(svc.factory.protocol, protocol)
            self.assertIs(svc.factory.context, service.hub.context)
        self.assertEqual(service.hub.context.deadline, 3.0)
        self.assertFalse(service.running)

    def test_garbageCollectorUntouched(self) -> None:
        """
        Building the service leaves the process's garbage collector as it
        is: the daemon tunes it when it starts.
        """
        before = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled())
        makeService(self.options("--listen", "tcp:0:interface=127.0.0.1"),
                    reactor=MemoryReactorClock())
        self.assertEqual((gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()), before)

    def test_garbageCollectorTunedAtStart(self) -> None:
        """
        twistd's start of the daemon (privilegedStartService) tunes it, once.
        """
        tuned: list[bool] = []
        self.patch(serviceModule, "tuneGarbageCollector", lambda: tuned.append(True))
        config = self.options("--listen", "tcp:0:interface=127.0.0.1").config
        service = XcauthService(buildHub(config, MemoryReactorClock()), [], MemoryReactorClock())
        self.assertEqual(tuned, [])
        service.privilegedStartService()
        self.assertEqual(tuned, [True])

    def test_backlogAdded(self) -> None:
        """
        Listeners xcauth opens get a listen backlog for bursts unless the
        endpoint gives its own.
        """
        options = self.options(
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=127.0.0.1:backlog=7",
        )
        self.assertEqual(
            [li.endpoint for li in options.listeners],
            ["tcp:0:interface=127.0.0.1:backlog=1024", "tcp:0:interface=127.0.0.1:backlog=7"],
        )


class BuildHubTests(SynchronousTestCase):
    def config(self, **settings: Any) -> Any:
        path = writeConfig(self.mktemp(), URL, "new,old", listen="tcp:1", **settings)
        options = Options()
        options.parseOptions(["-c", path])
        return options.config

    def test_noCache(self) -> None:
        hub = buildHub(self.config(), Clock())
        self.assertIsNone(hub.cache)
        self.assertIsNone(hub.authenticator.cache)
        settings = hub.domains.settingsFor("any.example")
        self.assertEqual(settings.secrets, (b"new", b"old"))
        assert isinstance(settings.client, JSXCClient)
        self.assertEqual(settings.client.url, URL)

    def test_memoryCache(self) -> None:
        hub = buildHub(self.config(cache_storage="memory", cache_bcrypt_rounds="10,5"), Clock())
        assert hub.cache is not None
        self.assertIsInstance(hub.cache.storage, MemoryStorage)
        self.assertEqual(hub.cache._rounds, 5)
        self.assertIs(hub.authenticator.cache, hub.cache)

    def test_databaseCache(self) -> None:
        db = os.path.join(os.path.dirname(os.path.abspath(self.mktemp())), "x.sqlite3")
        hub = buildHub(
            self.config(cache_storage="db", cache_bcrypt_rounds="10,5", db=db), Clock()
        )
        assert hub.cache is not None
        self.assertIsInstance(hub.cache.storage, DatabaseStorage)
        self.assertEqual(hub.cache._rounds, 10)
        self.assertEqual(hub.store.path, db)
        self.assertFalse(os.path.exists(db))  # nothing is opened before start

    def test_contextFromConfig(self) -> None:
        hub = buildHub(self.config(deadline="2.5", max_in_flight="9"), Clock())
        self.assertEqual((hub.context.deadline, hub.context.maxInFlight), (2.5, 9))
        self.assertIs(hub.context.authenticator, hub.authenticator)
