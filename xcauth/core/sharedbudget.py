"""
The brute-force budgets of several nodes that share one PostgreSQL database.

L{SharedBudget} is the L{IAttemptBudget} of every node of a cluster: each
node decides at once from its memory (no round trip per login), as
L{MemoryBudget} does, and adds what the other nodes counted.  Every
L{SharedBudget.INTERVAL} seconds a node writes the checks it counted since
(refused checks of a user; failed, unanswered or refused checks toward a
Nextcloud) to the C{budgetevents} table and reads the other nodes' checks of
the last C{window}: a user's budget and a Nextcloud's daemon-wide budget are
then the cluster's.  L{SharedBudget.exchange} is one exchange; the daemon
runs it on a timer (L{xcauth.daemon.hub.Hub}) and once more when it stops.

The slack: checks still in flight, and those made on other nodes within the
last interval, are not seen yet; so within one interval an attacker who
spreads guesses over N nodes gets at most N times a node's limit, after that
the cluster's limit holds.  A user's budget refills at the same rate over
the merged checks of all nodes.  With the database unavailable, each node
keeps its own limits (its own checks always count) and writes what it
counted once the database is back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from xcauth.core.penalty import MemoryBudget
from xcauth.interfaces import IAttemptBudget

log = Logger()

#: Checks waiting to be written at most (the oldest are dropped first: the
#: node's own limits still count them).
MAX_OUTBOX = 10_000
#: Other nodes' checks kept at most.
MAX_REMOTE = 100_000

#: See L{SharedBudget}'s C{exchange}.
Exchange = Callable[
    [str, list[tuple[str, str, float]], float, float],
    "Deferred[list[tuple[str, str, float]]]",
]


@implementer(IAttemptBudget)
class SharedBudget(MemoryBudget):
    """
    L{MemoryBudget} plus the checks of the other nodes of the database.

    @param exchange: writes this node's checks and reads the others' in the
        shared database: C{exchange(node, events, since, before)} with
        C{events} a list of C{(kind, key, at)}, firing with the other nodes'
        events since C{since} (L{xcauth.state.budget.exchangeEvents} run by
        the store); C{before}: events older than this may be forgotten.
    @param clock: the clock of the exchanges.
    @param node: this node's name in the table.
    """

    #: Seconds between two exchanges with the database.
    INTERVAL = 1.0

    def __init__(self, exchange: Exchange, clock: IReactorTime, node: str, checks: int = 5,
                 refill: float = 900.0, window: float = 1800.0,
                 maxEntries: int = 100_000) -> None:
        super().__init__(checks, refill, window, maxEntries)
        self._exchange = exchange
        self._clock = clock
        self.node = node
        self._outbox: deque[tuple[str, str, float]] = deque(maxlen=MAX_OUTBOX)
        self._remoteUsers: dict[str, list[float]] = {}
        self._remoteBackends: dict[str, list[float]] = {}
        self._running: Deferred[None] | None = None
        self._failing = False

    # -- what the other nodes counted -------------------------------------------

    def _remoteLevel(self, user: str, now: float) -> float:
        times = self._remoteUsers.get(user)
        if not times:
            return 0.0
        level, previous = 0.0, times[0]
        for at in times:
            level = max(level - (at - previous) * self.rate, 0.0) + 1.0
            previous = at
        return max(level - max(now - previous, 0.0) * self.rate, 0.0)

    def _remoteCount(self, backend: str, now: float) -> int:
        cutoff = now - self.window
        return sum(1 for at in self._remoteBackends.get(backend, ()) if at > cutoff)

    # -- IAttemptBudget -----------------------------------------------------------

    def settle(self, user: str, backend: str, reservedAt: float, now: float,
               accepted: bool | None) -> None:
        super().settle(user, backend, reservedAt, now, accepted)
        if accepted is False:
            self._outbox.append(("user", user, reservedAt))
        if accepted is not True:
            self._outbox.append(("backend", backend, reservedAt))

    def failed(self, backend: str, now: float) -> None:
        super().failed(backend, now)
        self._outbox.append(("backend", backend, now))

    # -- the exchanges ----------------------------------------------------------------

    def exchange(self) -> Deferred[None] | None:
        """
        Write the checks counted since the last exchange and read the other
        nodes' (at most one exchange at a time; a failed one keeps the
        checks for the next).
        """
        if self._running is not None:
            return None
        now = self._clock.seconds()
        events = list(self._outbox)
        self._outbox.clear()
        horizon = max(self.window, self.checks / self.rate)
        d = self._exchange(self.node, events, now - horizon, now - horizon)

        def read(rows: list[tuple[str, str, float]]) -> None:
            users: dict[str, list[float]] = {}
            backends: dict[str, list[float]] = {}
            for kind, key, at in rows[-MAX_REMOTE:]:
                (users if kind == "user" else backends).setdefault(key, []).append(at)
            self._remoteUsers, self._remoteBackends = users, backends
            if self._failing:
                self._failing = False
                log.info("brute-force budgets shared with the other nodes again")

        def failed(f: Any) -> None:
            # Written next time; meanwhile this node's own limits hold.
            for event in reversed(events):
                self._outbox.appendleft(event)
            if not self._failing:
                self._failing = True
                log.warn(
                    "cannot share the brute-force budgets with the other nodes: "
                    "{reason}; each node keeps its own limits meanwhile",
                    reason=str(f.value),
                )

        def done(_: object) -> None:
            self._running = None

        exchanged: Deferred[None] = d.addCallbacks(read, failed)
        exchanged.addBoth(done)
        if self._running is None and not exchanged.called:
            self._running = exchanged
        return exchanged
