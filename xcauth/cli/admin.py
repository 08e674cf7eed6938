"""
The administration commands of C{xcauth}, acting on the state database
directly (synchronously, with plain C{sqlite3}; safe while the daemon runs,
which picks domain changes up within seconds)::

    xcauth [-c FILE] [--db PATH] domains add DOMAIN --url URL --secret SECRET [--authdomain NAME]
    xcauth [-c FILE] [--db PATH] domains set DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]
    xcauth [-c FILE] [--db PATH] domains remove DOMAIN
    xcauth [-c FILE] [--db PATH] domains list
    xcauth [-c FILE] [--db PATH] domains show DOMAIN [--show-secret]
    (domains add|set: --service-password-file FILE and --secret-file FILE read
    the secret from a file, '-' from standard input; domains add --backend
    nextcloud asks for the app password on the terminal when none is given)
    xcauth [-c FILE] [--db PATH] cache list
    xcauth [-c FILE] [--db PATH] cache remove JID
    xcauth [-c FILE] [--db PATH] cache clear
    xcauth [-c FILE] [--db PATH] roster refresh [USER@DOMAIN]
    xcauth [-c FILE] [--db DB] db upgrade
    xcauth [-c FILE] [--db DB] db copy SQLITE_PATH

C{--db} (or C{db=}) may name a PostgreSQL database (C{postgresql://...} or a
libpq key/value string); its password then comes from C{--db-password-file}
(or C{db-password-file=} of the config file), never from the command line.

(C{-c} and C{--db} may also come after the command words.)

The database is the one given with C{--db}, else the C{db=} of the config file
(C{-c}, or C{/etc/xcauth.conf} when it exists), else the default.  Secrets are
masked unless asked for; password hashes are never printed.  Run as root on a
database (or its directory) that belongs to another user, the service's, the
commands refuse with a line saying how to run them as that user.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from xcauth.daemon.config import (
    BACKENDS,
    DEFAULT_CONFIG_FILE,
    ConfigError,
    default,
    readConfigFile,
    readSecretFile,
    versionLine,
)
from xcauth.interfaces import LOGIN_FORMATS
from xcauth.state import database as store
from xcauth.state.postgres import describe
from xcauth.state.schema import SchemaTooNew
from xcauth.text import validateURL


class AdminError(Exception):
    """
    The command cannot be carried out; the message says why.
    """


class _DatabaseOptions(usage.Options):
    """
    C{-c FILE} and C{--db PATH}, accepted at every level of an administration
    command (C{xcauth domains list --db PATH} as well as C{xcauth --db PATH
    domains list}); Twisted gathers these into every subclass's options.
    """

    optParameters = [
        [
            "config-file",
            "c",
            None,
            f"Read db=... from this file (default: {DEFAULT_CONFIG_FILE} when it "
            "exists).",
        ],
        ["db", None, None, "The state database (overrides the config file)."],
        [
            "db-password-file", None, None,
            "The file (or systemd credential) holding the PostgreSQL password "
            "(overrides the config file).",
        ],
    ]

    def opt_version(self) -> None:
        """
        Print xcauth's version and exit.
        """
        print(versionLine())
        raise SystemExit(0)


class _CommandGroup(_DatabaseOptions):
    """
    A command word whose own command words follow (C{domains add ...}).
    """

    #: The group's name, for messages.
    name = ""
    subCommands: list[Any] = []

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                f"{self.name} needs one of: " + ", ".join(c[0] for c in self.subCommands)
            )

    def getSynopsis(self) -> str:
        """
        Under one of its commands, just the words so far (C{xcauth domains}),
        which the command's own synopsis continues.
        """
        if self.subCommand is not None and self.parent is not None:
            return f"{self.parent.getSynopsis()} {self.parent.subCommand}"
        return super().getSynopsis()


def databasePath(options: usage.Options) -> str:
    """
    The database an administration command acts on: the innermost C{--db},
    else the C{db=} of the innermost C{-c} file (or of L{DEFAULT_CONFIG_FILE}
    when it exists), else the default.
    """
    chain = []
    current: Any = options
    while current is not None:
        chain.append(current)
        current = getattr(current, "parent", None)
    for o in chain:
        if o.get("db"):
            return str(o["db"])
    path = next((o["config-file"] for o in chain if o.get("config-file")), None)
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        for key, value, _ in readConfigFile(path):
            if key == "db" and value:
                return value
    return str(default("db"))


def databasePassword(options: usage.Options) -> str | None:
    """
    The PostgreSQL password of an administration command: from the innermost
    C{--db-password-file}, else the C{db-password-file=} of the config file;
    C{None} without one.
    """
    chain = []
    current: Any = options
    while current is not None:
        chain.append(current)
        current = getattr(current, "parent", None)
    name = next((o["db-password-file"] for o in chain if o.get("db-password-file")), None)
    if name is None:
        path = next((o["config-file"] for o in chain if o.get("config-file")), None)
        if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            for key, value, _ in readConfigFile(path):
                if key == "db-password-file" and value:
                    name = value
    return None if name is None else readSecretFile(name, "db-password-file")


def _checkDomain(domain: str) -> str:
    from xcauth.identity import InvalidIdentity, canonicalDomain

    domain = domain.strip()
    try:
        # Stored in the canonical form the daemon looks domains up in.
        return canonicalDomain(domain)
    except InvalidIdentity:
        raise usage.UsageError(f"{domain!r} is not a valid XMPP domain name") from None


class _DomainArg(_DatabaseOptions):
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Options may follow the domain (getopt stops at the first argument).
        args = list(sys.argv[1:] if options is None else options)
        # The options that take a value, as getopt knows them ("db=", "c:").
        valued = {f"--{o[:-1]}" for o in self.longOpt if o.endswith("=")}
        valued |= {f"-{c}" for c, n in zip(self.shortOpt, self.shortOpt[1:] + " ", strict=True) if n == ":"}
        front: list[str] = []
        positional: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                positional += args[i + 1 :]
                break
            if arg.startswith("-") and len(arg) > 1:
                front.append(arg)
                if arg in valued and i + 1 < len(args):
                    front.append(args[i + 1])
                    i += 1
            else:
                positional.append(arg)
            i += 1
        super().parseOptions(front + ["--"] + positional)

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self["domain"] = _checkDomain(domain)


class _DomainEdit(_DomainArg):
    optParameters = [
        ["url", "u", None, "The JSXC external API URL of the domain's Nextcloud."],
        [
            "secret",
            "s",
            None,
            "The domain's JSXC API secret (comma-separated while rotating).",
        ],
        [
            "authdomain",
            None,
            None,
            "The domain name the backend knows the users under "
            "(default: the XMPP domain).",
        ],
        ["backend", None, None, "jsxc (the JSXC app) or nextcloud (stock Nextcloud, "
         "--url is then its base URL)."],
        ["service-user", None, None, "Backend nextcloud: the service account's login."],
        ["service-password", None, None,
         "Backend nextcloud: the service account's app password (visible in ps and "
         "the shell's history: prefer --service-password-file)."],
        ["service-password-file", None, None,
         "Backend nextcloud: read the app password from this file ('-': standard "
         "input)."],
        ["secret-file", None, None,
         "Read --secret from this file ('-': standard input)."],
        ["login-format", None, None, "Backend nextcloud: {user} or {user}@{domain}."],
    ]

    def readSecretFiles(self) -> None:
        """
        Read the secrets given as files (once).
        """
        for option, target in (("service-password-file", "service-password"),
                               ("secret-file", "secret")):
            if self[option] is not None:
                if self[target] is not None:
                    raise usage.UsageError(f"give --{target} or --{option}, not both")
                self[target] = _readSecret(self[option], f"--{option}")
                self[option] = None

    def postOptions(self) -> None:
        self.readSecretFiles()
        if self["backend"] is not None and self["backend"] not in BACKENDS:
            raise usage.UsageError(
                f"--backend {self['backend']!r}: use one of " + ", ".join(BACKENDS)
            )
        if self["login-format"] is not None and self["login-format"] not in LOGIN_FORMATS:
            raise usage.UsageError(
                f"--login-format {self['login-format']!r}: use one of "
                + ", ".join(LOGIN_FORMATS)
            )
        if self["url"] is not None:
            try:
                validateURL(self["url"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["secret"] is not None and not self["secret"].strip():
            raise usage.UsageError("--secret must not be empty")


def _readSecret(path: str, option: str) -> str:
    """
    The first line of the file C{path} (C{-}: standard input), for a secret
    that must not appear on a command line.
    """
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.readline()
    except OSError as e:
        raise usage.UsageError(f"{option}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise usage.UsageError(f"{option}: {path} is not UTF-8 text") from None
    secret = text.strip("\r\n")
    if not secret.strip():
        raise usage.UsageError(f"{option}: {path} holds no secret")
    return secret


def _promptSecret(what: str) -> str | None:
    """
    Ask for a secret on the terminal (not echoed); C{None} without one.
    """
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    import getpass

    try:
        secret = getpass.getpass(f"{what}: ")
    except (EOFError, KeyboardInterrupt):
        return None
    return secret if secret.strip() else None


#: Options of C{domains set} and the columns they change.
_EDITABLE = {
    "url": "authurl",
    "secret": "authsecret",
    "authdomain": "authdomain",
    "backend": "backend",
    "service-user": "serviceuser",
    "service-password": "servicepassword",
    "login-format": "loginformat",
}


def _backendColumns(sub: usage.Options) -> dict[str, str | None]:
    return {
        _EDITABLE[k]: sub[k]
        for k in ("backend", "service-user", "service-password", "login-format")
        if sub[k] is not None
    }


class DomainAddOptions(_DomainEdit):
    """
    C{domains add DOMAIN --url URL --secret SECRET [--authdomain NAME]}
    """

    synopsis = (
        "DOMAIN --url URL --secret SECRET [--authdomain NAME]\n"
        "       DOMAIN --backend nextcloud --url BASE-URL --service-user LOGIN "
        "[--service-password-file FILE|-] [--login-format FORMAT] [--secret TOKEN-KEY]\n"
        "(without --service-password-file, the app password is asked for on the "
        "terminal)"
    )

    def postOptions(self) -> None:
        self.readSecretFiles()
        if self["backend"] == "nextcloud" and self["service-password"] is None:
            self["service-password"] = _promptSecret("the service account's app password")
        if self["backend"] == "nextcloud":
            missing = [f"--{k}" for k in ("url", "service-user", "service-password")
                       if self[k] is None]
            if "--service-password" in missing:
                missing[missing.index("--service-password")] = (
                    "--service-password-file (or --service-password)")
            if missing:
                raise usage.UsageError(
                    "domains add --backend nextcloud needs " + ", ".join(missing)
                )
        elif self["url"] is None or self["secret"] is None:
            raise usage.UsageError("domains add needs --url and --secret")
        super().postOptions()


class DomainSetOptions(_DomainEdit):
    """
    C{domains set DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]}
    """

    synopsis = "DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]"

    def postOptions(self) -> None:
        self.readSecretFiles()
        if all(self[k] is None for k in _EDITABLE):
            raise usage.UsageError(
                "domains set needs at least one of "
                + ", ".join(f"--{k}" for k in _EDITABLE)
            )
        super().postOptions()


class DomainRemoveOptions(_DomainArg):
    """
    C{domains remove DOMAIN}
    """

    synopsis = "DOMAIN"


class DomainShowOptions(_DomainArg):
    """
    C{domains show DOMAIN [--show-secret]}
    """

    synopsis = "DOMAIN [--show-secret]"
    optFlags = [["show-secret", None, "Print the secret instead of masking it."]]


class DomainListOptions(_DatabaseOptions):
    """
    C{domains list}
    """

    synopsis = ""


class DomainsOptions(_CommandGroup):
    """
    C{domains add|set|remove|list|show}
    """

    name = "domains"
    synopsis = "add|set|remove|list|show ..."
    subCommands = [
        ["add", None, DomainAddOptions, "Add a domain with its own backend."],
        ["set", None, DomainSetOptions, "Change what is given of a domain."],
        ["remove", None, DomainRemoveOptions, "Remove a domain."],
        ["list", None, DomainListOptions, "List the domains (secrets masked)."],
        ["show", None, DomainShowOptions, "Show one domain."],
    ]



class CacheRemoveOptions(_DatabaseOptions):
    """
    C{cache remove JID}
    """

    synopsis = "USER@DOMAIN"

    def parseArgs(self, jid: str) -> None:  # type: ignore[override]
        self["jid"] = jid


class CacheListOptions(_DatabaseOptions):
    """
    C{cache list}
    """

    synopsis = ""


class CacheClearOptions(_DatabaseOptions):
    """
    C{cache clear}
    """

    synopsis = ""


class CacheOptions(_CommandGroup):
    """
    C{cache list|remove|clear}
    """

    name = "cache"
    synopsis = "list|remove JID|clear"
    subCommands = [
        ["list", None, CacheListOptions, "List the cached JIDs and their times."],
        ["remove", None, CacheRemoveOptions, "Forget the cached password of a JID."],
        ["clear", None, CacheClearOptions, "Forget every cached password."],
    ]



class RosterRefreshOptions(_DatabaseOptions):
    """
    C{roster refresh [USER@DOMAIN]}
    """

    synopsis = "[USER@DOMAIN]"

    def parseArgs(self, jid: str | None = None) -> None:
        if jid is not None and "@" not in jid:
            raise usage.UsageError(f"{jid!r} is not a JID (USER@DOMAIN)")
        self["jid"] = jid


class RosterOptions(_CommandGroup):
    """
    C{roster refresh}
    """

    name = "roster"
    synopsis = "refresh [USER@DOMAIN]"
    subCommands = [
        [
            "refresh",
            None,
            RosterRefreshOptions,
            "Forget what the roster sync stored for a JID (or for all), so that "
            "the next login syncs everything again.",
        ],
    ]


class DbUpgradeOptions(_DatabaseOptions):
    synopsis = ""


class DbCopyOptions(_DomainArg):
    # (a _DomainArg: options may follow the path as they follow a domain)
    synopsis = "SQLITE_PATH"

    def parseArgs(self, source: str) -> None:  # type: ignore[override]
        self["source"] = source


class DbOptions(_CommandGroup):
    """
    C{db upgrade}, C{db copy SQLITE_PATH}
    """

    name = "db"
    synopsis = "upgrade | copy SQLITE_PATH"
    subCommands = [
        [
            "upgrade", None, DbUpgradeOptions,
            "Bring the state database's schema to this version's (the daemon also "
            "does at start).",
        ],
        [
            "copy", None, DbCopyOptions,
            "Copy the domains, the credential cache and the roster sync state of a "
            "SQLite file into the state database (e.g. PostgreSQL); rows it has "
            "already are kept.",
        ],
    ]


#: The administration commands, as C{subCommands} of the C{xcauth} command.
SUBCOMMANDS: list[Any] = [
    ["domains", None, DomainsOptions, "Manage per-domain backends (xcauth domains --help)."],
    ["cache", None, CacheOptions, "Inspect and clear the credential cache."],
    ["roster", None, RosterOptions, "Make the shared roster sync start over."],
    ["db", None, DbOptions, "Upgrade the state database, or copy a SQLite file into it."],
]


def maskSecret(secret: str | None) -> str:
    """
    A secret as it is shown unless asked for: never any of its characters.
    """
    if not secret:
        return "(global)"
    return "******** (hidden; --show-secret prints it)"


def rowBackend(row: store.DomainRow) -> str:
    """
    The backend a domain row uses: its own, C{jsxc} for a row with a URL
    written before there was a choice, else the global one.
    """
    if row.backend:
        return row.backend
    return "jsxc" if row.authurl else "(global)"


def checkOwner(path: str, command: str, euid: int | None = None) -> None:
    """
    Refuse to work as root on a database that belongs to the service's user:
    root would leave files (the database, its journal) that the service
    cannot open.  The error says how to run the command as that user.
    """
    if (os.geteuid() if euid is None else euid) != 0 or "://" in path or "=" in path:
        # Not root, or a PostgreSQL database (a URL or key=value string).
        return
    target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    try:
        uid = os.stat(target).st_uid
    except OSError:
        return
    if uid == 0:
        return
    import pwd

    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    if name is not None:
        how = f"runuser -u {name} -- xcauth {command} ..."
    else:
        # A DynamicUser= of systemd (make install): no name outside the service.
        how = ("systemd-run --pipe --wait -p DynamicUser=yes -p User=xcauth "
               f"-p StateDirectory=xcauth xcauth {command} ...")
    owner = name or f"uid {uid}"
    raise AdminError(
        f"{target} belongs to {owner}, the service's user: as root this command "
        f"would leave files the service cannot open; run it as {owner}: {how}"
    )


def _open(path: str, create: bool, password: str | None = None) -> store.Connection:
    from xcauth.state import postgres as pgstore

    try:
        if pgstore.isPostgres(path):
            try:
                conn = pgstore.connect(path, password, ADMIN_TIMEOUT, "xcauth-admin")
            except ValueError as e:
                raise AdminError(str(e)) from None
            try:
                store.ensureSchema(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        return store.connect(path, create=create)
    except SchemaTooNew as e:
        raise AdminError(str(e)) from None
    except store.NoDatabase:
        raise AdminError(
            f"no state database at {path} (give --db, or db=... in the config file)"
        ) from None
    except store.DatabaseError as e:
        raise AdminError(str(e)) from None


#: Seconds a statement of an administration command may take on PostgreSQL.
ADMIN_TIMEOUT = 60.0


def runDb(conn: store.Connection, options: DbOptions, out: Any, target: str) -> int:
    """
    Carry out a C{db} command on C{conn} (the database C{target}, opened and
    so already upgraded); returns the exit status.
    """
    if options.subCommand == "upgrade":
        print(
            f"the state database {describe(target)} has schema version "
            f"{store.schemaVersion(conn)}",
            file=out,
        )
        return 0
    source = options.subOptions["source"]
    if os.path.abspath(source) == os.path.abspath(target):
        raise AdminError("db copy: the SQLITE_PATH is the state database itself")
    if not os.path.isfile(source):
        raise AdminError(f"db copy: no SQLite file at {source}")
    try:
        sourceConn = store.connect(source, create=False)
    except (store.DatabaseError, SchemaTooNew) as e:
        raise AdminError(f"db copy: {e}") from None
    try:
        counts = copyState(sourceConn, conn)
    finally:
        sourceConn.close()
    for table, (copied, kept) in counts.items():
        print(f"{table}: {copied} rows copied, {kept} already there (kept)", file=out)
    return 0


def _text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def copyState(
    source: store.Connection, target: store.Connection
) -> dict[str, tuple[int, int]]:
    """
    Copy every row of the tables of L{store.TABLES} from C{source} to
    C{target} in one transaction; a row whose key C{target} has already is
    kept as it is there.  Returns, per table, the rows copied and those kept.
    """
    counts: dict[str, tuple[int, int]] = {}
    with store.transaction(target):
        for table, columns in store.TABLES.items():
            names = [name for name, _ in columns]
            rows = source.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall()
            marks = ", ".join("?" * len(names))
            copied = 0
            for row in rows:
                cursor = target.execute(
                    f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks}) "
                    "ON CONFLICT DO NOTHING",
                    [_text(v) for v in row],
                )
                copied += max(cursor.rowcount, 0)
            counts[table] = (copied, len(rows) - copied)
        store.notify(target, store.DOMAINS_CHANNEL, "")
        store.notify(target, store.CACHE_CHANNEL, "")
    return counts


def runDomains(conn: store.Connection, options: DomainsOptions, out: Any) -> int:
    """
    Carry out a C{domains} command; returns the exit status.
    """
    command, sub = options.subCommand, options.subOptions
    if command == "list":
        rows = store.listDomains(conn)
        if not rows:
            print("no domains (every domain uses the global url and secret)", file=out)
        for row in rows:
            line = (
                f"{row.xmppdomain}\tbackend={rowBackend(row)}\t"
                f"url={row.authurl or '(global)'}\t"
                f"authdomain={row.authdomain or row.xmppdomain}\t"
                f"secret={'********' if row.authsecret else '(global)'}"
            )
            if row.backend or row.serviceuser or row.servicepassword:
                line += (
                    f"\tservice-user={row.serviceuser or '(global)'}"
                    f"\tservice-password={'********' if row.servicepassword else '(global)'}"
                )
            print(line, file=out)
        return 0
    domain = sub["domain"]
    if command == "add":
        secret = sub["secret"].strip() if sub["secret"] is not None else None
        if not store.addDomain(
            conn, domain, sub["url"], secret, sub["authdomain"] or None,
            **_backendColumns(sub),
        ):
            raise AdminError(
                f"domain {domain} exists already; change it with 'domains set'"
            )
        print(f"added domain {domain}", file=out)
        return 0
    if command == "set":
        changes: dict[str, str | None] = {}
        if sub["url"] is not None:
            changes["authurl"] = sub["url"]
        if sub["secret"] is not None:
            changes["authsecret"] = sub["secret"].strip()
        if sub["authdomain"] is not None:
            changes["authdomain"] = sub["authdomain"] or None
        changes.update(_backendColumns(sub))
        if not store.updateDomain(conn, domain, **changes):
            raise AdminError(f"unknown domain {domain}; add it with 'domains add'")
        names = {column: option for option, column in _EDITABLE.items()}
        print(f"changed domain {domain}: "
              f"{', '.join(sorted(names[c] for c in changes))}", file=out)
        return 0
    if command == "remove":
        if not store.removeDomain(conn, domain):
            raise AdminError(f"unknown domain {domain}")
        print(f"removed domain {domain}", file=out)
        return 0
    found = store.getDomain(conn, domain)
    if found is None:
        raise AdminError(f"unknown domain {domain}")
    secret = (found.authsecret or "(global)") if sub["show-secret"] else maskSecret(
        found.authsecret)
    print(f"domain:     {found.xmppdomain}", file=out)
    print(f"backend:    {rowBackend(found)}", file=out)
    print(f"url:        {found.authurl or '(global)'}", file=out)
    print(f"authdomain: {found.authdomain or found.xmppdomain}", file=out)
    print(f"secret:     {secret}", file=out)
    if found.backend or found.serviceuser or found.servicepassword or found.loginformat:
        password = (
            (found.servicepassword or "(global)") if sub["show-secret"]
            else maskSecret(found.servicepassword)
        )
        print(f"service-user: {found.serviceuser or '(global)'}", file=out)
        print(f"service-password: {password}", file=out)
        print(f"login-format: {found.loginformat or '(global)'}", file=out)
    return 0


def runCache(conn: store.Connection, options: CacheOptions, out: Any) -> int:
    """
    Carry out a C{cache} command; returns the exit status.  Hashes are never
    printed.
    """
    command = options.subCommand
    if command == "list":
        rows = store.listCache(conn)
        if not rows:
            print("the credential cache is empty", file=out)
        for row in rows:
            print(
                f"{row.jid}\tfirst={store.formatTimestamp(row.firstAuth)}\t"
                f"verified={store.formatTimestamp(row.remoteAuth)}\t"
                f"used={store.formatTimestamp(row.anyAuth)}",
                file=out,
            )
        return 0
    if command == "remove":
        jid = options.subOptions["jid"]
        if not store.deleteCacheEntry(conn, jid):
            raise AdminError(f"no cache entry for {jid}")
        print(f"removed the cache entry of {jid}", file=out)
        return 0
    count = store.clearCache(conn)
    print(f"removed {count} cache entries", file=out)
    return 0


def runRoster(conn: store.Connection, options: RosterOptions, out: Any) -> int:
    """
    Carry out a C{roster} command; returns the exit status.
    """
    from xcauth.state.roster import forgetRoster

    jid = options.subOptions["jid"]
    count = forgetRoster(conn, jid)
    if jid is None:
        print(f"forgot the roster sync state of {count} JIDs: each is synced again "
              "at its next login", file=out)
        return 0
    if not count:
        raise AdminError(f"no roster sync state for {jid}")
    print(f"forgot the roster sync state of {jid}: synced again at its next login",
          file=out)
    return 0


def run(command: str, options: usage.Options) -> int:
    """
    Carry out one administration command (C{command} is C{domains} or
    C{cache}, C{options} its parsed options); returns the exit status (0 done,
    1 the command failed).
    """
    try:
        path = databasePath(options.subOptions or options)
        password = databasePassword(options.subOptions or options)
        writing = (command == "domains" and options.subCommand in ("add", "set")) or (
            command == "db"
        )
        checkOwner(path, command)
        conn = _open(path, create=writing, password=password)
        try:
            if isinstance(options, DbOptions):
                return runDb(conn, options, sys.stdout, path)
            if isinstance(options, DomainsOptions):
                return runDomains(conn, options, sys.stdout)
            if isinstance(options, RosterOptions):
                return runRoster(conn, options, sys.stdout)
            assert isinstance(options, CacheOptions)
            return runCache(conn, options, sys.stdout)
        finally:
            conn.close()
    except (AdminError, ConfigError) as e:
        print(f"xcauth: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"xcauth: database error: {e}", file=sys.stderr)
        return 1
    except store.DatabaseError as e:
        print(f"xcauth: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not type(e).__module__.startswith("psycopg"):
            raise
        print(f"xcauth: database error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
