"""
The state database: one SQLite file (C{/var/lib/xcauth/xcauth.sqlite3}) shared
with existing installations, and the worker threads that keep blocking calls
off the reactor thread.

The schema is the one of PROTOCOLS.md.  Opening a file creates what is missing
(C{CREATE TABLE IF NOT EXISTS}, missing columns added), records the schema
version in C{PRAGMA user_version}, switches to WAL and never drops or rewrites
anything else, so columns people added themselves survive.  Several processes
may open (and create) the same file at once: the daemon and the C{xcauth}
admin command use the same functions here.

The functions taking a C{Connection} are synchronous; the daemon calls
them through L{Store.run}, which runs them on the store's single database
thread.  The same functions run on PostgreSQL, the state shared by several
nodes (L{xcauth.state.postgres}: a L{xcauth.state.postgres.PgStore} instead of a L{Store});
the schema of both is L{xcauth.state.schema}.  Timestamps are kept in the text format of C{CURRENT_TIMESTAMP}
(C{YYYY-MM-DD HH:MM:SS}, UTC), as older installations wrote them.
"""

from __future__ import annotations

import calendar
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, Union

import attr
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from xcauth.interfaces import IWorker
from xcauth.state import schema

log = Logger()

T = TypeVar("T")

#: The default location of the state database.
DEFAULT_DB = "/var/lib/xcauth/xcauth.sqlite3"

#: Seconds SQLite waits for another process's lock before giving up.
BUSY_TIMEOUT = 30.0

#: The schema version this code writes (C{PRAGMA user_version} in SQLite);
#: the tables of version 1 (L{xcauth.state.schema}).
SCHEMA_VERSION = schema.SCHEMA_VERSION
TABLES = schema.TABLES

class PostgresConnection(Protocol):
    """
    What the row functions use of a PostgreSQL connection
    (L{xcauth.state.postgres.PgConnection}): SQLite's calls, and a
    transaction.
    """

    def execute(self, sql: str, parameters: Any = ()) -> Any: ...

    def transaction(self) -> Any: ...

    def close(self) -> None: ...


#: A connection the row functions here take: SQLite's, or PostgreSQL's
#: through L{xcauth.state.postgres.PgConnection} (the same calls).
Connection = Union[sqlite3.Connection, PostgresConnection]

#: The channels of PostgreSQL notifications (L{notify}).
DOMAINS_CHANNEL = "xcauth_domains"
CACHE_CHANNEL = "xcauth_cache"


class NoDatabase(Exception):
    """
    The database file does not exist (and the store was told not to create it).
    """


class DatabaseError(Exception):
    """
    The database cannot be used; the message says why.
    """


# --- timestamps -------------------------------------------------------------


def formatTimestamp(seconds: float) -> str:
    """
    UNIX seconds as C{CURRENT_TIMESTAMP} text (UTC, whole seconds).
    """
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(seconds)))


def parseTimestamp(value: Any) -> float:
    """
    A stored timestamp as UNIX seconds.  Accepts C{CURRENT_TIMESTAMP} text, ISO
    text with fractions or a C{T}, and numbers; anything else is C{0} (so an
    entry with a broken timestamp counts as expired, never as fresh).
    """
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return 0.0
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return calendar.timegm(parsed.utctimetuple()) + parsed.microsecond / 1e6


# --- connections and schema -------------------------------------------------


