"""
The brute-force budgets shared by the nodes of one database
(L{xcauth.core.sharedbudget}), on SQLite files standing in for the shared
database (the same row functions run on PostgreSQL, see
L{tests.e2e.test_cluster_e2e}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from xcauth.core.sharedbudget import SharedBudget
from xcauth.interfaces import IAttemptBudget
from xcauth.state import database as store
from xcauth.state.budget import exchangeEvents

NC = "https://cloud.example.org"


class _FileStore:
    """
    Runs a row function on a SQLite file at once; C{down} makes every call
    fail as an unreachable database would.
    """

    def __init__(self, path: str) -> None:
        self.conn = store.connect(path)
        self.down = False

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        if self.down:
            return fail(store.DatabaseError("the database is unavailable"))
        return succeed(f(self.conn, *args))


class SharedBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        path = os.path.join(os.path.abspath(self.mktemp()))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.storeA = _FileStore(path)
        self.storeB = _FileStore(path)
        self.a = SharedBudget(self.exchanger(self.storeA), self.clock, "a")
        self.b = SharedBudget(self.exchanger(self.storeB), self.clock, "b")

    @staticmethod
    def exchanger(fileStore: _FileStore) -> Any:
        def exchange(node: str, events: Any, since: float, before: float) -> Deferred[Any]:
            return fileStore.run(exchangeEvents, node, events, since, before)

        return exchange

    def spend(self, budget: SharedBudget, user: str, n: int) -> None:
        for _ in range(n):
            now = self.clock.seconds()
            self.assertIsNone(budget.reserve(user, NC, now, 10))
            budget.settle(user, NC, now, now, False)
            self.clock.advance(1)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IAttemptBudget, self.a))

    def test_userBudgetIsTheClusters(self) -> None:
        """
        Checks refused through node A count on node B once both exchanged;
        before that, each node has its own budget (the documented slack).
        """
        self.spend(self.a, "bob@example.org", 5)
        now = self.clock.seconds()
        self.assertEqual(self.a.reserve("bob@example.org", NC, now, 10), "user")
        self.assertFalse(self.b.limited("bob@example.org", NC, now, 10))
        self.a.exchange()
        self.b.exchange()
        self.assertTrue(self.b.limited("bob@example.org", NC, now, 10))
        self.assertEqual(self.b.reserve("bob@example.org", NC, now, 10), "user")
        self.assertIsNone(self.b.reserve("alice@example.org", NC, now, 10))

    def test_refillsOverTheMergedChecks(self) -> None:
        """
        Node B sees node A's checks refill at the budget's rate.
        """
        self.spend(self.a, "bob@example.org", 5)
        self.a.exchange()
        self.b.exchange()
        self.clock.advance(self.a.checks / self.a.rate / 5 + 1)  # one check back
        now = self.clock.seconds()
        self.assertIsNone(self.b.reserve("bob@example.org", NC, now, 10))
        self.assertEqual(self.b.reserve("bob@example.org", NC, now, 10), "user")
        self.clock.advance(self.a.checks / self.a.rate + 1)
        self.assertFalse(self.b.limited("bob@example.org", NC, self.clock.seconds(), None))

    def test_backendBudgetIsTheClusters(self) -> None:
        """
        Failed checks toward a Nextcloud count daemon-wide on every node.
        """
        for i in range(6):
            self.spend(self.a, f"user{i}@example.org", 1)
        self.a.exchange()
        self.b.exchange()
        now = self.clock.seconds()
        self.assertEqual(self.b.backendFailures(NC, now), 6)
        for i in range(4):
            self.assertIsNone(self.b.reserve(f"other{i}@example.org", NC, now, 10))
        self.assertEqual(self.b.reserve("last@example.org", NC, now, 10), "backend")

    def test_databaseDownKeepsOwnLimits(self) -> None:
        """
        With the database unavailable each node keeps its own limits, says
        so once, and writes what it counted once the database is back.
        """
        self.storeA.down = True
        with capturedLogs() as events:
            self.spend(self.a, "bob@example.org", 5)
            self.a.exchange()
            self.a.exchange()
        warnings = [e for e in events if "cannot share" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(self.a.reserve("bob@example.org", NC, self.clock.seconds(), 10),
                         "user")
        self.storeA.down = False
        with capturedLogs():
            self.a.exchange()
        self.b.exchange()
        self.assertTrue(self.b.limited("bob@example.org", NC, self.clock.seconds(), 10))

    def test_acceptedChecksNotShared(self) -> None:
        """
        A right password gives its check back: nothing is written for it.
        """
        now = self.clock.seconds()
        self.assertIsNone(self.a.reserve("bob@example.org", NC, now, 10))
        self.a.settle("bob@example.org", NC, now, now, True)
        self.a.exchange()
        self.b.exchange()
        self.assertFalse(self.b.limited("bob@example.org", NC, now, 10))
        self.assertEqual(self.b.backendFailures(NC, now), 0)
