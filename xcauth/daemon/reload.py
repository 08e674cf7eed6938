"""
The daemon's signals: SIGHUP reloads the configuration and reopens the log
file, SIGTERM stops the daemon cleanly (answers in flight are sent, see
L{xcauth.daemon.service.XcauthService.stopService}) with exit status 0.

The handlers do no work themselves: each schedules its action on the reactor
thread (C{callFromThread}) and returns.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python.logfile import LogFile

from xcauth.daemon.config import Config, ConfigError
from xcauth.daemon.hub import Hub
from xcauth.daemon.listen import Listener
from xcauth.twistedprivate import twistdLogFile

log = Logger()


#: Rotated log files twistd keeps (each up to 1 MB; twistd's own rotation
#: would otherwise keep every one).
LOG_FILES_KEPT = 10


def boundTwistdLog() -> None:
    """
    Keep at most L{LOG_FILES_KEPT} rotated files of twistd's log file: a
    flood of log lines must not fill the disk.  (With systemd the daemon logs
    to the journal, which bounds itself; logrotate with SIGHUP works too.)
    """
    logFile = twistdLogFile()
    if isinstance(logFile, LogFile) and logFile.maxRotatedFiles is None:
        logFile.maxRotatedFiles = LOG_FILES_KEPT


def reopenTwistdLog() -> str | None:
    """
    Reopen twistd's log file under its name (after logrotate moved it away):
    L{BaseLogFile.reopen}, for external rotation tools.  Returns the path, or
    C{None} if there is no log file to reopen.
    """
    logFile = twistdLogFile()
    if logFile is None:
        return None
    path = str(logFile.path)
    writable = os.access(path, os.W_OK) if os.path.exists(path) else (
        os.access(os.path.dirname(path) or ".", os.W_OK)
    )
    if not writable:
        # Reopening closes the file first: logging would stop altogether.
        log.error("cannot reopen the log file {path}: not writable; logging on to the "
                  "file already open", path=path)
        return None
    log.info("reopening the log file {path}", path=logFile.path)
    logFile.reopen()
    log.info("log file {path} reopened", path=logFile.path)
    return str(logFile.path)


class Reloader:
    """
    Applies a new configuration to a running daemon.

    @param hub: the running hub.
    @param load: reads the configuration again (the same command line, the
        config file as it is now) and returns it with its listeners, or raises
        L{ConfigError}.
    @param listeners: the listeners being served.
    @param reopenLog: reopens the log file.
    """

    def __init__(
        self,
        hub: Hub,
        load: Callable[[], tuple[Config, list[Listener]]],
        listeners: list[Listener],
        reopenLog: Callable[[], object] = reopenTwistdLog,
    ) -> None:
        self.hub = hub
        self.load = load
        self.listeners = list(listeners)
        self.reopenLog = reopenLog

    def reload(self) -> bool:
        """
        Reopen the log file, read the configuration, apply what can change
        while running and log what needs a restart.  An invalid configuration
        is logged and changes nothing.

        @return: whether the new configuration was applied.
        """
        try:
            self.reopenLog()
        except OSError as e:
            log.error("cannot reopen the log file: {error}", error=str(e))
        try:
            config, listeners = self.load()
        except ConfigError as e:
            log.error(
                "reload failed, the running configuration stays in force: {error}",
                error=str(e),
            )
            return False
        if listeners != self.listeners:
            log.warn(
                "the listeners changed (now: {new}); they are served as before "
                "until a restart (running: {old})",
                new=", ".join(listener.name for listener in listeners) or "none",
                old=", ".join(listener.name for listener in self.listeners),
            )
        try:
            restart = self.hub.reload(config)
        except Exception:
            log.failure("applying the new configuration failed")
            return False
        for option in restart:
            log.warn("{option} changed: it takes effect after a restart", option=option)
        self.hub.domains.refresh()
        log.info(
            "configuration reloaded from {path}",
            path=config.configFile or "the command line",
        )
        return True


class SignalService(Service):
    """
    Installs the daemon's SIGHUP and SIGTERM handlers once the reactor runs
    (after twistd's own, which it replaces for SIGTERM).

    @param reactor: the reactor (C{callWhenRunning}, C{callFromThread}, C{stop}).
    @param onHangup: called on the reactor thread for each SIGHUP.
    @param install: installs a handler (L{signal.signal}; tests pass a fake).
    """

    name = "signals"

    def __init__(
        self,
        reactor: Any,
        onHangup: Callable[[], object],
        install: Callable[[int, Any], object] = signal.signal,
    ) -> None:
        self.reactor = reactor
        self.onHangup = onHangup
        self.install = install

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        boundTwistdLog()
        self.install(signal.SIGHUP, self._hangup)
        self.install(signal.SIGTERM, self._terminate)

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        self.onHangup()

    def _terminate(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        # twistd's own handler would also make the process end by SIGTERM
        # (status 143); a clean stop that answered what was in flight exits 0.
        log.info("SIGTERM: stopping; requests in flight are answered first")
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            log.info("already stopping")
