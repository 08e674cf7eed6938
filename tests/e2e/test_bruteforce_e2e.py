"""
End-to-end tests of the brute-force protection: the real C{twistd xcauth}
against the fake stock Nextcloud (which follows Nextcloud's brute-force
throttle and counts what reaches it), attacked over several framings at once.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import TestCase

from tests.harness import (
    connect,
    ejabberdFrame,
    freePort,
    recvExactly,
    recvLine,
    serveOn,
    startBackend,
)
from xcauth.testing.fakestock import MAX_ATTEMPTS, SERVICE_PASSWORD

HOST = "127.0.0.1"
DOMAIN = "example.org"


def counted(data: str) -> bytes:
    raw = data.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def lineLogins(port: int, requests: list[tuple[str, str]]) -> list[bytes]:
    """
    Pipeline C{auth} requests of C{(user, password)} on one connection of
    the line framing; the answers.
    """
    with connect((HOST, port), timeout=60) as s:
        s.sendall(b"".join(f"auth:{u}:{DOMAIN}:{p}\n".encode() for u, p in requests))
        return [recvLine(s) for _ in requests]


def ejabberdLogin(port: int, user: str, password: str) -> bool:
    with connect((HOST, port), timeout=30) as s:
        s.sendall(ejabberdFrame(f"auth:{user}:{DOMAIN}:{password}"))
        return recvExactly(s, 4) == b"\x00\x02\x00\x01"


def saslauthdLogin(port: int, user: str, password: str) -> bool:
    with connect((HOST, port), timeout=30) as s:
        s.sendall(counted(user) + counted(password) + counted("imap") + counted(DOMAIN))
        length = int.from_bytes(recvExactly(s, 2), "big")
        return recvExactly(s, length).startswith(b"OK")


def dovecotLogin(port: int, user: str, password: str, rip: str) -> bool:
    with connect((HOST, port), timeout=30) as s:
        plain = base64.b64encode(f"\0{user}@{DOMAIN}\0{password}".encode()).decode()
        s.sendall(b"VERSION\t1\t1\nCPID\t4242\n"
                  + f"AUTH\t1\tPLAIN\tservice=imap\trip={rip}\tresp={plain}\n".encode())
        while True:
            line = recvLine(s)
            if line.startswith((b"OK\t", b"FAIL\t")):
                return line.startswith(b"OK\t")


class BruteForceTests(TestCase):
    """
    One daemon (no credential cache) serving the prosody, ejabberd,
    saslauthd and dovecot framings over the fake stock Nextcloud, which is
    not allow-listed.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.ports = {name: freePort() for name in ("prosody", "ejabberd", "saslauthd",
                                                     "dovecot")}
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "service-password")
        with open(path, "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        self.nextcloud, config = startBackend(
            self, os.path.join(self.dir, "nc"), stock=True, deadline="6",
            service_password_file=path, service_password=None, log_requests="none",
        )
        extra = []
        for name in ("ejabberd", "saslauthd", "dovecot"):
            extra += ["--listen", f"{name}=tcp:{self.ports[name]}:interface={HOST}"]
        self.daemon = serveOn(self, os.path.join(self.dir, "daemon"), config, "prosody",
                              self.ports["prosody"], *extra)

    def counts(self) -> dict[str, Any]:
        url = f"http://{HOST}:{self.nextcloud.port}/fake/counts"
        with urllib.request.urlopen(url, timeout=10) as answer:
            result: dict[str, Any] = json.load(answer)
            return result

    def login(self, user: str, password: str) -> tuple[bool, float]:
        started = time.monotonic()
        answer = lineLogins(self.ports["prosody"], [(user, password)])[0]
        return answer == b"1", time.monotonic() - started

    def test_concurrentGuesses(self) -> None:
        """
        300 distinct wrong passwords for one user, pipelined on 10
        connections at once (Nextcloud answers the user after 200 ms):
        at most 5 reach Nextcloud, all are refused.
        """
        user = "slow200-bob"
        answers: list[bytes] = []

        def attack(c: int) -> None:
            answers.extend(lineLogins(self.ports["prosody"],
                                      [(user, f"guess-{c}-{i}") for i in range(30)]))

        threads = [threading.Thread(target=attack, args=(c,)) for c in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(len(answers), 300)
        self.assertEqual(set(answers), {b"0"})
        self.assertLessEqual(self.counts()["loginsOf"].get(user, 0), 5)

    def test_nameOnlyAttackOnEveryFraming(self) -> None:
        """
        Wrong passwords for bob at 5 a second on each of the prosody,
        ejabberd, saslauthd and dovecot framings (a new client address per
        dovecot guess) for 8 s: bob's known password is answered 1 within
        1 s on every try, without a credential cache.
        """
        self.assertEqual(self.login("bob", "bob's secret")[0], True)
        stop = threading.Event()
        errors: list[BaseException] = []
        sent = [0]
        guesses: list[threading.Thread] = []

        def guess(send: Callable[[int], bool], i: int) -> None:
            try:
                self.assertFalse(send(i))
            except BaseException as e:  # reported by the test's thread
                errors.append(e)

        def attacker(send: Callable[[int], bool]) -> None:
            # 5 a second, each on a connection of its own, not waiting for
            # the (held back) answers.
            i = 0
            while not stop.is_set() and i < 100:
                t = threading.Thread(target=guess, args=(send, i))
                guesses.append(t)
                t.start()
                sent[0] += 1
                i += 1
                stop.wait(0.2)

        attacks = [
            lambda i: lineLogins(self.ports["prosody"], [("bob", f"x{i}")])[0] == b"1",
            lambda i: ejabberdLogin(self.ports["ejabberd"], "bob", f"e{i}"),
            lambda i: saslauthdLogin(self.ports["saslauthd"], "bob", f"s{i}"),
            lambda i: dovecotLogin(self.ports["dovecot"], "bob", f"d{i}", f"203.0.113.{i % 250}"),
        ]
        threads = [threading.Thread(target=attacker, args=(a,)) for a in attacks]
        for t in threads:
            t.start()
        tries = []
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                tries.append(self.login("bob", "bob's secret"))
                time.sleep(0.25)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            for t in guesses:
                t.join(60)
        self.assertEqual(errors, [])
        self.assertGreater(sent[0], 100)
        self.assertGreater(len(tries), 10)
        self.assertEqual([ok for ok, _ in tries], [True] * len(tries))
        self.assertLess(max(took for _, took in tries), 1.0, tries)
        counts = self.counts()
        # Guesses that reached Nextcloud (bob's own logins may reach it too,
        # while his budget is not spent yet).
        self.assertLessEqual(counts["refusedOf"].get("bob", 0), 5)
        self.assertEqual(counts["tooMany"], 0)

    def test_guessesOverFiftyNames(self) -> None:
        """
        One wrong password for each of 50 names, 5 connections at once:
        Nextcloud stays below its 429 threshold, and alice (whose password
        is known) logs in at once.
        """
        self.assertEqual(self.login("alice", "pa:ss w")[0], True)
        names = ["bob", "jörg", "erin", "carol"] + [f"nobody{i}" for i in range(46)]
        answers: list[bytes] = []

        def attack(part: list[str]) -> None:
            answers.extend(lineLogins(self.ports["prosody"], [(n, "guess") for n in part]))

        threads = [threading.Thread(target=attack, args=(names[k::5],)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(sorted(answers), [b"0"] * 50)
        counts = self.counts()
        self.assertLessEqual(counts["failures30m"], MAX_ATTEMPTS)
        self.assertEqual(counts["tooMany"], 0)
        ok, took = self.login("alice", "pa:ss w")
        self.assertTrue(ok)
        self.assertLess(took, 1.0)
        self.assertIn("brute-force budget of", self.daemon.output())


