"""
C{make demo} (C{scripts/demo.py}): with the fake Nextcloud's port taken
nothing starts and make fails with one line saying why; a signal to make
alone stops the daemon and the fake Nextcloud.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import (
    REPO,
    canConnect,
    childEnv,
    connect,
    freePort,
    recvLine,
    waitFor,
)


def makeDemo(nextcloudPort: int, listenPort: int) -> list[str]:
    if shutil.which("make") is None:
        raise SkipTest("needs make")
    # -o: the virtualenv is there (the tests run in it); do not rebuild it.
    return ["make", "--no-print-directory", "-o", ".venv/bin/.installed", "demo",
            f"DEMO_NEXTCLOUD_PORT={nextcloudPort}",
            f"DEMO_LISTEN=tcp:{listenPort}:interface=127.0.0.1"]


class DemoTests(TestCase):
    def test_backendPortTaken(self) -> None:
        listenPort = freePort()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            p = subprocess.run(makeDemo(port, listenPort), cwd=REPO, env=childEnv(),
                               capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        lines = p.stderr.strip().splitlines()
        self.assertIn(
            f"fake Nextcloud: cannot listen on 127.0.0.1:{port}: Address already in use",
            lines,
        )
        self.assertIn("demo: the fake Nextcloud did not start; nothing else was started",
                      lines)
        self.assertNotIn("Traceback", p.stderr)
        self.assertFalse(canConnect(("127.0.0.1", listenPort)))

    def test_signalToMakeStopsEverything(self) -> None:
        nextcloudPort, listenPort = freePort(), freePort()
        log = open(os.path.abspath(self.mktemp()), "wb")
        self.addCleanup(log.close)
        make = subprocess.Popen(makeDemo(nextcloudPort, listenPort), cwd=REPO,
                                env=childEnv(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def killGroup() -> None:
            # Whatever is left of what this test started (nothing, if it passes).
            try:
                os.killpg(make.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            make.wait(10)

        self.addCleanup(killGroup)
        waitFor(lambda: canConnect(("127.0.0.1", listenPort)), "the demo daemon")
        s = connect(("127.0.0.1", listenPort))
        s.sendall(b"auth:admin:example.org:good_password\n")
        self.assertEqual(recvLine(s), b"1")
        s.close()
        make.send_signal(signal.SIGTERM)
        make.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            canConnect(("127.0.0.1", listenPort)) or canConnect(("127.0.0.1", nextcloudPort))
        ):
            time.sleep(0.1)
        self.assertFalse(canConnect(("127.0.0.1", listenPort)), "the daemon still runs")
        self.assertFalse(canConnect(("127.0.0.1", nextcloudPort)), "the fake still runs")
        # No process of the demo's session is left.
        waitFor(lambda: not _sessionAlive(make.pid), "the demo's processes to end",
                timeout=20)


def _sessionAlive(sid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the name: state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False