def _isBusy(e: sqlite3.OperationalError) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _retryBusy(f: Callable[[], T], timeout: float = BUSY_TIMEOUT) -> T:
    """
    Call C{f}, retrying while SQLite says the database is busy (some statements,
    such as changing the journal mode, return busy without waiting).
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return f()
        except sqlite3.OperationalError as e:
            if not _isBusy(e) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """
    A write transaction: C{BEGIN IMMEDIATE} (takes the write lock up front, so
    two processes never deadlock upgrading read locks), C{COMMIT} or
    C{ROLLBACK}.  On PostgreSQL, psycopg's transaction block.
    """
    if not isinstance(conn, sqlite3.Connection):
        with conn.transaction():
            yield conn
        return
    _retryBusy(lambda: conn.execute("BEGIN IMMEDIATE"))
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        _retryBusy(lambda: conn.execute("COMMIT"))


#: The mode of the database and its side files: they hold password hashes and
#: the domains' API secrets.
FILE_MODE = 0o600


def protect(path: str) -> None:
    """
    Create C{path} with mode L{FILE_MODE} if it does not exist, whatever the
    umask, and take the group's and others' access away from it and its
    C{-wal} and C{-shm} files if they have any (SQLite gives the side files
    the database file's mode).  The group may keep read access (0640, the
    service's group); others never.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    except OSError:
        return  # sqlite3 says what is wrong
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o037:
                os.chmod(name, mode & 0o740)
        except OSError:
            pass


def connect(path: str, create: bool = True) -> sqlite3.Connection:
    """
    Open the database at C{path} and bring its schema up to date.

    @param create: create the file if it does not exist; otherwise raise
        L{NoDatabase}.
    @raise DatabaseError: the file cannot be opened or is not a database.
    """
    if not create and not os.path.exists(path):
        raise NoDatabase(path)
    protect(path)
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise DatabaseError(f"cannot open database {path}: {e}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        ensureSchema(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseError(f"cannot use database {path}: {e}") from None
    except schema.SchemaTooNew:
        conn.close()
        raise
    return conn


def ensureSchema(conn: Connection) -> None:
    """
    Switch to WAL, create missing tables and columns, record the schema version
    (L{xcauth.state.schema}).  Existing tables, rows and extra columns are left as
    they are.

    @raise schema.SchemaTooNew: a newer xcauth upgraded the database.
    """
    if not isinstance(conn, sqlite3.Connection):
        if schema.check(conn) < SCHEMA_VERSION or not schema.complete(conn):
            with transaction(conn):
                schema.migrate(conn)
        return
    mode = _retryBusy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
    if mode is None or str(mode[0]).lower() != "wal":
        log.warn("the state database could not be switched to WAL mode")
    conn.execute("PRAGMA synchronous = NORMAL")
    if schema.check(conn) >= SCHEMA_VERSION and schema.complete(conn):
        return
    with transaction(conn):
        schema.migrate(conn)


def notify(conn: Connection, channel: str, payload: str) -> None:
    """
    Tell every node listening on C{channel} (PostgreSQL's C{NOTIFY}, sent when
    the transaction commits); nothing on SQLite.
    """
    if not isinstance(conn, sqlite3.Connection):
        conn.execute("SELECT pg_notify(?, ?)", (channel, payload[:7900]))


def schemaVersion(conn: Connection) -> int:
    """
    The schema version recorded in the database.
    """
    return schema.version(conn)


# --- domains ----------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class DomainRow:
    """
    One row of the C{domains} table (only the columns xcauth uses).
    """

    xmppdomain: str
    authsecret: str | None
    authurl: str | None
    authdomain: str | None
    backend: str | None = None
    serviceuser: str | None = None
    servicepassword: str | None = attr.ib(default=None, repr=False)
    loginformat: str | None = None


_DOMAIN_COLUMNS = (
    "xmppdomain, authsecret, authurl, authdomain, backend, serviceuser, "
    "servicepassword, loginformat"
)


def listDomains(conn: Connection) -> list[DomainRow]:
    """
    All domains, sorted by name.
    """
    rows = conn.execute(
        f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY xmppdomain"
    ).fetchall()
    return [DomainRow(*row) for row in rows]


def getDomain(conn: Connection, domain: str) -> DomainRow | None:
    """
    One domain, or C{None}.
    """
    row = conn.execute(
        f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE xmppdomain = ?",
        (domain,),
    ).fetchone()
    return None if row is None else DomainRow(*row)


def addDomain(
    conn: Connection,
    domain: str,
    url: str,
    secret: str | None,
    authDomain: str | None,
    **backend: str | None,
) -> bool:
    """
    Add a domain; C{False} if it exists already.

    @param backend: the columns C{backend}, C{serviceuser},
        C{servicepassword}, C{loginformat} to set.
    """
    allowed = {"backend", "serviceuser", "servicepassword", "loginformat"}
    if not set(backend) <= allowed:
        raise ValueError(f"unknown columns {sorted(set(backend) - allowed)}")
    names = sorted(backend)
    columns = ", ".join(["xmppdomain", "authsecret", "authurl", "authdomain"] + names)
    marks = ", ".join("?" * (4 + len(names)))
    with transaction(conn):
        if getDomain(conn, domain) is not None:
            return False
        conn.execute(
            f"INSERT INTO domains ({columns}) VALUES ({marks})",
            [domain, secret, url, authDomain] + [backend[n] for n in names],
        )
        notify(conn, DOMAINS_CHANNEL, domain)
    return True


def updateDomain(conn: Connection, domain: str, **changes: str | None) -> bool:
    """
    Change the given columns (C{authsecret}, C{authurl}, C{authdomain},
    C{backend}, C{serviceuser}, C{servicepassword}, C{loginformat}) of a
    domain; C{False} if there is no such domain.
    """
    allowed = {"authsecret", "authurl", "authdomain", "backend", "serviceuser",
               "servicepassword", "loginformat"}
    if not set(changes) <= allowed:
        raise ValueError(f"unknown columns {sorted(set(changes) - allowed)}")
    with transaction(conn):
        if getDomain(conn, domain) is None:
            return False
        if changes:
            names = sorted(changes)
            assignments = ", ".join(f"{name} = ?" for name in names)
            conn.execute(
                f"UPDATE domains SET {assignments} WHERE xmppdomain = ?",
                [changes[n] for n in names] + [domain],
            )
            notify(conn, DOMAINS_CHANNEL, domain)
    return True


def removeDomain(conn: Connection, domain: str) -> bool:
    """
    Remove a domain; C{False} if there is no such domain.
    """
    with transaction(conn):
        cursor = conn.execute("DELETE FROM domains WHERE xmppdomain = ?", (domain,))
        notify(conn, DOMAINS_CHANNEL, domain)
    return cursor.rowcount > 0


# --- credential cache -------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class CacheRow:
    """
    One row of the C{authcache} table, timestamps as UNIX seconds.
    """

    jid: str
    pwhash: str | None
    firstAuth: float
    remoteAuth: float
    anyAuth: float


def _cacheRow(row: tuple[Any, ...]) -> CacheRow:
    return CacheRow(
        jid=row[0],
        pwhash=row[1],
        firstAuth=parseTimestamp(row[2]),
        remoteAuth=parseTimestamp(row[3]),
        anyAuth=parseTimestamp(row[4]),
    )


def getCacheEntry(conn: Connection, jid: str) -> CacheRow | None:
    """
    The cache entry of C{jid}, or C{None}.
    """
    row = conn.execute(
        "SELECT jid, pwhash, firstauth, remoteauth, anyauth FROM authcache "
        "WHERE jid = ?",
        (jid,),
    ).fetchone()
    return None if row is None else _cacheRow(row)


def listCache(conn: Connection) -> list[CacheRow]:
    """
    Every cache entry, sorted by JID.
    """
    rows = conn.execute(
        "SELECT jid, pwhash, firstauth, remoteauth, anyauth FROM authcache "
        "ORDER BY jid"
    ).fetchall()
    return [_cacheRow(row) for row in rows]


def putCacheEntry(conn: Connection, jid: str, pwhash: str, now: float) -> None:
    """
    Store a freshly verified password hash: the backend and the query timestamps
    become C{now}; the first-success timestamp of an existing entry is kept.
    """
    stamp = formatTimestamp(now)
    upsert = (
        "INSERT INTO authcache (jid, pwhash, firstauth, remoteauth, anyauth) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (jid) DO UPDATE SET "
        "pwhash = excluded.pwhash, remoteauth = excluded.remoteauth, "
        "anyauth = excluded.anyauth"
    )
    if not isinstance(conn, sqlite3.Connection):
        # PostgreSQL: one statement (no BEGIN and COMMIT round trips).  Other
        # nodes are told to drop what they keep of the entry when its hash
        # changes (a new password); a first entry needs no word (NOTIFY
        # serializes commits).
        conn.execute(
            f"WITH old AS (SELECT pwhash FROM authcache WHERE jid = ?), "
            f"up AS ({upsert} RETURNING 1) "
            f"SELECT pg_notify(?, ?) FROM old WHERE pwhash IS DISTINCT FROM ?",
            (jid, jid, pwhash, stamp, stamp, stamp, CACHE_CHANNEL, jid, pwhash),
        )
        return
    with transaction(conn):
        conn.execute(upsert, (jid, pwhash, stamp, stamp, stamp))


def touchCacheEntry(
    conn: Connection, jid: str, now: float, verified: bool
) -> None:
    """
    Record a successful query (and, if C{verified}, a backend verification) of
    an existing entry at C{now}.
    """
    stamp = formatTimestamp(now)
    with transaction(conn):
        if verified:
            conn.execute(
                "UPDATE authcache SET remoteauth = ?, anyauth = ? WHERE jid = ?",
                (stamp, stamp, jid),
            )
        else:
            conn.execute(
                "UPDATE authcache SET anyauth = ? WHERE jid = ?", (stamp, jid)
            )


def deleteCacheEntry(conn: Connection, jid: str) -> bool:
    """
    Remove the entry of C{jid}; C{False} if there was none.
    """
    with transaction(conn):
        cursor = conn.execute("DELETE FROM authcache WHERE jid = ?", (jid,))
        notify(conn, CACHE_CHANNEL, jid)
    return cursor.rowcount > 0


def clearCache(conn: Connection) -> int:
    """
    Remove every cache entry; returns how many there were.
    """
    with transaction(conn):
        cursor = conn.execute("DELETE FROM authcache")
        notify(conn, CACHE_CHANNEL, "")
    return cursor.rowcount


# --- threads ----------------------------------------------------------------


@implementer(IWorker)
class ThreadWorker:
    """
    A small owned thread pool: L{run} calls a blocking function in one of its
    threads and returns a L{Deferred}.  L{stop} waits for the work already
    given, then ends the threads.

    @param reactor: the reactor results are delivered on.
    @param name: the thread pool's name (visible in thread dumps).
    @param threads: how many threads run work at once.
    """

    def __init__(self, reactor: Any, name: str, threads: int = 1) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._pending: set[Deferred[Any]] = set()
        self._started = False

    def start(self) -> None:
        """
        Start the threads.
        """
        if not self._started:
            self._started = True
            self._pool.start()

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Call C{f(*args)} in a worker thread.
        """
        self.start()
        d = deferToThreadPool(self._reactor, self._pool, f, *args)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def stop(self) -> Deferred[None]:
        """
        Wait for the pending work (and for work its callbacks add), then stop
        the threads.
        """
        if not self._pending:
            if self._started:
                self._started = False
                self._pool.stop()
            return succeed(None)
        waiting = [whenFired(d) for d in list(self._pending)]
        return gatherResults(waiting).addCallback(lambda _: self.stop())


def whenFired(d: Deferred[Any]) -> Deferred[None]:
    """
    A Deferred firing (with C{None}) when C{d} fires, leaving C{d}'s own result
    to its other callbacks.
    """
    waiter: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter


class Store:
    """
    The state database as the daemon uses it: one connection, opened lazily in
    the database thread, every call made in that one thread.

    @param path: the database file.
    @param worker: the database thread (a L{ThreadWorker} of one thread, or a
        synchronous stand-in in tests).
    @param create: create the file if it does not exist.  Otherwise, while it
        does not exist, L{run} fails with L{NoDatabase} (and tries again on the
        next call, so a file the admin command creates later is picked up).
    """

    #: C{sqlite} here; C{postgresql} for L{xcauth.state.postgres.PgStore}.
    engine = "sqlite"

    def __init__(self, path: str, worker: Any, create: bool = True) -> None:
        self.path = path
        self._worker = worker
        self._create = create
        self._conn: Connection | None = None
        # The file (device, inode) the connection was opened on.
        self._opened: tuple[int, int] | None = None

    def checkFile(self) -> Deferred[None] | None:
        """
        If the file the connection uses was deleted or replaced while running
        (what was written since would be lost with the connection), say so and
        open the file at C{path} again (created anew if the cache lives in
        it).  Cheap: one C{stat}, on the calling (reactor) thread.
        """
        opened = self._opened
        if opened is None:
            return None
        try:
            st = os.stat(self.path)
            now: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now == opened:
            return None
        self._opened = None
        log.warn(
            "the state database {path} was {what} while xcauth runs: opening it "
            "again{created}",
            path=self.path,
            what="deleted" if now is None else "replaced",
            created=" (a new, empty one)" if now is None and self._create else "",
        )
        d: Deferred[None] = self._worker.run(self._close)
        return d

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Call C{f(connection, *args)} in the database thread.
        """
        d: Deferred[T] = self._worker.run(self._call, f, *args)
        return d

    def _call(self, f: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            self._conn = connect(self.path, self._create)
            st = os.stat(self.path)
            self._opened = (st.st_dev, st.st_ino)
        conn = self._conn
        return _retryBusy(lambda: f(conn, *args))

    def subscribe(self, channel: str, callback: Callable[[str | None], Any]) -> None:
        """
        Nothing: only a database shared by several nodes tells of changes
        (L{xcauth.state.postgres.PgStore.subscribe}).
        """

    def onReconnect(self, callback: Callable[[], Any]) -> None:
        """
        Nothing: a file does not go away as a server does.
        """

    def startListening(self) -> None:
        """
        Nothing to listen to.
        """

    def close(self) -> Deferred[None]:
        """
        Close the connection after the work already queued.
        """
        d: Deferred[None] = self._worker.run(self._close)
        return d

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
