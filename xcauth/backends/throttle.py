"""
Watching Nextcloud's brute-force throttle from xcauth's side.

Nextcloud delays every Basic-auth login from an address with failed logins
(0.1 s doubling per failure in 12 hours, up to 25 s) and refuses all of them
with C{429} past ten failures in 30 minutes.  xcauth logs in for all its
users from one address, so it should be on Nextcloud's brute-force
allow-list.  L{ThrottleWatch}, a L{TimerService}, reads the capabilities when
it starts and every C{interval} seconds and warns when xcauth's address is not allow-listed or
is being delayed, and warns when a login was answered with C{429} or took
longer than C{warnDelay} seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.interfaces import NoMetrics, ThrottleSource, ThrottleState

log = Logger()

#: Seconds between two warnings about slow or refused logins.
WARN_INTERVAL = 60.0

#: Seconds a C{429} or a slow login keeps the backend "throttling" (Nextcloud
#: blocks for the failures of the last 30 minutes).
THROTTLED_FOR = 1800.0

ALLOW_LIST_HOWTO = (
    "add xcauth's address (as Nextcloud sees it; behind a proxy see "
    "trusted_proxies) to the allow-list of the Brute-force settings app "
    "(Administration settings > Security > Brute-force IP allow-list), or with "
    "occ config:app:set bruteForce whitelist_1 --value=ADDRESS/32"
)


class ThrottleWatch(TimerService):
    """
    Reads the throttle state of one Nextcloud and warns: a service reading
    when it starts and every C{interval} seconds on C{clock}.

    @param client: what reads the capabilities (an L{xcauth.backends.ocs.OCSClient}).
    @param clock: schedules the reads and rate-limits the warnings.
    @param interval: seconds between two reads.
    @param warnDelay: a login slower than this (seconds) is warned about.
    """

    def __init__(self, client: ThrottleSource, clock: IReactorTime,
                 interval: float = 300.0, warnDelay: float = 1.0,
                 metrics: NoMetrics | None = None) -> None:
        super().__init__(interval, self.check)
        self.client = client
        self.metrics = metrics if metrics is not None else NoMetrics()  # metrics
        #: Schedules the reads (L{TimerService}'s clock) and dates the logins.
        self.clock: IReactorTime = clock
        self.interval = interval
        self.warnDelay = warnDelay
        self._lastWarning = -WARN_INTERVAL
        #: The last state read, or C{None}.
        self.state: ThrottleState | None = None
        # When a login was last answered 429 or slowed by the throttle.
        self._lastThrottled: float | None = None

    def key(self) -> str:
        """
        The backend's key in the daemon-wide budget (its URL).
        """
        return str(self.client.url)

    def allowListed(self) -> bool:
        """
        Whether the capabilities last read say xcauth's address is on the
        brute-force allow-list.
        """
        return self.state is not None and self.state.allowListed is True

    def throttled(self) -> bool:
        """
        Whether this Nextcloud throttles xcauth's address: the capabilities
        report a delay of C{warnDelay} or more, or a login was answered
        C{429} or took C{warnDelay} within L{THROTTLED_FOR} seconds.
        """
        if self.state is not None and self.state.delay >= self.warnDelay:
            return True
        last = self._lastThrottled
        return last is not None and 0 <= self.clock.seconds() - last < THROTTLED_FOR

    def stopService(self) -> None:
        """
        Stop reading, at once: unlike L{TimerService}'s, this stop does not
        wait for a read in progress (it ends within the backend's timeout).
        A watch is not started again.
        """
        if self.running:
            super().stopService()
            Service.stopService(self)

    def check(self) -> Deferred[None]:
        """
        Read the capabilities once and warn about what they say.
        """
        d: Deferred[Any] = self.client.throttleState()
        d.addCallbacks(self._seen, self._failed)
        return d

    def _seen(self, state: ThrottleState) -> None:
        self.state = state
        self.metrics.throttle(publicURL(self.client.url), state.delay, state.allowListed)
        if state.allowListed is False:
            log.warn(
                "xcauth's address is not on the brute-force allow-list of Nextcloud at "
                "{url}: failed logins of its users slow down (and may block) every "
                "login; {howto}",
                url=self.client.url,
                howto=ALLOW_LIST_HOWTO,
            )
        if state.delay >= self.warnDelay:
            log.warn(
                "Nextcloud at {url} delays every login from xcauth's address by "
                "{delay:.1f} s (brute-force protection after failed logins)",
                url=self.client.url,
                delay=state.delay,
            )

    def _failed(self, f: Failure) -> None:
        log.info(
            "cannot read the capabilities of Nextcloud at {url}: {reason}",
            url=self.client.url,
            reason=str(f.value),
        )

    def loginSeen(self, seconds: float, status: int) -> None:
        """
        A password check took C{seconds} and was answered with C{status}.
        """
        if status != 429 and seconds < self.warnDelay:
            return
        now = self.clock.seconds()
        self._lastThrottled = now
        if now - self._lastWarning < WARN_INTERVAL:
            return
        self._lastWarning = now
        if status == 429:
            log.warn(
                "Nextcloud at {url} refuses logins from xcauth's address (HTTP 429, "
                "brute-force maximum reached after {delay:.1f} s): logins are "
                "answered from the credential cache only; {howto}",
                url=self.client.url,
                delay=seconds,
                howto=ALLOW_LIST_HOWTO,
            )
        else:
            log.warn(
                "a login at Nextcloud {url} took {delay:.1f} s (brute-force delay of "
                "xcauth's address?); {howto}",
                url=self.client.url,
                delay=seconds,
                howto=ALLOW_LIST_HOWTO,
            )


def publicURL(url: str) -> str:
    """
    C{url} without user information (a metrics label must hold no secret).
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class ThrottleWatches(MultiService):
    """
    The watches of every stock Nextcloud backend in use, as child services:
    started with this service, and at once for a backend added while it runs
    (a new domain).
    """

    def add(self, watch: ThrottleWatch) -> None:
        """
        Watch one more backend.
        """
        watch.setServiceParent(self)

    def discard(self, client: object) -> None:
        """
        Stop and forget the watch of C{client}, a backend no domain uses any
        more (its row changed or went).
        """
        for watch in [w for w in self if isinstance(w, ThrottleWatch) and w.client is client]:
            watch.disownServiceParent()
