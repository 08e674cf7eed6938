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
from collections.abc import Callable, Iterable
from typing import Any

import attr
from twisted.python import usage

from xcauth.interfaces import LOGIN_FORMATS
from xcauth.text import splitSecrets, validateURL

DEFAULT_CONFIG_FILE = "/etc/xcauth.conf"

#: Where the credential cache may live.
CACHE_STORAGES = ("none", "memory", "db")

#: How the shared roster is synced to ejabberd (see xcauth.roster.sync).
ROSTER_SYNCS = ("none", "http", "ejabberdctl")

#: Which requests get their info line (L{xcauth.framing.base.RequestTimer}).
LOG_REQUESTS = ("all", "failures", "none")

#: The backends: the JSXC app's signed API, or a stock Nextcloud's OCS API.
BACKENDS = ("jsxc", "nextcloud")

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: Keys of existing configuration files this version does not act on: accepted
#: with a warning so an existing /etc/xcauth.conf keeps working.
IGNORED_KEYS = frozenset(
    {
        "cache-db",
        "domain-db",
        "domains-db",
        "interactive",
        "update-roster",
        "shared-roster-db",
        "per-domain-config",
        "penalty-lockout-after",
        "penalty-lockout",
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
            "(for example 2,2.5: the total below the deadline)"
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


def readSecretFile(path: str, name: str = "service-password-file") -> str:
    """
    The first line of the file C{path}; a bare file name is looked up in
    C{$CREDENTIALS_DIRECTORY} (a systemd credential) when that is set.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.sep not in path:
        path = os.path.join(credentials, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not valid UTF-8") from None
    if not text:
        raise ConfigError(f"{name}: {path} is empty")
    return text


def checkNextcloudBackend(values: dict[str, Any]) -> None:
    """
    Check the options of C{backend = nextcloud} (and read the password file).
    """
    if not values["serviceUser"]:
        raise ConfigError(
            "backend nextcloud needs service-user (a Nextcloud administrator or "
            "group administrator that looks up users)"
        )
    given = [values["servicePassword"], values["servicePasswordFile"]]
    if all(given):
        raise ConfigError("give service-password or service-password-file, not both")
    if values["servicePasswordFile"]:
        values["servicePassword"] = readSecretFile(values["servicePasswordFile"])
    if not values["servicePassword"]:
        raise ConfigError(
            "backend nextcloud needs service-password-file (or service-password): "
            "an app password of the service account"
        )
    if "/apps/ojsxc/" in values["url"]:
        raise ConfigError(
            f"url {values['url']!r} is the JSXC app's API: backend nextcloud needs "
            "Nextcloud's base URL, e.g. https://cloud.example.org"
        )


def parseDomains(name: str, text: str) -> tuple[str, ...]:
    """
    A comma-separated list of domains, each in its canonical form
    (L{xcauth.identity.canonicalDomain}), without repeats.
    """
    from xcauth.identity import InvalidIdentity, canonicalDomain

    domains: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            domain = canonicalDomain(part)
        except InvalidIdentity as e:
            raise ConfigError(f"{name}: {part!r} is not a domain: {e}") from None
        if domain not in domains:
            domains.append(domain)
    return tuple(domains)


def _choice(choices: Iterable[str]) -> Callable[[str, str], str]:
    allowed = tuple(choices)

    def parse(name: str, text: str) -> str:
        if text not in allowed:
            raise ConfigError(
                f"{name} {text!r} is not valid: use one of " + ", ".join(allowed)
            )
        return text

    return parse


def _text(name: str, text: str) -> str:
    return text


def _seconds(name: str, text: str) -> float:
    return parsePositive(name, text)


def _count(name: str, text: str) -> int:
    return int(parsePositive(name, text, integer=True))


def _countOrZero(name: str, text: str) -> int:
    if text.strip() == "0":
        return 0
    return _count(name, text)


@attr.s(frozen=True, auto_attribs=True)
class Setting:
    """
    One option of the config file and the command line.

    @ivar name: the option's name (C{--name}, C{name=} in the file).
    @ivar attribute: the L{Config} attribute it sets.
    @ivar default: the text of its default, or C{None} for none.
    @ivar help: what it does, for C{--help}.
    @ivar parse: turns C{(name, text)} into the value, or raises L{ConfigError}.
    @ivar short: the one-letter command-line form, if any.
    @ivar repeatable: given several times on the command line, the values
        are joined with commas (C{--domain a --domain b}).
    """

    name: str
    attribute: str
    default: str | None
    help: str
    parse: Callable[[str, str], Any] = _text
    short: str | None = None
    repeatable: bool = False


#: Every option with a value, its default and how it is parsed: the one place
#: where each is written.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "log", "log", None,
        "Log file of the xcauth command (stdin/stdout and one-shot modes), or a "
        "directory to log to xcauth.log in; default: standard error. The daemon "
        "logs where twistd's --logfile says.",
        short="l",
    ),
    Setting(
        "type", "type", "generic",
        "Framing of listeners that do not name one: prosody, generic, ejabberd, "
        "ejabberd-line, saslauthd, postfix, dovecot.",
        short="t",
    ),
    Setting(
        "backend", "backend", "jsxc",
        "How Nextcloud is asked: jsxc (the JSXC app's external API, for existing "
        "installations) or nextcloud (a stock Nextcloud's OCS API, no app needed).",
        _choice(BACKENDS),
    ),
    Setting(
        "url", "url", None,
        "For backend jsxc the URL of the JSXC external API, e.g. "
        "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php; for "
        "backend nextcloud Nextcloud's base URL, e.g. https://cloud.example.org "
        "or https://example.org/nextcloud",
        short="u",
    ),
    Setting(
        "secret", "secrets", None,
        "The JSXC API secret (optional for backend nextcloud: then only the key "
        "of time-limited tokens). Several comma-separated secrets are allowed while "
        "rotating: tokens made with any are accepted, requests are signed with the "
        "first.",
        short="s",
    ),
    Setting(
        "service-user", "serviceUser", None,
        "Backend nextcloud: the login name of the service account that looks up "
        "users and groups (an administrator, or group administrator of the XMPP "
        "users' groups).",
    ),
    Setting(
        "service-password", "servicePassword", None,
        "Backend nextcloud: an app password of the service account (prefer "
        "service-password-file).",
    ),
    Setting(
        "service-password-file", "servicePasswordFile", None,
        "Backend nextcloud: a file holding the service account's app password; a "
        "bare name is looked up in $CREDENTIALS_DIRECTORY (systemd LoadCredential=).",
    ),
    Setting(
        "login-format", "loginFormat", "{user}",
        "Backend nextcloud: the Nextcloud login name of an XMPP user: {user}, or "
        "{user}@{domain} (e-mail logins).",
        _choice(LOGIN_FORMATS),
    ),
    Setting(
        "domain", "domains", None,
        "A domain the global backend serves (repeatable; domain=a.example,b.example "
        "in the file). A domain is served by its own row of the domains table "
        "(xcauth domains add) or by being listed here; any other gets no. Without "
        "a list, backend jsxc serves any domain (Nextcloud decides) and backend "
        "nextcloud with login-format={user}@{domain} too; backend nextcloud with "
        "login-format={user} needs the list.",
        parseDomains,
        repeatable=True,
    ),
    Setting(
        "refused-password-ttl", "refusedTTL", "10m",
        "A refused password of a user is refused again locally for this long "
        "(a client retrying a stale password reaches Nextcloud once).",
        parseTTL,
    ),
    Setting(
        "penalty-delay", "penaltyDelay", "0.5",
        "Seconds a failed login is answered late after the first failure, doubling "
        "with each consecutive failure of the user up to penalty-max-delay.",
        _seconds,
    ),
    Setting(
        "penalty-max-delay", "penaltyMaxDelay", "2",
        "The longest delay of a failed login; at most half the deadline is used "
        "(a value given must be below deadline).",
        _seconds,
    ),
    Setting(
        "penalty-user-checks", "penaltyUserChecks", "5",
        "Checks of passwords new to xcauth that may reach Nextcloud per user at once "
        "(every framing and client address of the user together); counted when the "
        "check starts, given back when the password is right.",
        _count,
    ),
    Setting(
        "penalty-user-refill", "penaltyUserRefill", "15m",
        "The time in which a user's spent checks all come back (one every "
        "penalty-user-refill / penalty-user-checks).",
        parseTTL,
    ),
    Setting(
        "penalty-backend-failures", "penaltyBackendFailures", "10",
        "Backend nextcloud: failed (or pending) checks toward one Nextcloud within "
        "penalty-backend-window, daemon-wide, while xcauth's address is not on its "
        "brute-force allow-list (Nextcloud answers 429 past 10 in 30 minutes).",
        _count,
    ),
    Setting(
        "penalty-backend-window", "penaltyBackendWindow", "30m",
        "Backend nextcloud: the window of penalty-backend-failures.",
        parseTTL,
    ),
    Setting(
        "penalty-allow-listed-failures", "penaltyAllowListedFailures", "100",
        "Backend nextcloud: the daemon-wide budget while xcauth's address is "
        "allow-listed (0: none).",
        _countOrZero,
    ),
    Setting(
        "known-passwords", "knownPasswords", "8",
        "Passwords per user (a password and app passwords) remembered as accepted, "
        "as keyed hashes in memory: they get in during any limit.",
        _count,
    ),
    Setting(
        "known-password-ttl", "knownPasswordTTL", "1d",
        "How long after Nextcloud last accepted it a known password gets in without "
        "asking Nextcloud while a limit is reached or Nextcloud throttles.",
        parseTTL,
    ),
    Setting(
        "penalty-forget", "penaltyForget", "1h",
        "The failures of a user or client address (which make refusals slower) are "
        "forgotten this long after the last one.",
        parseTTL,
    ),
    Setting(
        "penalty-max-entries", "penaltyMaxEntries", "100000",
        "Users, client addresses, refused passwords and users with known passwords "
        "remembered at most, each (the oldest are forgotten first), bounding the "
        "memory a flood of failed logins can use.",
        _count,
    ),
    Setting(
        "throttle-check-interval", "throttleCheckInterval", "5m",
        "Backend nextcloud: how often Nextcloud's capabilities are read to check "
        "that xcauth's address is on the brute-force allow-list.",
        parseTTL,
    ),
    Setting(
        "throttle-warn-delay", "throttleWarnDelay", "1",
        "Backend nextcloud: warn when Nextcloud delays logins by this many seconds "
        "or more (brute-force protection).",
        _seconds,
    ),
    Setting(
        "timeout", "timeout", "2,2.5",
        "Backend timeouts in seconds: N, or CONNECT,TOTAL. Keep TOTAL below the "
        "deadline: a Nextcloud that has not answered by then counts as "
        "unavailable, so the credential cache can still answer in time.",
        lambda name, text: parseTimeout(text),
    ),
    Setting(
        "deadline", "deadline", "4",
        "Seconds within which every request is answered, even if the backend hangs "
        "(false, or 400 for Postfix). Keep it below the client's own timeout "
        "(Prosody waits 5 s).",
        _seconds,
    ),
    Setting(
        "max-in-flight", "maxInFlight", "64",
        "Requests worked on at once per connection; past it the connection is not "
        "read until answers leave.",
        _count,
    ),
    Setting(
        "log-requests", "logRequests", "failures",
        "Which requests get a log line (operation, user, result, latency): all, "
        "failures (every answer but a yes) or none.",
        _choice(LOG_REQUESTS),
    ),
    Setting(
        "max-connections", "maxConnections", "auto",
        "Connections open at once per listener; past it new ones are closed at once "
        "(with one log line a minute). auto: what the file descriptor limit "
        "(ulimit -n, systemd's LimitNOFILE=) leaves after the backend's connections, "
        "shared among the listeners.",
        lambda name, text: None if text == "auto" else _count(name, text),
    ),
    Setting(
        "metrics", "metrics", None,
        "Serve Prometheus metrics (text format, at /metrics) on this Twisted server "
        "endpoint, e.g. tcp:9464:interface=127.0.0.1; keep it on loopback (the "
        "metrics name framings and rates, and nothing authenticates the scraper). "
        "Default: no metrics listener.",
    ),
    Setting(
        "db", "db", "/var/lib/xcauth/xcauth.sqlite3",
        "The state database: per-domain settings, the persistent credential cache "
        "and the roster sync's state. A SQLite file, or a PostgreSQL database "
        "shared by several nodes (postgresql://USER@HOST/DBNAME or a libpq "
        "key/value string such as 'host=/run/postgresql dbname=xcauth'; no "
        "password in it: see db-password-file).",
    ),
    Setting(
        "db-password-file", "dbPasswordFile", None,
        "The file holding the PostgreSQL password of db (its first line); a bare "
        "name is a systemd credential (LoadCredential=).",
    ),
    Setting(
        "cache-storage", "cacheStorage", "none",
        "Credential cache: none, memory, or db (in the state database).",
        _choice(CACHE_STORAGES),
    ),
    Setting(
        "cache-query-ttl", "cacheQueryTTL", "1h",
        "A cached password is used without asking the backend if it was last used "
        "within this time (and verified within the verification TTL). Seconds or N "
        "with s, m, h, d, w.",
        parseTTL,
    ),
    Setting(
        "cache-verification-ttl", "cacheVerificationTTL", "1d",
        "A cached password is used without asking the backend only if the backend "
        "confirmed it within this time.",
        parseTTL,
    ),
    Setting(
        "cache-unreachable-ttl", "cacheUnreachableTTL", "1w",
        "While the backend is unavailable, a cached password confirmed within this "
        "time is accepted.",
        parseTTL,
    ),
    Setting(
        "cache-bcrypt-rounds", "bcryptRounds", "12,4",
        "bcrypt cost of cached passwords: PERSISTENT,MEMORY (for cache-storage db "
        "and memory).",
        lambda name, text: parseRounds(text),
    ),
    Setting(
        "dovecot-default-domain", "dovecotDefaultDomain", None,
        "Domain of dovecot-framing logins that name none (no @ and no realm=), such "
        "as Prosody's mod_auth_dovecot sends; without it they fail.",
    ),
    Setting(
        "roster-sync", "rosterSync", None,
        "Sync the Nextcloud groups a user shares to ejabberd shared roster groups "
        "(and display names to vCard full names) after each login: none, http "
        "(ejabberd's mod_http_api at roster-api-url) or ejabberdctl (the program at "
        "ejabberdctl). Default: ejabberdctl when ejabberdctl is set, http when "
        "roster-api-url is set, else none.",
    ),
    Setting(
        "roster-api-url", "rosterApiURL", None,
        "ejabberd's HTTP API for the roster sync, e.g. http://127.0.0.1:5281/api",
    ),
    Setting(
        "ejabberdctl", "ejabberdctl", None,
        "The ejabberdctl program for the roster sync, e.g. /usr/sbin/ejabberdctl",
    ),
    Setting(
        "roster-command-timeout", "rosterCommandTimeout", "10",
        "Seconds one ejabberd command of the roster sync may take.",
        _seconds,
    ),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def default(name: str) -> Any:
    """
    The parsed default of option C{name}.
    """
    setting = SETTINGS_BY_NAME[name]
    assert setting.default is not None, name
    return setting.parse(name, setting.default)


@attr.s(frozen=True, auto_attribs=True)
class Config:
    """
    The validated settings (see L{SETTINGS} for what each means).
    """

    type: str
    url: str
    secrets: tuple[bytes, ...]
    backend: str
    serviceUser: str | None
    servicePassword: str | None = attr.ib(repr=False)
    servicePasswordFile: str | None
    loginFormat: str
    refusedTTL: float
    penaltyDelay: float
    penaltyMaxDelay: float
    penaltyUserChecks: int
    penaltyUserRefill: float
    penaltyBackendFailures: int
    penaltyBackendWindow: float
    penaltyAllowListedFailures: int
    knownPasswords: int
    knownPasswordTTL: float
    penaltyForget: float
    penaltyMaxEntries: int
    throttleCheckInterval: float
    throttleWarnDelay: float
    timeout: tuple[float, float]
    deadline: float
    maxInFlight: int
    maxConnections: int | None
    db: str
    cacheStorage: str
    cacheQueryTTL: float
    cacheVerificationTTL: float
    cacheUnreachableTTL: float
    bcryptRounds: tuple[int, int]
    dovecotDefaultDomain: str | None
    rosterSync: str
    rosterApiURL: str | None
    ejabberdctl: str | None
    rosterCommandTimeout: float
    debug: bool
    listen: tuple[str, ...]
    configFile: str | None
    log: str | None
    logRequests: str = "failures"
    metrics: str | None = None
    domains: tuple[str, ...] = ()
    dbPasswordFile: str | None = None
    #: The PostgreSQL password read from C{db-password-file}.
    dbPassword: str | None = attr.ib(default=None, repr=False)

    @property
    def connectTimeout(self) -> float:
        """
        Seconds to connect to the backend.
        """
        return self.timeout[0]

    @property
    def totalTimeout(self) -> float:
        """
        Seconds for a whole backend request.
        """
        return self.timeout[1]


def versionLine(program: str = "xcauth") -> str:
    """
    What C{--version} prints: xcauth's version and what it runs on.
    """
    import platform

    import twisted
    from xcauth import __version__

    return (f"{program} {__version__} (Twisted {twisted.__version__}, "
            f"Python {platform.python_version()})")


class ConfigOptions(usage.Options):
    """
    The options every xcauth entry point shares, merged with the config file.
    """

    def opt_version(self) -> None:
        """
        Print xcauth's version and exit.
        """
        print(versionLine())
        raise SystemExit(0)

    optFlags: list[list[str | None]] = [
        ["debug", "d", "Log every request's details at debug level."]
    ]
    optParameters = [
        [
            "config-file",
            "c",
            None,
            f"Read options from this file (default: {DEFAULT_CONFIG_FILE} when it "
            "exists). Command-line options override it.",
        ]
    ] + [
        [
            s.name,
            s.short,
            None,
            s.help + (f" [default: {s.default}]" if s.default is not None else ""),
        ]
        for s in SETTINGS
        if not s.repeatable
    ]

    config: Config

    def __init__(self) -> None:
        super().__init__()
        self.fileListen: list[str] = []
        self["listen"] = []
        for s in SETTINGS:
            if s.repeatable:
                self[s.name] = None

    def opt_domain(self, value: str) -> None:
        """
        A domain the global backend serves; repeatable, or comma-separated
        (see the config file's domain=).
        """
        self["domain"] = value if self["domain"] is None else f"{self['domain']},{value}"

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
        repeatable = {s.name for s in SETTINGS if s.repeatable}
        known = {p[0] for p in self.optParameters} | {f[0] for f in self.optFlags} | repeatable
        # Lines of a repeatable setting add up (domain=a then domain=b); the
        # command line replaces them all.
        fromFile: dict[str, list[str]] = {}
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
                if key in repeatable:
                    fromFile.setdefault(key, []).append(value)
                elif self[key] is None:
                    self[key] = value
            else:
                raise ConfigError(
                    f"{where}: unknown option {key!r}; see --help for the options"
                )
        for key, values in fromFile.items():
            if self[key] is None:
                self[key] = ",".join(values)

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
            self.config = self.validate()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def validate(self) -> Config:
        """
        Parse the merged options (defaults for those not given) and check them
        together.
        """
        values: dict[str, Any] = {}
        for s in SETTINGS:
            text = self[s.name]
            if text is None:
                text = s.default
            values[s.attribute] = None if text is None else s.parse(s.name, text)
        if values["type"] not in self.framingNames():
            raise ConfigError(
                f"unknown type {values['type']!r}: use one of "
                + ", ".join(self.framingNames())
            )
        if not values["url"]:
            if values["backend"] == "nextcloud":
                raise ConfigError(
                    "no backend url: set url= (your Nextcloud's address), "
                    "service-user= and service-password-file= in the config file"
                )
            raise ConfigError(
                "no backend url: for a stock Nextcloud set backend=nextcloud, url=, "
                "service-user= and service-password-file= in the config file "
                "(for the JSXC app: url= and secret=)"
            )
        try:
            validateURL(values["url"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        values["domains"] = values["domains"] or ()
        if values["backend"] == "nextcloud":
            checkNextcloudBackend(values)
            if values["loginFormat"] == "{user}" and not values["domains"]:
                raise ConfigError(
                    "backend nextcloud with login-format={user} does not send the "
                    "domain to Nextcloud, so it would answer for any domain: list the "
                    "domains it serves with domain=a.example,b.example (or --domain NAME)"
                )
        elif not values["secrets"]:
            raise ConfigError(
                "no API secret: set secret=... in the config file or give --secret"
            )
        secrets = values["secrets"]
        values["secrets"] = splitSecrets(secrets or "")
        if secrets is not None and not values["secrets"]:
            raise ConfigError("the secret setting holds no secret")
        if self["penalty-max-delay"] is not None and (
            values["penaltyMaxDelay"] >= values["deadline"]
        ):
            raise ConfigError(
                f"penalty-max-delay {values['penaltyMaxDelay']:g} must be below "
                f"deadline {values['deadline']:g}"
            )
        total, deadline = values["timeout"][1], values["deadline"]
        if total > deadline:
            print(
                f"xcauth: warning: the backend timeout {total:g} s is above the "
                f"deadline {deadline:g} s: while Nextcloud hangs, requests are answered "
                "by the deadline and the credential cache never gets to answer; set "
                f"timeout=CONNECT,TOTAL with TOTAL below {deadline:g}",
                file=sys.stderr,
            )
        db = values["db"]
        if not db:
            raise ConfigError("db needs the path of the state database")
        values["rosterSync"] = rosterSync(
            values["rosterSync"], values["rosterApiURL"], values["ejabberdctl"]
        )
        if isPostgresDB(db):
            checkPostgres(values)
        elif values["dbPasswordFile"]:
            raise ConfigError("db-password-file is for a PostgreSQL db, and db is a file")
        elif values["cacheStorage"] == "db" or values["rosterSync"] != "none":
            directory = os.path.dirname(os.path.abspath(db))
            if not os.path.isdir(directory):
                raise ConfigError(
                    f"db {db!r}: directory {directory} does not exist (create it, "
                    "writable by the xcauth user, or set db=...)"
                )
        return Config(
            debug=bool(self["debug"]),
            listen=tuple(self["listen"] or self.fileListen),
            configFile=self["config-file"],
            **values,
        )


def isPostgresDB(db: str) -> bool:
    """
    Whether C{db} names a PostgreSQL database (L{xcauth.state.postgres.isPostgres}).
    """
    from xcauth.state.postgres import isPostgres

    return isPostgres(db)


def checkPostgres(values: dict[str, Any]) -> None:
    """
    Check a PostgreSQL C{db} (valid, psycopg installed, no password in it)
    and read its password file.
    """
    from xcauth.state.postgres import parse

    try:
        parse(values["db"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if values["dbPasswordFile"]:
        values["dbPassword"] = readSecretFile(values["dbPasswordFile"], "db-password-file")


def rosterSync(mode: str | None, apiURL: str | None, ejabberdctl: str | None) -> str:
    """
    The validated C{roster-sync} mode, implied by C{ejabberdctl=} or
    C{roster-api-url=} when not given (configurations of older versions
    enable the sync with C{ejabberdctl=} alone).
    """
    if mode is None:
        if ejabberdctl and apiURL:
            raise ConfigError(
                "both ejabberdctl and roster-api-url are set: choose one with "
                "roster-sync=ejabberdctl or roster-sync=http"
            )
        mode = "ejabberdctl" if ejabberdctl else ("http" if apiURL else "none")
    if mode not in ROSTER_SYNCS:
        raise ConfigError(
            f"roster-sync {mode!r} is not valid: use one of " + ", ".join(ROSTER_SYNCS)
        )
    if mode == "http":
        if not apiURL:
            raise ConfigError(
                "roster-sync=http needs roster-api-url, e.g. "
                "roster-api-url=http://127.0.0.1:5281/api"
            )
        try:
            validateURL(apiURL)
        except ValueError as e:
            raise ConfigError(f"roster-api-url: {e}") from None
    if mode == "ejabberdctl":
        if not ejabberdctl:
            raise ConfigError(
                "roster-sync=ejabberdctl needs ejabberdctl=PATH, e.g. "
                "ejabberdctl=/usr/sbin/ejabberdctl"
            )
        if not (os.path.isfile(ejabberdctl) and os.access(ejabberdctl, os.X_OK)):
            raise ConfigError(f"ejabberdctl {ejabberdctl!r} is not an executable program")
    return mode
