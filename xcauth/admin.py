"""
The administration commands of C{xcauth}, acting on the state database
directly (synchronously, with plain C{sqlite3}; safe while the daemon runs,
which picks domain changes up within seconds)::

    xcauth [-c FILE] [--db PATH] domains add DOMAIN --url URL --secret SECRET [--authdomain NAME]
    xcauth [-c FILE] [--db PATH] domains set DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]
    xcauth [-c FILE] [--db PATH] domains remove DOMAIN
    xcauth [-c FILE] [--db PATH] domains list
    xcauth [-c FILE] [--db PATH] domains show DOMAIN [--show-secret]
    xcauth [-c FILE] [--db PATH] cache list
    xcauth [-c FILE] [--db PATH] cache remove JID
    xcauth [-c FILE] [--db PATH] cache clear
    xcauth [-c FILE] [--db PATH] roster refresh [USER@DOMAIN]

The database is the one given with C{--db}, else the C{db=} of the config file
(C{-c}, or C{/etc/xcauth.conf} when it exists), else the default.  Secrets are
masked unless asked for; password hashes are never printed.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from xcauth import store
from xcauth.config import DEFAULT_CONFIG_FILE, DEFAULTS, ConfigError, readConfigFile
from xcauth.nextcloud import validateURL

#: The words that start an administration command.
COMMANDS = ("domains", "cache", "roster")

#: Options before the command word that take a value.
_VALUE_OPTIONS = ("-c", "--config-file", "--db")


class AdminError(Exception):
    """
    The command cannot be carried out; the message says why.
    """


def adminCommandIndex(argv: Sequence[str]) -> int | None:
    """
    The index of the administration command word in C{argv}, if the arguments
    are an administration command: only C{-c FILE} and C{--db PATH} may come
    before it.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in COMMANDS:
            return i
        if arg in _VALUE_OPTIONS:
            i += 2
        elif arg.startswith(("--config-file=", "--db=")) or (
            arg.startswith("-c") and len(arg) > 2
        ):
            i += 1
        else:
            return None
    return None


