"""
Options shared by the twistd plugin and the C{xcauth} command, and the existing
C{/etc/xcauth.conf} format: C{key=value} lines, C{#} comments, bare flags such as
C{debug}, and repeatable keys such as C{listen}.  The command line overrides the
file; a C{listen} on the command line replaces those of the file.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any

import attr
from twisted.logger import Logger
from twisted.python import usage

from xcauth.nextcloud import validateURL

log = Logger()

DEFAULT_CONFIG_FILE = "/etc/xcauth.conf"

#: Parameters with their defaults, applied after the file and the command line.
DEFAULTS: dict[str, Any] = {
    "type": "generic",
    "timeout": "5,10",
    "deadline": "4",
    "max-in-flight": "64",
    "db": "/var/lib/xcauth/xcauth.sqlite3",
    "cache-storage": "none",
    "cache-query-ttl": "1h",
    "cache-verification-ttl": "1d",
    "cache-unreachable-ttl": "1w",
    "cache-bcrypt-rounds": "12,4",
}

#: Where the credential cache may live.
CACHE_STORAGES = ("none", "memory", "db")

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: Keys of existing configuration files this version does not act on: accepted
#: with a warning so an existing /etc/xcauth.conf keeps working.
IGNORED_KEYS = frozenset(
    {
        "cache-db",
        "ejabberdctl",
        "domain-db",
        "domains-db",
        "interactive",
        "update-roster",
        "shared-roster-db",
        "per-domain-config",
    }
)

#: Keys that may appear several times in a file.
REPEATABLE_KEYS = frozenset({"listen"})

#: Bare flags allowed in a file.
FLAG_KEYS = frozenset({"debug"})


class ConfigError(Exception):
    """
    The configuration is wrong; the message says what to fix.
    """


# The grammar of the configargparse files older versions read: a key, then
# "=", ":" or white space, then the value; a bare key is a flag; a "#" or ";"
# after white space starts a comment; lines starting with "#", ";", "[" or
# "---" are skipped.
_KEY = r"(?P<key>[^:=;#\s]+?)"
_COMMENT = r"\s*(?P<comment>\s[;#].*)?"
_KEY_ONLY = re.compile("^" + _KEY + _COMMENT + "$")
_KEY_VALUE = re.compile("^" + _KEY + r"\s*[:=\s]\s*(?P<value>.+?)" + _COMMENT + "$")


def readConfigFile(path: str) -> list[tuple[str, str | None, int]]:
    """
    Read C{key=value} entries from C{path} as C{(key, value, lineNumber)};
    a bare key (a flag) has the value C{None}.  A value C{[a, b]} of a
    repeatable key gives one entry per element.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid UTF-8") from None
    entries: list[tuple[str, str | None, int]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in "#;[" or line.startswith("---"):
            continue
        keyOnly = _KEY_ONLY.match(line)
        if keyOnly:
            entries.append((keyOnly.group("key").lstrip("-"), None, number))
            continue
        keyValue = _KEY_VALUE.match(line)
        if keyValue is None:
            raise ConfigError(
                f"{path} line {number}: not a 'key=value' line"
            )
        key = keyValue.group("key").lstrip("-")
        value = keyValue.group("value")
        if key in REPEATABLE_KEYS and value.startswith("[") and value.endswith("]"):
            entries.extend((key, v.strip(), number) for v in value[1:-1].split(",") if v.strip())
        else:
            entries.append((key, value, number))
    return entries


def parseTimeout(text: str) -> tuple[float, float]:
    """
    Parse C{N} or C{connect,total} seconds.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= 3600 for v in values):
        raise ConfigError(
            f"timeout {text!r} is not valid: give seconds as N or CONNECT,TOTAL "
            "(for example 5,10)"
        )
    connect = values[0]
    total = values[-1]
    return connect, max(connect, total)


def parsePositive(name: str, text: str, integer: bool = False) -> float:
    """
    Parse a positive number for option C{name}.
    """
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = 0
    if not value > 0:
        kind = "a positive whole number" if integer else "a positive number of seconds"
        raise ConfigError(f"{name} {text!r} is not valid: give {kind}")
    return value


def parseTTL(name: str, text: str) -> float:
    """
    Parse a TTL: integer seconds, or an integer with one suffix of C{s m h d w}
    (C{90}, C{30m}, C{1d}).
    """
    value = text.strip().lower()
    factor = 1
    if value[-1:] in _TTL_UNITS:
        factor = _TTL_UNITS[value[-1]]
        value = value[:-1]
    if not value.isdigit() or int(value) <= 0:
        raise ConfigError(
            f"{name} {text!r} is not valid: give whole seconds, or a whole number "
            "with one of the suffixes s, m, h, d, w (for example 1h, 30m, 1w)"
        )
    return float(int(value) * factor)


def parseRounds(text: str) -> tuple[int, int]:
    """
    Parse C{cache-bcrypt-rounds}: C{PERSISTENT,MEMORY} bcrypt costs, or one cost
    for both; each 4 to 31.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() and 4 <= int(p) <= 31 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ConfigError(
        f"cache-bcrypt-rounds {text!r} is not valid: give the bcrypt costs "
        "PERSISTENT,MEMORY (each 4 to 31), for example 12,4"
    )


@attr.s(auto_attribs=True)
class Config:
    """
    The validated settings.
    """

    type: str
    url: str
    secrets: tuple[bytes, ...]
    connectTimeout: float
    totalTimeout: float
    deadline: float
    maxInFlight: int
    debug: bool
    listen: list[str]
    configFile: str | None
    log: str | None = None
    db: str = "/var/lib/xcauth/xcauth.sqlite3"
    cacheStorage: str = "none"
    cacheQueryTTL: float = 3600.0
    cacheVerificationTTL: float = 86400.0
    cacheUnreachableTTL: float = 7 * 86400.0
    bcryptRounds: tuple[int, int] = (12, 4)
    dovecotDefaultDomain: str | None = None


class ConfigOptions(usage.Options):
    """
    The options every xcauth entry point shares, merged with the config file.
    """

    optFlags: list[list[str | None]] = [
        ["debug", "d", "Log every request's details at debug level."]
    ]
    optParameters = [
        [
            "log",
            "l",
            None,
            "Log file of the xcauth command (stdin/stdout and one-shot modes), or a "
            "directory to log to xcauth.log in; default: standard error. The "
            "daemon logs where twistd's --logfile says.",
        ],
        [
            "config-file",
            "c",
            None,
            f"Read options from this file (default: {DEFAULT_CONFIG_FILE} when it "
            "exists). Command-line options override it.",
        ],
        [
            "type",
            "t",
            None,
            "Framing of listeners that do not name one: prosody, generic, ejabberd, "
            "ejabberd-line, saslauthd, postfix, dovecot. [default: generic]",
        ],
        [
            "url",
            "u",
            None,
            "URL of the JSXC external API, e.g. "
            "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php",
        ],
        [
            "secret",
            "s",
            None,
            "The JSXC API secret. Several comma-separated secrets are allowed while "
            "rotating: tokens made with any are accepted, requests are signed with "
            "the first.",
        ],
        [
            "timeout",
            None,
            None,
            "Backend timeouts in seconds: N, or CONNECT,TOTAL. [default: 5,10]",
        ],
        [
            "deadline",
            None,
            None,
            "Seconds within which every request is answered, even if the backend "
            "hangs (false, or 400 for Postfix). Keep it below the client's own "
            "timeout (Prosody waits 5 s). [default: 4]",
        ],
        [
            "max-in-flight",
            None,
            None,
            "Requests worked on at once per connection; past it the connection is "
            "not read until answers leave. [default: 64]",
        ],
        [
            "db",
            None,
            None,
            "The state database (SQLite): per-domain settings and the persistent "
            "credential cache. [default: /var/lib/xcauth/xcauth.sqlite3]",
        ],
        [
            "cache-storage",
            None,
            None,
            "Credential cache: none, memory, or db (in the state database). "
            "[default: none]",
        ],
        [
            "cache-query-ttl",
            None,
            None,
            "A cached password is used without asking the backend if it was last "
            "used within this time (and verified within the verification TTL). "
            "Seconds or N with s, m, h, d, w. [default: 1h]",
        ],
        [
            "cache-verification-ttl",
            None,
            None,
            "A cached password is used without asking the backend only if the "
            "backend confirmed it within this time. [default: 1d]",
        ],
        [
            "cache-unreachable-ttl",
            None,
            None,
            "While the backend is unavailable, a cached password confirmed within "
            "this time is accepted. [default: 1w]",
        ],
        [
            "cache-bcrypt-rounds",
            None,
            None,
            "bcrypt cost of cached passwords: PERSISTENT,MEMORY (for "
            "cache-storage db and memory). [default: 12,4]",
        ],
        [
            "dovecot-default-domain",
            None,
            None,
            "Domain of dovecot-framing logins that name none (no @ and no realm=), "
            "such as Prosody's mod_auth_dovecot sends; without it they fail.",
        ],
    ]

    config: Config

    def __init__(self) -> None:
        super().__init__()
        self.fileListen: list[str] = []
        self["listen"] = []

    def framingNames(self) -> Iterable[str]:
        """
        The framing names C{--type} accepts.
        """
        from xcauth.framing.registry import framingNames

        return framingNames()

    def _mergeFile(self) -> None:
        path = self["config-file"]
        if path is None:
            if not os.path.exists(DEFAULT_CONFIG_FILE):
                return
            path = DEFAULT_CONFIG_FILE
        self["config-file"] = path
        known = {p[0] for p in self.optParameters} | {f[0] for f in self.optFlags}
        for key, value, number in readConfigFile(path):
            where = f"{path} line {number}"
            if key in IGNORED_KEYS:
                self.ignoredKey(key, value, where)
            elif key in REPEATABLE_KEYS and value is not None:
                self.fileListen.append(value)
            elif key in FLAG_KEYS:
                if value is None or value.lower() in ("1", "true", "yes", "on"):
                    self[key] = self[key] or True
                elif value.lower() not in ("0", "false", "no", "off"):
                    raise ConfigError(f"{where}: {key} takes no value, or true/false")
            elif key in known and key != "config-file":
                if value is None:
                    raise ConfigError(f"{where}: {key} needs a value ({key}=...)")
                if self[key] is None:
                    self[key] = value
            else:
                raise ConfigError(
                    f"{where}: unknown option {key!r}; see --help for the options"
                )

    def ignoredKey(self, key: str, value: str | None, where: str) -> None:
        """
        A key of older configuration files that this version does not act on.
        """
        print(
            f"xcauth: warning: {where}: option {key!r} is not supported by this "
            "version and is ignored",
            file=sys.stderr,
        )

    def postOptions(self) -> None:
        try:
            self._mergeFile()
            for key, value in DEFAULTS.items():
                if self[key] is None:
                    self[key] = value
            self.config = self.validate()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def validate(self) -> Config:
        """
        Check the merged options and build the L{Config}.
        """
        if self["type"] not in self.framingNames():
            raise ConfigError(
                f"unknown type {self['type']!r}: use one of "
                + ", ".join(self.framingNames())
            )
        if not self["url"]:
            raise ConfigError(
                "no backend url: set url=... in the config file or give --url"
            )
        try:
            validateURL(self["url"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self["secret"]:
            raise ConfigError(
                "no API secret: set secret=... in the config file or give --secret"
            )
        secrets = tuple(
            s.strip().encode("utf-8") for s in self["secret"].split(",") if s.strip()
        )
        if not secrets:
            raise ConfigError("the secret setting holds no secret")
        connect, total = parseTimeout(self["timeout"])
        if self["cache-storage"] not in CACHE_STORAGES:
            raise ConfigError(
                f"cache-storage {self['cache-storage']!r} is not valid: use one of "
                + ", ".join(CACHE_STORAGES)
            )
        db = self["db"]
        if not db:
            raise ConfigError("db needs the path of the state database")
        if self["cache-storage"] == "db":
            directory = os.path.dirname(os.path.abspath(db))
            if not os.path.isdir(directory):
                raise ConfigError(
                    f"db {db!r}: directory {directory} does not exist (create it, "
                    "writable by the xcauth user, or set db=...)"
                )
        return Config(
            type=self["type"],
            url=self["url"],
            secrets=secrets,
            connectTimeout=connect,
            totalTimeout=total,
            deadline=parsePositive("deadline", self["deadline"]),
            maxInFlight=int(parsePositive("max-in-flight", self["max-in-flight"], True)),
            debug=bool(self["debug"]),
            listen=list(self["listen"] or self.fileListen),
            configFile=self["config-file"],
            log=self["log"],
            db=db,
            cacheStorage=self["cache-storage"],
            cacheQueryTTL=parseTTL("cache-query-ttl", self["cache-query-ttl"]),
            cacheVerificationTTL=parseTTL(
                "cache-verification-ttl", self["cache-verification-ttl"]
            ),
            cacheUnreachableTTL=parseTTL(
                "cache-unreachable-ttl", self["cache-unreachable-ttl"]
            ),
            bcryptRounds=parseRounds(self["cache-bcrypt-rounds"]),
            dovecotDefaultDomain=self["dovecot-default-domain"] or None,
        )
