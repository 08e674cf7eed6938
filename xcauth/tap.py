"""
The C{twistd xcauth} plugin: options and C{makeService}.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from xcauth.config import ConfigError, ConfigOptions
from xcauth.listen import Listener, parseListener, systemdSockets


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

    listeners: list[Listener]

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
        saslauthd, postfix; without it, --type (or a systemd descriptor named
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
            self.listeners = [parseListener(e, config.type) for e in entries]
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    The daemon: the shared authentication core and one listener per C{--listen}.
    """
    from twisted.internet import reactor

    from xcauth.hub import buildHub, tuneGarbageCollector
    from xcauth.service import XcauthService

    service = XcauthService(buildHub(options.config, reactor), options.listeners, reactor)
    tuneGarbageCollector()
    return service
