"""
Shared roster sync for ejabberd: the Nextcloud groups a user shares with others
become ejabberd shared roster groups, and Nextcloud display names become vCard
full names, as xmpp-cloud-auth did, but off the login path.

After a successful login the authenticator calls L{RosterSync.onLogin}, which
only notes the user: the sync starts after the login's answer has left, at most
one per user at a time (a login during a sync asks for one follow-up), at most
L{MAX_CONCURRENT} at once overall.  A sync asks the backend for the user's
shared roster (a C{fetch(user, domain) -> Deferred[dict[str, RosterEntry]]}
function, failing with L{BackendUnavailable}) and compares a SHA-256 of it with
the one stored at the last sync: an unchanged roster costs that one request and
no ejabberd command.  Otherwise, in this order:

 1. C{set_vcard USER HOST FN NAME} for each user whose stored full name differs;
 2. C{srg_list HOST}, to learn which groups ejabberd has;
 3. for each group not in it: C{srg_create ID HOST NAME NAME ID} (the group's
    id, see L{groupId}; its clean name, see L{cleanGroupName}, as label and
    description; displayed to itself, so members see each other), then
    C{srg_get_info ID HOST} to see that ejabberd has it; for each group in it
    that is not yet known, C{srg_get_members ID HOST}, to learn who is in it;
 4. C{srg_user_add USER HOST ID HOST} for each member not yet in the group
    and C{srg_user_del ...} for each stored member no longer listed, then
    C{srg_get_members ID HOST} where members were added, to see that they are;
 5. C{srg_user_del} of the login user from the groups it has left.

A group that ejabberd does not show after it was written (ejabberd 24.12
changes ids it does not keep as given) fails the sync instead of passing
unnoticed.  A known group that ejabberd no longer has (deleted there) is
created again; a group whose id differs from L{groupId}'s only by case, as
older versions named them, is used as it is.  Commands
go through an L{ICommandRunner}: L{HTTPCommandRunner} (ejabberd's mod_http_api)
or L{EjabberdctlRunner} (the C{ejabberdctl} program), each with a time limit per
command.  A failed sync is logged with the failing command's name and status
and tried again later (L{RETRY_DELAYS}); the state of each step that succeeded
is kept (L{xcauth.state.roster}), and the answer's hash only once every step
succeeded.

A sync stays in its tenant: a roster member whose domain is not served by the
same backend as the user (C{tenantOf}) is left out, so one Nextcloud cannot
write names or group members into another tenant's ejabberd host.  Every name
is made fit to be a command argument: a member whose name is no valid
identity is skipped, a display name loses its control characters and is cut
at L{MAX_ARGUMENT} characters, a group name longer than that is skipped (each
logged once per sync); the rest of the sync goes on.  Whatever a command
runner raises is a failed command (L{CommandFailed}).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xcauth.identity import InvalidIdentity, canonical
from xcauth.interfaces import (
    BackendUnavailable,
    Command,
    CommandFailed,
    ICommandRunner,
    RosterEntry,
)
from xcauth.state.database import whenFired
from xcauth.state.roster import RosterInfo, RosterState, groupKey

log = Logger()

#: Syncs running at once (each runs its commands one after the other; an
#: C{ejabberdctl} command starts an Erlang VM, about half a second of CPU).
MAX_CONCURRENT = 4
#: Seconds before the first, second, ... retry of a failed sync; after the
#: last one the sync is given up until the user's next login.
RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0, 1800.0)
#: Seconds one ejabberd command may take.
COMMAND_TIMEOUT = 10.0
#: Seconds a stopping daemon waits for the syncs in flight.
STOP_TIMEOUT = 5.0

#: Seconds a node's claim on a user's sync holds (L{RosterState.claim}): past
#: it, a node that died while syncing no longer keeps the others from syncing.
CLAIM_SECONDS = 300.0
#: Bytes of a command's output kept (the rest is dropped).
MAX_OUTPUT = 1024 * 1024

#: Characters of one command argument at most (a display name is cut there, a
#: longer group name skipped): far below the kernel's limit of an argument
#: (128 KiB) and anything a person's name needs.
MAX_ARGUMENT = 1024

#: Unicode categories a group name keeps: letters, digits, punctuation, symbols
#: and spaces (no control, format, separator-line or private-use characters).
_KEPT_CATEGORIES = frozenset(
    "Lu Ll Lt Lm Lo Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs".split()
)


# --- pure functions ---------------------------------------------------------


def cleanGroupName(name: str) -> str:
    """
    A group name as ejabberd gets it: only letters, digits, punctuation, symbols
    and spaces, no C{@} (so that C{GROUP@DOMAIN} keys stay unambiguous).
    """
    return "".join(
        c for c in name if c != "@" and unicodedata.category(c) in _KEPT_CATEGORIES
    )


#: Characters of a group id as is: what ejabberd's nodeprep keeps unchanged on
#: every version (ASCII lower case, digits, C{.}, C{_}, C{-}).
_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
#: Characters of a group id's readable part at most (the hash follows).
_ID_PREFIX = 40


def groupId(name: str) -> str:
    """
    The ejabberd id of a shared roster group of (clean) name C{name}: the name
    itself when it is already lower-case ASCII (C{[a-z0-9._-]}), else a
    readable lower-case part and a hash of the name, C{"g1-3d4c..."} for
    C{"G1"}.

    ejabberd 24.12 passes a new group's id through nodeprep (lower case, no
    spaces, no C{" & ' / : < > @}) and refuses or changes ids that it does not
    keep as given, while 23.01 keeps any id: ids of this form are kept by
    both, and two different names never share one.  The name is the group's
    label, which is what clients show.
    """
    if name and all(c in _ID_CHARACTERS for c in name):
        return name
    readable = "".join(c if c in _ID_CHARACTERS else "-" for c in name.lower())
    readable = "-".join(part for part in readable.split("-") if part)[:_ID_PREFIX]
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f"{readable or 'group'}-{digest}".lstrip(".")


def cleanDisplayName(name: str) -> str:
    """
    A display name fit to be a command argument: without control, format,
    line-separator or private-use characters (a NUL cannot be passed at all),
    cut at L{MAX_ARGUMENT} characters.
    """
    if not name.isprintable():
        name = "".join(
            c if c == " " or unicodedata.category(c) in _KEPT_CATEGORIES else " "
            for c in name
        ).strip()
    return name[:MAX_ARGUMENT]


def ignoredGroup(name: str) -> bool:
    """
    Whether a group is left out of the sync: its name ends in U+200B (ZERO WIDTH
    SPACE), the original's way of marking a Nextcloud group as not shared.
    """
    return name.endswith("\u200b")


def rosterHash(roster: Mapping[str, RosterEntry]) -> str:
    """
    SHA-256 (hex) of a shared roster, the same for the same content whatever the
    order of the users.
    """
    canonical = {user: [e.name, list(e.groups)] for user, e in roster.items()}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def splitJID(user: str, domain: str) -> tuple[str, str]:
    """
    A roster user name as (node, domain): C{bob} is C{bob@DOMAIN}, C{bob@other}
    stays on its domain.  The node is lowercased as ejabberd's nodeprep does, so
    that a Nextcloud user C{Alice} is the XMPP user C{alice}.
    """
    node, at, host = user.rpartition("@")
    if not at:
        node, host = user, domain
    return node.lower(), host.lower()


# --- commands ---------------------------------------------------------------


def setVcard(user: str, host: str, fullname: str) -> Command:
    """
    C{set_vcard USER HOST FN NAME}.
    """
    return Command(
        "set_vcard", (("user", user), ("host", host), ("name", "FN"), ("content", fullname))
    )


def srgCreate(group: str, host: str, label: str | None = None) -> Command:
    """
    C{srg_create GROUP HOST LABEL DESCRIPTION DISPLAY}: group id C{group},
    labelled and described C{label} (default: the id), displayed to itself.
    """
    label = group if label is None else label
    return Command(
        "srg_create",
        (
            ("group", group),
            ("host", host),
            ("label", label),
            ("description", label),
            ("display", group),
        ),
    )


def srgGetInfo(group: str, host: str) -> Command:
    """
    C{srg_get_info GROUP HOST}: nothing when ejabberd has no such group.
    """
    return Command("srg_get_info", (("group", group), ("host", host)))


def srgGetMembers(group: str, host: str) -> Command:
    """
    C{srg_get_members GROUP HOST}.
    """
    return Command("srg_get_members", (("group", group), ("host", host)))


def srgList(host: str) -> Command:
    """
    C{srg_list HOST}.
    """
    return Command("srg_list", (("host", host),))


def srgUserAdd(user: str, host: str, group: str, groupHost: str) -> Command:
    """
    C{srg_user_add USER HOST GROUP GROUPHOST}.
    """
    return Command(
        "srg_user_add",
        (("user", user), ("host", host), ("group", group), ("grouphost", groupHost)),
    )


def srgUserDel(user: str, host: str, group: str, groupHost: str) -> Command:
    """
    C{srg_user_del USER HOST GROUP GROUPHOST}.
    """
    return Command(
        "srg_user_del",
        (("user", user), ("host", host), ("group", group), ("grouphost", groupHost)),
    )


def _firstLine(text: str, limit: int = 200) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return ""


@implementer(ICommandRunner)
class HTTPCommandRunner:
    """
    Commands through ejabberd's HTTP API (mod_http_api): C{POST URL/COMMAND}
    with the arguments as a JSON object.

    @param client: a treq-like HTTP client (C{post(url, data=, headers=)}; a
        L{treq.client.HTTPClient} over its own connection pool).
    @param url: the API's base URL (C{http://127.0.0.1:5281/api}).
    @param clock: for the time limit.
    @param timeout: seconds per command.
    @param pool: the client's connection pool, closed by L{close}.
    """

    def __init__(
        self,
        client: Any,
        url: str,
        clock: IReactorTime,
        timeout: float,
        pool: Any = None,
    ) -> None:
        self._client = client
        self.url = url.rstrip("/")
        self._clock = clock
        self._timeout = timeout
        self._pool = pool

    def close(self) -> Deferred[None]:
        """
        Close the pooled connections.
        """
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

    def _body(self, command: Command) -> bytes:
        args: dict[str, Any] = dict(command.args)
        if command.name == "srg_create":
            # A list is what API version 1 (ejabberd 24.02 and later) takes;
            # version 0 (23.01) joins a one-element list into the same string.
            args["display"] = [args["display"]]
        return json.dumps(args, ensure_ascii=False).encode("utf-8")

    def run(self, command: Command) -> Deferred[list[str]]:
        """
        POST the command; HTTP 200 with C{0} (or a list) is success.
        """
        import treq

        d: Deferred[Any] = self._client.post(
            f"{self.url}/{command.name}",
            data=self._body(command),
            headers={b"Content-Type": [b"application/json"]},
            allow_redirects=False,
        )

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            body: Deferred[bytes] = treq.content(response)
            return body.addCallback(lambda b: (response.code, b))

        d.addCallback(read)
        d.addTimeout(self._timeout, self._clock)
        d.addCallbacks(
            lambda result: _httpResult(command.name, *result),
            lambda f: _httpFailure(command.name, f, self._timeout),
        )
        return d


def _httpResult(name: str, code: int, body: bytes) -> list[str]:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if code != 200:
        message = parsed.get("message") if isinstance(parsed, dict) else parsed
        text = message if isinstance(message, str) else body.decode("utf-8", "replace")
        raise CommandFailed(name, f"HTTP {code}", _firstLine(text))
    if parsed == 0:
        return []
    if isinstance(parsed, list):
        return [str(item) for item in parsed]
    raise CommandFailed(name, "HTTP 200", f"unexpected answer {_firstLine(repr(parsed))}")


def _httpFailure(name: str, f: Failure, timeout: float) -> Failure:
    if f.check(CommandFailed):
        return f
    reasons = getattr(f.value, "reasons", None) or []
    # The Agent reports a request cancelled by the time limit as a connection
    # failure (ResponseNeverReceived) whose reason is the cancellation.
    if f.check(TimeoutError, CancelledError) or any(
        r.check(CancelledError) for r in reasons
    ):
        return Failure(CommandFailed(name, "timeout", f"no answer within {timeout:g} s"))
    value = reasons[0].value if reasons else f.value
    return Failure(
        CommandFailed(name, "no connection", f"{type(value).__name__}: {value}"[:200])
    )


class _CollectOutput(ProcessProtocol):
    """
    Collects one command's output (bounded) and fires with its exit status.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[tuple[str, bytes]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def _keep(self, data: bytes) -> None:
        room = MAX_OUTPUT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def outReceived(self, data: bytes) -> None:
        self._keep(data)

    def errReceived(self, data: bytes) -> None:
        self._keep(data)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            status = "0"
        elif isinstance(value, ProcessTerminated):
            if value.exitCode is not None:
                status = str(value.exitCode)
            else:
                status = f"signal {value.signal}"
        else:
            status = type(value).__name__
        self.ended.callback((status, bytes(self.output)))


@implementer(ICommandRunner)
class EjabberdctlRunner:
    """
    Commands through the C{ejabberdctl} program: argv only, no shell; a command
    still running after C{timeout} seconds is killed.

    @param reactor: spawns the processes and runs the time limit.
    @param path: the C{ejabberdctl} program (C{ejabberdctl=} of the config).
    @param timeout: seconds per command.
    @param environ: the environment of the commands (default: this process's).
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        timeout: float,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._timeout = timeout
        self._environ = dict(os.environ if environ is None else environ)
        self._processes: set[Deferred[Any]] = set()

    def close(self) -> Deferred[None]:
        """
        Wait until the processes started have ended (those timed out or
        cancelled were killed).
        """
        waiting = [whenFired(d) for d in self._processes]
        return DeferredList(waiting).addCallback(lambda _: None)

    def run(self, command: Command) -> Deferred[list[str]]:
        """
        Run C{ejabberdctl COMMAND ARGS...}; exit status 0 is success, the output
        lines are the result.
        """
        protocol = _CollectOutput()
        reactor: IReactorProcess = self._reactor
        try:
            process = reactor.spawnProcess(
                protocol,
                self.path,
                [self.path, *command.argv()],
                env=self._environ,
            )
        except Exception as e:
            # OSError (E2BIG, ENOENT), ValueError (a NUL in an argument), ...
            return fail(CommandFailed(command.name, "not started", str(e)[:200]))
        def kill() -> None:
            try:
                process.signalProcess(signal.SIGKILL)
            except Exception:  # already gone
                pass
            # Children of a wrapper script may keep the pipes open: do not
            # wait for them.
            try:
                process.loseConnection()
            except Exception:
                pass

        def cancel(d: Deferred[list[str]]) -> None:
            if timer.active():
                timer.cancel()
            kill()

        result: Deferred[list[str]] = Deferred(cancel)

        def timeUp() -> None:
            kill()
            result.errback(
                CommandFailed(command.name, "timeout", f"killed after {self._timeout:g} s")
            )

        clock: IReactorTime = self._reactor
        timer = clock.callLater(self._timeout, timeUp)

        def ended(outcome: tuple[str, bytes]) -> None:
            if timer.active():
                timer.cancel()
            if result.called:  # timed out or cancelled already
                return
            status, output = outcome
            text = output.decode("utf-8", "replace")
            if status != "0":
                result.errback(
                    CommandFailed(command.name, f"exit status {status}", _firstLine(text))
                )
                return
            result.callback(
                [line for line in (s.strip() for s in text.splitlines()) if line]
            )

        self._processes.add(protocol.ended)
        protocol.ended.addBoth(self._ended, protocol.ended)
        protocol.ended.addCallback(ended)
        return result

    def _ended(self, outcome: Any, d: Deferred[Any]) -> Any:
        self._processes.discard(d)
        return outcome


# --- the sync ---------------------------------------------------------------


@attr.s(auto_attribs=True)
class SyncReport:
    """
    What one sync did.

    @ivar changed: C{False} when the roster was the same as at the last sync
        (no command was run).
    @ivar commands: the commands run, in order, as text.
    """

    jid: str
    changed: bool
    commands: list[str] = attr.Factory(list)


Fetcher = Callable[[str, str], "Deferred[dict[str, RosterEntry]]"]


@attr.s(auto_attribs=True)
class _SyncJob:
    """
    The sync of one user: queued, running, or waiting to be retried.
    """

    running: bool = False
    again: bool = False
    attempt: int = 0
    retry: IDelayedCall | None = None
    work: Deferred[SyncReport] | None = None


class RosterSync:
    """
    Keeps ejabberd's shared roster groups and full names in step with the
    backend's shared rosters, one user at a time after their logins.

    @param fetch: C{fetch(user, domain)}: the user's shared roster.
    @param runner: runs the ejabberd commands.
    @param state: where what was synced is kept.
    @param clock: schedules syncs, retries and the stop timeout.
    @param maxConcurrent: syncs running at once.
    @param retryDelays: seconds before each retry of a failed sync.
    @param stopTimeout: seconds L{stop} waits for the syncs in flight.
    @param tenantOf: the backend serving a domain (compared by identity), or
        C{None} for a domain not served: members of other domains are synced
        only if the same backend serves them.  Without it, only members of
        the user's own domain are.
    """

    def __init__(
        self,
        fetch: Fetcher,
        runner: ICommandRunner,
        state: RosterState,
        clock: IReactorTime,
        maxConcurrent: int = MAX_CONCURRENT,
        retryDelays: Sequence[float] = RETRY_DELAYS,
        stopTimeout: float = STOP_TIMEOUT,
        tenantOf: Callable[[str], object | None] | None = None,
    ) -> None:
        self._tenantOf = tenantOf
        self._fetch = fetch
        self._runner = runner
        self._state = state
        self._clock = clock
        self._semaphore = DeferredSemaphore(maxConcurrent)
        self._retryDelays = tuple(retryDelays)
        self._stopTimeout = stopTimeout
        self._jobs: dict[tuple[str, str], _SyncJob] = {}
        self._stopping = False

    # -- scheduling ---------------------------------------------------------

    def onLogin(self, user: str, domain: str) -> None:
        """
        C{user@domain} logged in: sync its roster soon, after the login's
        answer.  Returns at once; never fails.
        """
        if self._stopping:
            return
        key = (user, domain)
        job = self._jobs.get(key)
        if job is None:
            self._jobs[key] = _SyncJob()
            self._clock.callLater(0, self._start, key)
        elif job.running:
            # One follow-up after the sync in flight, for any number of logins.
            job.again = True
        elif job.retry is not None and job.retry.active():
            # Waiting for a retry (up to minutes away): the login brings it
            # forward, with the backoff started afresh.
            job.retry.cancel()
            job.retry = None
            job.attempt = 0
            self._clock.callLater(0, self._start, key)
        # Queued: that sync will fetch a fresh roster.

    def pending(self) -> int:
        """
        The users with a sync queued, running or waiting for a retry.
        """
        return len(self._jobs)

    def _start(self, key: tuple[str, str]) -> None:
        job = self._jobs.get(key)
        if job is None or self._stopping:
            return
        job.retry = None

        def begin() -> Deferred[SyncReport]:
            if self._stopping:
                return fail(CancelledError())
            job.running = True
            job.again = False
            return ensureDeferred(self._claimedSync(*key))

        d = job.work = self._semaphore.run(begin)
        d.addCallbacks(
            self._succeeded, self._failed, callbackArgs=(key, job), errbackArgs=(key, job)
        )

    def _succeeded(self, report: SyncReport, key: tuple[str, str], job: _SyncJob) -> None:
        job.running = False
        job.work = None
        job.attempt = 0
        if job.again and not self._stopping:
            self._clock.callLater(0, self._start, key)
        else:
            self._jobs.pop(key, None)

    def _failed(self, f: Failure, key: tuple[str, str], job: _SyncJob) -> None:
        job.running = False
        job.work = None
        jid = "@".join(key)
        if f.check(CancelledError):
            self._jobs.pop(key, None)
            return
        reason = str(f.value) if f.check(CommandFailed, BackendUnavailable) else None
        if reason is None:
            log.failure("roster sync of {jid} failed", f, jid=jid)
            reason = type(f.value).__name__
        if self._stopping:
            self._jobs.pop(key, None)
            return
        if job.again:
            # A login since: try again now rather than after a delay.
            job.attempt = 0
            log.warn("roster sync of {jid} failed: {reason}; trying again now",
                     jid=jid, reason=reason)
            self._clock.callLater(0, self._start, key)
            return
        if job.attempt >= len(self._retryDelays):
            log.error(
                "roster sync of {jid} failed: {reason}; given up after {attempts} "
                "attempts until the next login",
                jid=jid,
                reason=reason,
                attempts=job.attempt + 1,
            )
            self._jobs.pop(key, None)
            return
        delay = self._retryDelays[job.attempt]
        job.attempt += 1
        log.warn(
            "roster sync of {jid} failed: {reason}; retry {attempt} in {delay} s",
            jid=jid,
            reason=reason,
            attempt=job.attempt,
            delay=delay,
        )
        job.retry = self._clock.callLater(delay, self._start, key)

    def stop(self) -> Deferred[None]:
        """
        Start no more syncs, drop the queued ones and the retries, wait up to
        the stop timeout for the syncs in flight, then cancel them.
        """
        self._stopping = True
        running: list[Deferred[Any]] = []
        for job in list(self._jobs.values()):
            if job.retry is not None and job.retry.active():
                job.retry.cancel()
            if job.running and job.work is not None:
                running.append(job.work)
            elif job.work is not None:
                # Waiting for a free slot: never started.
                job.work.cancel()
        if not running:
            self._jobs.clear()
            return succeed(None)
        log.info("waiting for {count} roster syncs", count=len(running))
        done: Deferred[None] = Deferred()
        waiting = DeferredList(
            [whenFired(d) for d in running], consumeErrors=True
        )

        def timeUp() -> None:
            log.warn(
                "roster syncs still running after {seconds} s: cancelled",
                seconds=self._stopTimeout,
            )
            for d in running:
                d.cancel()

        timer = self._clock.callLater(self._stopTimeout, timeUp)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            self._jobs.clear()
            done.callback(None)

        waiting.addBoth(finished)
        return done

    # -- one sync -------------------------------------------------------------

    async def _claimedSync(self, user: str, domain: str) -> SyncReport:
        """
        Sync C{user@domain} if no other node sharing the database is syncing
        it (a claim in the database, given up when done).
        """
        jid = f"{user}@{domain}"
        if not await self._state.claim(jid, self._clock.seconds(), CLAIM_SECONDS):
            log.info("roster sync of {jid}: another node is syncing it", jid=jid)
            return SyncReport(jid, False)
        release = True
        try:
            return await self.sync(user, domain)
        except GeneratorExit:
            # Discarded without being resumed (its Deferred never fired): the
            # daemon is going away, the claim expires by itself.
            release = False
            raise
        finally:
            if release:
                self._state.release(jid).addErrback(
                    lambda f: log.failure("releasing the roster sync claim of {jid}", f,
                                          jid=jid)
                )

    def sync(self, user: str, domain: str) -> Deferred[SyncReport]:
        """
        Sync the roster of C{user@domain} now (not coalesced, not retried: the
        C{xcauth -R} command and the scheduler use it).

        @return: L{Deferred} firing with a L{SyncReport}, or failing with
            L{BackendUnavailable} or L{CommandFailed}.
        """
        return ensureDeferred(self._sync(user, domain))

    async def _sync(self, user: str, domain: str) -> SyncReport:
        started = time.monotonic()
        jid = f"{user}@{domain}"
        info = await self._state.info(jid)
        roster = await self._fetch(user, domain)
        answerHash = rosterHash(roster)
        if info is not None and info.responsehash == answerHash:
            return SyncReport(jid, False)
        report = SyncReport(jid, True)
        try:
            await self._apply(user, domain, info, roster, answerHash, report)
        finally:
            log.info(
                "roster sync of {jid}: {count} commands in {ms} ms",
                jid=jid,
                count=len(report.commands),
                ms=int((time.monotonic() - started) * 1000),
            )
        return report

    async def _run(self, report: SyncReport, command: Command) -> list[str]:
        report.commands.append(str(command))
        try:
            result: list[str] = await self._runner.run(command)
        except (CommandFailed, CancelledError):
            raise
        except Exception as e:
            # Whatever else a runner raises (a ValueError for an argument the
            # system refuses, say) is a failed command, not a traceback.
            raise CommandFailed(command.name, "error", f"{type(e).__name__}: {e}"[:200]) from e
        return result

    def _inTenant(self, domain: str, host: str) -> bool:
        if host == domain:
            return True
        if self._tenantOf is None:
            return False
        own = self._tenantOf(domain)
        return own is not None and self._tenantOf(host) is own

    async def _apply(
        self,
        user: str,
        domain: str,
        info: RosterInfo | None,
        roster: dict[str, RosterEntry],
        answerHash: str,
        report: SyncReport,
    ) -> None:
        jid = f"{user}@{domain}"
        # Members of each group (by id, see groupId), in the order of the
        # answer; the label of each id (its clean name).
        groups: dict[str, list[str]] = {}
        labels: dict[str, str] = {}
        names: dict[str, tuple[str, str, str]] = {}
        otherTenants = invalid = longGroups = 0
        for name, entry in roster.items():
            node, host = splitJID(name, domain)
            if not node:
                continue
            try:
                identity = canonical(node, host)
            except InvalidIdentity:
                invalid += 1
                continue
            node, host = identity.user, identity.domain
            if not self._inTenant(domain, host):
                otherTenants += 1
                continue
            member = identity.jid
            fullname = cleanDisplayName(entry.name)
            if fullname:
                names.setdefault(member, (node, host, fullname))
            for group in entry.groups:
                if ignoredGroup(group):
                    continue
                clean = cleanGroupName(group)
                if not clean:
                    continue
                if len(clean) > MAX_ARGUMENT:
                    longGroups += 1
                    continue
                ident = groupId(clean)
                labels.setdefault(ident, clean)
                members = groups.setdefault(ident, [])
                if member not in members:
                    members.append(member)
        if otherTenants or invalid or longGroups:
            log.warn(
                "roster sync of {jid}: left out {others} member(s) of domains another "
                "backend serves (or none), {invalid} member(s) whose name is no valid "
                "user name, {groups} group(s) with names over {limit} characters",
                jid=jid,
                others=otherTenants,
                invalid=invalid,
                groups=longGroups,
                limit=MAX_ARGUMENT,
            )
        # 1. Full names.
        stored = await self._state.fullNames(list(names))
        for member, (node, host, fullname) in names.items():
            if stored.get(member) != fullname:
                await self._run(report, setVcard(node, host, fullname))
                await self._state.setFullName(member, fullname)
        # 2, 3. Groups.  srg_list shows which exist: a known group that
        # ejabberd no longer has (deleted there) is created again, and a group
        # whose id differs only in case (made by an older version, which used
        # the name as the id) is used as it is.
        if groups:
            existing = await self._run(report, srgList(domain))
            exact = set(existing)
            folded: dict[str, str] = {}
            for name in existing:
                folded.setdefault(name.lower(), name)
            for ident in list(groups):
                if ident in exact:
                    continue
                legacy = folded.get(labels[ident].lower())
                if legacy is not None:
                    label = labels.pop(ident)
                    labels.setdefault(legacy, label)
                    merged = groups.setdefault(legacy, [])
                    merged.extend(m for m in groups.pop(ident) if m not in merged)
        keys = {group: groupKey(group, domain) for group in groups}
        known = await self._state.groupMembers(list(keys.values()))
        loginGroups: list[str] = []
        for group, members in groups.items():
            key = keys[group]
            previous = known.get(key)
            if group not in exact:
                if previous is not None:
                    log.info(
                        "shared roster group {group} of {domain} is gone from "
                        "ejabberd: creating it again",
                        group=group,
                        domain=domain,
                    )
                await self._run(report, srgCreate(group, domain, labels[group]))
                if not await self._run(report, srgGetInfo(group, domain)):
                    raise CommandFailed(
                        "srg_create", "not applied",
                        f"ejabberd shows no group {group} of {domain} after creating it",
                    )
                previous = ()
            elif previous is None:
                previous = tuple(
                    m.lower() for m in await self._run(report, srgGetMembers(group, domain))
                )
            added = [member for member in members if member not in previous]
            for member in added:
                node, host = splitJID(member, domain)
                await self._run(report, srgUserAdd(node, host, group, domain))
            for member in previous:
                if member not in members:
                    node, host = splitJID(member, domain)
                    await self._run(report, srgUserDel(node, host, group, domain))
            if added:
                shown = {
                    m.lower() for m in await self._run(report, srgGetMembers(group, domain))
                }
                missing = [member for member in added if member not in shown]
                if missing:
                    raise CommandFailed(
                        "srg_user_add", "not applied",
                        f"ejabberd shows {len(missing)} added members missing "
                        f"from group {group} of {domain}, {missing[0]} first",
                    )
            await self._state.setGroupMembers(key, members)
            if jid in members:
                loginGroups.append(group)
        # 4. Groups the login user has left.
        for group in info.groups if info is not None else ():
            if group not in loginGroups:
                await self._run(report, srgUserDel(user, domain, group, domain))
                await self._state.removeGroupMember(groupKey(group, domain), jid)
        await self._state.setSynced(jid, loginGroups, answerHash, self._clock.seconds())


async def describeSync(sync: RosterSync, user: str, domain: str) -> str | None:
    """
    Run one sync of C{user@domain} and describe it for a person (the
    C{xcauth -R} command); C{None} when it failed (the failure is logged).
    """
    try:
        report = await sync.sync(user, domain)
    except (CommandFailed, BackendUnavailable) as e:
        log.error("roster sync of {user}@{domain} failed: {reason}",
                  user=user, domain=domain, reason=str(e))
        return None
    if not report.changed:
        return (
            f"roster of {report.jid} unchanged since its last sync: no command run "
            f"('xcauth roster refresh {report.jid}' makes the next sync run them)"
        )
    lines = [f"roster of {report.jid} synced with {len(report.commands)} commands:"]
    lines += [f"  {command}" for command in report.commands]
    return "\n".join(lines)


# --- the backend side ---------------------------------------------------------


def backendFetcher(settingsFor: Callable[[str], Any]) -> Fetcher:
    """
    A roster fetcher over the domain's backend client (C{settingsFor(domain)}
    gives its L{xcauth.state.domains.DomainSettings}): C{client.sharedRoster(user,
    authDomain)}, a C{dict[str, RosterEntry]} as the L{IBackendClient}
    contract says.
    """

    def fetch(user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        settings = settingsFor(domain)
        if settings is None:
            return fail(BackendUnavailable(f"domain {domain} is not served"))
        d: Deferred[dict[str, RosterEntry]] = settings.client.sharedRoster(
            user, settings.authDomain or domain
        )
        return d

    return fetch
