"""
The real daemon at its limits: a listener's connection cap, the modes of the
files holding secrets, the state database deleted while running, an https
URL pointing at a plain-HTTP port, and one connection flooding while another
logs in.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import threading
import time

from twisted.trial.unittest import TestCase

from tests.harness import (
    XCAUTH,
    Daemon,
    childEnv,
    connect,
    recvLine,
    serveOn,
    startBackend,
    waitFor,
    writeConfig,
)
from xcauth.core.tokens import makeToken

SECRET = "e2e-secret-0123456789"


class LimitsTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = 0

    def daemon(self, **options: str) -> Daemon:
        self.nextcloud, config = startBackend(self, os.path.join(self.dir, "nc"), **options)
        daemon = serveOn(self, os.path.join(self.dir, "daemon"), config, "prosody")
        self.port = daemon.port
        return daemon

    def ask(self, s: socket.socket, line: str) -> bytes:
        s.sendall(line.encode() + b"\n")
        return recvLine(s)

    def test_connectionCap(self) -> None:
        """
        With max-connections=4, a fifth client is closed at once (one log line),
        the four keep working, and once one leaves a new client is served.
        """
        # On port 0 the harness reads the port from the log: no probe
        # connection of its own takes one of the four.
        daemon = self.daemon(max_connections="4")
        held = [connect(("127.0.0.1", self.port)) for _ in range(4)]
        try:
            for s in held:
                self.assertEqual(self.ask(s, "isuser:alice:example.org"), b"1")
            extra = connect(("127.0.0.1", self.port))
            extra.settimeout(10)
            try:
                extra.sendall(b"isuser:alice:example.org\n")
                self.assertEqual(extra.recv(10), b"")
            except ConnectionResetError:
                pass
            finally:
                extra.close()
            self.assertEqual(self.ask(held[0], "isuser:alice:example.org"), b"1")
            held.pop().close()
            time.sleep(0.2)
            with connect(("127.0.0.1", self.port)) as s:
                self.assertEqual(self.ask(s, "isuser:alice:example.org"), b"1")
            self.assertEqual(daemon.output().count("connections open on this listener"), 1)
        finally:
            for s in held:
                s.close()

    def test_fileModes(self) -> None:
        """
        Under a permissive umask, the database and its side files (password
        hashes, domain secrets) are created 0600, by the daemon and by the
        admin command.
        """
        db = os.path.join(self.dir, "state", "xcauth.sqlite3")
        os.makedirs(os.path.dirname(db))
        old = os.umask(0o000)
        try:
            self.daemon(cache_storage="db", db=db, cache_bcrypt_rounds="4,4")
            with connect(("127.0.0.1", self.port)) as s:
                self.assertEqual(self.ask(s, "auth:alice:example.org:pa:ss w"), b"1")
            waitFor(lambda: os.path.exists(db + "-wal"), "the database's write-ahead log")
            for name in (db, db + "-wal", db + "-shm"):
                if os.path.exists(name):
                    self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)
            other = os.path.join(self.dir, "admin.sqlite3")
            r = subprocess.run(
                [XCAUTH, "--db", other, "domains", "add", "example.net", "--url",
                 "https://cloud.example.net/x", "--secret", "s3cret"],
                capture_output=True, text=True, env=childEnv(), timeout=60,
            )
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o600)
        finally:
            os.umask(old)

    def test_databaseDeleted(self) -> None:
        """
        Deleting the state database while the daemon runs is logged, and the
        daemon goes on with a new file (the cache fills it again).
        """
        db = os.path.join(self.dir, "state", "xcauth.sqlite3")
        os.makedirs(os.path.dirname(db))
        daemon = self.daemon(cache_storage="db", db=db, cache_bcrypt_rounds="4,4")
        with connect(("127.0.0.1", self.port)) as s:
            self.assertEqual(self.ask(s, "auth:alice:example.org:pa:ss w"), b"1")
        for name in (db, db + "-wal", db + "-shm"):
            if os.path.exists(name):
                os.unlink(name)
        waitFor(lambda: "was deleted while xcauth runs" in daemon.output(),
                "the warning about the deleted database", timeout=30)
        with connect(("127.0.0.1", self.port)) as s:
            self.assertEqual(self.ask(s, "auth:bob:example.org:bob's secret"), b"1")

        def cached() -> bool:
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    return bool(conn.execute("SELECT count(*) FROM authcache").fetchone()[0])
                finally:
                    conn.close()
            except sqlite3.Error:
                return False

        waitFor(cached, "the new database's cache entry", timeout=30)

    def test_httpsToPlainPort(self) -> None:
        """
        An https url pointing at a plain-HTTP port says what is wrong, not just
        that no answer came.
        """
        plain, _ = startBackend(self, os.path.join(self.dir, "nc"))
        url = plain.url.replace("http://", "https://")
        config = writeConfig(os.path.join(self.dir, "https.conf"), url)
        r = subprocess.run(
            [XCAUTH, "-c", config, "-I", "alice", "example.org"],
            capture_output=True, text=True, env=childEnv(), timeout=60,
        )
        self.assertEqual(r.stdout.strip(), "None")
        self.assertIn("the TLS handshake never completes", r.stderr)

    def test_floodDoesNotStallOthers(self) -> None:
        """
        While one connection floods the listener with valid token logins
        (answered locally, never closed for it) and never reads its answers,
        another client's password login is answered, well before the flood
        has been worked through.
        """
        self.daemon()
        token = makeToken(SECRET.encode(), "alice", "example.org", int(time.time()) + 3600)
        line = f"auth:alice:example.org:{token}\n".encode()
        flood = connect(("127.0.0.1", self.port))
        sent = [0]
        stop = threading.Event()

        def pour() -> None:
            chunk = line * 2000
            try:
                while not stop.is_set() and sent[0] < 200_000:
                    flood.sendall(chunk)
                    sent[0] += 2000
            except OSError:
                pass

        pourer = threading.Thread(target=pour, daemon=True)
        pourer.start()
        try:
            waitFor(lambda: sent[0] >= 20_000, "the flood to start", timeout=30)
            started = time.monotonic()
            with connect(("127.0.0.1", self.port)) as s:
                self.assertEqual(self.ask(s, "auth:alice:example.org:pa:ss w"), b"1")
            took = time.monotonic() - started
            # Wide margin: far below the 4 s deadline, and the flood is still
            # being sent (the daemon stopped reading it while its answers
            # were not read).
            self.assertLess(took, 2.0)
            self.assertTrue(pourer.is_alive())
        finally:
            stop.set()
            flood.close()
            pourer.join(10)

    def test_hangingNextcloudCacheAnswers(self) -> None:
        """
        With the default timeouts and Nextcloud hanging (it accepts and never
        answers), a cached password is accepted before the 4 s deadline; an
        unknown one is refused by then.
        """
        import signal

        self.daemon(cache_storage="memory", cache_query_ttl="1s", log_requests="all")
        with connect(("127.0.0.1", self.port), timeout=30) as s:
            self.assertEqual(self.ask(s, "auth:alice:example.org:pa:ss w"), b"1")
            time.sleep(1.5)  # past the query TTL: Nextcloud is asked first
            assert self.nextcloud.process is not None
            os.kill(self.nextcloud.process.pid, signal.SIGSTOP)
            self.addCleanup(os.kill, self.nextcloud.process.pid, signal.SIGCONT)
            started = time.monotonic()
            self.assertEqual(self.ask(s, "auth:alice:example.org:pa:ss w"), b"1")
            took = time.monotonic() - started
            self.assertLess(took, 4.0)
            started = time.monotonic()
            self.assertEqual(self.ask(s, "auth:alice:example.org:not it"), b"0")
            self.assertLess(time.monotonic() - started, 4.5)
        print(f"\n    cached login answered in {took:.2f} s while Nextcloud hung")
