"""
Tests for the wiring of the stock Nextcloud backend in L{xcauth.daemon.hub.buildHub}:
the client class by backend (globally and per domain), the start-up check and
the refusal.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from xcauth.backends.jsxc import JSXCClient
from xcauth.backends.ocs import OCSClient
from xcauth.daemon.config import ConfigOptions
from xcauth.daemon.hub import Gate, Hub, buildHub
from xcauth.interfaces import StartupRefused
from xcauth.state import database as store

KEY = b"k" * 32


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
        self.assertEqual(len(list(hub.watches)), 1)
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

        from xcauth.core.tokens import makeToken

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


def ncRow(domain: str, url: str) -> store.DomainRow:
    return store.DomainRow(domain, None, url, None, backend="nextcloud",
                           serviceuser="svc", servicepassword="pw")


class DomainChangeTests(SynchronousTestCase):
    """
    What belongs to a domain's backend goes when its row changes or goes: the
    throttle watch of a stock client no domain uses any more, the refusals
    the penalty box remembers from the old backend.
    """

    def setUp(self) -> None:
        self.db = os.path.abspath(self.mktemp())
        self.hub = buildHub(config("--url", "https://c.example/jsxc", "--secret", "s",
                                   "--db", self.db), MemoryReactorClock())
        self.hub.domains.apply([])

    def test_throttleWatchOfChangedRowStops(self) -> None:
        watches = self.hub.watches
        watches.startService()
        self.hub.domains.apply([ncRow("nc.example", "https://nc.example")])
        [first] = watches
        self.assertTrue(first.running)
        self.hub.domains.apply([ncRow("nc.example", "https://nc2.example")])
        [second] = watches
        self.assertIsNot(second, first)
        self.assertEqual(second.client.url, "https://nc2.example")
        self.assertFalse(first.running)
        self.hub.domains.apply([])
        self.assertEqual(list(watches), [])
        self.assertFalse(second.running)

    def test_sharedClientKeepsItsWatch(self) -> None:
        """
        Two domains on one Nextcloud share a client: removing one keeps the
        watch of the other.
        """
        watches = self.hub.watches
        watches.startService()
        self.hub.domains.apply([ncRow("a.example", "https://nc.example"),
                                ncRow("b.example", "https://nc.example")])
        [watch] = watches
        self.hub.domains.apply([ncRow("a.example", "https://nc.example")])
        self.assertEqual(list(watches), [watch])
        self.assertTrue(watch.running)

    def test_watchesOfRowsAfterReloadStop(self) -> None:
        self.hub.reload(config("--url", "https://c.example/jsxc", "--secret", "s",
                               "--db", self.db))
        self.hub.domains.apply([ncRow("nc.example", "https://nc.example")])
        self.assertEqual(len(list(self.hub.watches)), 1)
        self.hub.domains.apply([])
        self.assertEqual(list(self.hub.watches), [])

    def test_refusalForgottenWhenDomainAdded(self) -> None:
        """
        bob of other.example, refused by the global backend before the row of
        his domain existed, is asked to the new backend once the row is there;
        alice of example.org, whose backend did not change, stays refused.
        """
        penalty = self.hub.authenticator.penalty  # type: ignore[attr-defined]
        penalty.failed("bob@other.example", KEY)
        penalty.failed("alice@example.org", KEY)
        self.hub.domains.apply([ncRow("other.example", "https://nc.example")])
        self.assertFalse(penalty.refused("bob@other.example", KEY))
        self.assertTrue(penalty.refused("alice@example.org", KEY))
        # The same rows again: nothing changes, nothing is forgotten.
        penalty.failed("bob@other.example", KEY)
        self.hub.domains.apply([ncRow("other.example", "https://nc.example")])
        self.assertTrue(penalty.refused("bob@other.example", KEY))
        # The row goes: bob's domain is the global backend's again.
        self.hub.domains.apply([])
        self.assertFalse(penalty.refused("bob@other.example", KEY))
        self.assertTrue(penalty.refused("alice@example.org", KEY))

    def test_refusalForgottenWhenGlobalBackendChanges(self) -> None:
        """
        A reload to another global backend forgets the refusals of the domains
        that use it, not those of domains with their own row.
        """
        self.hub.domains.apply([ncRow("other.example", "https://nc.example")])
        penalty = self.hub.authenticator.penalty  # type: ignore[attr-defined]
        penalty.failed("bob@other.example", KEY)
        penalty.failed("alice@example.org", KEY)
        self.hub.reload(config("--url", "https://c.example/jsxc", "--secret", "s",
                               "--db", self.db))
        self.assertTrue(penalty.refused("alice@example.org", KEY))
        self.hub.reload(config("--url", "https://new.example/jsxc", "--secret", "s",
                               "--db", self.db))
        self.assertFalse(penalty.refused("alice@example.org", KEY))
        self.assertTrue(penalty.refused("bob@other.example", KEY))


class ReloadCheckTests(SynchronousTestCase):
    def test_reloadChecksGlobalServiceAccount(self) -> None:
        """
        A reload checks the service account of the global stock client again;
        a refusal is logged with what to fix (the daemon goes on).
        """
        checked: list[str] = []

        def check(client: OCSClient) -> Any:
            checked.append(client._serviceUser)
            return fail(StartupRefused("svc2 is not an administrator"))

        self.patch(OCSClient, "checkPrivileges", check)
        db = os.path.abspath(self.mktemp())
        hub = buildHub(config("--backend", "nextcloud", "--url", "https://c.example",
                              "--service-user", "svc", "--service-password", "pw",
                              "--db", db), MemoryReactorClock())
        with capturedLogs() as events:
            hub.reload(config("--backend", "nextcloud", "--url", "https://c.example",
                              "--service-user", "svc2", "--service-password", "pw",
                              "--db", db))
        self.assertEqual(checked, ["svc2"])
        errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(
            errors,
            ["the global backend (after a reload) will not work: svc2 is not an "
             "administrator"],
        )