def _globalOptionsFirst(argv: Sequence[str]) -> list[str]:
    """
    Move C{-c FILE}, C{--config-file FILE} and C{--db PATH} given after the
    command word in front of it, so they work anywhere on the command line.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS and i + 1 < len(argv):
            front += [arg, argv[i + 1]]
            i += 2
            continue
        if arg.startswith(("--config-file=", "--db=")):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _checkDomain(domain: str) -> str:
    domain = domain.strip()
    if not domain or any(c in domain for c in ":@/ \t") or not domain.isprintable():
        raise usage.UsageError(f"{domain!r} is not a valid XMPP domain name")
    return domain


class _DomainArg(usage.Options):
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Options may follow the domain (getopt stops at the first argument).
        args = list(sys.argv[1:] if options is None else options)
        valued = set()
        for long, short, *_ in getattr(self, "optParameters", []):
            valued.add(f"--{long}")
            if short:
                valued.add(f"-{short}")
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
    ]

    def postOptions(self) -> None:
        if self["url"] is not None:
            try:
                validateURL(self["url"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["secret"] is not None and not self["secret"].strip():
            raise usage.UsageError("--secret must not be empty")


class DomainAddOptions(_DomainEdit):
    """
    C{domains add DOMAIN --url URL --secret SECRET [--authdomain NAME]}
    """

    synopsis = "DOMAIN --url URL --secret SECRET [--authdomain NAME]"

    def postOptions(self) -> None:
        if self["url"] is None or self["secret"] is None:
            raise usage.UsageError("domains add needs --url and --secret")
        super().postOptions()


class DomainSetOptions(_DomainEdit):
    """
    C{domains set DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]}
    """

    synopsis = "DOMAIN [--url URL] [--secret SECRET] [--authdomain NAME]"

    def postOptions(self) -> None:
        if all(self[k] is None for k in ("url", "secret", "authdomain")):
            raise usage.UsageError(
                "domains set needs at least one of --url, --secret, --authdomain"
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


class DomainListOptions(usage.Options):
    """
    C{domains list}
    """

    synopsis = ""


class DomainsOptions(usage.Options):
    """
    C{domains add|set|remove|list|show}
    """

    synopsis = "add|set|remove|list|show ..."
    subCommands = [
        ["add", None, DomainAddOptions, "Add a domain with its own backend."],
        ["set", None, DomainSetOptions, "Change what is given of a domain."],
        ["remove", None, DomainRemoveOptions, "Remove a domain."],
        ["list", None, DomainListOptions, "List the domains (secrets masked)."],
        ["show", None, DomainShowOptions, "Show one domain."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("domains needs one of: add, set, remove, list, show")


class CacheRemoveOptions(usage.Options):
    """
    C{cache remove JID}
    """

    synopsis = "USER@DOMAIN"

    def parseArgs(self, jid: str) -> None:  # type: ignore[override]
        self["jid"] = jid


class CacheListOptions(usage.Options):
    """
    C{cache list}
    """

    synopsis = ""


class CacheClearOptions(usage.Options):
    """
    C{cache clear}
    """

    synopsis = ""


class CacheOptions(usage.Options):
    """
    C{cache list|remove|clear}
    """

    synopsis = "list|remove JID|clear"
    subCommands = [
        ["list", None, CacheListOptions, "List the cached JIDs and their times."],
        ["remove", None, CacheRemoveOptions, "Forget the cached password of a JID."],
        ["clear", None, CacheClearOptions, "Forget every cached password."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("cache needs one of: list, remove, clear")


class RosterRefreshOptions(usage.Options):
    """
    C{roster refresh [USER@DOMAIN]}
    """

    synopsis = "[USER@DOMAIN]"

    def parseArgs(self, jid: str | None = None) -> None:
        if jid is not None and "@" not in jid:
            raise usage.UsageError(f"{jid!r} is not a JID (USER@DOMAIN)")
        self["jid"] = jid


class RosterOptions(usage.Options):
    """
    C{roster refresh}
    """

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

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("roster needs: refresh")


class AdminOptions(usage.Options):
    """
    Options of C{xcauth domains ...} and C{xcauth cache ...}.
    """

    synopsis = "[-c FILE] [--db PATH] domains|cache ..."
    optParameters = [
        [
            "config-file",
            "c",
            None,
            f"Read db=... from this file (default: {DEFAULT_CONFIG_FILE} when it "
            "exists).",
        ],
        ["db", None, None, "The state database (overrides the config file)."],
    ]
    subCommands = [
        ["domains", None, DomainsOptions, "Manage per-domain backends."],
        ["cache", None, CacheOptions, "Inspect and clear the credential cache."],
        ["roster", None, RosterOptions, "Make the shared roster sync start over."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: domains, cache or roster")

    def databasePath(self) -> str:
        """
        The database to act on: --db, the config file's db=, or the default.
        """
        if self["db"]:
            return str(self["db"])
        path = self["config-file"]
        if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            for key, value, _ in readConfigFile(path):
                if key == "db" and value:
                    return value
        return str(DEFAULTS["db"])


def maskSecret(secret: str | None) -> str:
    """
    A secret as it is shown unless asked for: never any of its characters.
    """
    if not secret:
        return "(global)"
    return "******** (hidden; --show-secret prints it)"


def _open(path: str, create: bool) -> sqlite3.Connection:
    try:
        return store.connect(path, create=create)
    except store.NoDatabase:
        raise AdminError(
            f"no state database at {path} (give --db, or db=... in the config file)"
        ) from None
    except store.DatabaseError as e:
        raise AdminError(str(e)) from None


def runDomains(conn: sqlite3.Connection, options: DomainsOptions, out: Any) -> int:
    """
    Carry out a C{domains} command; returns the exit status.
    """
    command, sub = options.subCommand, options.subOptions
    if command == "list":
        rows = store.listDomains(conn)
        if not rows:
            print("no domains (every domain uses the global url and secret)", file=out)
        for row in rows:
            print(
                f"{row.xmppdomain}\turl={row.authurl or '(global)'}\t"
                f"authdomain={row.authdomain or row.xmppdomain}\t"
                f"secret={'********' if row.authsecret else '(global)'}",
                file=out,
            )
        return 0
    domain = sub["domain"]
    if command == "add":
        if not store.addDomain(
            conn, domain, sub["url"], sub["secret"].strip(), sub["authdomain"] or None
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
        if not store.updateDomain(conn, domain, **changes):
            raise AdminError(f"unknown domain {domain}; add it with 'domains add'")
        print(f"changed domain {domain}: {', '.join(sorted(changes))}", file=out)
        return 0
    if command == "remove":
        if not store.removeDomain(conn, domain):
            raise AdminError(f"unknown domain {domain}")
        print(f"removed domain {domain}", file=out)
        return 0
    found = store.getDomain(conn, domain)
    if found is None:
        raise AdminError(f"unknown domain {domain}")
    secret = found.authsecret if sub["show-secret"] else maskSecret(found.authsecret)
    print(f"domain:     {found.xmppdomain}", file=out)
    print(f"url:        {found.authurl or '(global)'}", file=out)
    print(f"authdomain: {found.authdomain or found.xmppdomain}", file=out)
    print(f"secret:     {secret}", file=out)
    return 0


def runCache(conn: sqlite3.Connection, options: CacheOptions, out: Any) -> int:
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


def runRoster(conn: sqlite3.Connection, options: RosterOptions, out: Any) -> int:
    """
    Carry out a C{roster} command; returns the exit status.
    """
    from xcauth.rosterstore import forgetRoster

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


def main(argv: list[str]) -> int:
    """
    Run one administration command; returns the exit status (0 done, 1 the
    command failed, 2 usage error).
    """
    options = AdminOptions()
    try:
        options.parseOptions(_globalOptionsFirst(argv))
    except usage.UsageError as e:
        print(f"xcauth: {e}", file=sys.stderr)
        print("Run 'xcauth domains --help', 'xcauth cache --help' or "
              "'xcauth roster --help'.", file=sys.stderr)
        return 2
    try:
        path = options.databasePath()
        writing = options.subCommand == "domains" and options.subOptions.subCommand in (
            "add",
            "set",
        )
        conn = _open(path, create=writing)
        try:
            if options.subCommand == "domains":
                return runDomains(conn, options.subOptions, sys.stdout)
            if options.subCommand == "roster":
                return runRoster(conn, options.subOptions, sys.stdout)
            return runCache(conn, options.subOptions, sys.stdout)
        finally:
            conn.close()
    except (AdminError, ConfigError) as e:
        print(f"xcauth: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"xcauth: database error: {e}", file=sys.stderr)
        return 1
