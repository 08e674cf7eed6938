"""
Tests for the tenant an answer is given for: the domain table's canonical keys
and served domains, and the authenticator's refusals and evictions.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from xcauth.core.authenticator import Authenticator
from xcauth.core.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.penalty import PenaltyBox, PenaltyPolicy
from xcauth.interfaces import (
    BackendSpec,
    DomainSettings,
    IBackendClient,
    Outcome,
    RosterEntry,
)
from xcauth.state import database as store
from xcauth.state.domains import DomainTable
from xcauth.testing.workers import SynchronousWorker


@implementer(IBackendClient)
class TableClient:
    """
    A backend with users and passwords, recording what it is asked.
    """

    def __init__(self, url: str, users: dict[str, str]) -> None:
        self.url = url
        self.users = users
        self.calls: list[tuple[str, str, str]] = []

    def auth(self, user: str, domain: str, password: str) -> Deferred[Outcome]:
        self.calls.append(("auth", user, domain))
        return succeed(Outcome.YES if self.users.get(user) == password else Outcome.NO)

    def isUser(self, user: str, domain: str) -> Deferred[Outcome]:
        self.calls.append(("isuser", user, domain))
        return succeed(Outcome.YES if user in self.users else Outcome.NO)

    def sharedRoster(self, user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        self.calls.append(("roster", user, domain))
        return succeed({})


class _NoDB:
    def checkFile(self) -> None:
        pass

    def subscribe(self, channel: str, callback: Any) -> None:
        pass

    def onReconnect(self, callback: Any) -> None:
        pass


def table(served: tuple[str, ...] | None, rows: list[store.DomainRow]) -> tuple[
        DomainTable, TableClient, dict[str, TableClient]]:
    globalClient = TableClient("https://global.example/", {"bob": "global-bob"})
    made: dict[str, TableClient] = {}

    def makeClient(spec: BackendSpec) -> Any:
        client = made[spec.url] = TableClient(spec.url, {"bob": "other-bob"})
        return client

    t = DomainTable(
        _NoDB(),  # type: ignore[arg-type]
        DomainSettings((b"global-secret",), None, globalClient),
        makeClient, Clock(), served=served,
    )
    with capturedLogs():
        t.apply(rows)
    return t, globalClient, made


OTHER = store.DomainRow("Other.Example", "other-secret", "https://other.example/api", None)


class DomainTableTests(SynchronousTestCase):
    def test_rowKeysCanonical(self) -> None:
        """
        A row serves its domain in every spelling; never the global backend.
        """
        t, globalClient, made = table(None, [OTHER])
        other = made["https://other.example/api"]
        for spelling in ("other.example",):
            settings = t.settingsFor(spelling)
            assert settings is not None
            self.assertIs(settings.client, other)
        # The table is asked with canonical names only (the authenticator
        # makes them): another spelling is no row.
        self.assertIsNot(t.settingsFor("OTHER.EXAMPLE"), t.settingsFor("other.example"))
        self.assertIs(t.settingsFor("example.org").client, globalClient)  # type: ignore[union-attr]

    def test_servedList(self) -> None:
        t, globalClient, _ = table(("example.org",), [OTHER])
        self.assertIs(t.settingsFor("example.org").client, globalClient)  # type: ignore[union-attr]
        self.assertIsNotNone(t.settingsFor("other.example"))
        self.assertIsNone(t.settingsFor("not-served.invalid"))


class AuthenticatorTenantTests(SynchronousTestCase):
    """
    The attacks of the multi-tenant cases: case, trailing dot, unserved
    domains, answered for the right tenant or "no" without asking.
    """

    def setUp(self) -> None:
        self.table, self.globalClient, made = table(("example.org",), [OTHER])
        self.other = made["https://other.example/api"]
        self.auth = Authenticator(self.table.settingsFor, Clock(), PasswordKeys())

    def result(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def test_domainCaseAndDotStayInTenant(self) -> None:
        for domain in ("OTHER.EXAMPLE", "Other.Example", "other.example.", "OTHER.EXAMPLE."):
            self.assertIs(self.result(self.auth.authenticate("bob", domain, "global-bob")),
                          False, domain)
            self.assertIs(self.result(self.auth.authenticate("BOB", domain, "other-bob")),
                          True, domain)
        self.assertEqual({c[2] for c in self.other.calls}, {"other.example"})
        self.assertEqual({c[1] for c in self.other.calls}, {"bob"})
        self.assertEqual(self.globalClient.calls, [])

    def test_unservedDomainNo(self) -> None:
        with capturedLogs() as events:
            for _ in range(3):
                self.assertIs(self.result(self.auth.authenticate(
                    "bob", "not-served.invalid", "global-bob")), False)
                self.assertIs(self.result(self.auth.isUser("bob", "not-served.invalid")), False)
        self.assertEqual(self.globalClient.calls, [])
        self.assertEqual(self.auth.unserved, 6)
        # Logged once, not once per request.
        self.assertEqual(len([e for e in events if "does not serve" in e["log_format"]]), 1)

    def test_invalidIdentityUnasked(self) -> None:
        for user, domain in (("bob", "example.org@x"), ("bob", "a:b"), ("", "example.org"),
                             ("b\x00b", "example.org"), ("bob", "example..org")):
            self.assertIs(self.result(self.auth.authenticate(user, domain, "global-bob")), False)
            self.assertIs(self.result(self.auth.isUser(user, domain)), False)
        self.assertEqual(self.globalClient.calls, [])


class _Penalty:
    """
    Stands for a penalty box with known-good records.
    """

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forgetUser(self, jid: str) -> None:
        self.forgotten.append(jid)


class NoSuchUserTests(SynchronousTestCase):
    """
    Nextcloud's "no such user" evicts the cached password at once.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.client = TableClient("https://global.example/", {"bob": "bob-pw"})
        settings = DomainSettings((b"s",), None, self.client)
        self.cache = CredentialCache(
            MemoryStorage(), SynchronousWorker(), self.clock,
            CachePolicy(3600, 86400, 7 * 86400), rounds=4, passwordKey=PasswordKeys(),
        )
        self.auth = Authenticator(lambda d: settings, self.clock, PasswordKeys(),
                                  cache=self.cache)

    def login(self, password: str = "bob-pw") -> Any:
        with capturedLogs():
            return self.successResultOf(self.auth.authenticate("bob", "example.org", password))

    def test_isUserNoEvicts(self) -> None:
        self.assertIs(self.login(), True)
        del self.client.users["bob"]
        self.assertIs(self.login(), True)  # from the cache: Nextcloud not asked
        with capturedLogs():
            self.assertIs(self.successResultOf(self.auth.isUser("bob", "example.org")), False)
        self.assertIs(self.login(), False)

    def test_refusedLoginChecksExistence(self) -> None:
        """
        A refused login of a user with a cached password asks whether the
        user still exists: a deleted user's cached password stops working
        without waiting for an isuser.
        """
        self.assertIs(self.login(), True)
        del self.client.users["bob"]
        self.assertIs(self.login("guess"), False)
        self.assertIn(("isuser", "bob", "example.org"), self.client.calls)
        self.assertIs(self.login(), False)

    def test_existenceCheckBounded(self) -> None:
        """
        At most one existence check per user a minute, however many wrong
        passwords are tried.
        """
        self.assertIs(self.login(), True)
        for _ in range(20):
            self.login("guess")
        self.assertEqual(self.client.calls.count(("isuser", "bob", "example.org")), 1)

    def test_knownGoodRecordsHook(self) -> None:
        penalty = _Penalty()
        auth = Authenticator(lambda d: DomainSettings((b"s",), None, self.client),
                             self.clock, PasswordKeys(), penalty=penalty)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(auth.isUser("nobody", "example.org")), False)
        self.assertEqual(penalty.forgotten, ["nobody@example.org"])

    def test_deletedUserKnownPasswordForgotten(self) -> None:
        """
        Without a cache, a deleted user's password known as good (by the
        penalty box) stops getting in: the refused guess that spent the
        budget asked whether the user still exists.
        """
        penalty = PenaltyBox(self.clock)
        settings = DomainSettings((b"s",), None, self.client)
        auth = Authenticator(lambda d: settings, self.clock, PasswordKeys(), penalty=penalty)

        def login(password: str) -> Any:
            with capturedLogs():
                d = auth.authenticate("bob", "example.org", password)
                self.clock.advance(10)
                return self.successResultOf(d)

        self.assertIs(login("bob-pw"), True)
        self.assertTrue(penalty.knowsUser("bob@example.org"))
        del self.client.users["bob"]
        for i in range(PenaltyPolicy().userChecks + 1):
            self.assertIs(login(f"guess {i}"), False)
        self.assertIn(("isuser", "bob", "example.org"), self.client.calls)
        self.assertFalse(penalty.knowsUser("bob@example.org"))
        self.assertIs(login("bob-pw"), False)
