"""
bcrypt work for the credential cache, so that bcrypt never decides who waits.

L{HashQueue} sends at most C{concurrency} jobs at once to the bcrypt threads
and keeps the rest in order of priority: checking a cached password (someone
is waiting for that answer) before hashing a newly confirmed one (which only
makes a later login faster).  Hashes never take the last free thread: a check
never waits for more than the checks ahead of it.  The queue is bounded; one
user gets at most L{MAX_CHECKS_PER_USER} checks queued or running (a burst of
guesses against one account cannot hold up everyone else's), and a job whose
caller has gone (its L{Deferred} was cancelled) is dropped before it starts; a
check already running still reports its result to C{whenChecked} (the fast
verifier learns the password even if the login that asked timed out).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.interfaces import IWorker

log = Logger()

#: Checks (someone waits) go before hashes (nobody waits).
CHECK = 0
HASH = 1

#: Jobs waiting for a bcrypt thread, at most.  At about 0.25 s a job (cost 12)
#: on two threads, a full queue is half a minute of work.
MAX_QUEUED = 256

#: Checks of one user's passwords queued or running at once, at most.
MAX_CHECKS_PER_USER = 2


class QueueFull(Exception):
    """
    No room for the job: the bcrypt threads have more work than they can do
    in time (or this user has enough checks waiting).
    """


def checkPassword(password: bytes, pwhash: bytes) -> bool:
    """
    Whether C{password} matches the bcrypt hash C{pwhash} (blocking).
    """
    try:
        return bcrypt.checkpw(password, pwhash)
    except ValueError:
        # Not a bcrypt hash (a damaged or foreign row): no match.
        return False


def hashPassword(password: bytes, rounds: int) -> bytes:
    """
    A new bcrypt hash of C{password} with cost C{rounds} (blocking).
    """
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds))


class _HashJob:
    __slots__ = (
        "priority", "seq", "f", "args", "owner", "deferred", "cancelled", "whenDone"
    )

    def __init__(
        self, priority: int, seq: int, f: Callable[..., Any], args: tuple[Any, ...],
        owner: str | None, whenDone: Callable[[Any], None] | None = None,
    ) -> None:
        self.priority = priority
        self.seq = seq
        self.f = f
        self.args = args
        self.owner = owner
        self.whenDone = whenDone
        self.cancelled = False
        self.deferred: Deferred[Any] = Deferred(self._cancel)

    def __lt__(self, other: _HashJob) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled = True


class HashQueue:
    """
    bcrypt jobs for C{worker}'s threads, in priority order.

    @param worker: runs the blocking functions (the bcrypt threads).
    @param concurrency: jobs given to C{worker} at once (its thread count).
    @param maxQueued: jobs waiting, at most.
    """

    def __init__(self, worker: IWorker, concurrency: int, maxQueued: int = MAX_QUEUED) -> None:
        self._worker = worker
        self._concurrency = concurrency
        self._maxQueued = maxQueued
        self._queue: list[_HashJob] = []
        self._seq = itertools.count()
        self._running = 0
        self._runningHashes = 0
        # Checks queued or running per user.
        self._checks: dict[str, int] = {}
        self._idle: list[Deferred[None]] = []
        self._fullLogged = False

    @property
    def queued(self) -> int:
        """
        Jobs waiting (cancelled ones that were not dropped yet included).
        """
        return len(self._queue)

    def check(
        self, owner: str, password: bytes, pwhash: bytes,
        whenChecked: Callable[[bool], None] | None = None,
    ) -> Deferred[bool]:
        """
        Whether C{password} matches C{pwhash}, before any hashing; fails with
        L{QueueFull} when there is no room (or C{owner} has enough checks
        waiting).

        @param whenChecked: called with the result once the check has run,
            even if the returned L{Deferred} was cancelled meanwhile.
        """
        if self._checks.get(owner, 0) >= MAX_CHECKS_PER_USER:
            return fail(QueueFull(f"{MAX_CHECKS_PER_USER} checks of this user waiting"))
        if len(self._queue) >= self._maxQueued and not self._dropNewestHash():
            return self._full()
        self._checks[owner] = self._checks.get(owner, 0) + 1
        return self._submit(CHECK, checkPassword, (password, pwhash), owner, whenChecked)

    def hash(self, password: bytes, rounds: int) -> Deferred[bytes]:
        """
        A new hash of C{password}, after every check; fails with L{QueueFull}
        when there is no room.
        """
        if len(self._queue) >= self._maxQueued:
            return self._full()
        return self._submit(HASH, hashPassword, (password, rounds), None)

    def _full(self) -> Deferred[Any]:
        if not self._fullLogged:
            self._fullLogged = True
            log.warn(
                "bcrypt queue full ({count} jobs waiting): new passwords are not "
                "cached and cached ones not checked until it drains",
                count=len(self._queue),
            )
        return fail(QueueFull(f"{len(self._queue)} bcrypt jobs waiting"))

    def _dropNewestHash(self) -> bool:
        hashes = [job for job in self._queue if job.priority == HASH]
        if not hashes:
            return False
        newest = max(hashes)
        self._queue.remove(newest)
        heapq.heapify(self._queue)
        newest.deferred.errback(QueueFull("made room for a check"))
        return True

    def _submit(
        self, priority: int, f: Callable[..., Any], args: tuple[Any, ...], owner: str | None,
        whenDone: Callable[[Any], None] | None = None,
    ) -> Deferred[Any]:
        job = _HashJob(priority, next(self._seq), f, args, owner, whenDone)
        heapq.heappush(self._queue, job)
        d = job.deferred
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        # Hashes leave one thread to checks (when there is more than one).
        hashThreads = max(self._concurrency - 1, 1)
        while self._running < self._concurrency and self._queue:
            job = self._queue[0]
            if job.priority == HASH and self._runningHashes >= hashThreads:
                break
            heapq.heappop(self._queue)
            if job.cancelled:
                self._release(job)
                continue
            self._running += 1
            if job.priority == HASH:
                self._runningHashes += 1
            self._worker.run(job.f, *job.args).addBoth(self._done, job)
        if not self._running and not self._queue:
            self._fullLogged = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _release(self, job: _HashJob) -> None:
        if job.owner is not None:
            left = self._checks.get(job.owner, 1) - 1
            if left:
                self._checks[job.owner] = left
            else:
                self._checks.pop(job.owner, None)

    def _done(self, result: Any, job: _HashJob) -> None:
        self._running -= 1
        if job.priority == HASH:
            self._runningHashes -= 1
        self._release(job)
        if job.whenDone is not None and not isinstance(result, Failure):
            try:
                job.whenDone(result)
            except Exception:
                log.failure("bcrypt job callback failed")
        if not job.deferred.called:
            if isinstance(result, Failure):
                job.deferred.errback(result)
            else:
                job.deferred.callback(result)
        self._dispatch()

    def stop(self) -> Deferred[None]:
        """
        Drop the jobs still waiting (their callers get L{QueueFull}) and fire
        once the running ones are done.
        """
        queued, self._queue = self._queue, []
        for job in queued:
            self._release(job)
            if not job.deferred.called:
                job.deferred.errback(QueueFull("stopping"))
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
