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

import base64
import os
import select
import signal
import socket
import subprocess
import time

from twisted.trial import unittest

from tests.harness import (
    SECRET,
    XCAUTH,
    childEnv,
    ejabberdFrame,
    recvAll,
    recvExactly,
    recvLine,
    startBackend,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken
from xcauth.framing.saslauthd import OK as SASL_OK
from xcauth.framing.saslauthd import encodeCounted

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


#: How long a stopped xcauth may take to exit: generous for a loaded machine, far
#: below the 90 s of systemd's stop timeout after which it would be killed.
EXIT_BOUND = 10.0

#: A request of each stdio framing and the start of its answer (alice exists).
FRAMING_REQUESTS: dict[str, tuple[bytes, bytes]] = {
    "ejabberd": (ejabberdFrame("isuser:alice:example.org"), TRUE),
    "ejabberd-line": (b"isuser:alice:example.org\n", b"1\n"),
    "prosody": (b"auth:alice:example.org:pa:ss w\n", b"1\n"),
    "generic": (b"isuser:alice:example.org\n", b"1\n"),
    "postfix": (b"get alice@example.org\n", b"200 OK\n"),
    "saslauthd": (
        encodeCounted(b"alice") + encodeCounted(b"pa:ss w") + encodeCounted(b"xmpp")
        + encodeCounted(b"example.org"),
        SASL_OK,
    ),
    "dovecot": (
        b"VERSION\t1\t2\nCPID\t7\nAUTH\t1\tPLAIN\tservice=imap\tresp="
        + base64.b64encode(b"\0alice@example.org\0pa:ss w") + b"\n",
        b"OK\t1\tuser=alice@example.org",
    ),
}

#: The fake JSXC API's answer to an isuser request for a user who exists.
ISUSER_TRUE = b'{"result":"success","data":{"isUser":true}}'


def readUntil(fd: int, wanted: bytes, timeout: float = TIMEOUT) -> bytes:
    """
    Read from C{fd} until what was read contains C{wanted} (or EOF, or
    C{timeout} seconds); returns everything read.
    """
    data = b""
    deadline = time.monotonic() + timeout
    while wanted not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


class StopTests(StdioTestMixin, unittest.TestCase):
    """
    A spawned xcauth stops as ejabberd and Prosody stop it: pipes for stdin and
    stdout, then SIGTERM (C{systemctl stop} signals the whole control group) or
    the end of stdin; in every framing, after answers or in the middle of one.
    """

    def spawn(self, args: list[str], config: str | None = None) -> subprocess.Popen:
        self.stderrPath = os.path.join(os.path.dirname(self.config), f"stderr-{len(args)}")
        with open(self.stderrPath, "ab") as stderr:
            p = subprocess.Popen(
                [XCAUTH, "-c", config or self.config, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=childEnv(),
            )
        self.addCleanup(self._reap, p)
        return p

    def _reap(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(TIMEOUT)
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()

    def stderr(self) -> str:
        with open(self.stderrPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def assertExits(self, p: subprocess.Popen, what: str) -> None:
        """
        C{p} exits within L{EXIT_BOUND} seconds, with status 0.
        """
        try:
            status = p.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            self.fail(f"{what}: xcauth still runs {EXIT_BOUND} s later")
        self.assertEqual(status, 0, what)

    def answerOnce(self, p: subprocess.Popen, framing: str) -> None:
        assert p.stdin is not None and p.stdout is not None
        request, answer = FRAMING_REQUESTS[framing]
        p.stdin.write(request)
        p.stdin.flush()
        got = readUntil(p.stdout.fileno(), answer)
        self.assertIn(answer, got, framing)

    def test_sigtermAfterAnswers(self) -> None:
        """
        Every framing: one request answered, then SIGTERM; the process exits.
        """
        for framing in sorted(FRAMING_REQUESTS):
            p = self.spawn(["-t", framing])
            self.answerOnce(p, framing)
            p.send_signal(signal.SIGTERM)
            self.assertExits(p, f"SIGTERM after an answer, {framing}")

    def test_endOfInputAfterAnswers(self) -> None:
        """
        Every framing: one request answered, then stdin closes; the process
        exits.
        """
        for framing in sorted(FRAMING_REQUESTS):
            p = self.spawn(["-t", framing])
            self.answerOnce(p, framing)
            assert p.stdin is not None
            p.stdin.close()
            self.assertExits(p, f"end of input after an answer, {framing}")

    def test_sigtermBeforeAnyRequest(self) -> None:
        """
        SIGTERM to an xcauth that has not been asked anything yet.
        """
        p = self.spawn(["-t", "ejabberd"])
        waitFor(lambda: "domain settings loaded" in self.stderr(), "xcauth started",
                process=p)
        p.send_signal(signal.SIGTERM)
        self.assertExits(p, "SIGTERM before a request")
        assert p.stdout is not None
        self.assertEqual(p.stdout.read(), b"")

    def heldBackend(self) -> tuple[socket.socket, str]:
        """
        A JSXC API the test answers by hand (its socket is the test's: no port
        to race for) and a config pointing at it.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        directory = self.mktemp()
        os.makedirs(directory)
        config = writeConfig(
            os.path.join(directory, "xcauth.conf"),
            f"http://127.0.0.1:{port}/index.php/apps/ojsxc/ajax/externalApi.php",
            type="ejabberd", deadline="20", timeout="10,20",
        )
        return listener, config

    def inFlight(self, framing: str, stop: str) -> None:
        """
        An isuser request whose backend call is open when the process is told
        to stop (C{stop}: C{"sigterm"} or C{"eof"}); the backend answers after
        that.  The answer still reaches stdout, then the process exits.
        """
        listener, config = self.heldBackend()
        p = self.spawn(["-t", framing], config)
        assert p.stdin is not None and p.stdout is not None
        request, answer = FRAMING_REQUESTS[framing]
        p.stdin.write(request)
        p.stdin.flush()
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(TIMEOUT)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            self.assertTrue(chunk, "xcauth closed its backend request")
            received += chunk
        if stop == "sigterm":
            p.send_signal(signal.SIGTERM)
            waitFor(lambda: "Received SIGTERM" in self.stderr(), "SIGTERM handled",
                    process=p)
        else:
            p.stdin.close()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(ISUSER_TRUE)}\r\n".encode()
            + b"Connection: close\r\n\r\n" + ISUSER_TRUE
        )
        got = readUntil(p.stdout.fileno(), answer)
        self.assertEqual(got, answer)
        self.assertExits(p, f"{stop} in the middle of a request, {framing}")

    def test_sigtermInFlightEjabberd(self) -> None:
        self.inFlight("ejabberd", "sigterm")

    def test_sigtermInFlightProsody(self) -> None:
        self.inFlight("generic", "sigterm")

    def test_endOfInputInFlightEjabberd(self) -> None:
        self.inFlight("ejabberd", "eof")
