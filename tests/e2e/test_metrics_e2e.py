"""
End-to-end tests of C{--metrics}: the real C{twistd xcauth} daemon against
the fake Nextcloud answers a known mix of requests, and what Prometheus
would scrape from C{/metrics} counts exactly those; a metrics port in use
stops the start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.harness import (
    SECRET,
    TWISTD,
    Daemon,
    childEnv,
    connect,
    freePort,
    recvLine,
    startBackend,
    writeConfig,
)
from xcauth.core.tokens import makeToken
from xcauth.testing.fakenextcloud import DEMO_USERS

DOMAIN = "example.org"
HOST = "127.0.0.1"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """
    GET C{/metrics} like Prometheus: the content type and every sample.
    """
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        contentType = r.headers["Content-Type"]
        text = r.read().decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return contentType, out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """
    One sample; 0 if absent.
    """
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsDaemonTests(TestCase):
    """
    The daemon with one generic listener, the memory cache and C{--metrics}.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        _, self.config = startBackend(self, os.path.join(self.dir, "nextcloud"),
                                      cache_storage="memory")
        # Port 0 for both: the daemon logs the ports it got.
        self.daemon = Daemon(
            self.dir,
            ["--config-file", self.config,
             "--listen", f"generic=tcp:0:interface={HOST}",
             "--metrics", f"tcp:0:interface={HOST}"],
        )
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        ports = self.daemon.ports()
        self.port = ports[f"generic=tcp:0:interface={HOST}"]
        self.metricsPort = ports[f"metrics=tcp:0:interface={HOST}"]

    def ask(self, s: socket.socket, line: str) -> bytes:
        s.sendall(line.encode("utf-8") + b"\n")
        return recvLine(s)

    def test_countsWhatWasSent(self) -> None:
        """
        3 right passwords (3 users), 2 wrong ones, an isuser of a missing
        user, a token, an invalid line, then one right password again (a
        cache hit): each is counted once, where it was decided.
        """
        token = makeToken(SECRET.encode(), "alice", DOMAIN, int(time.time()) + 3600)
        s = connect((HOST, self.port))
        self.addCleanup(s.close)
        answers = [
            self.ask(s, f"auth:{user}:{DOMAIN}:{DEMO_USERS[user]}")
            for user in ("alice", "bob", "admin")
        ]
        answers += [self.ask(s, f"auth:carol:{DOMAIN}:wrong{i}") for i in (1, 2)]
        answers.append(self.ask(s, f"isuser:nobody:{DOMAIN}"))
        answers.append(self.ask(s, f"auth:alice:{DOMAIN}:{token}"))
        answers.append(self.ask(s, "nonsense"))
        # The cache stores the password's hash in the background (bcrypt at
        # cost 4 takes milliseconds): a wide margin before asking again.
        time.sleep(1.0)
        answers.append(self.ask(s, f"auth:alice:{DOMAIN}:{DEMO_USERS['alice']}"))
        self.assertEqual(answers, [b"1", b"1", b"1", b"0", b"0", b"0", b"1", b"0", b"1"])

        contentType, samples = scrape(self.metricsPort)
        self.assertTrue(contentType.startswith("text/plain"), contentType)

        def requests(operation: str, result: str) -> float:
            return sample(samples, "xcauth_requests_total", framing="prosody",
                          operation=operation, result=result)

        self.assertEqual(requests("auth", "true"), 5)  # 3 + the token + the cache hit
        self.assertEqual(requests("auth", "false"), 2)
        self.assertEqual(requests("isuser", "false"), 1)
        self.assertEqual(requests("invalid", "false"), 1)
        self.assertEqual(
            sum(v for (name, _), v in samples.items() if name == "xcauth_requests_total"), 9
        )
        self.assertEqual(sample(samples, "xcauth_request_seconds_count", framing="prosody",
                                operation="auth"), 7)
        backend = {
            outcome: sample(samples, "xcauth_backend_requests_total", backend="jsxc",
                            outcome=outcome)
            for outcome in ("true", "false", "unavailable")
        }
        self.assertEqual(backend, {"true": 3, "false": 3, "unavailable": 0})
        self.assertEqual(sample(samples, "xcauth_backend_seconds_count", backend="jsxc"), 6)
        cache = {
            result: sample(samples, "xcauth_cache_decisions_total", result=result)
            for result in ("hit", "miss", "stale", "fallback")
        }
        self.assertEqual(cache, {"hit": 1, "miss": 5, "stale": 0, "fallback": 0})
        # Gauges: the one connection open (counted in the reactor's thread for
        # a scrape served from the thread pool), the build.
        self.assertEqual(sample(samples, "xcauth_open_connections", framing="prosody"), 1)
        self.assertEqual(sum(v for (name, _), v in samples.items()
                             if name == "xcauth_build_info"), 1)
        self.assertIn(("xcauth_deadline_missed_total", (("framing", "prosody"),)), samples)
        # Both wrong passwords were answered late (penalty-delay).
        self.assertEqual(sample(samples, "xcauth_penalized_total", reason="delayed"), 2)
        self.assertEqual(sample(samples, "xcauth_in_flight"), 0)
        self.assertEqual(sum(v for (name, _), v in samples.items()
                             if name == "xcauth_deadline_missed_total"), 0)
        self.assertGreater(sample(samples, "process_resident_memory_bytes"), 0)
        self.assertIn(("python_info", ()), {(n, ()) for n, _ in samples})

        # A scrape writes no access line to the daemon's log.
        scrape(self.metricsPort)
        self.daemon.stop()
        log = self.daemon.output()
        self.assertNotIn("GET /metrics", log)
        self.assertIn(f"listening: metrics=tcp:0:interface={HOST} on {HOST} port {self.metricsPort}", log)

    def test_inFlight(self) -> None:
        """
        A request waiting for Nextcloud is in flight until it is answered.
        """
        s = connect((HOST, self.port))
        self.addCleanup(s.close)
        # The fake Nextcloud answers slowN- users after N ms.
        s.sendall(f"auth:slow1500-alice:{DOMAIN}:{DEMO_USERS['alice']}\n".encode())
        deadline = time.monotonic() + 1.0
        seen = 0.0
        while time.monotonic() < deadline and not seen:
            seen = sample(scrape(self.metricsPort)[1], "xcauth_in_flight")
            time.sleep(0.05)
        self.assertEqual(seen, 1)
        self.assertEqual(recvLine(s), b"1")
        self.assertEqual(sample(scrape(self.metricsPort)[1], "xcauth_in_flight"), 0)


class MetricsStartTests(TestCase):
    """
    The metrics listener starts like the others: one that cannot listen
    stops the daemon.
    """

    timeout = 60

    def test_portInUse(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = writeConfig(os.path.join(directory, "x.conf"), "http://127.0.0.1:9/api")
        with socket.socket() as s:
            s.bind((HOST, 0))
            s.listen(1)
            taken = s.getsockname()[1]
            p = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "xcauth", "-c", path,
                 "--listen", f"tcp:{freePort()}:interface={HOST}",
                 "--metrics", f"tcp:{taken}:interface={HOST}"],
                capture_output=True, text=True, timeout=60, env=childEnv(), cwd=directory,
            )
        self.assertNotEqual(p.returncode, 0)
        lines: Any = (p.stdout + p.stderr).strip().splitlines()
        self.assertIn(f"Couldn't listen on {HOST}:{taken}", lines[-1])
        # The message names the listener that cannot start.
        self.assertIn(f"xcauth: cannot start the listener metrics=tcp:{taken}:interface={HOST}: ",
                      lines[-1])
        self.assertIn("Address already in use", lines[-1])
        self.assertEqual(len([line for line in lines if "Couldn't listen" in line]), 1, lines)
