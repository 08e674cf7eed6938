"""
End to end: the real C{xcauth} command serving one client on standard input and
output, the way ejabberd (C{extauth_program}), Prosody, inetd and systemd with
C{Accept=yes} run it.

Each test starts the fake Nextcloud and runs C{xcauth -c CONFIG} as a child
process, through pipes or through a connected socket given as both stdin and
stdout.  Standard output must hold the answers and nothing else, byte for byte;
the logs go to standard error and never contain a password or a token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from twisted.trial import unittest

from xcauth.testing.processes import (
    SECRET,
    XCAUTH,
    childEnv,
    ejabberdFrame,
    recvAll,
    recvExactly,
    recvLine,
    startBackend,
)
from xcauth.token import makeToken

TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"
TIMEOUT = 30

#: Passwords and tokens that must never reach a log.
WRONG = "wrong-Pa55word"


def token(user: str = "alice", domain: str = "example.org") -> str:
    """
    A time-limited token valid for an hour.
    """
    return makeToken(SECRET.encode(), user, domain, int(time.time()) + 3600)


class StdioTestMixin:
    """
    The fake Nextcloud and a config file for each test.
    """

    def setUp(self) -> None:
        self.nextcloud, self.config = startBackend(
            self,
            self.mktemp(),
            type="ejabberd",
            # Generous: a slow shared test machine must not turn answers into
            # deadline falses.
            deadline="20",
            timeout="10,20",
        )

    def runXcauth(self, args: list[str], data: bytes) -> subprocess.CompletedProcess:
        """
        Run C{xcauth -c CONFIG ARGS} with C{data} on its stdin until it exits.
        """
        return subprocess.run(
            [XCAUTH, "-c", self.config, *args],
            input=data,
            capture_output=True,
            timeout=TIMEOUT,
            env=childEnv(),
        )

    def assertCleanLogs(self, stderr: bytes, *secrets: str) -> None:
        """
        The logs name requests but hold none of C{secrets}, nor a traceback.
        """
        text = stderr.decode("utf-8", "replace")
        self.assertIn("for alice@example.org via", text)
        for secret in (*secrets, "pa:ss w", "good_password", WRONG, SECRET):
            self.assertNotIn(secret, text)
        self.assertNotIn("Traceback", text)


class EjabberdStdioTests(StdioTestMixin, unittest.TestCase):
    """
    C{xcauth} as ejabberd's C{extauth_program}: binary frames through pipes.
    """

    def test_requestsThenZeroLengthFrame(self) -> None:
        """
        Every request is answered in order (an invalid UTF-8 frame is false and
        the session goes on); a zero-length frame ends the process with status 0,
        and what follows it is not read.
        """
        tok = token()
        requests = [
            ("auth:alice:example.org:pa:ss w", TRUE),
            (f"auth:alice:example.org:{WRONG}", FALSE),
            ("isuser:alice:example.org", TRUE),
            ("isuser:nobody:example.org", FALSE),
            (b"auth:alice:example.org:\xff\xfe", FALSE),
            (b"isuser:\xc3:example.org", FALSE),
            ("auth:jörg:example.org:pässwörd", TRUE),
            (f"auth:alice:example.org:{tok}", TRUE),
            (f"auth:admin:example.org:{tok}", FALSE),
            ("setpass:alice:example.org:new", FALSE),
            ("isuser:admin:example.org", TRUE),
        ]
        data = b"".join(ejabberdFrame(r) for r, _ in requests)
        data += b"\x00\x00" + ejabberdFrame("isuser:admin:example.org")
        result = self.runXcauth([], data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"".join(a for _, a in requests))
        self.assertCleanLogs(result.stderr, tok, "pässwörd")

    def test_endOfInput(self) -> None:
        """
        At EOF the answers to every complete request are written and the process
        exits with status 0; a frame cut short by EOF gets no answer.
        """
        data = (
            ejabberdFrame("auth:alice:example.org:pa:ss w")
            + ejabberdFrame("isuser:nobody:example.org")
            + ejabberdFrame("isuser:alice:example.org")[:10]
        )
        result = self.runXcauth([], data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, TRUE + FALSE)
        self.assertCleanLogs(result.stderr)

    def test_emptyInput(self) -> None:
        """
        Nothing at all on stdin: nothing on stdout, status 0.
        """
        result = self.runXcauth([], b"")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"")

    def test_quit(self) -> None:
        """
        C{quit} in a frame ends the session like a zero-length frame.
        """
        data = (
            ejabberdFrame("isuser:alice:example.org")
            + ejabberdFrame("quit")
            + ejabberdFrame("isuser:alice:example.org")
        )
        result = self.runXcauth(["-t", "ejabberd"], data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, TRUE)

    def test_interactive(self) -> None:
        """
        Each answer leaves as soon as it is known, before the next request is
        written (ejabberd sends one request at a time and waits).
        """
        p = subprocess.Popen(
            [XCAUTH, "-c", self.config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=childEnv(),
        )
        self.addCleanup(self._reap, p)
        assert p.stdin is not None and p.stdout is not None
        for request, answer in [
            ("auth:alice:example.org:pa:ss w", TRUE),
            (f"auth:alice:example.org:{WRONG}", FALSE),
            ("isuser:admin:example.org", TRUE),
        ]:
            p.stdin.write(ejabberdFrame(request))
            p.stdin.flush()
            self.assertEqual(p.stdout.read(4), answer)
        p.stdin.write(b"\x00\x00")
        p.stdin.close()
        self.assertEqual(p.stdout.read(), b"")
        self.assertEqual(p.wait(TIMEOUT), 0)

    def _reap(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(TIMEOUT)
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


class ProsodyStdioTests(StdioTestMixin, unittest.TestCase):
    """
    C{xcauth -t prosody} as Prosody's external auth program: lines through pipes.
    """

    def test_requestsThenQuit(self) -> None:
        """
        Lines are answered C{1}/C{0} in order, an invalid UTF-8 line and an empty
        line with C{0}; C{quit} ends the process with status 0 and what follows
        is not read.
        """
        tok = token()
        data = (
            b"auth:alice:example.org:pa:ss w\n"
            + f"auth:alice:example.org:{WRONG}\n".encode()
            + b"isuser:alice:example.org\r\n"
            + b"auth:alice:example.org:\xff\xfe\n"
            + b"\n"
            + f"auth:alice:example.org:{tok}\n".encode()
            + "auth:jörg:example.org:pässwörd\n".encode()
            + b"isuser:nobody:example.org\n"
            + b"quit\n"
            + b"isuser:alice:example.org\n"
        )
        result = self.runXcauth(["-t", "prosody"], data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"1\n0\n1\n0\n0\n1\n1\n0\n")
        self.assertCleanLogs(result.stderr, tok, "pässwörd")

    def test_endOfInput(self) -> None:
        """
        At EOF every complete line is answered and the process exits with status
        0; a last line without its newline gets no answer.
        """
        data = b"isuser:alice:example.org\nauth:alice:example.org:pa:ss w\nisuser:al"
        result = self.runXcauth(["-t", "prosody"], data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"1\n1\n")
        self.assertCleanLogs(result.stderr)


class LogFileTests(StdioTestMixin, unittest.TestCase):
    """
    C{--log}: where the command logs (a server that spawns it may not keep its
    standard error).
    """

    def test_logFile(self) -> None:
        path = os.path.abspath(self.mktemp())
        result = self.runXcauth(
            ["-t", "prosody", "--log", path], b"auth:alice:example.org:pa:ss w\nquit\n"
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"1\n"), result.stderr)
        self.assertEqual(result.stderr, b"")
        with open(path, "rb") as f:
            self.assertCleanLogs(f.read())

    def test_logDirectory(self) -> None:
        """
        A directory (what older versions took) gets C{xcauth.log} in it.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        result = self.runXcauth(
            ["-t", "prosody", "-l", directory], b"auth:alice:example.org:pa:ss w\n"
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"1\n"), result.stderr)
        with open(os.path.join(directory, "xcauth.log"), "rb") as f:
            self.assertCleanLogs(f.read())

    def test_unwritableLogFallsBackToStderr(self) -> None:
        """
        A log that cannot be opened is said on standard error, which then gets
        the log; the answers are unaffected.
        """
        result = self.runXcauth(
            ["-t", "prosody", "--log", "/nonexistent/dir/x.log"],
            b"auth:alice:example.org:pa:ss w\n",
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"1\n"), result.stderr)
        self.assertIn(b"cannot open log file /nonexistent/dir/x.log", result.stderr)
        self.assertCleanLogs(result.stderr)


