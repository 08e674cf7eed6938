"""
The schema of the state database, one for both engines (SQLite and
PostgreSQL), and its versioned migrations.

Version 1 is the schema of PROTOCOLS.md as SQLite files of existing
installations hold it (C{PRAGMA user_version = 1}); version 2 adds the
C{rosterclaims} table (one roster sync per user across several nodes), version
3 the C{budgetevents} table (brute-force budgets shared by several nodes).  Every
step only creates what is missing (tables, columns), never drops or rewrites
anything, so columns people added themselves survive and a step run twice
changes nothing.

SQLite records the version in C{PRAGMA user_version}; PostgreSQL in the one
row of the C{xcauth_schema} table.  A database whose version is newer than
L{SCHEMA_VERSION} is refused (L{SchemaTooNew}): this code does not know what
the newer one changed.  On PostgreSQL the steps run in one transaction under
an advisory lock, so nodes starting together migrate once.
"""

from __future__ import annotations

from typing import Any

#: The schema version this code writes.
SCHEMA_VERSION = 3

#: Version 1: every table and column of PROTOCOLS.md, in the types of the
#: original (SQLite) schema.
TABLES: dict[str, list[tuple[str, str]]] = {
    "domains": [
        ("xmppdomain", "TEXT PRIMARY KEY"),
        ("authsecret", "TEXT"),
        ("authurl", "TEXT"),
        ("authdomain", "TEXT"),
        ("regcontact", "TEXT"),
        ("regfirst", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
        ("reglatest", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
        # The backend of the domain (NULL: jsxc when authurl is set, else the
        # global backend) and the nextcloud backend's service account.
        ("backend", "TEXT"),
        ("serviceuser", "TEXT"),
        ("servicepassword", "TEXT"),
        ("loginformat", "TEXT"),
    ],
    "authcache": [
        ("jid", "TEXT PRIMARY KEY"),
        ("pwhash", "TEXT"),
        ("firstauth", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
        ("remoteauth", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
        ("anyauth", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
    ],
    "rosterinfo": [
        ("jid", "TEXT PRIMARY KEY"),
        ("fullname", "TEXT"),
        ("grouplist", "TEXT"),
        ("responsehash", "TEXT"),
        ("last_update", "TIMESTAMP DEFAULT CURRENT_TIMESTAMP"),
    ],
    "rostergroups": [
        ("groupname", "TEXT PRIMARY KEY"),
        ("userlist", "TEXT"),
    ],
}

#: Version 2: who runs the roster sync of a JID (C{node}) until when
#: (C{expires}, UNIX seconds).
TABLES_V2: dict[str, list[tuple[str, str]]] = {
    "rosterclaims": [
        ("jid", "TEXT PRIMARY KEY"),
        ("node", "TEXT"),
        ("expires", "DOUBLE PRECISION"),
    ],
}

#: Version 3: the checks each node counted toward the brute-force budgets
#: (L{xcauth.core.sharedbudget}): C{kind} C{user} (a refused check of the user
#: C{key}) or C{backend} (a failed check toward the Nextcloud C{key}), at
#: C{at} (UNIX seconds).
TABLES_V3: dict[str, list[tuple[str, str]]] = {
    "budgetevents": [
        ("node", "TEXT"),
        ("kind", "TEXT"),
        ("key", "TEXT"),
        ("at", "DOUBLE PRECISION"),
    ],
}

#: The tables each version adds.
STEPS: list[tuple[int, dict[str, list[tuple[str, str]]]]] = [
    (1, TABLES),
    (2, TABLES_V2),
    (3, TABLES_V3),
]

#: Timestamps are text in C{CURRENT_TIMESTAMP}'s format on both engines (what
#: SQLite files hold): on PostgreSQL a text column with that default.
_PG_NOW = "TEXT DEFAULT to_char(timezone('UTC', now()), 'YYYY-MM-DD HH24:MI:SS')"

#: The key of the advisory lock migrations on PostgreSQL run under.
MIGRATION_LOCK = 0x7863617574680001


class SchemaTooNew(Exception):
    """
    The database was upgraded by a newer xcauth; the message says so.
    """


def tooNew(version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"the state database has schema version {version}, newer than the "
        f"{SCHEMA_VERSION} this xcauth knows: upgrade xcauth on this node"
    )


def columnKind(kind: str, engine: str) -> str:
    """
    The column type of C{kind} (as written in L{TABLES}) on C{engine}.
    """
    if engine == "postgresql" and kind.startswith("TIMESTAMP"):
        return _PG_NOW
    return kind


def isPostgres(conn: Any) -> bool:
    return getattr(conn, "engine", "sqlite") == "postgresql"


def _columns(conn: Any, table: str) -> set[str] | None:
    """
    The column names of C{table}, or C{None} if it does not exist.
    """
    if isPostgres(conn):
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ).fetchall()
    else:
        rows = [(r[1],) for r in conn.execute(f"PRAGMA table_info({table})")]
    return {r[0] for r in rows} or None


def _ensureTables(conn: Any, tables: dict[str, list[tuple[str, str]]]) -> None:
    engine = "postgresql" if isPostgres(conn) else "sqlite"
    for table, columns in tables.items():
        present = _columns(conn, table)
        if present is None:
            body = ", ".join(f"{name} {columnKind(kind, engine)}" for name, kind in columns)
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body})")
            continue
        for name, kind in columns:
            if name not in present:
                # ALTER TABLE takes no PRIMARY KEY (and, in SQLite, no
                # non-constant default).
                plain = columnKind(kind, engine) if engine == "postgresql" else kind.split()[0]
                plain = plain.replace("PRIMARY KEY", "").strip()
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {plain}")


def complete(conn: Any) -> bool:
    """
    Whether every table and column of every step is there.
    """
    for _, tables in STEPS:
        for table, columns in tables.items():
            present = _columns(conn, table)
            if present is None or not {name for name, _ in columns} <= present:
                return False
    return True


def version(conn: Any) -> int:
    """
    The schema version recorded in the database (0: none).
    """
    if isPostgres(conn):
        if _columns(conn, "xcauth_schema") is None:
            return 0
        row = conn.execute("SELECT max(version) FROM xcauth_schema").fetchone()
        return int(row[0] or 0)
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _setVersion(conn: Any, number: int) -> None:
    if isPostgres(conn):
        conn.execute("DELETE FROM xcauth_schema")
        conn.execute("INSERT INTO xcauth_schema (version) VALUES (?)", (number,))
    else:
        conn.execute(f"PRAGMA user_version = {int(number)}")


def check(conn: Any) -> int:
    """
    The database's version; L{SchemaTooNew} if this code cannot use it.
    """
    found = version(conn)
    if found > SCHEMA_VERSION:
        raise tooNew(found)
    return found


def migrate(conn: Any) -> tuple[int, int]:
    """
    Bring the schema to L{SCHEMA_VERSION} inside the caller's write
    transaction (and, on PostgreSQL, its advisory lock); returns the versions
    before and after.  Every step's tables are ensured, not only the steps
    above the recorded version, so a file missing a column of its own version
    is repaired as before.
    """
    if isPostgres(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS xcauth_schema (version INTEGER NOT NULL)")
    before = check(conn)
    for _, tables in STEPS:
        _ensureTables(conn, tables)
    if before < SCHEMA_VERSION or (isPostgres(conn) and before == 0):
        _setVersion(conn, SCHEMA_VERSION)
    return before, SCHEMA_VERSION
