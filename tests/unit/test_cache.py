"""
Tests for the credential cache behind L{xcauth.core.authenticator.Authenticator}: the whole
timeline of an entry under a controlled clock (for the memory and the database
storage), eviction, tokens never cached, isuser during outages, coalescing of
concurrent logins, and answers that do not wait for busy bcrypt threads.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import bcrypt
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import jsxc
from xcauth.core.authenticator import Authenticator
from xcauth.core.cache import CachePolicy, CredentialCache, MemoryStorage
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.tokens import makeToken
from xcauth.interfaces import DomainSettings
from xcauth.state import database as store
from xcauth.state.cache import DatabaseStorage
from xcauth.testing.fakenextcloud import DEMO_USERS, FakeJSXC, makeSite
from xcauth.testing.workers import ManualWorker, SynchronousWorker

SECRET = b"cache-test-secret"
URL = "http://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"
DOMAIN = "example.org"
ALICE = DEMO_USERS["alice"]
MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
START = 1_700_000_000.0


class SwitchableAgent:
    """
    An agent in front of the fake Nextcloud that can be "unplugged": while
    C{down}, every request fails like a refused connection.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.down = False

    def request(self, *args: Any, **kw: Any) -> Deferred[Any]:
        if self.down:
            return fail(Failure(ConnectionRefusedError("unplugged")))
        return self.agent.request(*args, **kw)


class Env:
    """
    An authenticator with a cache over the fake Nextcloud, a clock and workers
    the test controls.
    """

    def __init__(
        self,
        storage: Any,
        hasher: Any = None,
        latency: float = 0.0,
        cache: bool = True,
        clock: Clock | None = None,
        resource: FakeJSXC | None = None,
    ) -> None:
        self.clock = clock or Clock()
        if clock is None:
            self.clock.advance(START)
        self.resource = resource or FakeJSXC(
            SECRET, dict(DEMO_USERS), self.clock, latency
        )
        self.traversal = RequestTraversalAgent(makeSite(self.resource).resource)
        self.agent = SwitchableAgent(self.traversal)
        client = jsxc(self.agent, URL, SECRET, self.clock, 10)
        settings = DomainSettings((SECRET,), None, client)
        self.hasher = hasher or SynchronousWorker()
        self.storage = storage
        self.cache = (
            CredentialCache(
                storage,
                self.hasher,
                self.clock,
                CachePolicy(HOUR, DAY, 7 * DAY),
                rounds=4,
                passwordKey=PasswordKeys(),
            )
            if cache
            else None
        )
        self.auth = Authenticator(lambda d: settings, self.clock, PasswordKeys(), cache=self.cache)

    def backendCalls(self, operation: str = "auth") -> int:
        return sum(1 for r in self.resource.requests if r.get("operation") == operation)

    def start(self, user: str, password: str) -> Deferred[bool]:
        return self.auth.authenticate(user, DOMAIN, password)

    def flush(self) -> None:
        self.traversal.flush()


