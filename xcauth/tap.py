"""
The C{twistd xcauth} plugin: options and C{makeService}.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.application.service import IService
from twisted.python import usage

from xcauth.config import ConfigError, ConfigOptions
from xcauth.framing.registry import FRAMINGS, framingNames


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


def checkEndpoint(description: str) -> None:
    """
    Parse an endpoint description now, so that a typo stops the daemon at start.
    """
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
        raise ConfigError(f"listen {description!r} is not a valid endpoint: {e}") from None


def systemdSockets(environ: Mapping[str, str] | None = None) -> list[str]:
    """
    One C{systemd:domain=...:name=...} endpoint per socket systemd passed to this
    process, each named after the framing it serves.

    @raise ConfigError: no sockets were passed, one has no name (or shares it
        with another), or a name selects no framing.
    """
    from twisted.python.systemd import ListenFDs

    if environ is None:
        # Twisted's systemd endpoint read (and removed) LISTEN_PID and
        # LISTEN_FDS from the environment when it was imported: ask it.
        from twisted.internet import endpoints as twistedEndpoints

        parser = getattr(twistedEndpoints, "_SystemdParser", None)
        fds = getattr(parser, "_sddaemon", None) or ListenFDs.fromEnvironment()
    else:
        fds = ListenFDs.fromEnvironment(environ=environ)
    descriptors = fds.inheritedDescriptors()
    if not descriptors:
        raise ConfigError(
            "--systemd-sockets: systemd passed no sockets (LISTEN_FDS); enable a "
            "socket unit such as xcauth-ejabberd.socket"
        )
    names = {fd: name for name, fd in fds.inheritedNamedDescriptors().items()}
    endpoints = []
    for fd in descriptors:
        name = names.get(fd)
        if not name:
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


class Options(ConfigOptions):
    """
    Options of C{twistd xcauth}.
    """

    synopsis = "[options]"
    longdesc = (
        "Authentication hub for ejabberd, Prosody and mail servers, answering from "
        "a Nextcloud server with the JSXC app and from time-limited tokens. "
        "Example: twistd -n xcauth -c /etc/xcauth.conf "
        "--listen ejabberd=tcp:23662:interface=127.0.0.1"
    )

    listeners: list[tuple[str, str]]

    optFlags = ConfigOptions.optFlags + [
        [
            "systemd-sockets",
            None,
            "Serve every socket systemd passes (LISTEN_FDS), each in the framing "
            "its FileDescriptorName= names (ejabberd, ejabberd-v6, postfix, "
            "saslauthd-unix, ...): enable only the socket units you want.",
        ],
    ]

    def opt_listen(self, entry: str) -> None:
        """
        [FRAMING=]ENDPOINT to serve; repeatable. ENDPOINT is a Twisted server
        endpoint (tcp:PORT:interface=127.0.0.1, tcp6:...,
        unix:/path:mode=660[:group=NAME], systemd:domain=INET:name=NAME,
        ssl:...). FRAMING is prosody, generic, ejabberd, ejabberd-line,
        saslauthd, postfix, dovecot; without it, --type (or a systemd descriptor named
        after a framing). Replaces the config file's listen entries.
        """
        self["listen"].append(entry)

    def postOptions(self) -> None:
        try:
            self._checkOptions()
        except usage.UsageError as e:
            # twistd would print its whole usage text before the message (and,
            # before Twisted 26.10, exit with status 0): say what to fix in one
            # line and fail the start.
            raise SystemExit(f"xcauth: {e}") from None

    def _checkOptions(self) -> None:
        super().postOptions()
        config = self.config
        try:
            entries = list(config.listen)
            if self["systemd-sockets"]:
                entries += systemdSockets()
            if not entries:
                raise ConfigError(
                    "nothing to listen on: give --listen [FRAMING=]ENDPOINT, e.g. "
                    "--listen tcp:23664:interface=127.0.0.1, or listen=... in the "
                    "config file"
                )
            self.listeners = [splitListen(e, config.type) for e in entries]
            for _, endpoint in self.listeners:
                bare, group = splitUnixGroup(endpoint)
                if group is not None:
                    groupID(endpoint, group)
                    unixSocketPath(bare)
                checkEndpoint(bare)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    The daemon: the shared backend and one listener per C{--listen}.
    """
    from twisted.internet import reactor

    from xcauth.service import XcauthService

    return XcauthService(options.config, options.listeners, reactor)
