"""
Time limits for many L{Deferred}s that share one timeout, on one timer.

L{Deferred.addTimeout} schedules a L{DelayedCall} per L{Deferred} (a push onto
the reactor's timer heap, compared with a Python-level C{__lt__}, and a
cancellation that the reactor sweeps later) and adds three closures, a list
and five cells.  A backend login has two limits (the backend's C{--timeout}
and the request's C{--deadline}); at 500 concurrent logins that is 1,000
pending timers and about 40 objects per login that live as long as the login
does.  Objects living that long survive the garbage collector's young
generations, so each full collection had more to traverse: the profile at
C = 500 showed about 20% of the daemon's CPU in the collector, against 5% at
C = 50.

With one timeout for all of them, limits expire in the order they were set:
an insertion-ordered map of the pending L{Deferred}s (C{OrderedDict}: O(1)
insertion, removal and oldest-first) and one timer for the oldest do the same
work.  A L{Deferred} that times out is cancelled and its L{CancelledError}
becomes a L{TimeoutError}, as with C{addTimeout}.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")

#: A limit within this many seconds of the timer's firing counts as expired:
#: the float arithmetic of rescheduling must not make the timer fire again
#: and again without the clock moving (C{task.Clock}).
_SLACK = 1e-6


class Deadlines:
    """
    Cancel each watched L{Deferred} that has not fired C{timeout} seconds
    after it was watched.

    @param clock: the clock for the limits.
    @param timeout: seconds, the same for every L{Deferred}.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        # Pending Deferreds to the time they expire, oldest first.
        self._pending: OrderedDict[Deferred[Any], float] = OrderedDict()
        # Those cancelled for their limit whose result is not known yet.
        self._timedOut: set[Deferred[Any]] = set()
        self._timer: IDelayedCall | None = None
        self._expiring = False

    def watch(self, d: Deferred[T]) -> Deferred[T]:
        """
        Limit C{d} (and the callbacks added to it so far) to C{timeout}
        seconds, like C{d.addTimeout(timeout, clock)}.

        @return: C{d}
        """
        self._pending[d] = self.clock.seconds() + self.timeout
        if self._timer is None and not self._expiring:
            self._timer = self.clock.callLater(self.timeout, self._expire)
        return d.addBoth(self._fired, d)

    def _fired(self, result: Any, d: Deferred[Any]) -> Any:
        if self._timedOut and d in self._timedOut:
            self._timedOut.discard(d)
            if isinstance(result, Failure):
                result.trap(CancelledError)
                raise TimeoutError(self.timeout, "Deferred")
            return result
        pending = self._pending
        pending.pop(d, None)
        if not pending and self._timer is not None:
            # Nothing left to watch: leave no timer behind (a stopped
            # service, a test's reactor).
            self._timer.cancel()
            self._timer = None
        return result

    def _expire(self) -> None:
        self._timer = None
        self._expiring = True
        pending = self._pending
        try:
            while pending:
                d, expiry = next(iter(pending.items()))
                if expiry - self.clock.seconds() > _SLACK:
                    break
                del pending[d]
                self._timedOut.add(d)
                # Runs callbacks, which may watch or release other Deferreds:
                # the loop looks at the oldest again each time.
                d.cancel()
        finally:
            self._expiring = False
            if pending and self._timer is None:
                first = next(iter(pending.values()))
                delay = max(first - self.clock.seconds(), 0.0)
                self._timer = self.clock.callLater(delay, self._expire)
