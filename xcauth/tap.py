"""
The C{twistd xcauth} plugin: options and C{makeService}.
"""

from __future__ import annotations

from typing import Any

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

    def opt_listen(self, entry: str) -> None:
        """
        [FRAMING=]ENDPOINT to serve; repeatable. ENDPOINT is a Twisted server
        endpoint (tcp:PORT:interface=127.0.0.1, tcp6:..., unix:/path:mode=660,
        systemd:domain=INET:name=NAME, ssl:...). FRAMING is prosody, generic,
        ejabberd, ejabberd-line; without it, --type (or a systemd descriptor
        named after a framing). Replaces the config file's listen entries.
        """
        self["listen"].append(entry)

    def postOptions(self) -> None:
        super().postOptions()
        config = self.config
        if not config.listen:
            raise usage.UsageError(
                "nothing to listen on: give --listen [FRAMING=]ENDPOINT, e.g. "
                "--listen tcp:23664:interface=127.0.0.1, or listen=... in the "
                "config file"
            )
        try:
            self.listeners = [splitListen(e, config.type) for e in config.listen]
            for _, endpoint in self.listeners:
                checkEndpoint(endpoint)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    The daemon: the shared backend and one listener per C{--listen}.
    """
    from twisted.internet import reactor

    from xcauth.service import XcauthService

    reactor: Any
    return XcauthService(options.config, options.listeners, reactor)
