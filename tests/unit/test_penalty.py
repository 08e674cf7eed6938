"""
Tests for L{xcauth.core.penalty} on its own and in the authenticator, and of how
gentle xcauth is with Nextcloud's brute-force throttle: counted on
L{FakeStockNextcloud}, reached through the production request path.
"""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_ocs import DOMAIN, stockClient
from xcauth.backends.throttle import ThrottleWatch
from xcauth.core.authenticator import Authenticator
from xcauth.core.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.penalty import KnownPasswords, MemoryBudget, PenaltyBox, PenaltyPolicy
from xcauth.interfaces import DomainSettings, ThrottleState
from xcauth.testing.fakestock import MAX_ATTEMPTS, FakeStockNextcloud, makeStockSite
from xcauth.testing.workers import SynchronousWorker

KEY_A = b"a" * 32
KEY_B = b"b" * 32


class PenaltyBoxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.box = PenaltyBox(self.clock, PenaltyPolicy(
            refusedTTL=600, baseDelay=0.5, maxDelay=2.0, userChecks=3, userRefill=900,
        ))

    def test_refusedPairRemembered(self) -> None:
        self.assertFalse(self.box.refused("a@x", KEY_A))
        self.box.failed("a@x", KEY_A)
        self.assertTrue(self.box.refused("a@x", KEY_A))
        self.assertFalse(self.box.refused("a@x", KEY_B))
        self.assertFalse(self.box.refused("b@x", KEY_A))
        self.clock.advance(600)
        self.assertFalse(self.box.refused("a@x", KEY_A))

    def test_forgetDomains(self) -> None:
        """
        The refusals, failure records and known passwords of the users of the
        domains named are dropped; other domains' stay, and so do the
        failures of client addresses (they are not a domain's).
        """
        self.box.failed("bob@other.example", KEY_A, "127.0.0.1")
        self.box.failed("a b@other.example", KEY_A)
        self.box.failed("a@x", KEY_A)
        self.box.known.add("carol@other.example", KEY_B, self.clock.seconds())
        self.box.known.add("dave@x", KEY_B, self.clock.seconds())
        self.assertEqual(self.box.forgetDomains(lambda d: d == "other.example"), 5)
        self.assertFalse(self.box.refused("bob@other.example", KEY_A))
        self.assertFalse(self.box.refused("a b@other.example", KEY_A))
        self.assertEqual(self.box.delay("bob@other.example"), 0)
        self.assertFalse(self.box.knowsUser("carol@other.example"))
        self.assertTrue(self.box.refused("a@x", KEY_A))
        self.assertEqual(self.box.delay("a@x"), 0.5)
        self.assertTrue(self.box.knowsUser("dave@x"))
        self.assertGreater(self.box.delay("nobody@x", "127.0.0.1"), 0)

    def test_delayDoublesToCap(self) -> None:
        self.assertEqual(self.box.delay("a@x"), 0)
        delays = []
        for _ in range(5):
            self.box.failed("a@x", KEY_A, known=True)
            delays.append(self.box.delay("a@x"))
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0, 2.0])

    def test_delayBoundedAtAnyCount(self) -> None:
        """
        Item 7: the delay stays a capped float however many failures there
        were (C{2 ** 1025} used to overflow).
        """
        for _ in range(3000):
            self.box.failed("a@x", KEY_A, "192.0.2.1", known=True)
        self.assertEqual(self.box.delay("a@x"), 2.0)
        self.assertEqual(self.box.delay("b@x", "192.0.2.1"), 2.0)
        self.box._records["a@x"][0] = 10 ** 30  # far beyond any real count
        self.assertEqual(self.box.delay("a@x"), 2.0)
        started = self.clock.seconds()
        d = self.box.holdBack("a@x", None, started)
        self.clock.advance(2.0)
        self.successResultOf(d)

    def test_peerDelayOnTop(self) -> None:
        """
        A client address's failures slow down its refusals for every user,
        without giving any user a budget of its own.
        """
        for i in range(3):
            self.box.failed(f"u{i}@x", KEY_A, "192.0.2.1")
        self.assertEqual(self.box.delay("other@x", "192.0.2.1"), 2.0)
        self.assertEqual(self.box.delay("other@x", "192.0.2.2"), 0.0)

    def test_successClears(self) -> None:
        for i in range(3):
            self.box.failed("a@x", bytes([i]) * 32, "192.0.2.1")
        self.box.succeeded("a@x", "192.0.2.1")
        self.assertEqual(self.box.delay("a@x", "192.0.2.1"), 0)

    def test_holdBackCountsFromStart(self) -> None:
        self.box.failed("a@x", KEY_A, known=True)
        self.box.failed("a@x", KEY_A, known=True)
        started = self.clock.seconds()
        self.clock.advance(0.4)
        d = self.box.holdBack("a@x", None, started)
        self.assertNoResult(d)
        self.clock.advance(0.59)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        self.successResultOf(d)
        self.successResultOf(self.box.holdBack("a@x", None, started - 5))

    def test_budgetSpentVouched(self) -> None:
        """
        With the user's checks spent the backend is not asked; what the cache
        vouches for is accepted, the rest refused (and not remembered as
        wrong: it was never checked).
        """
        for i in range(3):
            self.box.gate("a@x", bytes([i]) * 32, lambda: succeed(False))
        asked: list[int] = []

        def check() -> Deferred[bool | None]:
            asked.append(1)
            return succeed(True)

        d = self.box.gate("a@x", KEY_A, check, lambda: succeed(False))
        self.clock.advance(2)
        self.assertIs(self.successResultOf(d), False)
        d = self.box.gate("a@x", KEY_B, check, lambda: succeed(True))
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(asked, [])
        self.assertFalse(self.box.refused("a@x", KEY_A))
        # Vouched for: now known, it gets in again without the cache.
        self.assertIs(self.successResultOf(self.box.gate("a@x", KEY_B, check)), True)
        self.assertEqual(asked, [])

    def test_bounded(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(maxEntries=10))
        for i in range(100):
            box.failed(f"u{i}@x", KEY_A)
            box.known.add(f"u{i}@x", KEY_B, 0)
            box.budget.reserve(f"u{i}@x", "b", 0, None)
        self.assertLessEqual(len(box), 20)
        self.assertLessEqual(len(box.budget), 10)  # type: ignore[arg-type]
        self.assertTrue(box.refused("u99@x", KEY_A))

    def test_forgotten(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(forgetAfter=60, refusedTTL=30))
        box.failed("a@x", KEY_A)
        self.clock.advance(61)
        box.failed("b@x", KEY_A)
        self.assertEqual(len(box), 2)


