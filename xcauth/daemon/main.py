"""
Start-up errors of the daemon, and C{xcauth-daemon}: C{twistd} whose start
errors reach the terminal as one line.

A listener that cannot listen fails after twistd has forked into the
background (without C{-n}).  twistd's parent process waits on a status pipe
for the daemon's word and hears only about an L{Exception} raised by the
services' start: it then exits with status 1 and prints C{An error has
occurred: ...}, the exception's first 100 bytes.  A L{SystemExit} is not
reported and leaves the parent waiting forever.  L{StartError} is both: twistd
reports it through the pipe, and it ends the process with its message (in
the foreground, C{-n}, the message is the one line on standard error).

C{xcauth-daemon} is C{twistd} (the same arguments: C{xcauth-daemon
--pidfile=... --logfile=... xcauth -c /etc/xcauth.conf}) with a runner that
passes the whole message through the pipe and prints it as it is:
C{xcauth: cannot start a listener: ...}.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: Bytes of a start error sent through the status pipe: below C{PIPE_BUF}
#: (4096 on Linux), so that the daemon never blocks writing it.
STATUS_LIMIT = 2000


class StartError(SystemExit, Exception):
    """
    The daemon cannot start; the message (C{xcauth: ...}) says why.  An
    L{Exception} for twistd's start-up status pipe, a L{SystemExit} for the
    process's exit status and its one line on standard error.
    """

    def __str__(self) -> str:
        return str(self.code)


def formatStartError(exception: BaseException) -> bytes:
    """
    What the daemon writes to the status pipe when its start failed: C{1 }
    and the message, at most L{STATUS_LIMIT} bytes.
    """
    if isinstance(exception, StartError):
        text = str(exception)
    else:
        text = f"xcauth: {type(exception).__name__}: {exception}"
    return ("1 " + text.replace("\n", " ")).encode("utf-8", "backslashreplace")[:STATUS_LIMIT]


def statusMessage(data: bytes) -> str | None:
    """
    The line to print for what the parent read from the status pipe: C{None}
    for success (C{0}).
    """
    if data == b"0":
        return None
    text = data[2:].decode("utf-8", "replace").strip()
    if not text:
        return "xcauth: the daemon ended during its start; see its log file"
    return text if text.startswith("xcauth: ") else f"xcauth: {text}"


def _showOnTerminal(options: Any, error: BaseException) -> None:
    # In the foreground with --logfile=FILE, standard error goes to the log
    # file: the terminal gets the line too.
    from twisted.python.util import untilConcludes

    logfile = options.get("logfile")
    if options.get("nodaemon") and logfile and logfile != "-":
        stderr = sys.__stderr__
        if stderr is not None:
            untilConcludes(stderr.write, str(error) + "\n")
            stderr.flush()


def _waitForStart(readPipe: int) -> int:
    # The parent's wait for the daemon's word: the whole message, one line.
    from twisted.python.util import untilConcludes

    data = untilConcludes(os.read, readPipe, STATUS_LIMIT)
    message = statusMessage(data)
    if message is None:
        return 0
    stderr = sys.__stderr__
    assert stderr is not None
    untilConcludes(stderr.write, message + "\n")
    return 1


def _runner() -> Any:
    """
    twistd's runner, with the whole start error passed to the parent.
    """
    from xcauth.twistedprivate import startReportingRunner

    return startReportingRunner(formatStartError, _waitForStart, _showOnTerminal, StartError)


def main() -> None:
    """
    C{xcauth-daemon}: run C{twistd} with the arguments given.
    """
    from xcauth.daemon.config import versionLine
    from xcauth.twistedprivate import endWithTwistdSignal, serverOptions

    ServerOptions: Any = serverOptions()

    class Options(ServerOptions):
        def opt_version(self) -> None:
            """
            Print xcauth's version (and Twisted's) and exit.
            """
            print(versionLine("xcauth-daemon"))
            raise SystemExit(0)

    Runner = _runner()

    def runApp(config: Any) -> None:
        runner = Runner(config)
        runner.run()
        endWithTwistdSignal(runner)

    # twistd's app.run, but a wrong option is one line and a pointer, not the
    # whole help followed by the line.
    from twisted.python import usage

    config = Options()
    try:
        config.parseOptions()
    except usage.error as e:
        print(f"xcauth-daemon: {e}", file=sys.stderr)
        print("Run 'xcauth-daemon --help' or 'xcauth-daemon xcauth --help' for the "
              "options.", file=sys.stderr)
        raise SystemExit(1) from None
    runApp(config)
