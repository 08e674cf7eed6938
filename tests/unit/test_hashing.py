"""
Tests for L{xcauth.core.hashing.HashQueue} (bcrypt work in priority order on a
bounded queue) and for the credential cache's use of it: the fast verifier,
checks before hashes, and the fallback before the client's deadline.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_cache import ALICE, Env
from xcauth.core.cache import FALLBACK_MARGIN, CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.hashing import MAX_CHECKS_PER_USER, HashQueue, QueueFull, hashPassword
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.interfaces import Outcome
from xcauth.testing.workers import ManualWorker

HASH = hashPassword(b"secret", 4)


class HashQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = ManualWorker()
        self.queue = HashQueue(self.worker, concurrency=2, maxQueued=4)

    def test_checksBeforeHashes(self) -> None:
        """
        Hashes asked for first still wait for every check: someone waits for
        a check, nobody for a hash.
        """
        order: list[str] = []
        for i in range(3):
            self.queue.hash(b"new%d" % i, 4).addCallback(lambda _, i=i: order.append(f"hash{i}"))
        for i in range(2):
            self.queue.check(f"u{i}", b"secret", HASH).addCallback(
                lambda ok, i=i: order.append(f"check{i}:{ok}")
            )
        self.worker.runAll()
        # One hash had started before the checks arrived; hashes never take the
        # last free thread, so the first check started at once.
        self.assertEqual(order, ["hash0", "check0:True", "check1:True", "hash1", "hash2"])

    def test_bounded(self) -> None:
        """
        A full queue refuses new hashes; a check makes room by dropping the
        newest hash.
        """
        hashes = [self.queue.hash(b"p%d" % i, 4) for i in range(5)]  # 1 runs, 4 wait
        self.failureResultOf(self.queue.hash(b"more", 4), QueueFull)
        check = self.queue.check("alice", b"secret", HASH)
        self.failureResultOf(hashes[-1], QueueFull)
        self.worker.runAll()
        self.assertIs(self.successResultOf(check), True)
        for d in hashes[:-1]:
            self.successResultOf(d)

    def test_perUserChecks(self) -> None:
        """
        A burst of guesses against one user takes at most
        L{MAX_CHECKS_PER_USER} places; other users' checks still get theirs.
        """
        guesses = [self.queue.check("alice", b"guess%d" % i, HASH) for i in range(10)]
        refused = [d for d in guesses if d.called]
        self.assertEqual(len(refused), 10 - MAX_CHECKS_PER_USER)
        for d in refused:
            self.failureResultOf(d, QueueFull)
        bob = self.queue.check("bob", b"secret", HASH)
        self.worker.runAll()
        self.assertIs(self.successResultOf(bob), True)

    def test_cancelledBeforeStartIsDropped(self) -> None:
        """
        A check whose caller has gone never reaches a bcrypt thread.
        """
        self.queue.check("bob", b"secret", HASH)
        self.queue.check("carol", b"secret", HASH)
        check = self.queue.check("alice", b"secret", HASH)
        check.cancel()
        self.failureResultOf(check, CancelledError)
        self.worker.runAll()
        self.assertEqual(self.worker.calls, ["checkPassword", "checkPassword"])

    def test_hashesLeaveAThreadToChecks(self) -> None:
        """
        However many hashes wait, one thread stays free for checks.
        """
        for i in range(4):
            self.queue.hash(b"p%d" % i, 4)
        self.assertEqual(self.worker.calls, ["hashPassword"])
        check = self.queue.check("alice", b"secret", HASH)
        self.assertEqual(self.worker.calls, ["hashPassword", "checkPassword"])
        self.worker.runOne()  # the hash
        self.worker.runOne()  # the check
        self.assertIs(self.successResultOf(check), True)

    def test_runningCheckStillReports(self) -> None:
        """
        A check that started before its caller went away still reports its
        result (the fast verifier learns the password).
        """
        seen: list[bool] = []
        check = self.queue.check("alice", b"secret", HASH, seen.append)
        check.cancel()
        self.failureResultOf(check, CancelledError)
        self.worker.runAll()
        self.assertEqual(seen, [True])

    def test_stop(self) -> None:
        running = self.queue.hash(b"a", 4)
        waiting = [self.queue.hash(b"b", 4), self.queue.hash(b"c", 4), self.queue.hash(b"d", 4)]
        stopped = self.queue.stop()
        for d in waiting:
            self.failureResultOf(d, QueueFull)
        self.assertNoResult(stopped)
        self.worker.runAll()
        self.successResultOf(stopped)
        self.successResultOf(running)


class VerifierTests(SynchronousTestCase):
    """
    Passwords confirmed since the daemon started are checked without bcrypt.
    """

    def warm(self) -> tuple[Env, ManualWorker]:
        hasher = ManualWorker()
        env = Env(MemoryStorage(), hasher=hasher)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        hasher.runAll()  # the new hash
        hasher.calls.clear()
        return env, hasher

    def test_rightPasswordNoBcrypt(self) -> None:
        env, hasher = self.warm()
        d = env.start("alice", ALICE)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(hasher.calls, [])

    def test_wrongGuessesNoBcryptWhileBackendDown(self) -> None:
        """
        With the backend down, 200 wrong guesses against a cached user cost no
        bcrypt, and another cached user logs in at once.
        """
        env, hasher = self.warm()
        env.resource.users["bob"] = "bobpw"
        d = env.start("bob", "bobpw")
        env.flush()
        self.assertTrue(self.successResultOf(d))
        hasher.runAll()
        hasher.calls.clear()
        env.clock.advance(2 * 3600)  # past the query TTL: the backend is asked
        env.agent.down = True
        guesses = [env.start("alice", f"guess{i}") for i in range(200)]
        env.flush()
        for g in guesses:
            self.assertIsNone(self.successResultOf(g))
        bob = env.start("bob", "bobpw")
        env.flush()
        self.assertTrue(self.successResultOf(bob))
        self.assertEqual(hasher.calls, [])

    def test_timedOutCheckStillTeaches(self) -> None:
        """
        A login that timed out while its bcrypt check ran still leaves the
        password confirmed: the user's next login needs no bcrypt.
        """
        env, hasher = self.warm()
        # Restarted: only the stored hash is known.
        env = Env(env.storage, hasher=hasher, clock=env.clock, resource=env.resource)
        d = env.start("alice", ALICE)
        self.assertEqual(hasher.calls, ["checkPassword"])
        d.cancel()  # the client's deadline
        self.failureResultOf(d, CancelledError)
        hasher.runAll()
        again = env.start("alice", ALICE)
        self.assertTrue(self.successResultOf(again))
        self.assertEqual(hasher.calls, ["checkPassword"])

    def test_evictionForgets(self) -> None:
        env, hasher = self.warm()
        env.resource.users["alice"] = "changed"
        env.clock.advance(2 * 3600)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertFalse(self.successResultOf(d))
        env.agent.down = True
        d = env.start("alice", ALICE)
        env.flush()
        self.assertIsNone(self.successResultOf(d))


class _HangingBackend:
    def __init__(self) -> None:
        self.requests: list[Deferred[Outcome]] = []
        self.cancelled = 0

    def __call__(self) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred(lambda _: self._cancelled())
        self.requests.append(d)
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1


class FallbackBeforeDeadlineTests(SynchronousTestCase):
    """
    When the backend has not answered shortly before the client's deadline, a
    password the cache vouches for is accepted and the request abandoned.
    """

    def cache(self) -> tuple[CredentialCache, Clock, Any]:
        clock = Clock()
        clock.advance(1_000_000)
        from xcauth.testing.workers import SynchronousWorker

        storage = MemoryStorage()
        cache = CredentialCache(
            storage, SynchronousWorker(), clock, CachePolicy(3600, 86400, 7 * 86400), 4,
            PasswordKeys(), deadline=4.0,
        )
        storage.put("alice@example.org", hashPassword(b"right", 4), clock.seconds())
        clock.advance(7200)  # past the query TTL: the backend is asked first
        return cache, clock, storage

    def test_hangingBackend(self) -> None:
        cache, clock, _ = self.cache()
        backend = _HangingBackend()
        d = cache.authenticate("alice@example.org", "right", backend)
        self.assertNoResult(d)
        clock.advance(4.0 - FALLBACK_MARGIN - 0.01)
        self.assertNoResult(d)
        clock.advance(0.02)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(backend.cancelled, 1)

    def test_wrongPasswordWaitsForBackend(self) -> None:
        """
        A password the cache does not vouch for keeps waiting: the backend
        (or the deadline) decides.
        """
        cache, clock, _ = self.cache()
        backend = _HangingBackend()
        d = cache.authenticate("alice@example.org", "wrong", backend)
        clock.advance(4.0)
        self.assertNoResult(d)
        backend.requests[0].callback(Outcome.NO)
        self.assertIs(self.successResultOf(d), False)

    def test_backendInTimeDecides(self) -> None:
        cache, clock, _ = self.cache()
        backend = _HangingBackend()
        d = cache.authenticate("alice@example.org", "right", backend)
        clock.advance(1.0)
        backend.requests[0].callback(Outcome.NO)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancelledByClient(self) -> None:
        cache, clock, _ = self.cache()
        backend = _HangingBackend()
        d = cache.authenticate("alice@example.org", "right", backend)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(backend.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_daemonDefaultsGiveTheCacheTime(self) -> None:
        """
        With the default settings, the backend's time limit ends before the
        request's deadline (so a refused or hanging backend leaves time for
        the cache to answer).
        """
        from xcauth.daemon.config import default

        connect, total = default("timeout")
        self.assertLess(total, default("deadline"))