class AcceptedSocketTests(StdioTestMixin, unittest.TestCase):
    """
    inetd, or systemd with C{Accept=yes} and C{StandardInput=socket}: stdin and
    stdout are one connected socket.
    """

    def spawnOnSocket(self, args: list[str]) -> tuple[socket.socket, subprocess.Popen]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        stderrPath = os.path.join(os.path.dirname(self.config), "stderr")
        with open(stderrPath, "wb") as stderr:
            p = subprocess.Popen(
                [XCAUTH, "-c", self.config, *args],
                stdin=theirs,
                stdout=theirs,
                stderr=stderr,
                env=childEnv(),
            )
        theirs.close()
        self.addCleanup(self._reap, p)
        self.stderrPath = stderrPath
        ours.settimeout(TIMEOUT)
        return ours, p

    def _reap(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(TIMEOUT)

    def stderr(self) -> bytes:
        with open(self.stderrPath, "rb") as f:
            return f.read()

    def test_ejabberd(self) -> None:
        """
        Binary frames on the socket, answered one at a time; after the client
        shuts down its side the process closes the socket and exits with 0.
        """
        s, p = self.spawnOnSocket([])
        for request, answer in [
            ("auth:alice:example.org:pa:ss w", TRUE),
            (f"auth:alice:example.org:{WRONG}", FALSE),
            (b"isuser:\xff:example.org", FALSE),
            ("isuser:alice:example.org", TRUE),
        ]:
            s.sendall(ejabberdFrame(request))
            self.assertEqual(recvExactly(s, 4), answer)
        s.sendall(ejabberdFrame("isuser:nobody:example.org"))
        s.shutdown(socket.SHUT_WR)
        self.assertEqual(recvAll(s), FALSE)
        self.assertEqual(p.wait(TIMEOUT), 0)
        self.assertCleanLogs(self.stderr())

    def test_prosodyQuit(self) -> None:
        """
        Lines on the socket; C{quit} closes it and ends the process with 0.
        """
        s, p = self.spawnOnSocket(["-t", "prosody"])
        s.sendall(b"auth:alice:example.org:pa:ss w\n")
        self.assertEqual(recvLine(s), b"1")
        s.sendall(b"isuser:nobody:example.org\nquit\n")
        self.assertEqual(recvAll(s), b"0\n")
        self.assertEqual(p.wait(TIMEOUT), 0)
        self.assertCleanLogs(self.stderr())
