"""
Tests for the wiring of the stock Nextcloud backend in L{xcauth.hub.buildHub}:
the client class by backend (globally and per domain), the start-up check and
the refusal.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from xcauth import store
from xcauth.config import ConfigOptions
from xcauth.hub import Gate, Hub, buildHub
from xcauth.jsxc import JSXCClient
from xcauth.ocs import OCSClient, StartupRefused


def config(*args: str) -> Any:
    options = ConfigOptions()
    if "nextcloud" in args:
        # login-format={user} needs the served domains listed.
        args = (*args, "--domain", "example.org")
    options.parseOptions(list(args))
    return options.config


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = os.path.abspath(self.mktemp())

    def test_jsxc(self) -> None:
        hub = buildHub(config("--url", "https://c.example/jsxc", "--secret", "s",
                              "--db", self.db), MemoryReactorClock())
        self.assertIsInstance(hub.domains.globalSettings.client, JSXCClient)
        self.assertIsNone(hub.startupCheck)

    def test_nextcloud(self) -> None:
        hub = buildHub(config("--backend", "nextcloud", "--url", "https://c.example",
                              "--service-user", "svc", "--service-password", "pw",
                              "--db", self.db), MemoryReactorClock())
        client = hub.domains.globalSettings.client
        self.assertIsInstance(client, OCSClient)
        self.assertEqual(hub.domains.globalSettings.secrets, ())
        self.assertIsNotNone(hub.startupCheck)
        assert hub.watches is not None
        self.assertEqual(len(hub.watches.watches), 1)
        self.assertIsNotNone(hub.authenticator.penalty)  # type: ignore[attr-defined]

    def test_perDomain(self) -> None:
        hub = buildHub(config("--url", "https://c.example/jsxc", "--secret", "s",
                              "--db", self.db), MemoryReactorClock())
        hub.domains.apply([
            store.DomainRow("nc.example", None, "https://nc.example", None,
                            backend="nextcloud", serviceuser="svc", servicepassword="pw"),
            store.DomainRow("old.example", "s2", "https://old.example/jsxc", None),
            store.DomainRow("bad.example", None, None, None, backend="nextcloud"),
        ])
        self.assertIsInstance(hub.domains.settingsFor("nc.example").client, OCSClient)
        self.assertIsInstance(hub.domains.settingsFor("old.example").client, JSXCClient)
        # Incomplete: ignored, the global settings apply.
        self.assertIs(hub.domains.settingsFor("bad.example"), hub.domains.globalSettings)


class RefusalTests(SynchronousTestCase):
    def hub(self, check: Any) -> tuple[Hub, list[str]]:
        refused: list[str] = []
        hub = buildHub(config("--url", "https://c.example/jsxc", "--secret", "s",
                              "--db", os.path.abspath(self.mktemp())), MemoryReactorClock())
        hub.startupCheck = check
        hub.refuse = refused.append
        return hub, refused

    def test_refused(self) -> None:
        """
        A refusal calls C{refuse}; requests wait (they are answered by the
        framing's deadline, then the process ends).
        """
        hub, refused = self.hub(lambda: fail(StartupRefused("make it an administrator")))
        hub.gate = Gate()
        self.successResultOf(hub.runStartupCheck())  # type: ignore[arg-type]
        self.assertEqual(refused, ["make it an administrator"])
        self.assertIsNotNone(hub.gate.whenOpen())

    def test_requestsWaitForCheck(self) -> None:
        from twisted.internet.defer import Deferred

        gate = Gate()
        checked: Deferred[None] = Deferred()
        hub, refused = self.hub(lambda: checked)
        hub.gate = gate
        ready = gate.whenOpen
        waiting = ready()
        assert waiting is not None
        hub.runStartupCheck()
        self.assertNoResult(waiting)
        checked.callback(None)
        self.successResultOf(waiting)
        self.assertIsNone(ready())

    def test_passesOrUnavailable(self) -> None:
        from xcauth.interfaces import BackendUnavailable

        for check in (lambda: succeed(None), lambda: fail(BackendUnavailable("down"))):
            hub, refused = self.hub(check)
            hub.gate = Gate()
            self.successResultOf(hub.runStartupCheck())  # type: ignore[arg-type]
            self.assertEqual(refused, [])
            self.assertIsNone(hub.gate.whenOpen())


class TokensDoNotWaitTests(SynchronousTestCase):
    """
    While Nextcloud's start-up check is pending (a slow Nextcloud), a token is
    answered at once; what needs Nextcloud waits for the check.
    """

    def test_tokenAnsweredBeforeCheck(self) -> None:
        import time

        from xcauth.token import makeToken

        hub = buildHub(config("--backend", "nextcloud", "--url", "https://c.example",
                              "--service-user", "svc", "--service-password", "pw",
                              "--secret", "token-key", "--db",
                              os.path.abspath(self.mktemp())), MemoryReactorClock())
        hub.domains.apply([])
        hub.domains._markLoaded(None)
        self.assertIsNotNone(hub.gate)
        assert hub.gate is not None
        self.assertFalse(hub.gate.opened)
        auth = hub.authenticator
        token = makeToken(b"token-key", "alice", "example.org", int(time.time()) + 3600)
        self.assertIs(self.successResultOf(auth.authenticate("alice", "example.org", token)),
                      True)
        waiting = auth.authenticate("alice", "example.org", "a password")
        self.assertNoResult(waiting)
        self.assertNoResult(auth.isUser("alice", "example.org"))
        waiting.cancel()
        self.failureResultOf(waiting)
