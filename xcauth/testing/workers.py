"""
Stand-ins for L{xcauth.state.database.ThreadWorker} in tests: one that runs work at once
on the calling thread, and one that queues it until the test says so (to hold
a worker "busy" and prove that other answers do not wait for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.interfaces import IWorker


@implementer(IWorker)
class SynchronousWorker:
    """
    Runs work immediately; the Deferred has already fired.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Call C{f(*args)} now.
        """
        self.calls.append(getattr(f, "__name__", repr(f)))
        try:
            return succeed(f(*args))
        except BaseException:
            return fail(Failure())


@implementer(IWorker)
class ManualWorker:
    """
    Queues work until L{runOne} or L{runAll}: a worker pool that is busy until
    the test frees it.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.calls: list[str] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Queue C{f(*args)}.
        """
        d: Deferred[Any] = Deferred()
        self.calls.append(getattr(f, "__name__", repr(f)))
        self.queue.append((f, args, d))
        return d

    def runOne(self) -> None:
        """
        Run the oldest queued call.
        """
        f, args, d = self.queue.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def runAll(self) -> None:
        """
        Run queued calls (including those they queue) until none is left.
        """
        while self.queue:
            self.runOne()