class TimelineMixin:
    """
    The life of a cache entry; run for each storage.
    """

    def makeStorage(self) -> Any:
        raise NotImplementedError

    def entry(self, env: Env, jid: str = f"alice@{DOMAIN}") -> Any:
        return self.successResultOf(env.storage.get(jid))  # type: ignore[attr-defined]

    def login(self, env: Env, password: str = ALICE, user: str = "alice") -> bool:
        d = env.start(user, password)
        env.flush()
        return self.successResultOf(d)  # type: ignore[attr-defined,no-any-return]

    def test_timeline(self) -> None:
        """
        Normal hits, query TTL expiry, verification TTL expiry, the unreachable
        fallback inside and beyond its TTL.
        """
        t: Any = self
        env = Env(self.makeStorage())
        t.assertIsNone(self.entry(env))
        # First login: the backend, then the entry is stored.
        firstAt = env.clock.seconds()
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 1)
        first = self.entry(env)
        t.assertIsNotNone(first)
        t.assertTrue(bcrypt.checkpw(ALICE.encode(), first.pwhash))
        # Within the query TTL: from the cache.
        env.clock.advance(50 * MINUTE)
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 1)
        # A wrong password is never accepted from the cache: it goes to the backend.
        t.assertFalse(self.login(env, "wrong"))
        t.assertEqual(env.backendCalls(), 2)
        # Someone's wrong guess leaves the real password's entry alone.
        t.assertIsNotNone(self.entry(env))
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 2)
        env.clock.advance(61 * MINUTE)
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 3)
        # Query TTL expired (61 minutes without a login): the backend again.
        env.clock.advance(61 * MINUTE)
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 4)
        verified = env.clock.seconds()
        # Logins every 30 minutes keep the entry fresh until the verification
        # TTL (1 day after the last backend verification) runs out.
        while env.clock.seconds() + 30 * MINUTE < verified + DAY:
            env.clock.advance(30 * MINUTE)
            t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 4)
        env.clock.advance(30 * MINUTE)
        t.assertTrue(self.login(env))
        t.assertEqual(env.backendCalls(), 5)
        verified = env.clock.seconds()
        # Backend unavailable, query TTL over: the unreachable TTL applies.
        env.agent.down = True
        env.clock.advance(2 * DAY)
        t.assertTrue(self.login(env))
        t.assertFalse(self.login(env, "wrong"))
        env.clock.advance(verified + 7 * DAY - env.clock.seconds() - 10)
        t.assertTrue(self.login(env))
        env.clock.advance(20)
        t.assertFalse(self.login(env))
        # Back up: the backend decides and refreshes the entry.
        env.agent.down = False
        t.assertTrue(self.login(env))
        entry = self.entry(env)
        t.assertTrue(entry.remoteAuth >= env.clock.seconds() - 1)
        # The first success is kept across refreshes.
        t.assertEqual(int(entry.firstAuth), int(firstAt))

    def test_evictionOnNoauth(self) -> None:
        """
        When the backend says a cached password is wrong, it stops working at
        once, even for the unreachable fallback.
        """
        t: Any = self
        env = Env(self.makeStorage())
        t.assertTrue(self.login(env))
        env.clock.advance(2 * HOUR)
        env.resource.users["alice"] = "new password"
        t.assertFalse(self.login(env, ALICE))
        t.assertIsNone(self.entry(env))
        env.agent.down = True
        t.assertFalse(self.login(env, ALICE))
        # The new password is cached once the backend confirms it.
        env.agent.down = False
        t.assertTrue(self.login(env, "new password"))
        env.agent.down = True
        env.clock.advance(2 * HOUR)
        t.assertTrue(self.login(env, "new password"))
        t.assertFalse(self.login(env, ALICE))

    def test_newPasswordReplacesOld(self) -> None:
        """
        A fresh entry whose hash does not match goes to the backend; a success
        there replaces the hash.
        """
        t: Any = self
        env = Env(self.makeStorage())
        t.assertTrue(self.login(env))
        env.resource.users["alice"] = "changed"
        t.assertTrue(self.login(env, "changed"))
        t.assertEqual(env.backendCalls(), 2)
        t.assertTrue(bcrypt.checkpw(b"changed", self.entry(env).pwhash))
        t.assertTrue(self.login(env, "changed"))
        t.assertEqual(env.backendCalls(), 2)

    def test_tokensNeverCached(self) -> None:
        """
        A token login touches neither the backend nor the cache.
        """
        t: Any = self
        env = Env(self.makeStorage())
        token = makeToken(SECRET, "alice", DOMAIN, int(START + HOUR))
        t.assertTrue(self.login(env, token))
        t.assertEqual(env.backendCalls(), 0)
        t.assertIsNone(self.entry(env))
        t.assertEqual(env.hasher.calls, [])
        # An expired token is a (wrong) password for the backend, not cached.
        env.clock.advance(2 * HOUR)
        t.assertFalse(self.login(env, token))
        t.assertIsNone(self.entry(env))

    def test_isUserDuringOutage(self) -> None:
        """
        isuser for a user seen to exist within the verification TTL is
        answered from state while the backend is unavailable; others stay
        unknown (C{None}).
        """
        t: Any = self
        env = Env(self.makeStorage())

        def isUser(user: str) -> Any:
            d = env.auth.isUser(user, DOMAIN)
            env.flush()
            return self.successResultOf(d)

        t.assertIs(isUser("bob"), True)
        t.assertIs(isUser("carol"), False)
        t.assertTrue(self.login(env))
        env.agent.down = True
        t.assertIs(isUser("bob"), True)
        t.assertIs(isUser("alice"), True)
        t.assertIsNone(isUser("carol"))
        t.assertIsNone(isUser("admin"))
        env.clock.advance(DAY + 1)
        t.assertIsNone(isUser("bob"))
        t.assertIsNone(isUser("alice"))


