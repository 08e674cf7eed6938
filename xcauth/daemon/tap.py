"""
The C{twistd xcauth} plugin: options and C{makeService}.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from xcauth.daemon.config import Config, ConfigError, ConfigOptions
from xcauth.daemon.listen import (
    Listener,
    checkEndpoint,
    parseListener,
    socketDirectoryProblem,
    systemdSockets,
)

log = Logger()

#: The secret of the sample config file and of C{make demo}'s fake Nextcloud.
DEMO_SECRET = b"demo-secret-change-me"


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
    #: The arguments parsed, to read the configuration again on SIGHUP.
    argv: list[str]

    optFlags = ConfigOptions.optFlags + [
        [
            "demo",
            None,
            "Allow the sample config file's demo secret (make demo does).",
        ],
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

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

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
            for listener in self.listeners:
                problem = socketDirectoryProblem(listener)
                if problem is not None:
                    raise ConfigError(problem)
            if config.metrics is not None:  # metrics: a typo stops the start
                try:
                    checkEndpoint(config.metrics)
                except ConfigError as e:
                    raise ConfigError(f"metrics: {e}") from None
            if DEMO_SECRET in config.secrets and not self["demo"]:
                raise ConfigError(
                    "secret is the demo secret of the sample config file: set "
                    "secret= to the API secret of your Nextcloud's JSXC app "
                    "(admin settings, JSXC) and url= to its external API"
                    + (f" in {config.configFile}" if config.configFile else "")
                )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class ReloadOptions(Options):
    """
    The options read again for a reload: errors are raised as
    L{usage.UsageError} (instead of ending the process), warnings are logged.
    """

    def postOptions(self) -> None:
        self._checkOptions()

    def ignoredKey(self, key: str, value: str | None, where: str) -> None:
        log.warn(
            "{where}: option {key!r} is not supported by this version and is ignored",
            where=where,
            key=key,
        )


def loadAgain(argv: list[str]) -> tuple[Config, list[Listener]]:
    """
    Parse C{argv} (the daemon's own arguments) and read the config file it
    names as it is now.

    @raise ConfigError: saying what is wrong.
    """
    options = ReloadOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise ConfigError(str(e)) from None
    return options.config, options.listeners


def makeService(options: Options, reactor: object = None) -> IService:
    """
    The daemon: the shared authentication core, one listener per C{--listen},
    and the signal handlers (SIGHUP reloads, SIGTERM stops after answering).
    Building it changes nothing process-wide: the garbage collector is tuned
    when the daemon starts (L{XcauthService.privilegedStartService}).
    """
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = defaultReactor

    from xcauth.daemon.hub import buildHub
    from xcauth.daemon.reload import Reloader, SignalService
    from xcauth.daemon.service import XcauthService

    hub = buildHub(options.config, reactor)
    service = XcauthService(hub, options.listeners, reactor)
    argv = list(getattr(options, "argv", []))
    reloader = Reloader(hub, lambda: loadAgain(argv), options.listeners)
    SignalService(reactor, reloader.reload).setServiceParent(service)
    return service