class _Watch:
    """
    A throttle watch as the penalty box sees it.
    """

    def __init__(self, listed: bool = False, throttled: bool = False) -> None:
        self.listed = listed
        self.isThrottled = throttled

    def throttled(self) -> bool:
        return self.isThrottled

    def allowListed(self) -> bool:
        return self.listed

    def key(self) -> str:
        return "https://cloud.example.org"


class BackendBudgetTests(SynchronousTestCase):
    """
    The daemon-wide budget of failed checks toward one Nextcloud.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.box = PenaltyBox(self.clock, PenaltyPolicy(baseDelay=0.0, backendFailures=3,
                                                        allowListedFailures=None))

    def test_limitFollowsAllowList(self) -> None:
        self.assertEqual(self.box.backendLimit(_Watch()), 3)
        self.assertIsNone(self.box.backendLimit(_Watch(listed=True)))
        self.assertIsNone(self.box.backendLimit(None))  # JSXC: no throttle of its own

    def test_spentLoggedOnceAMinute(self) -> None:
        """
        Beyond the budget a new password is "unavailable" without asking
        Nextcloud; the log says so at most once a minute, with the numbers.
        """
        asked: list[str] = []

        def check(name: str, answer: bool | None) -> Any:
            return lambda: (asked.append(name), succeed(answer))[1]

        with capturedLogs() as events:
            for i in range(3):
                self.box.gate(f"u{i}@x", KEY_A, check(f"u{i}", False), watch=_Watch())
            for i in range(3):
                d = self.box.gate(f"v{i}@x", KEY_A, check(f"v{i}", True), watch=_Watch())
                self.assertIsNone(self.successResultOf(d))
            self.clock.advance(61)
            self.box.gate("w@x", KEY_A, check("w", True), watch=_Watch())
        self.assertEqual(asked, ["u0", "u1", "u2"])
        spent = [e for e in events if "budget of" in e.get("log_format", "")]
        self.assertEqual(len(spent), 2)
        self.assertEqual((spent[0]["failures"], spent[0]["limit"]), (3, 3))
        # Allow-listed (no daemon-wide limit here): checked again.
        d = self.box.gate("w@x", KEY_A, check("w", True), watch=_Watch(listed=True))
        self.assertIs(self.successResultOf(d), True)

    def test_knownGetsInWhileThrottled(self) -> None:
        """
        While Nextcloud throttles, a known password gets in without it, a
        known one past known-password-ttl does not.
        """
        self.box.known.add("a@x", KEY_A, self.clock.seconds())
        self.box.known.add("a@x", KEY_B, self.clock.seconds() - 86400)
        never = lambda: succeed(None)  # noqa: E731
        watch = _Watch(throttled=True)
        self.assertIs(self.successResultOf(self.box.gate("a@x", KEY_A, never, watch=watch)),
                      True)
        self.assertIsNone(self.successResultOf(self.box.gate("a@x", KEY_B, never,
                                                             watch=watch)))


class MemoryBudgetTests(SynchronousTestCase):
    """
    The per-user and daemon-wide budgets in memory.
    """

    def test_userBucketRefills(self) -> None:
        budget = MemoryBudget(checks=5, refill=900)
        self.assertEqual([budget.reserve("a@x", "nc", 0, None) for _ in range(6)],
                         [None] * 5 + ["user"])
        self.assertTrue(budget.limited("a@x", "nc", 0, None))
        self.assertEqual(budget.reserve("b@x", "nc", 0, None), None)
        self.assertEqual(budget.reserve("a@x", "nc", 179, None), "user")
        self.assertEqual(budget.reserve("a@x", "nc", 180, None), None)
        self.assertEqual(budget.reserve("a@x", "nc", 181, None), "user")
        # Full again 15 minutes after the last check: forgotten.
        self.assertFalse(budget.limited("a@x", "nc", 181 + 900, None))
        self.assertEqual(len(budget), 1)

    def test_acceptedGivesBack(self) -> None:
        budget = MemoryBudget(checks=1, refill=900)
        self.assertIsNone(budget.reserve("a@x", "nc", 0, 10))
        self.assertEqual(budget.reserve("a@x", "nc", 0, 10), "user")
        budget.settle("a@x", "nc", 0, 1, True)
        self.assertIsNone(budget.reserve("a@x", "nc", 1, 10))
        self.assertEqual(budget.backendFailures("nc", 1), 1)

    def test_backendWindow(self) -> None:
        budget = MemoryBudget(checks=5, refill=900, window=1800)
        for i in range(10):
            self.assertIsNone(budget.reserve(f"u{i}@x", "nc", i, 10))
        self.assertEqual(budget.reserve("other@x", "nc", 10, 10), "backend")
        self.assertTrue(budget.limited("fresh@x", "nc", 10, 10))
        self.assertFalse(budget.limited("fresh@x", "other", 10, 10))
        self.assertIsNone(budget.reserve("other@x", "nc", 10, None))  # no limit
        # The first failure ages out of the window.
        self.assertIsNone(budget.reserve("other@x", "nc", 1800.5, 10))
        budget.failed("nc", 1801)
        self.assertEqual(budget.backendFailures("nc", 1801), 10)

    def test_clockBackwards(self) -> None:
        budget = MemoryBudget(checks=1, refill=60)
        self.assertIsNone(budget.reserve("a@x", "nc", 100, None))
        self.assertEqual(budget.reserve("a@x", "nc", 50, None), "user")
        self.assertIsNone(budget.reserve("a@x", "nc", 161, None))

    def test_interface(self) -> None:
        from zope.interface.verify import verifyObject

        from xcauth.interfaces import IAttemptBudget

        self.assertTrue(verifyObject(IAttemptBudget, MemoryBudget()))


class KnownPasswordsTests(SynchronousTestCase):
    def test_severalPerUser(self) -> None:
        known = KnownPasswords(perUser=8)
        keys = [bytes([i]) * 32 for i in range(9)]
        for i, key in enumerate(keys):
            known.add("a@x", key, i)
        self.assertIsNone(known.get("a@x", keys[0]))  # the least recent one
        self.assertEqual(known.get("a@x", keys[8]), 8)
        self.assertEqual(known.count("a@x"), 8)
        known.remove("a@x", keys[8])
        self.assertIsNone(known.get("a@x", keys[8]))
        self.assertEqual(known.get("a@x", keys[7]), 7)
        self.assertIsNone(known.get("b@x", keys[7]))


class GentleTests(SynchronousTestCase):
    """
    The authenticator with penalties and a cache in front of the fake stock
    Nextcloud.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nextcloud = FakeStockNextcloud(self.clock)
        self.agent = RequestTraversalAgent(makeStockSite(self.nextcloud).resource)
        self.client = stockClient(self.agent, self.clock)
        self.keys = PasswordKeys()
        self.cache = CredentialCache(
            MemoryStorage(), SynchronousWorker(), self.clock,
            CachePolicy(queryTTL=3600, verificationTTL=86400, unreachableTTL=7 * 86400),
            4, self.keys,
        )
        self.watch = ThrottleWatch(self.client, self.clock, interval=300, warnDelay=1.0)
        self.client.onLogin = self.watch.loginSeen
        self.client.watch = self.watch
        self.penalty = PenaltyBox(self.clock, PenaltyPolicy())
        self.settings = settings = DomainSettings((), None, self.client)
        self.auth = Authenticator(
            lambda d: settings, self.clock, self.keys, cache=self.cache, penalty=self.penalty
        )

    def withoutCache(self) -> None:
        """
        The authenticator without a credential cache (cache-storage=none).
        """
        settings = self.settings
        self.auth = Authenticator(lambda d: settings, self.clock, self.keys,
                                  penalty=self.penalty)

    def start(self, user: str, password: str, peer: str | None = None) -> list[Any]:
        """
        Start a login without running the clock; its answer lands in the list.
        """
        results: list[Any] = []
        self.auth.authenticate(user, DOMAIN, password, peer).addBoth(results.append)
        return results

    def settle(self, limit: float = 60.0) -> None:
        """
        Run the clock and the fake until nothing is pending (or C{limit} s).
        """
        started = self.clock.seconds()
        while self.clock.seconds() - started < limit:
            self.agent.flush()
            if not self.clock.getDelayedCalls():
                self.agent.flush()
                if not self.clock.getDelayedCalls():
                    return
            self.clock.advance(0.05)

    def login(self, user: str, password: str, peer: str | None = None,
              limit: float = 30.0) -> tuple[Any, float]:
        """
        Log in and run the clock until the answer; the answer and the seconds
        it took.
        """
        started = self.clock.seconds()
        results: list[Any] = []
        d: Deferred[Any] = self.auth.authenticate(user, DOMAIN, password, peer)
        d.addBoth(results.append)
        self.agent.flush()
        while not results and self.clock.seconds() - started < limit:
            self.clock.advance(0.05)
            self.agent.flush()
        self.assertTrue(results, "no answer")
        return results[0], self.clock.seconds() - started

    def test_stalePasswordReachesOnce(self) -> None:
        """
        20 retries of one stale password reach Nextcloud at most twice, and
        are answered later and later (within the deadline).
        """
        waits = []
        for _ in range(20):
            answer, took = self.login("alice", "old password")
            self.assertIs(answer, False)
            waits.append(took)
        self.assertLessEqual(self.nextcloud.loginsOf("alice"), 2)
        self.assertLessEqual(self.nextcloud.throttle.count("127.0.0.1"), 2)
        self.assertGreater(waits[3], waits[0] - 0.01)
        self.assertTrue(all(w < 4 for w in waits), waits)
        # The right password still works at once and clears the penalty.
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertEqual(self.penalty.delay("alice@" + DOMAIN), 0)

    def test_guessingStaysBelowLimit(self) -> None:
        """
        Distinct wrong passwords against one user leave Nextcloud below its
        429 limit, and another user logs in on the first try.
        """
        for i in range(40):
            answer, took = self.login("bob", f"guess {i}")
            self.assertIs(answer, False)
            self.assertLess(took, 4)
        self.assertLess(self.nextcloud.throttle.count("127.0.0.1"), MAX_ATTEMPTS)
        self.assertEqual(self.nextcloud.tooMany, 0)
        self.assertLessEqual(self.nextcloud.loginsOf("bob"), PenaltyPolicy().userChecks)
        answer, took = self.login("alice", "pa:ss w")
        self.assertIs(answer, True)
        # Only Nextcloud's own delay for the failures it saw, nothing of xcauth's.
        self.assertLessEqual(took, self.nextcloud.throttle.delay("127.0.0.1") + 0.2)

    def test_concurrentGuessesCounted(self) -> None:
        """
        Item 1: 256 distinct wrong passwords of one user sent at once (any
        number of connections) reach Nextcloud at most 5 times: a check is
        counted when it starts.
        """
        self.withoutCache()
        # Nextcloud answers bob after 200 ms: every guess is sent meanwhile.
        answers = [self.start("slow200-bob", f"guess {i}") for i in range(256)]
        self.settle()
        self.assertEqual([a for r in answers for a in r if a is not False], [])
        self.assertLessEqual(self.nextcloud.loginsOf("slow200-bob"), PenaltyPolicy().userChecks)

    def test_identicalConcurrentShareOneCheck(self) -> None:
        """
        Identical concurrent logins still share one check, and it costs
        one check of the budget only.
        """
        self.withoutCache()
        answers = [self.start("slow200-bob", "bob's secret") for _ in range(20)]
        wrong = [self.start("slow200-alice", "same guess") for _ in range(20)]
        self.settle()
        self.assertEqual([r[0] for r in answers], [True] * 20)
        self.assertEqual([r[0] for r in wrong], [False] * 20)
        self.assertEqual(self.nextcloud.loginsOf("slow200-bob"), 1)
        self.assertEqual(self.nextcloud.loginsOf("slow200-alice"), 1)
        self.assertIs(self.login("slow200-alice", "pa:ss w")[0], True)

    def test_nameOnlyCannotLockOut(self) -> None:
        """
        Item 2: wrong passwords sent by someone who knows only the name, from
        XMPP and mail (with and without a client address), leave the user's
        known password working at once, without asking Nextcloud, and
        without a credential cache.
        """
        self.withoutCache()
        self.assertIs(self.login("bob", "bob's secret")[0], True)
        for i in range(30):
            self.login("bob", f"guess {i}", peer=None if i % 2 else f"192.0.2.{i}")
        seen = len(self.nextcloud.requests)
        for _ in range(5):
            answer, took = self.login("bob", "bob's secret")
            self.assertIs(answer, True)
            self.assertLess(took, 0.1)
        self.assertEqual(len(self.nextcloud.requests), seen)

    def test_lockoutNotRenewable(self) -> None:
        """
        Item 2: a user whose password is new to xcauth gets in once the
        guessing stops, within the refill time, and one guess per
        cool-down no longer keeps them out for ever.
        """
        self.withoutCache()
        # Nextcloud's own delay (for every login from xcauth's address after
        # failures within 12 hours) is not the point here.
        self.nextcloud.allowList()
        for i in range(5):
            self.login("bob", f"guess {i}")
        self.assertIs(self.login("bob", "bob's secret")[0], False)  # budget spent
        # One guess every 16 minutes for 3 hours: the user, trying between
        # the guesses, gets in.
        results = []
        for i in range(12):
            self.clock.advance(8 * 60)
            results.append(self.login("bob", "bob's secret")[0])
            self.clock.advance(8 * 60)
            self.login("bob", f"late guess {i}")
        self.assertIn(True, results)
        # Once guessing stops, the budget comes back within the refill time.
        self.penalty.known.remove("bob@" + DOMAIN, self.keys("bob's secret"))
        for i in range(5):
            self.login("bob", f"more {i}")
        self.clock.advance(PenaltyPolicy().userRefill / PenaltyPolicy().userChecks)
        self.assertIs(self.login("bob", "bob's secret")[0], True)

    def test_addressesShareTheUserBudget(self) -> None:
        """
        Item 3: a new client address per guess opens no new budget: 40
        guesses from 40 addresses reach Nextcloud at most 5 times.
        """
        self.withoutCache()
        for i in range(40):
            self.assertIs(self.login("bob", f"guess {i}", peer=f"198.51.100.{i}")[0], False)
        self.assertLessEqual(self.nextcloud.loginsOf("bob"), PenaltyPolicy().userChecks)

    def test_manyNamesKeepNextcloudBelow429(self) -> None:
        """
        Item 4: one wrong password for each of 50 names (real and not)
        leaves Nextcloud below its 429 limit for xcauth's address, and a
        known password of another user logs in at once.
        """
        self.withoutCache()
        self.assertIs(self.login("bob", "bob's secret")[0], True)
        names = ["alice", "jörg", "erin"] + [f"nobody{i}" for i in range(47)]
        for name in names:
            self.assertIn(self.login(name, "guess")[0], (False, None))
        self.assertEqual(self.nextcloud.tooMany, 0)
        self.assertLessEqual(self.nextcloud.throttle.count("127.0.0.1", 1800), MAX_ATTEMPTS)
        answer, took = self.login("bob", "bob's secret")
        self.assertIs(answer, True)
        self.assertLess(took, 0.1)

    def test_provokedThrottleNoOldPassword(self) -> None:
        """
        Item 5: bob's password changed in Nextcloud; while Nextcloud answers
        429, his old cached password (verified two days ago, within the
        unreachable TTL) is not accepted.
        """
        self.assertIs(self.login("bob", "bob's secret")[0], True)
        self.nextcloud.users["bob"].password = "bob's new secret"
        self.clock.advance(2 * 86400)
        for _ in range(MAX_ATTEMPTS + 1):
            self.nextcloud.throttle.register("127.0.0.1")
        self.assertIsNot(self.login("bob", "bob's secret")[0], True)
        self.assertGreater(self.nextcloud.tooMany, 0)

    def test_refusedKnownPasswordNotVouched(self) -> None:
        """
        Item 5: a known password that Nextcloud refused since is never
        accepted during a throttle, while the other known one is.
        """
        self.withoutCache()
        self.nextcloud.users["alice"].appPasswords["Alice-App"] = "alice"
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)
        self.nextcloud.users["alice"].password = "changed"
        self.assertIs(self.login("alice", "pa:ss w")[0], False)
        self.clock.advance(PenaltyPolicy().refusedTTL)
        for _ in range(MAX_ATTEMPTS + 1):
            self.nextcloud.throttle.register("127.0.0.1")
        self.assertIsNot(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)

    def test_severalKnownPasswords(self) -> None:
        """
        Item 6: alice's password and her app password both get in while
        someone guesses at her name.
        """
        self.nextcloud.users["alice"].appPasswords["Alice-App"] = "alice"
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)
        for i in range(10):
            self.login("alice", f"guess {i}")
        seen = len(self.nextcloud.requests)
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)
        self.assertEqual(len(self.nextcloud.requests), seen)

    def test_severalKnownPasswordsDuringOutage(self) -> None:
        """
        Item 6: with a credential cache, during an outage of Nextcloud both
        alice's password and her app password get in (the cache's entry
        holds the last one only).
        """
        from xcauth.interfaces import Outcome

        self.nextcloud.users["alice"].appPasswords["Alice-App"] = "alice"
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)
        self.clock.advance(3601)  # past the query TTL: Nextcloud is asked

        class Down:
            url = "https://down.example.org"

            def auth(self, user: str, domain: str, password: str) -> Deferred[Outcome]:
                return succeed(Outcome.UNAVAILABLE)

        down = DomainSettings((), None, Down())  # type: ignore[arg-type]
        self.auth = Authenticator(lambda d: down, self.clock, self.keys, cache=self.cache,
                                  penalty=self.penalty)
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertIs(self.login("alice", "Alice-App")[0], True)
        self.assertIsNone(self.login("alice", "another")[0])

    def test_unavailableSpendsNoBudget(self) -> None:
        """
        Checks that Nextcloud did not answer (down, or an error) give their
        check back: a user whose logins failed through an outage, or whose
        domain moves to another backend, gets in with the right password as
        soon as a backend answers.
        """
        from xcauth.interfaces import Outcome

        class Down:
            url = "https://down.example.org"

            def auth(self, user: str, domain: str, password: str) -> Deferred[Outcome]:
                return succeed(Outcome.UNAVAILABLE)

        self.withoutCache()
        up = self.auth
        down = DomainSettings((), None, Down())  # type: ignore[arg-type]
        self.auth = Authenticator(lambda d: down, self.clock, self.keys, penalty=self.penalty)
        for _ in range(3 * PenaltyPolicy().userChecks):
            self.assertIsNone(self.login("alice", "pa:ss w")[0])
        self.auth = up
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertEqual(self.nextcloud.loginsOf("alice"), 1)

    def test_staleRetriedPastOverflow(self) -> None:
        """
        Item 7: a stale password retried 1,100 times is refused every
        time, never raising out of the authenticator.
        """
        self.withoutCache()
        self.nextcloud.allowList()
        for i in range(1100):
            d = self.auth.authenticate("bob", DOMAIN, "stale")
            self.clock.advance(3)
            self.agent.flush()
            self.clock.advance(3)
            self.assertIs(self.successResultOf(d), False, i)

    def test_emptyPasswordsSpendNoBudget(self) -> None:
        """
        Empty passwords (never right, never sent to Nextcloud) spend neither
        the user's checks nor the daemon-wide budget.
        """
        self.withoutCache()
        for i in range(30):
            self.assertIs(self.login(f"user{i}", "")[0], False)
            self.assertIs(self.login("bob", "")[0], False)
        self.assertIs(self.login("bob", "bob's secret")[0], True)
        self.assertEqual(self.penalty.budget.backendFailures(self.watch.key(), 0), 0)

    def test_gateFailureIsUnavailable(self) -> None:
        """
        Whatever goes wrong in the protection is answered "unavailable", not
        raised into a framing.
        """
        def broken(*a: Any, **kw: Any) -> Any:
            raise OverflowError("broken")

        self.penalty.gate = broken  # type: ignore[method-assign]
        d = self.auth.authenticate("bob", DOMAIN, "bob's secret")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.flushLoggedErrors(OverflowError)), 1)

    def test_tooManyWithWarmCache(self) -> None:
        """
        Nextcloud answering 429 is "unavailable": a cached password still
        logs the user in.
        """
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.clock.advance(3601)
        for _ in range(MAX_ATTEMPTS + 1):
            self.nextcloud.throttle.register("127.0.0.1")
        before = self.nextcloud.tooMany
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertEqual(self.nextcloud.tooMany, before + 1)
        # Without a cache entry: unavailable, not "no".
        self.assertIsNone(self.login("bob", "bob's secret")[0])
        self.assertEqual(self.penalty.delay("bob@" + DOMAIN), 0)

    def test_tokenBeforePenalty(self) -> None:
        from xcauth.core.tokens import makeToken

        settings = DomainSettings((b"token-secret",), None, self.client)
        self.auth = Authenticator(lambda d: settings, self.clock, self.keys,
                                  penalty=self.penalty)
        for i in range(5):
            self.login("bob", f"guess {i}")
        token = makeToken(b"token-secret", "bob", DOMAIN, int(self.clock.seconds()) + 60)
        self.assertIs(self.login("bob", token)[0], True)


class WatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nextcloud = FakeStockNextcloud(self.clock)
        self.agent = RequestTraversalAgent(makeStockSite(self.nextcloud).resource)
        self.client = stockClient(self.agent, self.clock)
        self.watch = ThrottleWatch(self.client, self.clock, interval=300, warnDelay=1.0)

    def test_notAllowListed(self) -> None:
        with capturedLogs() as events:
            self.watch.startService()
            self.agent.flush()
        warnings = [e for e in events if "allow-list" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertIn("occ config:app:set bruteForce", warnings[0]["howto"])
        self.assertEqual(self.watch.state, ThrottleState(0.0, False))
        self.watch.stopService()

    def test_stateCounted(self) -> None:
        """
        What the watch reads is handed to the metrics, under the URL without
        user information.
        """
        from xcauth.backends.throttle import publicURL
        from xcauth.daemon.metrics import Metrics

        metrics = Metrics(self.clock, process=False)
        watch = ThrottleWatch(self.client, self.clock, interval=300, warnDelay=1.0,
                              metrics=metrics)
        with capturedLogs():
            watch.check()
            self.agent.flush()
        self.assertEqual(metrics.throttleStates(), {self.client.url: (0.0, False)})
        self.assertEqual(publicURL("https://u:p@cloud.example/nc"), "https://cloud.example/nc")
        self.assertEqual(publicURL("https://cloud.example"), "https://cloud.example")

    def test_allowListedAndPeriodic(self) -> None:
        self.nextcloud.allowList()
        with capturedLogs() as events:
            self.watch.startService()
            self.agent.flush()
            self.clock.advance(300)
            self.agent.flush()
        self.assertFalse([e for e in events if "allow-list" in e["log_format"]])
        self.assertEqual(
            sum(1 for _, path, _ in self.nextcloud.requests if path.endswith("capabilities")), 2
        )
        self.watch.stopService()

    def test_delayWarned(self) -> None:
        for _ in range(4):
            self.nextcloud.throttle.register("127.0.0.1")
        with capturedLogs() as events:
            self.watch.check()
            self.agent.flush()
        delays = [e for e in events if "delays every login" in e["log_format"]]
        self.assertEqual(len(delays), 1)
        self.assertAlmostEqual(delays[0]["delay"], 1.6)

    def test_slowAndRefusedLogins(self) -> None:
        with capturedLogs() as events:
            self.watch.loginSeen(0.2, 200)
            self.watch.loginSeen(3.2, 401)
            self.watch.loginSeen(3.2, 401)  # rate-limited
            self.clock.advance(61)
            self.watch.loginSeen(0.0, 429)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0]["delay"], 3.2)
        self.assertIn("429", events[1]["log_format"])

    def test_throttledAndAllowListed(self) -> None:
        """
        The watch says whether Nextcloud throttles xcauth (a 429 or a slow
        login within 30 minutes, or a delay in the capabilities) and whether
        its address is allow-listed.
        """
        self.assertFalse(self.watch.throttled())
        self.assertFalse(self.watch.allowListed())
        self.watch.loginSeen(0.2, 401)
        self.assertFalse(self.watch.throttled())
        self.watch.loginSeen(0.0, 429)
        self.assertTrue(self.watch.throttled())
        self.clock.advance(1800)
        self.assertFalse(self.watch.throttled())
        for _ in range(4):
            self.nextcloud.throttle.register("127.0.0.1")
        self.watch.check()
        self.agent.flush()
        self.assertTrue(self.watch.throttled())
        self.nextcloud.allowList()
        self.watch.check()
        self.agent.flush()
        self.assertTrue(self.watch.allowListed())
        self.assertFalse(self.watch.throttled())
        self.assertEqual(self.watch.key(), self.client.url)
