"""
Tests for L{xcauth.deadlines}: one timer doing what C{addTimeout} does for
every L{Deferred}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xcauth.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 4.0)

    def test_timesOut(self) -> None:
        """
        A L{Deferred} still pending after the timeout is cancelled and fails
        with L{TimeoutError}; not a moment before.
        """
        d: Deferred[Any] = self.deadlines.watch(Deferred())
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_firedInTime(self) -> None:
        """
        A L{Deferred} that fires in time keeps its result, and no timer is
        left once nothing is watched.
        """
        d: Deferred[Any] = Deferred()
        self.deadlines.watch(d)
        d.callback("answer")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(d), "answer")

    def test_eachItsOwnTime(self) -> None:
        """
        Each L{Deferred} expires C{timeout} seconds after it was watched,
        whatever happened to those watched before it.
        """
        # Times that are exact in binary floating point.
        first: Deferred[Any] = self.deadlines.watch(Deferred())
        self.clock.advance(1.25)
        second: Deferred[Any] = self.deadlines.watch(Deferred())
        self.clock.advance(0.5)
        third: Deferred[Any] = self.deadlines.watch(Deferred())
        second.callback(None)
        self.clock.advance(4.0 - 1.75)
        self.failureResultOf(first, TimeoutError)
        self.assertNoResult(third)
        self.clock.advance(1.75 - 0.125)
        self.assertNoResult(third)
        self.clock.advance(0.125)
        self.failureResultOf(third, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelledByCaller(self) -> None:
        """
        Cancelling before the timeout is a plain cancellation.
        """
        d: Deferred[Any] = self.deadlines.watch(Deferred())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancellerAnswers(self) -> None:
        """
        A canceller that gives a result on timeout: the result stays.
        """
        d: Deferred[Any] = self.deadlines.watch(Deferred(lambda d: d.callback("late")))
        self.clock.advance(4.0)
        self.assertEqual(self.successResultOf(d), "late")

    def test_watchedWhileExpiring(self) -> None:
        """
        A L{Deferred} watched from the callbacks of one that timed out gets
        the full timeout, and older ones still expire on time.
        """
        later: list[Deferred[Any]] = []
        first: Deferred[Any] = Deferred()
        self.deadlines.watch(first)
        first.addErrback(lambda f: later.append(self.deadlines.watch(Deferred())))
        self.clock.advance(1.0)
        second: Deferred[Any] = self.deadlines.watch(Deferred())
        self.clock.advance(3.0)
        self.assertEqual(len(later), 1)
        self.clock.advance(1.0)
        self.failureResultOf(second, TimeoutError)
        self.assertNoResult(later[0])
        self.clock.advance(3.0)
        self.failureResultOf(later[0], TimeoutError)

    def test_fractionalTimes(self) -> None:
        """
        Rescheduling at float times never spins without the clock moving.
        """
        deadlines = Deadlines(self.clock, 0.3)
        ds = []
        for _ in range(50):
            ds.append(deadlines.watch(Deferred()))
            self.clock.advance(0.1)
        self.clock.advance(0.3)
        for d in ds:
            self.failureResultOf(d, TimeoutError)