class MemoryTimelineTests(TimelineMixin, SynchronousTestCase):
    def makeStorage(self) -> Any:
        return MemoryStorage()


class DatabaseTimelineTests(TimelineMixin, SynchronousTestCase):
    def makeStorage(self) -> Any:
        path = os.path.join(self.mktemp() + ".d", "state.sqlite3")
        os.makedirs(os.path.dirname(path))
        self.db = store.Store(path, SynchronousWorker())
        self.addCleanup(lambda: self.successResultOf(self.db.close()))
        self.path = path
        return DatabaseStorage(self.db)

    def test_storedInOldFormat(self) -> None:
        """
        Timestamps are stored as CURRENT_TIMESTAMP text, the hash as text.
        """
        env = Env(self.makeStorage())
        self.assertTrue(self.login(env))
        conn = sqlite3.connect(self.path)
        try:
            row = conn.execute(
                "SELECT pwhash, firstauth, remoteauth, anyauth, "
                "typeof(firstauth) FROM authcache WHERE jid = ?",
                (f"alice@{DOMAIN}",),
            ).fetchone()
        finally:
            conn.close()
        self.assertTrue(row[0].startswith("$2"))
        self.assertEqual(row[1], store.formatTimestamp(START))
        self.assertEqual(row[1], row[2])
        self.assertEqual(row[4], "text")

    def test_surviveRestart(self) -> None:
        """
        A new process (a new cache over the same file) accepts the cached
        password and knows the user exists while the backend is down.
        """
        storage = self.makeStorage()
        env = Env(storage)
        self.assertTrue(self.login(env))
        env2 = Env(DatabaseStorage(self.db), clock=env.clock, resource=env.resource)
        env2.agent.down = True
        env.clock.advance(3 * HOUR)
        self.assertTrue(self.login(env2))
        d = env2.auth.isUser("alice", DOMAIN)
        self.assertIs(self.successResultOf(d), True)


class NoCacheTests(SynchronousTestCase):
    def test_noCacheNoFallback(self) -> None:
        """
        Without a cache an outage means "no" for auth and "unknown" for isuser.
        """
        env = Env(None, cache=False)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        env.agent.down = True
        self.assertFalse(self.successResultOf(env.start("alice", ALICE)))
        self.assertIsNone(self.successResultOf(env.auth.isUser("alice", DOMAIN)))


