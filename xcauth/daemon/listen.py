"""
Listeners: C{[FRAMING=]ENDPOINT} entries, the sockets systemd passes, the
C{group=} argument xcauth adds to UNIX endpoints, and the service that serves
one framing on one endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attr
from twisted.application.service import IService
from twisted.application.strports import service as strportsService
from twisted.internet.protocol import Factory

from xcauth.daemon.config import ConfigError
from xcauth.framing.registry import FRAMINGS, framingNames

#: The listen backlog of the sockets xcauth opens itself, unless the endpoint
#: says C{backlog=}: a burst of clients (Postfix's smtpd processes, a restarted
#: ejabberd's pool) connects at once, and the kernel's default of 50 makes the
#: rest retry their SYN a second later.
BACKLOG = 1024


@attr.s(frozen=True, auto_attribs=True)
class Listener:
    """
    One C{--listen} entry: the framing, the endpoint description Twisted
    parses, and the group its UNIX socket is given to (if any).
    """

    framing: str
    entry: str
    endpoint: str
    group: str | None = None

    @property
    def name(self) -> str:
        """
        How log lines name the listener.
        """
        return f"{self.framing}={self.entry}"


#: File descriptors kept for everything but client connections and backend
#: requests: the database, log files, the bcrypt threads' pipes, systemd's.
RESERVED_DESCRIPTORS = 64


def descriptorLimit() -> int:
    """
    The process's soft limit of open file descriptors.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def backendRequestLimit(descriptors: int) -> int:
    """
    Backend requests in flight at most (each holds a connection): a quarter
    of the file descriptors, at most L{xcauth.backends.http.DEFAULT_MAX_REQUESTS}.
    """
    from xcauth.backends.http import DEFAULT_MAX_REQUESTS

    return max(8, min(DEFAULT_MAX_REQUESTS, descriptors // 4))


def connectionLimit(configured: int | None, listeners: int, descriptors: int) -> int:
    """
    The connections each listener accepts at once: C{configured}, or what the
    file descriptor limit leaves after the backend's requests and
    L{RESERVED_DESCRIPTORS}, shared among the listeners.
    """
    if configured is not None:
        return configured
    spare = descriptors - backendRequestLimit(descriptors) - RESERVED_DESCRIPTORS
    return max(8, spare // max(listeners, 1))


def parseListener(entry: str, defaultFraming: str) -> Listener:
    """
    Parse and check one C{[FRAMING=]ENDPOINT} entry.

    @raise ConfigError: the framing, the endpoint or its group is not valid.
    """
    framing, description = splitListen(entry, defaultFraming)
    bare, group = splitUnixGroup(description)
    if group is not None:
        groupID(description, group)
        unixSocketPath(bare)
    shown = bare
    bare = mutualTLSForm(systemdUNIXForm(withBacklog(bare)))
    checkEndpoint(bare, shown)
    return Listener(framing, description, bare, group)


def mutualTLSForm(description: str) -> str:
    """
    An C{ssl:...:clientCA=CA} description in the C{xcauth-tls:...} form that
    requires client certificates (L{xcauth.daemon.tls}); any other unchanged.
    """
    parts = _splitArgs(description)
    if parts[0] != "ssl" or not any(p.startswith("clientCA=") for p in parts[1:]):
        return description
    return ":".join(["xcauth-tls", *parts[1:]])


#: Addresses a plain listener may use without a warning.
_LOOPBACK = ("127.", "::1", "localhost", "::ffff:127.")


def plainRemoteWarning(listener: Listener) -> str | None:
    """
    For a plain TCP listener that is not on loopback only, why that is
    dangerous (the framings carry passwords in the clear); else C{None}.
    """
    parts = _splitArgs(listener.endpoint)
    if parts[0] not in ("tcp", "tcp6"):
        return None
    interface = ""
    for part in parts[1:]:
        if part.startswith("interface="):
            interface = _unescape(part[len("interface="):])
    if interface.startswith(_LOOPBACK) or interface in ("::1", "0:0:0:0:0:0:0:1"):
        return None
    where = interface or "every address"
    return (
        f"listener {listener.name} accepts plain TCP on {where}: its requests carry "
        "passwords in the clear and nothing authenticates the client; listen on "
        "loopback, or use a TLS listener with client certificates "
        "(ssl:PORT:privateKey=KEY:certKey=CERT:clientCA=CA)"
    )


def withBacklog(description: str) -> str:
    """
    C{description} with C{backlog=}L{BACKLOG} added for the endpoint types
    that take one, unless it has its own.
    """
    parts = _splitArgs(description)
    if parts[0] not in ("tcp", "tcp6", "unix", "ssl"):
        return description
    if any(p.startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={BACKLOG}"


def systemdUNIXForm(description: str) -> str:
    """
    A C{systemd:domain=UNIX:...} description in the C{xcauth-systemd-unix:...}
    form, whose port keeps the socket's mode and file (L{xcauth.daemon.systemdunix});
    any other description unchanged.
    """
    parts = _splitArgs(description)
    if parts[0] != "systemd" or "domain=UNIX" not in parts[1:]:
        return description
    return ":".join(["xcauth-systemd-unix"] + [p for p in parts[1:] if p != "domain=UNIX"])


def listenerService(listener: Listener, factory: Factory, reactor: Any) -> IService:
    """
    The service serving C{factory} on C{listener}'s endpoint.  It raises when
    the endpoint cannot listen, which stops the daemon's start.
    """
    service = strportsService(listener.endpoint, factory, reactor=reactor)
    service.setName(listener.name)
    return service


def socketDirectoryProblem(listener: Listener) -> str | None:
    """
    For a UNIX listener whose directory is missing, the message saying so.
    """
    if not listener.endpoint.startswith("unix:"):
        return None
    directory = os.path.dirname(unixSocketPath(listener.endpoint)) or "."
    if os.path.isdir(directory):
        return None
    return (
        f"listen {listener.entry!r}: the directory {directory} does not exist "
        "(create it, or with systemd set RuntimeDirectory=)"
    )


def splitListen(entry: str, defaultFraming: str) -> tuple[str, str]:
    """
    Split C{[FRAMING=]ENDPOINT} into the framing and the endpoint description.

    Without C{FRAMING=}, a systemd endpoint whose descriptor name is a framing
    name, or starts with one followed by C{-} (C{ejabberd-v6}), uses that
    framing; any other endpoint uses C{defaultFraming}.
    """
    head, sep, rest = entry.partition("=")
    if sep and ":" not in head:
        if head not in FRAMINGS:
            raise ConfigError(
                f"listen {entry!r}: unknown framing {head!r}; use one of "
                + ", ".join(framingNames())
            )
        if not rest:
            raise ConfigError(f"listen {entry!r}: no endpoint after {head}=")
        return head, rest
    return framingFromSystemdName(entry) or defaultFraming, entry


def framingFromSystemdName(endpoint: str) -> str | None:
    """
    The framing a systemd endpoint's C{name=} selects, if any.
    """
    if not endpoint.startswith("systemd:"):
        return None
    for arg in endpoint.split(":")[1:]:
        key, _, value = arg.partition("=")
        if key == "name":
            matches = [
                f for f in FRAMINGS if value == f or value.startswith(f + "-")
            ]
            return max(matches, key=len) if matches else None
    return None


def _splitArgs(description: str) -> list[str]:
    """
    Split an endpoint description at the C{:} that separate its arguments
    (not at C{\\:}), keeping the escapes.
    """
    parts = [""]
    escaped = False
    for char in description:
        if escaped:
            parts[-1] += char
            escaped = False
        elif char == "\\":
            parts[-1] += char
            escaped = True
        elif char == ":":
            parts.append("")
        else:
            parts[-1] += char
    return parts


def _unescape(arg: str) -> str:
    out = []
    escaped = False
    for char in arg:
        if not escaped and char == "\\":
            escaped = True
            continue
        out.append(char)
        escaped = False
    return "".join(out)


def splitUnixGroup(description: str) -> tuple[str, str | None]:
    """
    Take the C{group=NAME} argument xcauth adds to C{unix:} endpoints out of an
    endpoint description: returns the description Twisted understands and the
    group (C{None} without one).  The socket is given to that group once it
    listens, so that with C{mode=660} only the group's members can connect.
    """
    parts = _splitArgs(description)
    groups = [p for p in parts[1:] if p.startswith("group=")]
    if not groups:
        return description, None
    if parts[0] != "unix":
        raise ConfigError(
            f"listen {description!r}: group= is for unix: endpoints only (for a "
            "systemd socket, set SocketGroup= in the socket unit)"
        )
    if len(groups) > 1:
        raise ConfigError(f"listen {description!r}: group= given more than once")
    group = _unescape(groups[0][len("group=") :])
    if not group:
        raise ConfigError(f"listen {description!r}: group= needs a group name")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith("group=")]
    return ":".join(kept), group


def unixSocketPath(description: str) -> str:
    """
    The file system path of a C{unix:} endpoint description (C{unix:PATH:...}
    or C{unix:address=PATH:...}).
    """
    args = _splitArgs(description)[1:]
    for arg in args:
        if arg.startswith("address="):
            return _unescape(arg[len("address=") :])
    for arg in args:
        if "=" not in arg:
            return _unescape(arg)
    raise ConfigError(f"listen {description!r}: no socket path")


def groupID(description: str, group: str) -> int:
    """
    The numeric id of C{group} (a name or a number), or a L{ConfigError}
    naming the listener.
    """
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"listen {description!r}: there is no group named {group!r} on this "
            "system"
        ) from None


def checkEndpoint(description: str, shown: str | None = None) -> None:
    """
    Parse an endpoint description now, so that a typo stops the daemon at start.

    @param shown: the description as the administrator wrote it (without
        what xcauth adds, such as C{backlog=}), for the messages.
    """
    if shown is not None and shown != description:
        try:
            checkEndpoint(description)
        except ConfigError as e:
            raise ConfigError(str(e).replace(repr(description), repr(shown), 1)) from None
        return
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except KeyError as e:
        raise ConfigError(
            f"listen {description!r}: no socket named {e} was passed by systemd "
            "(check FileDescriptorName= in the socket unit)"
        ) from None
    except IndexError:
        raise ConfigError(
            f"listen {description!r}: no socket with that index was passed by "
            "systemd (LISTEN_FDS)"
        ) from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"listen {description!r} is not a valid endpoint: {plainReason(e)}"
        ) from None


def plainReason(e: Exception) -> str:
    """
    What is wrong with an endpoint, in words: Python's C{int()} message becomes
    "'X' is not a number".
    """
    import re

    match = re.fullmatch(r"invalid literal for int\(\) with base 10: (.*)", str(e))
    if match:
        return f"{match.group(1)} is not a number"
    return str(e)


def systemdSockets(environ: Mapping[str, str] | None = None) -> list[str]:
    """
    One C{systemd:domain=...:name=...} endpoint per socket systemd passed to this
    process, each named after the framing it serves.

    @raise ConfigError: no sockets were passed, one has no name (or shares it
        with another), or a name selects no framing.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    # Twisted's systemd endpoint read LISTEN_PID and LISTEN_FDS when it was
    # imported (and removed them from the environment); LISTEN_FDNAMES is
    # left, one name per descriptor from 3 on.  Whether a name was really
    # passed to this process is what Twisted's endpoint answers.
    env = os.environ if environ is None else environ
    names = env.get("LISTEN_FDNAMES", "").split(":")
    descriptors = []
    for index, name in enumerate(names):
        try:
            serverFromString(reactor, f"systemd:domain=INET:index={index}")
        except (IndexError, KeyError):
            continue
        descriptors.append((3 + index, name))
    if not descriptors:
        raise ConfigError(
            "--systemd-sockets: systemd passed no sockets (LISTEN_FDS); enable a "
            "socket unit such as xcauth-ejabberd.socket"
        )
    endpoints = []
    for fd, name in descriptors:
        if not name or names.count(name) > 1:
            raise ConfigError(
                f"--systemd-sockets: socket {fd} has no FileDescriptorName= of its "
                "own; give each socket unit a unique name that starts with its framing"
            )
        family = _family(fd)
        if family is None:
            raise ConfigError(f"--systemd-sockets: socket {name!r} is not a TCP or UNIX socket")
        endpoint = f"systemd:domain={family}:name={name}"
        if framingFromSystemdName(endpoint) is None:
            raise ConfigError(
                f"--systemd-sockets: socket name {name!r} names no framing; use "
                + ", ".join(framingNames())
                + ", optionally followed by -SOMETHING"
            )
        endpoints.append(endpoint)
    return endpoints


def _family(fd: int) -> str | None:
    import socket

    s = socket.socket(fileno=fd)
    try:
        family, kind = s.family, s.type
    finally:
        s.detach()
    if kind != socket.SOCK_STREAM:
        return None
    return {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}.get(
        family
    )
