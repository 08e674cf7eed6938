"""
C{xcauth token USER DOMAIN [--ttl 1h]}: print a time-limited token for a
user, made with the domain's first secret (its own from the C{domains} table,
else the global C{secret}).  Tokens work with either backend, the JSXC app's
or a stock Nextcloud's: they are checked by xcauth alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.python import usage

from xcauth.cli.admin import _DomainArg, databasePath
from xcauth.core.tokens import makeToken
from xcauth.daemon.config import (
    DEFAULT_CONFIG_FILE,
    ConfigError,
    parseTTL,
    readConfigFile,
)
from xcauth.state import database as store
from xcauth.text import splitSecrets


class TokenOptions(_DomainArg):
    """
    C{xcauth token USER DOMAIN [--ttl TTL]} (options may follow the
    arguments; C{-c FILE} and C{--db PATH} as for the other commands).
    """

    synopsis = "USER DOMAIN [--ttl 1h] [-c FILE] [--db PATH]"
    optParameters = [
        ["ttl", None, "1h", "How long the token is valid: seconds or N with s, m, h, d, w."],
    ]

    def parseArgs(self, user: str, domain: str) -> None:  # type: ignore[override]
        self["user"] = user
        self["domain"] = domain

    def postOptions(self) -> None:
        try:
            self["seconds"] = parseTTL("--ttl", self["ttl"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


#: The subcommand entry for the C{xcauth} command's C{subCommands}.
SUBCOMMAND = ["token", None, TokenOptions, "Print a time-limited token for USER DOMAIN."]


def _configPath(options: usage.Options) -> str | None:
    current: Any = options
    while current is not None:
        if current.get("config-file"):
            return str(current["config-file"])
        current = getattr(current, "parent", None)
    import os

    return DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None


def secretFor(options: usage.Options, domain: str) -> bytes:
    """
    The secret tokens of C{domain} are made with.

    @raise ConfigError: there is none.
    """
    try:
        conn = store.connect(databasePath(options), create=False)
    except (store.NoDatabase, store.DatabaseError):
        conn = None
    if conn is not None:
        try:
            row = store.getDomain(conn, domain)
        finally:
            conn.close()
        if row is not None and row.authsecret and splitSecrets(row.authsecret):
            return splitSecrets(row.authsecret)[0]
    path = _configPath(options)
    if path is not None:
        for key, value, _ in readConfigFile(path):
            if key == "secret" and value and splitSecrets(value):
                return splitSecrets(value)[0]
    raise ConfigError(
        f"no secret for {domain}: set secret=... in the config file (the key of "
        "time-limited tokens) or give the domain one with xcauth domains set"
    )


def run(options: TokenOptions, out: IO[str] = sys.stdout,
        now: Callable[[], float] = time.time) -> int:
    """
    Print the token; returns the exit status.
    """
    from xcauth.identity import InvalidIdentity, canonical

    try:
        # Tokens are checked for the canonical identity of each login.
        identity = canonical(options["user"], options["domain"])
    except InvalidIdentity as e:
        print(f"xcauth: {e}", file=sys.stderr)
        return 1
    try:
        secret = secretFor(options, identity.domain)
    except ConfigError as e:
        print(f"xcauth: {e}", file=sys.stderr)
        return 1
    expiry = int(now() + options["seconds"])
    print(makeToken(secret, identity.user, identity.domain, expiry), file=out)
    return 0
