"""
End-to-end test harness: the fake Nextcloud and the real C{twistd xcauth} daemon
as child processes on loopback, and small blocking clients for the framings.

Everything started here is bounded: waits time out, and L{Process.stop} kills
what does not stop by itself.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
XCAUTH = os.path.join(BIN, "xcauth")
SECRET = "e2e-secret-0123456789"
START_TIMEOUT = 30.0


#: Ports L{freePort} hands out: below the kernel's ephemeral range (32768 and up
#: on Linux), which the port-0 binds and the outgoing connections of every
#: process draw from, so none of them can take a port between L{freePort} and
#: its bind; and clear of the ports of the servers the tests drive.
PORT_RANGE = range(15000, 20000)
#: One lock file per port handed out: parallel test processes (trial --jobs, or
#: two checkouts at once) never hand out the same port.
PORT_LOCKS = os.path.join(tempfile.gettempdir(), "xcauth-test-ports")
#: The locks this process holds, kept until it exits (a port is never reused
#: by the process that had it, so a daemon being stopped never races its
#: successor).
_heldPorts: dict[int, int] = {}


def freePort(host: str = "127.0.0.1") -> int:
    """
    A TCP port free on C{host}, for a program that cannot bind port 0 and say
    which port it got (ejabberd, Prosody, Postfix, a fixed C{--listen}): one of
    L{PORT_RANGE} that no other test process holds (a lock file in
    L{PORT_LOCKS}) and that can be bound now.  Where the program under test can
    bind port 0 and report it (L{Daemon.ports}, the fake Nextcloud's port
    file), the tests do that instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    os.makedirs(PORT_LOCKS, exist_ok=True)
    start = random.randrange(len(PORT_RANGE))
    for i in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
        if port in _heldPorts:
            continue
        fd = os.open(os.path.join(PORT_LOCKS, str(port)), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                os.close(fd)
                continue
        _heldPorts[port] = fd
        return port
    raise RuntimeError(f"no free port left in {PORT_RANGE}")


def childEnv(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment for child processes: this interpreter's, with the repository
    importable.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def waitFor(
    check: Callable[[], object],
    what: str,
    timeout: float = START_TIMEOUT,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """
    Poll C{check()} until it is true, for at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def canConnect(address: tuple[str, int] | str) -> bool:
    """
    Whether a TCP C{(host, port)} or a UNIX socket path accepts connections.
    """
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(address)
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            with socket.socket(family) as s:
                s.settimeout(1)
                s.connect(address)
        return True
    except OSError:
        return False


class Process:
    """
    A child process with its output in a file.
    """

    def __init__(self, argv: list[str], logPath: str, env: dict[str, str] | None = None,
                 **kw: Any) -> None:
        self.argv = argv
        self.logPath = os.path.abspath(logPath)
        self.env = childEnv(env)
        self.kw = kw
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=REPO, **self.kw
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """
        SIGTERM, then SIGKILL after C{timeout} seconds; returns the exit status.
        """
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        return p.returncode

    def kill(self) -> None:
        """
        SIGKILL, no goodbye.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        """
        Everything the process wrote so far.
        """
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class FakeNextcloud(Process):
    """
    The fake JSXC API (L{xcauth.testing.fakenextcloud}) on a free loopback port,
    or with C{stock=True} the fake stock Nextcloud (L{xcauth.testing.fakestock};
    C{stockArgs} are more of its options, e.g. C{["--allow-listed"]}).
    """

    def __init__(self, directory: str, secret: str = SECRET, latencyMs: float = 0,
                 port: int = 0, stock: bool = False, stockArgs: Iterable[str] = (),
                 extraArgs: Iterable[str] = ()) -> None:
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.portFile = os.path.join(directory, "nextcloud.port")
        self.requestedPort = port
        self.stock = stock
        extra = ["--stock", *stockArgs] if stock else []
        super().__init__(
            [sys.executable, "-m", "xcauth.testing.fakenextcloud", "--port", str(port),
             "--secret", secret, "--latency", str(latencyMs), "--port-file", self.portFile,
             *extra, *extraArgs],
            os.path.join(directory, "nextcloud.log"),
        )
        self.port = 0

    def start(self) -> None:
        if os.path.exists(self.portFile):
            os.unlink(self.portFile)
        super().start()
        waitFor(lambda: os.path.exists(self.portFile), "fake Nextcloud port file",
                process=self.process)
        with open(self.portFile) as f:
            self.port = int(f.read())

    @property
    def url(self) -> str:
        if self.stock:
            return f"http://127.0.0.1:{self.port}/nextcloud"
        return f"http://127.0.0.1:{self.port}/index.php/apps/ojsxc/ajax/externalApi.php"

    def stockOptions(self) -> dict[str, str]:
        """
        The config options of the stock backend with the fake's privileged
        service account (for L{writeConfig}).
        """
        from xcauth.testing.fakestock import SERVICE_PASSWORD, SERVICE_USER

        # login-format={user} sends no domain: the served one is listed.
        return {"backend": "nextcloud", "service_user": SERVICE_USER,
                "service_password": SERVICE_PASSWORD, "domain": "example.org"}


def writeConfig(path: str, url: str, secret: str = SECRET, **options: object) -> str:
    """
    Write an xcauth config file; C{options} with C{_} for C{-} in their keys
    (C{None}: left out).  Every request is logged (C{log-requests=all}) unless
    C{log_requests} says otherwise: the tests read those lines.
    """
    options.setdefault("log_requests", "all")
    lines = [f"url={url}", f"secret={secret}"]
    for key, value in options.items():
        key = key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.extend(f"{key}={v}" for v in value)
        elif value is True:
            lines.append(key)
        else:
            lines.append(f"{key}={value}")
    path = os.path.abspath(path)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def startBackend(testCase: Any, directory: str, stock: bool = False,
                 stockArgs: Iterable[str] = (), **options: Any) -> tuple[FakeNextcloud, str]:
    """
    Start the fake Nextcloud in C{directory} (stopped when C{testCase} ends) and
    write C{directory/xcauth.conf} pointing at it, with C{options} as for
    L{writeConfig}.  With C{stock=True}, the fake stock Nextcloud and the
    nextcloud backend with its service account (C{options} may override them).
    Returns the fake and the config file's path.
    """
    os.makedirs(directory, exist_ok=True)
    nextcloud = FakeNextcloud(directory, stock=stock, stockArgs=stockArgs)
    testCase.addCleanup(nextcloud.stop)
    nextcloud.start()
    if stock:
        options = {**nextcloud.stockOptions(), **options}
    config = writeConfig(os.path.join(directory, "xcauth.conf"), nextcloud.url, **options)
    return nextcloud, config


class Daemon(Process):
    """
    The real C{twistd -n xcauth} with C{args}; L{start} waits until every address
    in C{waitOn} accepts connections.
    """

    def __init__(self, directory: str, args: list[str],
                 waitOn: Iterable[tuple[str, int] | str] = (),
                 env: dict[str, str] | None = None, **kw: Any) -> None:
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.waitOn = list(waitOn)
        self.daemonLog = os.path.join(directory, "xcauth.log")
        super().__init__(
            [TWISTD, "-n", "--pidfile=", f"--logfile={self.daemonLog}", "xcauth", *args],
            os.path.join(directory, "twistd.out"), env, **kw
        )

    def start(self) -> None:
        super().start()
        # Ready once the reactor runs (its signal handlers are installed): a
        # SIGTERM before that would kill the daemon without its clean stop.
        waitFor(lambda: "xcauth ready:" in self.output(), "xcauth ready", process=self.process)
        for address in self.waitOn:
            waitFor(partial(canConnect, address), f"xcauth listening on {address}",
                    process=self.process)

    def ports(self) -> dict[str, int]:
        """
        The TCP port of each listener (by its C{--listen} entry, the metrics
        listener by its endpoint) as the daemon logged it once listening: a
        listener on C{tcp:0} gets its port from the kernel, and no other
        process can take it first.
        """
        return {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"listening: (\S+) on \S+ port (\d+)", self.output())
        }

    @property
    def port(self) -> int:
        """
        The port of the first TCP listener.
        """
        ports = list(self.ports().values())
        if not ports:
            raise RuntimeError("the daemon logged no TCP listener")
        return ports[0]

    def output(self) -> str:
        """
        The daemon's log plus anything printed before logging started.
        """
        text = super().output()
        try:
            with open(self.daemonLog, encoding="utf-8", errors="replace") as f:
                text += f.read()
        except FileNotFoundError:
            pass
        return text


def serveOn(testCase: Any, directory: str, config: str, framing: str, port: int = 0,
            *args: str) -> Daemon:
    """
    The real daemon with C{config}, serving C{framing} on 127.0.0.1:C{port},
    started (and stopped at the test's end).  With port 0 (the default) the
    daemon binds a port the kernel chooses: L{Daemon.port}.
    """
    daemon = Daemon(
        directory,
        ["--config-file", config, "--listen", f"{framing}=tcp:{port}:interface=127.0.0.1",
         *args],
        waitOn=[("127.0.0.1", port)] if port else [],
    )
    testCase.addCleanup(daemon.stop)
    daemon.start()
    return daemon


def connect(address: tuple[str, int] | str, timeout: float = 10.0) -> socket.socket:
    """
    A blocking client socket with a timeout.
    """
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    s.settimeout(timeout)
    s.connect(address)
    return s


def recvExactly(s: socket.socket, n: int) -> bytes:
    """
    Read exactly C{n} bytes (fewer only at EOF).
    """
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recvLine(s: socket.socket) -> bytes:
    """
    Read one C{\\n}-terminated line (without it), or what came before EOF.
    """
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\n")


def recvAll(s: socket.socket) -> bytes:
    """
    Read until the peer closes.
    """
    chunks: list[bytes] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def ejabberdFrame(text: str | bytes) -> bytes:
    """
    A request in ejabberd's binary framing.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data