class ConcurrencyTests(SynchronousTestCase):
    """
    Concurrent logins of one user share one backend request and one hash.
    """

    def test_sameUserSamePassword(self) -> None:
        hasher = ManualWorker()
        env = Env(MemoryStorage(), hasher=hasher, latency=1.0)
        ds = [env.start("alice", ALICE) for _ in range(20)]
        env.flush()
        self.assertEqual(env.backendCalls(), 1)
        for d in ds:
            self.assertNoResult(d)
        env.clock.advance(1.0)
        env.flush()
        self.assertEqual([self.successResultOf(d) for d in ds], [True] * 20)
        # The answers left before the hash was made; one hash is queued.
        self.assertEqual(hasher.calls, ["hashPassword"])
        # More logins while hashing: the backend is asked (no entry yet), but
        # no second hash starts.
        more = [env.start("alice", ALICE) for _ in range(5)]
        env.flush()
        env.clock.advance(1.0)
        env.flush()
        self.assertEqual([self.successResultOf(d) for d in more], [True] * 5)
        self.assertEqual(env.backendCalls(), 2)
        self.assertEqual(hasher.calls, ["hashPassword"])
        hasher.runAll()
        self.assertEqual(list(env.storage.entries), [f"alice@{DOMAIN}"])
        # Now a burst is served by the fast verifier: the password was
        # confirmed by the backend and hashed by this process; no bcrypt.
        burst = [env.start("alice", ALICE) for _ in range(10)]
        self.assertEqual([self.successResultOf(d) for d in burst], [True] * 10)
        self.assertEqual(hasher.calls, ["hashPassword"])
        # A restarted daemon knows only the stored hash: one shared check.
        env = Env(env.storage, hasher=hasher, clock=env.clock, resource=env.resource)
        burst = [env.start("alice", ALICE) for _ in range(10)]
        self.assertEqual(hasher.calls, ["hashPassword", "checkPassword"])
        hasher.runAll()
        self.assertEqual([self.successResultOf(d) for d in burst], [True] * 10)
        self.assertEqual(env.backendCalls(), 2)

    def test_differentPasswordsNotShared(self) -> None:
        """
        Only the same password is shared: a wrong one gets its own answer.
        """
        env = Env(MemoryStorage(), latency=1.0)
        good = env.start("alice", ALICE)
        bad = env.start("alice", "wrong")
        env.flush()
        self.assertEqual(env.backendCalls(), 2)
        env.clock.advance(1.0)
        env.flush()
        self.assertTrue(self.successResultOf(good))
        self.assertFalse(self.successResultOf(bad))

    def test_evictionWhileHashing(self) -> None:
        """
        A noauth arriving while the hash of a just-confirmed password is still
        being made wins: the hash is not stored afterwards.
        """
        hasher = ManualWorker()
        env = Env(MemoryStorage(), hasher=hasher)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        env.resource.users["alice"] = "changed"
        d = env.start("alice", ALICE)
        env.flush()
        self.assertFalse(self.successResultOf(d))
        hasher.runAll()
        self.assertEqual(env.storage.entries, {})

    def test_oneCallerCancels(self) -> None:
        """
        A caller that goes away does not cancel the work others wait for; when
        the last one goes, the backend request is cancelled.
        """
        env = Env(MemoryStorage(), latency=1.0)
        first = env.start("alice", ALICE)
        second = env.start("alice", ALICE)
        env.flush()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        env.clock.advance(1.0)
        env.flush()
        self.assertTrue(self.successResultOf(second))
        self.assertEqual(env.backendCalls(), 1)
        # All callers gone: the shared work is cancelled, nothing is cached,
        # and a later login starts afresh.
        env.clock.advance(2 * HOUR)
        env.resource.users["bob"] = "b"
        lone = env.start("bob", "b")
        env.flush()
        lone.cancel()
        self.failureResultOf(lone, CancelledError)
        self.assertEqual(env.auth._inflight, {})
        env.clock.advance(1.0)
        env.flush()
        self.assertNotIn(f"bob@{DOMAIN}", env.storage.entries)
        again = env.start("bob", "b")
        env.flush()
        env.clock.advance(1.0)
        env.flush()
        self.assertTrue(self.successResultOf(again))

    def test_noPasswordInMemoryKeys(self) -> None:
        """
        In-flight work is indexed by a keyed hash, never by the password.
        """
        env = Env(MemoryStorage(), latency=1.0)
        env.start("alice", ALICE)
        (key,) = env.auth._inflight
        self.assertNotIn(ALICE, key)
        self.assertNotIn(ALICE.encode(), key[2])


