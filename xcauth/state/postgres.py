"""
The state database on PostgreSQL (C{db=postgresql://...} or a libpq key/value
string), shared by several xcauth nodes.

The row functions of L{xcauth.state.database} and L{xcauth.state.roster} run unchanged
on a L{PgConnection} (C{?} placeholders become psycopg's).  L{PgStore} runs
them on a bounded pool of threads, one psycopg connection each, never on the
reactor thread, and bounds each call: a statement timeout on the server and
the same timeout on the reactor's side (the caller gets
L{StoreUnavailable} and goes on, e.g. with its memory).  When a connection
fails the store is "down": calls fail at once, without a thread, and a probe
connects again every L{RETRY_SECONDS}; when it succeeds the store is "up"
again and the L{PgStore.onReconnect} callbacks run (writes to retry, memory
to drop).

A listener thread keeps one more connection that C{LISTEN}s to the channels
subscribed to (L{PgStore.subscribe}): the row functions C{NOTIFY} when a
domain or a cache entry changes, and every node applies it within a moment.
A subscriber is also called with C{None} when the listener (re)connects:
notifications may have been missed, re-read everything.

The password comes from C{db-password-file} (or a systemd credential), never
from C{db} itself; L{describe} shows a C{db} value without any password.
"""

from __future__ import annotations

import re
import select
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from xcauth.state.database import DatabaseError, Store, ThreadWorker

log = Logger()

T = TypeVar("T")

#: Threads (and connections) running queries at once.
POOL_SIZE = 4

#: Seconds between two attempts to reach a PostgreSQL that is down.
RETRY_SECONDS = 1.0

#: Seconds the listener waits for notifications before checking whether it
#: should stop.
LISTEN_POLL = 0.5

#: Seconds between two checks that the listener's connection still works.
LISTEN_CHECK = 5.0

_PREFIXES = ("postgresql://", "postgres://")
_KEYWORD = re.compile(r"^\s*[a-z_]+\s*=")


class StoreUnavailable(Exception):
    """
    PostgreSQL cannot be reached, or did not answer in time.
    """


def isPostgres(db: str) -> bool:
    """
    Whether the C{db} setting names a PostgreSQL database (a URL or a libpq
    key/value string) rather than a SQLite file.
    """
    return db.startswith(_PREFIXES) or bool(_KEYWORD.match(db))


def parse(db: str) -> dict[str, str]:
    """
    The libpq parameters of C{db}.

    @raise ValueError: not a valid libpq string, or it holds a password.
    """
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(
            "db names a PostgreSQL database but psycopg is not installed "
            "(apt install python3-psycopg, or pip install 'xcauth[postgresql]')"
        ) from None
    import psycopg

    try:
        params = conninfo_to_dict(db)
    except psycopg.ProgrammingError:
        # (libpq's message may quote part of the string: not shown.)
        raise ValueError(
            "db is not a valid PostgreSQL URL (postgresql://USER@HOST/DBNAME) or "
            "libpq key/value string (host=... dbname=...)"
        ) from None
    if params.get("password"):
        raise ValueError(
            "db holds a password: put it in a file named by db-password-file "
            "(or a systemd credential), not in db"
        )
    return {k: str(v) for k, v in params.items()}


def describe(db: str) -> str:
    """
    C{db} without any password, for messages.
    """
    if not isPostgres(db):
        return db
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(db)
    except Exception:
        return "postgresql://(unparsable)"
    params.pop("password", None)
    return str(make_conninfo("", **params))


@lru_cache(maxsize=256)
def _translate(sql: str) -> str:
    # The row functions' SQL holds no literal "?" or "%".
    return sql.replace("%", "%%").replace("?", "%s")


