"""
Tests for L{xcauth.penalty} on its own and in the authenticator, and of how
gentle xcauth is with Nextcloud's brute-force throttle: counted on
L{FakeStockNextcloud}, reached through the production request path.
"""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.test_ocs import DOMAIN, stockClient
from xcauth.auth import Authenticator
from xcauth.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.domains import DomainSettings
from xcauth.keys import PasswordKeys
from xcauth.ocs import ThrottleState
from xcauth.penalty import PenaltyBox, PenaltyPolicy
from xcauth.testing.fakestock import MAX_ATTEMPTS, FakeStockNextcloud, makeStockSite
from xcauth.testing.workers import SynchronousWorker
from xcauth.throttlewatch import ThrottleWatch

KEY_A = b"a" * 32
KEY_B = b"b" * 32


class PenaltyBoxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.box = PenaltyBox(self.clock, PenaltyPolicy(
            refusedTTL=600, baseDelay=0.5, maxDelay=2.0, lockoutAfter=3, lockoutSeconds=900,
        ))

    def test_refusedPairRemembered(self) -> None:
        self.assertFalse(self.box.refused("a@x", KEY_A))
        self.box.failed("a@x", "a@x", KEY_A)
        self.assertTrue(self.box.refused("a@x", KEY_A))
        self.assertFalse(self.box.refused("a@x", KEY_B))
        self.assertFalse(self.box.refused("b@x", KEY_A))
        self.clock.advance(600)
        self.assertFalse(self.box.refused("a@x", KEY_A))

    def test_forgetDomains(self) -> None:
        """
        The refusals and failure records of the users of the domains named are
        dropped (with and without the client's address in the key); other
        domains' stay.
        """
        self.box.failed("bob@other.example 127.0.0.1", "bob@other.example", KEY_A)
        self.box.failed("a b@other.example", "a b@other.example", KEY_A)
        self.box.failed("a@x", "a@x", KEY_A)
        self.assertEqual(self.box.forgetDomains(lambda d: d == "other.example"), 4)
        self.assertFalse(self.box.refused("bob@other.example", KEY_A))
        self.assertFalse(self.box.refused("a b@other.example", KEY_A))
        self.assertEqual(self.box.delay("bob@other.example 127.0.0.1"), 0)
        self.assertTrue(self.box.refused("a@x", KEY_A))
        self.assertEqual(self.box.delay("a@x"), 0.5)

    def test_delayDoublesToCap(self) -> None:
        self.assertEqual(self.box.delay("a@x"), 0)
        delays = []
        for _ in range(5):
            self.box.failed("a@x", "a@x", KEY_A, known=True)
            delays.append(self.box.delay("a@x"))
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0, 2.0])

    def test_lockoutAfterDistinct(self) -> None:
        for i in range(2):
            self.box.failed("a@x", "a@x", bytes([i]) * 32)
        self.box.failed("a@x", "a@x", bytes([1]) * 32)  # a repeat is not distinct
        self.assertFalse(self.box.lockedOut("a@x"))
        self.box.failed("a@x", "a@x", bytes([2]) * 32)
        self.assertTrue(self.box.lockedOut("a@x"))
        self.assertFalse(self.box.lockedOut("b@x"))
        self.clock.advance(900)
        self.assertFalse(self.box.lockedOut("a@x"))
        # Still known as a guesser: the next distinct wrong password locks again.
        self.box.failed("a@x", "a@x", bytes([3]) * 32)
        self.assertTrue(self.box.lockedOut("a@x"))

    def test_successClears(self) -> None:
        for i in range(3):
            self.box.failed("a@x", "a@x", bytes([i]) * 32)
        self.box.succeeded("a@x")
        self.assertFalse(self.box.lockedOut("a@x"))
        self.assertEqual(self.box.delay("a@x"), 0)

    def test_holdBackCountsFromStart(self) -> None:
        self.box.failed("a@x", "a@x", KEY_A, known=True)
        self.box.failed("a@x", "a@x", KEY_A, known=True)
        started = self.clock.seconds()
        self.clock.advance(0.4)
        d = self.box.holdBack("a@x", started)
        self.assertNoResult(d)
        self.clock.advance(0.59)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        self.successResultOf(d)
        self.successResultOf(self.box.holdBack("a@x", started - 5))

    def test_gateVouchedDuringCoolDown(self) -> None:
        """
        During a cool-down the backend is not asked; what the cache vouches
        for is accepted (and clears the penalty), the rest refused.
        """
        from twisted.internet.defer import succeed

        for i in range(3):
            self.box.failed("a@x", "a@x", bytes([i]) * 32)
        asked: list[int] = []

        def check() -> Deferred[bool | None]:
            asked.append(1)
            return succeed(True)

        d = self.box.gate("a@x", "a@x", KEY_A, check, lambda: succeed(False))
        self.clock.advance(2)
        self.assertIs(self.successResultOf(d), False)
        d = self.box.gate("a@x", "a@x", KEY_B, check, lambda: succeed(True))
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(asked, [])
        self.assertFalse(self.box.lockedOut("a@x"))
        # Not remembered as a wrong password: it was never checked.
        self.assertFalse(self.box.refused("a@x", KEY_A))

    def test_peerKeys(self) -> None:
        self.assertEqual(PenaltyBox.who("a@x", None), "a@x")
        self.assertNotEqual(PenaltyBox.who("a@x", "10.0.0.1"), PenaltyBox.who("a@x", "10.0.0.2"))

    def test_bounded(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(maxEntries=10))
        for i in range(100):
            box.failed(f"u{i}@x", f"u{i}@x", KEY_A)
        self.assertLessEqual(len(box), 20)
        self.assertTrue(box.refused("u99@x", KEY_A))

    def test_forgotten(self) -> None:
        box = PenaltyBox(self.clock, PenaltyPolicy(forgetAfter=60, refusedTTL=30))
        box.failed("a@x", "a@x", KEY_A)
        self.clock.advance(61)
        box.failed("b@x", "b@x", KEY_A)
        self.assertEqual(len(box), 2)


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
        self.penalty = PenaltyBox(self.clock, PenaltyPolicy())
        settings = DomainSettings((), None, self.client)
        self.auth = Authenticator(
            lambda d: settings, self.clock, self.keys, cache=self.cache, penalty=self.penalty
        )

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
        self.assertLessEqual(self.nextcloud.loginsOf("bob"), PenaltyPolicy().lockoutAfter)
        answer, took = self.login("alice", "pa:ss w")
        self.assertIs(answer, True)
        # Only Nextcloud's own delay for the failures it saw, nothing of xcauth's.
        self.assertLessEqual(took, self.nextcloud.throttle.delay("127.0.0.1") + 0.2)

    def test_coolDownRightPasswordFromCache(self) -> None:
        """
        Guesses that Nextcloud refused leave the real password's cache entry
        alone (only a refused cached password evicts it), so during the
        cool-down the right password is accepted from the cache, without
        asking Nextcloud: someone guessing does not lock the user out.
        """
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        for i in range(5):
            self.login("alice", f"guess {i}")
        self.assertTrue(self.penalty.lockedOut("alice@" + DOMAIN))
        seen = len(self.nextcloud.requests)
        self.assertIs(self.login("alice", "pa:ss w")[0], True)
        self.assertEqual(len(self.nextcloud.requests), seen)
        self.clock.advance(PenaltyPolicy().lockoutSeconds)
        self.assertIs(self.login("alice", "pa:ss w")[0], True)

    def test_coolDownWithoutCache(self) -> None:
        settings = DomainSettings((), None, self.client)
        self.auth = Authenticator(lambda d: settings, self.clock, self.keys,
                                  penalty=self.penalty)
        for i in range(5):
            self.login("bob", f"guess {i}")
        seen = len(self.nextcloud.requests)
        self.assertIs(self.login("bob", "bob's secret")[0], False)
        self.assertEqual(len(self.nextcloud.requests), seen)
        self.clock.advance(PenaltyPolicy().lockoutSeconds)
        self.assertIs(self.login("bob", "bob's secret")[0], True)

    def test_peerKeyed(self) -> None:
        for i in range(5):
            self.login("bob", f"guess {i}", peer="192.0.2.1")
        self.assertTrue(self.penalty.lockedOut(PenaltyBox.who("bob@" + DOMAIN, "192.0.2.1")))
        self.assertIs(self.login("bob", "bob's secret", peer="192.0.2.2")[0], True)

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
        from xcauth.token import makeToken

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
            self.watch.start()
            self.agent.flush()
        warnings = [e for e in events if "allow-list" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertIn("occ config:app:set bruteForce", warnings[0]["howto"])
        self.assertEqual(self.watch.state, ThrottleState(0.0, False))
        self.watch.stop()

    def test_allowListedAndPeriodic(self) -> None:
        self.nextcloud.allowList()
        with capturedLogs() as events:
            self.watch.start()
            self.agent.flush()
            self.clock.advance(300)
            self.agent.flush()
        self.assertFalse([e for e in events if "allow-list" in e["log_format"]])
        self.assertEqual(
            sum(1 for _, path, _ in self.nextcloud.requests if path.endswith("capabilities")), 2
        )
        self.watch.stop()

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
