"""
The C{xcauth} command.

- C{xcauth -c FILE -A USER DOMAIN PASSWORD}: check a password once; prints
  C{True}/C{False}, or C{None} when the backend is unavailable.
- C{xcauth -c FILE -I USER DOMAIN}: does the user exist; prints C{True}/C{False},
  or C{None} when the backend is unavailable.
- One-shot checks exit with L{EXIT_YES} (0), L{EXIT_NO} (1), L{EXIT_USAGE} (2:
  usage or configuration error) or L{EXIT_UNAVAILABLE} (3: backend
  unavailable); they log nothing below errors unless C{--debug} is given (an unavailable
  backend's warnings are shown with its answer).
- C{xcauth -c FILE -R USER DOMAIN}: with a roster sync configured
  (C{roster-sync}), sync the user's shared roster to ejabberd now and print the
  commands run; otherwise print the shared roster JSON.
- C{xcauth -c FILE [-t TYPE]}: serve one client on standard input and output in
  the configured framing (as C{extauth_program} of ejabberd, or spawned by
  Prosody, inetd or systemd with C{Accept=yes}); logs go to standard error.
- C{xcauth [-c FILE] [--db PATH] domains ...|cache ...}: administer the state
  database (see L{xcauth.cli.admin}).
- C{xcauth [-c FILE] token USER DOMAIN [--ttl 1h]}: print a time-limited token
  (see L{xcauth.cli.token}).
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from xcauth.cli.admin import SUBCOMMANDS
from xcauth.daemon.config import ConfigOptions

#: Exit statuses of the one-shot checks (C{-A}, C{-I}, C{-R}).
EXIT_YES = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


class Options(ConfigOptions):
    """
    Options of the C{xcauth} command.
    """

    synopsis = (
        "Usage: xcauth [-c FILE] [-A USER DOMAIN PASSWORD | -I USER DOMAIN | "
        "-R USER DOMAIN]\n"
        "       xcauth [-c FILE | --db PATH] domains|cache|roster ...  "
        "(xcauth domains --help)\n"
        "       xcauth [-c FILE] token USER DOMAIN [--ttl 1h]\n"
        "Without -A/-I/-R or a command: serve the configured framing on stdin/stdout."
    )

    def getSynopsis(self) -> str:
        """
        The usage line; under a command (C{xcauth domains add --help}) only
        the start its own synopsis continues.
        """
        if self.subCommand is not None:
            return "Usage: xcauth"
        return super().getSynopsis()
    optFlags = ConfigOptions.optFlags + [
        ["auth-test", "A", "Check USER DOMAIN PASSWORD once and print True/False/None."],
        ["isuser-test", "I", "Check whether USER DOMAIN exists: True/False/None."],
        [
            "roster-test",
            "R",
            "Sync the shared roster of USER DOMAIN to ejabberd now and print what "
            "was done (without roster-sync: print the roster).",
        ],
    ]
    @property
    def subCommands(self) -> list[Any]:
        """
        The administration commands (C{xcauth domains ...}), except after
        C{-A}, C{-I} or C{-R}, whose arguments are a user and a domain (a user
        may be called C{domains}).
        """
        if any(self.get(mode) for mode in ("auth-test", "isuser-test", "roster-test")):
            return []
        from xcauth.cli.token import SUBCOMMAND

        return SUBCOMMANDS + [SUBCOMMAND]

    def parseArgs(self, *args: str) -> None:
        self["args"] = list(args)

    def postOptions(self) -> None:
        if self.subCommand is not None:
            # An administration command: it needs only the database path.
            return
        modes = [m for m in ("auth-test", "isuser-test", "roster-test") if self[m]]
        if len(modes) > 1:
            raise usage.UsageError("give only one of -A, -I and -R")
        self["mode"] = modes[0] if modes else "stdio"
        wanted = {"auth-test": 3, "isuser-test": 2, "roster-test": 2, "stdio": 0}[
            self["mode"]
        ]
        if len(self["args"]) != wanted:
            what = {
                "auth-test": "-A needs USER DOMAIN PASSWORD",
                "isuser-test": "-I needs USER DOMAIN",
                "roster-test": "-R needs USER DOMAIN",
                "stdio": "unexpected arguments (did you mean -A or -I?)",
            }[self["mode"]]
            raise usage.UsageError(what)
        super().postOptions()


def _openLog(path: str | None) -> IO[str]:
    """
    The stream to log to: C{path} (a file, or a directory for C{xcauth.log} in
    it), or standard error when none is given or it cannot be opened (a
    program spawned by ejabberd must answer even if its log is misconfigured).
    """
    if path is None:
        return sys.stderr
    if os.path.isdir(path):
        path = os.path.join(path, "xcauth.log")
    try:
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as e:
        print(f"xcauth: cannot open log file {path}: {e.strerror}; logging to "
              "standard error", file=sys.stderr)
        return sys.stderr


#: Warnings held back by a quiet one-shot check: shown only when the backend
#: turns out unavailable (they say why), never Nextcloud's allow-list advice.
_held: list[dict[str, Any]] = []


def _hold(event: dict[str, Any]) -> None:
    if event.get("log_level") == LogLevel.warn and not str(
        event.get("log_namespace", "")
    ).startswith("xcauth.backends.throttle"):
        _held.append(event)


def _startLogging(debug: bool, path: str | None, quiet: bool = False) -> None:
    """
    Log to C{path} (or standard error): every level with C{debug}, else from
    info on; C{quiet} (one-shot checks): errors only, warnings held back.
    """
    level = LogLevel.debug if debug else LogLevel.error if quiet else LogLevel.info
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    observers: list[Any] = [
        FilteringLogObserver(textFileLogObserver(_openLog(path)), [predicate])
    ]
    if quiet and not debug:
        observers.append(_hold)
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


async def _oneShot(reactor: Any, options: Options) -> int:
    from xcauth.daemon.hub import buildHub, refuseToRun

    hub = buildHub(options.config, reactor)
    # A configuration Nextcloud refuses: the one line, a configuration error.
    hub.refuse = lambda m: refuseToRun(reactor, m, status=EXIT_USAGE, logged=False)
    hub.startService()
    auth = hub.authenticator
    args = options["args"]
    try:
        if options["mode"] == "auth-test":
            result: Any = await auth.authenticate(args[0], args[1], args[2])
        elif options["mode"] == "isuser-test":
            result = await auth.isUser(args[0], args[1])
        elif hub.rosterSync is not None:
            from xcauth.identity import canonicalOrNone
            from xcauth.roster.sync import describeSync

            # The sync runs for the canonical identity, as after a login.
            identity = canonicalOrNone(args[0], args[1])
            if identity is None:
                result = None
            else:
                result = await describeSync(hub.rosterSync, identity.user, identity.domain)
        else:
            roster = await auth.roster(args[0], args[1])
            result = None if roster is None else roster.decode("utf-8")
    finally:
        await hub.stopService()
    print(result)
    if result is True or (isinstance(result, str)):
        return EXIT_YES
    if result is False:
        return EXIT_NO
    for event in _held:
        print(f"xcauth: {formatEvent(event)}", file=sys.stderr)
    print("xcauth: the backend is unavailable", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _serveStdio(reactor: Any, options: Options) -> Deferred[None]:
    from twisted.internet.stdio import StandardIO

    from xcauth.daemon.drain import drainConnections
    from xcauth.daemon.hub import buildHub, tuneGarbageCollector
    from xcauth.daemon.service import DRAIN_MARGIN
    from xcauth.framing.base import XcauthFactory
    from xcauth.framing.registry import STDIO_FRAMINGS
    from xcauth.state.database import whenFired

    hub = buildHub(options.config, reactor)
    hub.startService()
    tuneGarbageCollector()
    factory = XcauthFactory(STDIO_FRAMINGS[options.config.type], hub.context)
    protocol = factory.buildProtocol(None)
    done: Deferred[None] = Deferred()
    lost = protocol.connectionLost
    stopped: list[Deferred[None]] = []

    def stopHub() -> Deferred[None]:
        # Once: the hub's threads must end, or the interpreter waits for them
        # forever after the reactor has stopped.
        if not stopped:
            stopped.append(hub.stopService())
        return whenFired(stopped[0])

    def connectionLost(reason: Any = None) -> None:
        lost(reason)
        stopHub().addBoth(lambda _: done.callback(None))

    async def shutdown() -> None:
        # SIGTERM (ejabberd's and Prosody's stop, systemd's for the unit's
        # control group): answer what was read, within the deadline, then stop.
        await drainConnections([protocol], reactor, hub.context.deadline + DRAIN_MARGIN)
        await stopHub()

    protocol.connectionLost = connectionLost
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(shutdown()))
    StandardIO(protocol, reactor=reactor)
    return done


def main(argv: list[str] | None = None) -> None:
    """
    Entry point of the C{xcauth} console script.
    """
    args = sys.argv[1:] if argv is None else argv
    options = Options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        print(f"xcauth: {e}", file=sys.stderr)
        print("Run 'xcauth --help' for the options.", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if options.subCommand == "token":
        from xcauth.cli import token as tokencmd
        raise SystemExit(tokencmd.run(options.subOptions))
    if options.subCommand is not None:
        from xcauth.cli import admin
        raise SystemExit(admin.run(options.subCommand, options.subOptions))
    _startLogging(options.config.debug, options.config.log,
                  quiet=options["mode"] != "stdio")
    from twisted.internet import reactor
    from twisted.internet.task import react

    if options["mode"] == "stdio":
        react(lambda r: _serveStdio(r, options), [])
    else:
        status: list[int] = []

        def run(r: Any) -> Deferred[None]:
            d = ensureDeferred(_oneShot(r, options))
            return d.addCallback(status.append)

        try:
            react(run, [])
        except SystemExit as e:
            if e.code not in (0, None):
                raise SystemExit(EXIT_USAGE) from None
            raise SystemExit(status[0] if status else EXIT_USAGE) from None
    del reactor


if __name__ == "__main__":
    main()