class BusyWorkerTests(SynchronousTestCase):
    def test_tokenAndIsUserWhileHashersBusy(self) -> None:
        """
        With the bcrypt threads held busy by a burst of cache checks, a token
        login and an isuser are answered; the cache checks answer afterwards.
        """
        hasher = ManualWorker()
        env = Env(MemoryStorage(), hasher=hasher)
        users = {f"user{i}": f"pw{i}" for i in range(8)}
        env.resource.users.update(users)
        for user, password in users.items():
            d = env.start(user, password)
            env.flush()
            self.assertTrue(self.successResultOf(d))
        hasher.runAll()
        # A restarted daemon: the entries are stored, nothing is confirmed in
        # memory yet, so every check needs bcrypt.
        env = Env(env.storage, hasher=hasher, clock=env.clock, resource=env.resource)
        burst = [env.start(user, password) for user, password in users.items()]
        # Two checks on the two bcrypt threads, the rest waiting in order.
        self.assertEqual(len(hasher.queue), 2)
        assert env.cache is not None
        self.assertEqual(env.cache.hashes.queued, len(users) - 2)
        for d in burst:
            self.assertNoResult(d)
        token = makeToken(SECRET, "alice", DOMAIN, int(START + HOUR))
        self.assertTrue(self.successResultOf(env.start("alice", token)))
        isUser = env.auth.isUser("bob", DOMAIN)
        env.flush()
        self.assertIs(self.successResultOf(isUser), True)
        # The burst is still waiting for the workers.
        self.assertEqual(len(hasher.queue), 2)
        hasher.runAll()
        self.assertEqual([self.successResultOf(d) for d in burst], [True] * len(users))


class BrokenStorage(MemoryStorage):
    """
    A storage whose reads fail, like a damaged database.
    """

    def get(self, jid: str) -> Deferred[Any]:
        return fail(Failure(sqlite3.DatabaseError("database disk image is malformed")))


class BrokenStorageTests(SynchronousTestCase):
    def test_backendStillAsked(self) -> None:
        """
        A failing cache storage is logged and bypassed: logins go to the
        backend, isuser during an outage is unknown.
        """
        env = Env(BrokenStorage())
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        env.agent.down = True
        env.clock.advance(2 * HOUR)
        self.assertFalse(self.successResultOf(env.start("alice", ALICE)))
        self.assertIsNone(self.successResultOf(env.auth.isUser("carol", DOMAIN)))
        self.assertTrue(self.flushLoggedErrors(sqlite3.DatabaseError))


class KeptEntriesTests(SynchronousTestCase):
    """
    C{DatabaseStorage} with a clock keeps entries in memory for a few seconds
    and writes a successful query at most once a minute: cache hits cost no
    trip to the database thread; changes made by the admin command apply
    within C{READ_SECONDS}.
    """

    def test_hitsSkipTheDatabase(self) -> None:
        clock = Clock()
        clock.advance(START)
        path = os.path.join(self.mktemp() + ".d", "state.sqlite3")
        os.makedirs(os.path.dirname(path))
        worker = SynchronousWorker()
        db = store.Store(path, worker)
        self.addCleanup(lambda: self.successResultOf(db.close()))
        env = Env(DatabaseStorage(db, clock), clock=clock)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        clock.advance(1)
        self.assertTrue(self.successResultOf(env.start("alice", ALICE)))  # reads once
        worker.calls.clear()
        for _ in range(20):
            clock.advance(0.1)
            self.assertTrue(self.successResultOf(env.start("alice", ALICE)))
        self.assertEqual(worker.calls, [])
        self.assertEqual(env.backendCalls(), 1)
        # The admin command removes the entry: within READ_SECONDS it is gone
        # for the daemon too (the backend is asked again).
        conn = sqlite3.connect(path)
        conn.execute("DELETE FROM authcache")
        conn.commit()
        conn.close()
        clock.advance(DatabaseStorage.READ_SECONDS)
        d = env.start("alice", ALICE)
        env.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(env.backendCalls(), 2)