class PgCursor:
    """
    The part of a DB-API cursor the row functions use.
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall()) if self._cursor.description else []

    def __iter__(self) -> Any:
        return iter(self.fetchall())


class PgConnection:
    """
    A psycopg connection (autocommit; L{xcauth.state.database.transaction} opens
    transactions) offering what the row functions call on a SQLite one.
    """

    engine = "postgresql"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Any = ()) -> PgCursor:
        return PgCursor(self.raw.execute(_translate(sql), tuple(parameters)))

    def transaction(self) -> Any:
        return self.raw.transaction()

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return f"<PgConnection {describe(self.raw.info.dsn)}>"


def connect(
    db: str, password: str | None, timeout: float | None = None, application: str = "xcauth"
) -> PgConnection:
    """
    A new connection to C{db}.

    @param timeout: seconds any statement may take (C{statement_timeout}),
        and, rounded up (at least 2), to connect.
    @raise DatabaseError: it cannot be reached (what libpq said, without the
        password).
    """
    import psycopg

    params: dict[str, Any] = dict(parse(db))
    if password is not None:
        params["password"] = password
    params.setdefault("application_name", application)
    if timeout is not None:
        params["connect_timeout"] = max(2, int(timeout + 0.999))
        options = params.get("options", "")
        params["options"] = f"{options} -c statement_timeout={int(timeout * 1000)}".strip()
        params.setdefault("keepalives", "1")
        params.setdefault("keepalives_idle", "10")
        params.setdefault("keepalives_interval", "5")
        params.setdefault("keepalives_count", "3")
    try:
        raw = psycopg.connect(autocommit=True, **params)
    except psycopg.Error as e:
        raise DatabaseError(
            f"cannot connect to the state database {describe(db)}: {_reason(e, password)}"
        ) from None
    return PgConnection(raw)


def _reason(e: BaseException, password: str | None) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if password:
        text = text.replace(password, "***")
    return text


class _Call:
    """
    One call waiting for a thread: dropped if its caller gave up meanwhile.
    """

    cancelled = False


class PgStore(Store):
    """
    The state database on PostgreSQL as the daemon uses it (see the module).

    @param db: the C{db} setting (URL or key/value string, no password).
    @param password: from C{db-password-file}, or C{None}.
    @param reactor: runs timers and delivers results.
    @param timeout: seconds within which every call answers or fails (keep it
        below the requests' deadline).
    @param threads: connections used at once.
    @param metrics: the daemon's metrics, or C{None}.
    """

    engine = "postgresql"

    def __init__(
        self,
        db: str,
        password: str | None,
        reactor: Any,
        timeout: float = 1.5,
        threads: int = POOL_SIZE,
        metrics: Any = None,
    ) -> None:
        self.db = db
        self.path = describe(db)
        self._password = password
        self._reactor = reactor
        self.timeout = timeout
        self.metrics = metrics
        self._worker = ThreadWorker(reactor, "xcauth-pg", threads)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[PgConnection] = set()
        #: Backend process ids of this store's connections (a notification
        #: from one of them was sent by this node).
        self.pids: set[int] = set()
        self.down = False
        self._probe: LoopingCall | None = None
        self._reconnect: list[Callable[[], Any]] = []
        self._subscribers: dict[str, list[Callable[[str | None], Any]]] = {}
        self._listener: ThreadWorker | None = None
        self._listening: Deferred[None] | None = None
        self._stopListening = threading.Event()
        self.inUse = 0
        self._closed = False
        #: Whether the listener is connected: notifications arrive.
        self.listening = False

    def __repr__(self) -> str:
        return f"<PgStore {self.path}>"

    # -- calls ---------------------------------------------------------------

    def checkFile(self) -> Deferred[None] | None:
        """
        Nothing to check: there is no file.
        """
        return None

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Call C{f(connection, *args)} in one of the pool's threads; fails with
        L{StoreUnavailable} at once while PostgreSQL is down, or after
        C{timeout} seconds without an answer.
        """
        if self.down or self._closed:
            return fail(StoreUnavailable(f"the state database {self.path} is unavailable"))
        return self._submit(f, args)

    def _submit(self, f: Callable[..., T], args: tuple[Any, ...]) -> Deferred[T]:
        call = _Call()
        started = time.monotonic()
        result: Deferred[T] = Deferred()
        self.inUse += 1
        self._gauge()

        def late() -> None:
            call.cancelled = True
            self._observe("timeout", time.monotonic() - started)
            result.errback(
                StoreUnavailable(
                    f"the state database {self.path} did not answer within "
                    f"{self.timeout:g} s"
                )
            )

        timer = self._reactor.callLater(self.timeout, late)

        def done(outcome: Any) -> None:
            self.inUse -= 1
            self._gauge()
            if timer.active():
                timer.cancel()
            if result.called:
                return  # the caller has gone on
            if isinstance(outcome, Failure):
                self._observe("error", time.monotonic() - started)
                result.errback(outcome)
            else:
                self._observe("ok", time.monotonic() - started)
                result.callback(outcome)

        self._worker.run(self._callPooled, call, f, *args).addBoth(done)
        return result

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.storeInUse(self.inUse)

    def _observe(self, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.storeQuery(outcome, seconds)

    def _connection(self) -> PgConnection:
        conn: PgConnection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.raw.closed:
            return conn
        conn = connect(self.db, self._password, self.timeout)
        self._local.conn = conn
        with self._lock:
            self._connections.add(conn)
            self.pids.add(conn.raw.info.backend_pid)
        return conn

    def _drop(self) -> None:
        conn: PgConnection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is None:
            return
        with self._lock:
            self._connections.discard(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _callPooled(self, call: _Call, f: Callable[..., T], *args: Any) -> T:
        import psycopg

        # A connection found broken (the server restarted since it was last
        # used) is replaced once at once; the row functions may run twice
        # (each is one transaction that can be repeated).
        for attempt in (1, 2):
            if call.cancelled:
                raise StoreUnavailable(f"the state database {self.path} is unavailable")
            try:
                conn = self._connection()
            except DatabaseError as e:
                self._reactor.callFromThread(self._markDown, str(e))
                raise StoreUnavailable(str(e)) from None
            try:
                return f(conn, *args)
            except psycopg.Error as e:
                reason = _reason(e, self._password)
                if conn.raw.broken or conn.raw.closed:
                    self._drop()
                    if attempt == 1:
                        continue
                    self._reactor.callFromThread(self._markDown, reason)
                    raise StoreUnavailable(
                        f"the state database {self.path} is unavailable: {reason}"
                    ) from None
                if isinstance(e, psycopg.errors.QueryCanceled):
                    raise StoreUnavailable(
                        f"the state database {self.path} did not answer in time"
                    ) from None
                raise DatabaseError(f"state database {self.path}: {reason}") from None
        raise AssertionError("unreachable")

    # -- down and up -----------------------------------------------------------

    def onReconnect(self, callback: Callable[[], Any]) -> None:
        """
        Call C{callback} (on the reactor thread) each time PostgreSQL is
        reached again after being down.
        """
        self._reconnect.append(callback)

    def _markDown(self, reason: str) -> None:
        if self.down or self._closed:
            return
        self.down = True
        if self.metrics is not None:
            self.metrics.storeDown(True)
        log.error(
            "the state database is unavailable ({reason}): logins go on, the "
            "credential cache uses this node's memory and the domain settings "
            "stay as they are; trying again every {seconds:g} s",
            reason=reason,
            seconds=RETRY_SECONDS,
        )
        self._probe = LoopingCall(self._tryAgain)
        self._probe.clock = self._reactor
        self._probe.start(RETRY_SECONDS, now=False)

    def _tryAgain(self) -> Deferred[None] | None:
        if self._closed:
            return None
        d = self._submit(_ping, ())
        return d.addCallbacks(lambda _: self._markUp(), lambda _: None)

    def _markUp(self) -> None:
        if not self.down:
            return
        self.down = False
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None
        if self.metrics is not None:
            self.metrics.storeDown(False)
            self.metrics.storeReconnect()
        log.info("the state database {db} is available again", db=self.path)
        for callback in list(self._reconnect):
            try:
                callback()
            except Exception:
                log.failure("after reconnecting to the state database")

    # -- notifications -----------------------------------------------------------

    def subscribe(self, channel: str, callback: Callable[[str | None], Any]) -> None:
        """
        Call C{callback(payload)} (on the reactor thread) for each notification
        on C{channel} sent by another node or by the admin command, and
        C{callback(None)} when the listener (re)connects.
        """
        self._subscribers.setdefault(channel, []).append(callback)

    def startListening(self) -> None:
        """
        Start the listener thread (once there are subscribers).
        """
        if self._listener is not None or not self._subscribers or self._closed:
            return
        self._stopListening.clear()
        self._listener = ThreadWorker(self._reactor, "xcauth-pg-listen", 1)
        self._listening = self._listener.run(self._listen, sorted(self._subscribers))
        self._listening.addErrback(lambda f: log.failure("the PostgreSQL listener failed", f))

    def _listen(self, channels: list[str]) -> None:
        import psycopg
        from psycopg import sql

        failedBefore = False
        while not self._stopListening.is_set():
            try:
                # Keepalives and the statement timeout: a silent network
                # cut is found within seconds, not hours.
                conn = connect(self.db, self._password, self.timeout, "xcauth-listen")
            except DatabaseError as e:
                if not failedBefore:
                    failedBefore = True
                    self._reactor.callFromThread(
                        log.warn, "the notification listener cannot connect: {reason}",
                        reason=str(e),
                    )
                self._stopListening.wait(RETRY_SECONDS)
                continue
            try:
                # Notifications reach the handler while a statement runs (as
                # psycopg 3.1, Debian 12's, and later versions do alike): a
                # readable socket, or a check every LISTEN_CHECK seconds
                # (the connection is still there, and answers), runs one.
                conn.raw.add_notify_handler(
                    lambda note: self._reactor.callFromThread(
                        self._notified, note.channel, note.payload, note.pid
                    )
                )
                for channel in channels:
                    conn.raw.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                failedBefore = False
                self._reactor.callFromThread(self._resync, channels)
                checked = time.monotonic()
                while not self._stopListening.is_set():
                    readable, _, _ = select.select([conn.raw.fileno()], [], [], LISTEN_POLL)
                    if readable or time.monotonic() - checked > LISTEN_CHECK:
                        conn.raw.execute("SELECT 1")
                        checked = time.monotonic()
            except psycopg.Error:
                pass
            finally:
                # Until connected again, nodes' changes may go unheard.
                self._reactor.callFromThread(setattr, self, "listening", False)
                try:
                    conn.close()
                except Exception:
                    pass
            self._stopListening.wait(RETRY_SECONDS)

    def _resync(self, channels: list[str]) -> None:
        self.listening = True
        for channel in channels:
            for callback in self._subscribers.get(channel, []):
                self._deliver(callback, None)

    def _notified(self, channel: str, payload: str, pid: int) -> None:
        if pid in self.pids:
            return  # sent by this node, which applied it already
        for callback in self._subscribers.get(channel, []):
            self._deliver(callback, payload)

    def _deliver(self, callback: Callable[[str | None], Any], payload: str | None) -> None:
        try:
            result = callback(payload)
        except Exception:
            log.failure("handling a state database notification")
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: log.failure("handling a state database notification", f)
            )

    # -- closing -------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """
        Stop the listener and the probe, let the work given finish, close
        every connection.
        """
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self._close_())

    async def _close_(self) -> None:
        self._closed = True
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._stopListening.set()
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        await self._worker.stop()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass


def _ping(conn: PgConnection) -> None:
    conn.execute("SELECT 1")
