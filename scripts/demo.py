"""
C{make demo}: the fake Nextcloud with the demo users and the daemon in front
of it, started and stopped together.

C{python scripts/demo.py [--nextcloud-port 23680] [--listen ENDPOINT]}
starts the fake Nextcloud, and the daemon (C{twistd -n xcauth --demo}) once
the fake listens.  If the fake cannot listen (its port is taken), it prints
why and the demo ends with status 1 before the daemon starts.  When either
process ends, or this one gets SIGINT, SIGTERM or SIGHUP, or its parent
(C{make}) dies, both are stopped.

A plain blocking supervisor, not a Twisted program: it only waits for its two
children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.python import usage

from xcauth.testing.fakenextcloud import API_PATH, _dieWithParent

DEMO_SECRET = "demo-secret-change-me"

#: The sample configuration of each backend.
SAMPLES = {"jsxc": "xcauth.conf", "nextcloud": "xcauth-nextcloud.conf"}

#: Seconds the fake Nextcloud gets to listen, and each child to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class Options(usage.Options):
    optParameters = [
        ["nextcloud-port", None, "23680", "Port of the fake Nextcloud on 127.0.0.1."],
        ["listen", None, "tcp:23664:interface=127.0.0.1", "Where the daemon listens."],
        ["config-file", "c", None,
         "The daemon's config file [default: the sample of the backend]."],
        ["backend", None, "jsxc",
         "jsxc (the JSXC app's API) or nextcloud (a stock Nextcloud's OCS API)."],
    ]

    def postOptions(self) -> None:
        if self["backend"] not in SAMPLES:
            raise usage.UsageError("--backend is jsxc or nextcloud")
        if self["config-file"] is None:
            self["config-file"] = SAMPLES[self["backend"]]


class Stop(Exception):
    """
    A signal asked the demo to stop.
    """


def _stopOnSignal(signum: int, frame: Any) -> None:
    raise Stop(signum)


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """
    SIGTERM, then SIGKILL after L{STOP_TIMEOUT} seconds.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    """
    Run the demo until it is stopped; the exit status.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    _dieWithParent()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stopOnSignal)
    bin = os.path.dirname(sys.executable)
    nextcloud = daemon = None
    directory = tempfile.mkdtemp(prefix="xcauth-demo-")
    portFile = os.path.join(directory, "nextcloud.port")
    try:
        nextcloud = subprocess.Popen(
            [sys.executable, "-m", "xcauth.testing.fakenextcloud",
             "--port", options["nextcloud-port"], "--secret", DEMO_SECRET,
             "--port-file", portFile]
            + (["--stock"] if options["backend"] == "nextcloud" else []),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(portFile):
            if nextcloud.poll() is not None:
                print("demo: the fake Nextcloud did not start; nothing else was started",
                      file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("demo: the fake Nextcloud did not listen in time", file=sys.stderr)
                return 1
            time.sleep(0.05)
        with open(portFile) as f:
            port = int(f.read())
        daemon = subprocess.Popen(
            [os.path.join(bin, "twistd"), "-n", "--pidfile=", "xcauth", "--demo",
             "--config-file", options["config-file"], "--listen", options["listen"],
             "--url", f"http://127.0.0.1:{port}"
             + (API_PATH.decode() if options["backend"] == "jsxc" else "")],
        )
        while True:
            for name, process in (("the daemon", daemon), ("the fake Nextcloud", nextcloud)):
                code = process.poll()
                if code is not None:
                    if code:
                        print(f"demo: {name} ended with status {code}", file=sys.stderr)
                    return 1 if code else 0
            time.sleep(0.2)
    except Stop:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        stop(daemon)
        stop(nextcloud)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


if __name__ == "__main__":
    raise SystemExit(main())
