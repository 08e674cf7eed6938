"""
End to end: systemd socket activation with Debian's real C{systemd-socket-activate}
(package systemd), which binds the sockets, waits for the first connection, and
then execs C{twistd -n xcauth} in place with C{LISTEN_FDS}, C{LISTEN_PID} (its own
pid, so the exec'd twistd sees its pid there) and C{LISTEN_FDNAMES} set, the way
systemd does for a socket unit with C{FileDescriptorName=}.

No C{FRAMING=} prefix is given on the command line: each descriptor's name picks
the framing (C{ejabberd}, C{prosody}, C{ejabberd-line}, C{ejabberd-v6},
C{prosody-unix}).  Each socket must answer in its own framing, and the daemon's
log must name that framing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.trial import unittest

from tests.harness import (
    SECRET,
    TWISTD,
    Process,
    childEnv,
    connect,
    ejabberdFrame,
    freePort,
    recvExactly,
    recvLine,
    startBackend,
    waitFor,
    writeConfig,
)

ACTIVATE = shutil.which("systemd-socket-activate")
TRUE = b"\x00\x02\x00\x01"
FALSE = b"\x00\x02\x00\x00"
TIMEOUT = 30


def ipv6Loopback() -> bool:
    """
    Whether C{::1} can be bound here.
    """
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class SocketActivated(Process):
    """
    C{systemd-socket-activate -l ADDRESS --fdname=NAME ... twistd -n xcauth ARGS}.
    """

    def __init__(self, directory: str, sockets: list[tuple[str, str]], args: list[str]):
        self.daemonLog = os.path.join(directory, "xcauth.log")
        argv = [ACTIVATE or "systemd-socket-activate"]
        for address, name in sockets:
            argv += ["-l", address, f"--fdname={name}"]
        # systemd-socket-activate gives the program only the variables named
        # with -E, plus LISTEN_*.
        env = childEnv()
        for variable in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "HOME", "LANG"):
            if variable in env:
                argv += ["-E", variable]
        argv += [TWISTD, "-n", "--pidfile=", f"--logfile={self.daemonLog}", "xcauth"]
        super().__init__(argv + args, os.path.join(directory, "activate.out"))

    def daemonOutput(self) -> str:
        try:
            with open(self.daemonLog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class SystemdSocketActivationTests(unittest.TestCase):
    """
    Several named sockets handed to one daemon by C{systemd-socket-activate}.
    """

    if ACTIVATE is None:
        skip = "systemd-socket-activate not installed (apt-get install systemd)"

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.nextcloud, self.config = startBackend(
            self,
            self.directory,
            type="generic",
            deadline="20",
            timeout="10,20",
        )
        # A short path: UNIX socket paths are limited to about 100 bytes.
        self.sockDir = tempfile.mkdtemp(prefix="xcauth-sd-")
        self.addCleanup(shutil.rmtree, self.sockDir, True)

    def activate(
        self, sockets: list[tuple[str, str]], listen: list[str], *extra: str
    ) -> SocketActivated:
        args = ["-c", self.config, *extra]
        for entry in listen:
            args += ["--listen", entry]
        p = SocketActivated(self.directory, sockets, args)
        self.addCleanup(p.stop)
        p.start()
        # The sockets are bound (and listening) before the program starts.
        waitFor(
            lambda: p.output().count("Listening on") == len(sockets),
            "systemd-socket-activate listening",
            process=p.process,
        )
        return p

    def assertLogged(self, p: SocketActivated, text: str) -> None:
        waitFor(lambda: text in p.daemonOutput(), f"log line {text!r}", timeout=10)

    def test_namedSockets(self) -> None:
        """
        Each descriptor name selects its framing: C{ejabberd} and C{ejabberd-v6}
        binary (and line-based for a typing person), C{prosody}, C{prosody-unix}
        and C{ejabberd-line} lines.
        """
        ejabberd = ("127.0.0.1", freePort())
        prosody = ("127.0.0.1", freePort())
        ejabberdLine = ("127.0.0.1", freePort())
        unix = os.path.join(self.sockDir, "prosody.sock")
        sockets = [
            (f"{ejabberd[0]}:{ejabberd[1]}", "ejabberd"),
            (f"{prosody[0]}:{prosody[1]}", "prosody"),
            (f"{ejabberdLine[0]}:{ejabberdLine[1]}", "ejabberd-line"),
            (unix, "prosody-unix"),
        ]
        listen = [
            "systemd:domain=INET:name=ejabberd",
            "systemd:domain=INET:name=prosody",
            "systemd:domain=INET:name=ejabberd-line",
            "systemd:domain=UNIX:name=prosody-unix",
        ]
        v6 = None
        if ipv6Loopback():
            v6 = ("::1", freePort("::1"))
            sockets.append((f"[::1]:{v6[1]}", "ejabberd-v6"))
            listen.append("systemd:domain=INET6:name=ejabberd-v6")
        p = self.activate(sockets, listen)

        # The first connection starts the daemon; it waits in the backlog.
        with connect(prosody, TIMEOUT) as s:
            s.sendall(b"auth:alice:example.org:pa:ss w\nisuser:sd-prosody:example.org\n")
            self.assertEqual(recvLine(s), b"1")
            self.assertEqual(recvLine(s), b"0")
        self.assertLogged(p, "isuser false for sd-prosody@example.org via prosody ")

        with connect(ejabberd, TIMEOUT) as s:
            s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
            self.assertEqual(recvExactly(s, 4), TRUE)
            s.sendall(ejabberdFrame("isuser:sd-ejabberd:example.org"))
            self.assertEqual(recvExactly(s, 4), FALSE)
        self.assertLogged(p, "isuser false for sd-ejabberd@example.org via ejabberd ")

        # A person typing on the ejabberd socket is served line-based.
        with connect(ejabberd, TIMEOUT) as s:
            s.sendall(b"isuser:admin:example.org\nquit\n")
            self.assertEqual(recvLine(s), b"1")

        with connect(ejabberdLine, TIMEOUT) as s:
            s.sendall(b"isuser:sd-line:example.org\nisuser:admin:example.org\n")
            self.assertEqual(recvLine(s), b"0")
            self.assertEqual(recvLine(s), b"1")
        self.assertLogged(p, "isuser false for sd-line@example.org via ejabberd-line ")

        with connect(unix, TIMEOUT) as s:
            s.sendall(b"isuser:sd-unix:example.org\nauth:admin:example.org:good_password\n")
            self.assertEqual(recvLine(s), b"0")
            self.assertEqual(recvLine(s), b"1")
        self.assertLogged(p, "isuser false for sd-unix@example.org via prosody ")

        if v6 is not None:
            with connect(v6, TIMEOUT) as s:
                s.sendall(ejabberdFrame("isuser:sd-v6:example.org"))
                self.assertEqual(recvExactly(s, 4), FALSE)
                s.sendall(ejabberdFrame("auth:jörg:example.org:pässwörd"))
                self.assertEqual(recvExactly(s, 4), TRUE)
            self.assertLogged(p, "isuser false for sd-v6@example.org via ejabberd ")

        log = p.daemonOutput()
        for secret in ("pa:ss w", "good_password", "pässwörd", SECRET):
            self.assertNotIn(secret, log)
        self.assertNotIn("Traceback", log)
        # twistd ran under systemd-socket-activate's pid (exec in place), so the
        # LISTEN_PID check passed.  SIGTERM stops it cleanly; twistd then ends by
        # re-raising the signal, as systemd expects of a stopped service.
        assert p.process is not None
        p.process.send_signal(signal.SIGTERM)
        self.assertIn(p.process.wait(TIMEOUT), (0, -signal.SIGTERM))
        self.assertIn("Main loop terminated.", p.daemonOutput())
        self.assertNotIn("Traceback", p.daemonOutput())

    def test_index(self) -> None:
        """
        C{systemd:domain=INET:index=0} adopts the first descriptor; C{FRAMING=}
        picks the framing when the name does not.
        """
        address = ("127.0.0.1", freePort())
        self.activate(
            [(f"{address[0]}:{address[1]}", "whatever")],
            ["ejabberd=systemd:domain=INET:index=0"],
        )
        with connect(address, TIMEOUT) as s:
            s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
            self.assertEqual(recvExactly(s, 4), TRUE)

    def test_unnamedFramingUsesType(self) -> None:
        """
        A descriptor name that is no framing name leaves the framing to C{--type}.
        """
        address = ("127.0.0.1", freePort())
        self.activate(
            [(f"{address[0]}:{address[1]}", "xmpp-auth")],
            ["systemd:domain=INET:name=xmpp-auth"],
            "--type=ejabberd-line",
        )
        with connect(address, TIMEOUT) as s:
            s.sendall(b"isuser:admin:example.org\n")
            self.assertEqual(recvLine(s), b"1")


class AllSystemdSocketsTests(SystemdSocketActivationTests):
    """
    C{--systemd-sockets}: every socket systemd passes is served, in the framing
    its name says, with no C{--listen} at all (so socket units can be enabled
    one by one).
    """

    def test_everySocketServed(self) -> None:
        ejabberd = ("127.0.0.1", freePort())
        postfix = ("127.0.0.1", freePort())
        saslauthd = os.path.join(self.sockDir, "mux")
        prosody = os.path.join(self.sockDir, "prosody.sock")
        p = self.activate(
            [
                (f"{ejabberd[0]}:{ejabberd[1]}", "ejabberd"),
                (f"{postfix[0]}:{postfix[1]}", "postfix"),
                (saslauthd, "saslauthd-unix"),
                (prosody, "prosody-unix"),
            ],
            [],
            "--systemd-sockets",
        )
        with connect(ejabberd, TIMEOUT) as s:
            s.sendall(ejabberdFrame("auth:alice:example.org:pa:ss w"))
            self.assertEqual(recvExactly(s, 4), TRUE)
        with connect(postfix, TIMEOUT) as s:
            s.sendall(b"get alice@example.org\nget nobody@example.org\n")
            self.assertEqual(recvLine(s), b"200 OK")
            self.assertEqual(recvLine(s), b"500 No such user")
        with connect(saslauthd, TIMEOUT) as s:
            fields = [b"alice@example.org", b"pa:ss w", b"smtp", b""]
            s.sendall(b"".join(len(f).to_bytes(2, "big") + f for f in fields))
            length = int.from_bytes(recvExactly(s, 2), "big")
            self.assertEqual(recvExactly(s, length), b"OK success")
        with connect(prosody, TIMEOUT) as s:
            s.sendall(b"isuser:admin:example.org\n")
            self.assertEqual(recvLine(s), b"1")
        log = p.daemonOutput()
        for framing in ("ejabberd", "postfix", "saslauthd", "prosody"):
            self.assertIn(f"listening: {framing}=systemd:", log)
        self.assertNotIn("pa:ss w", log)

    def test_nameWithoutFraming(self) -> None:
        """
        A socket whose name selects no framing stops the start with a message
        naming it.
        """
        address = ("127.0.0.1", freePort())
        p = self.activate([(f"{address[0]}:{address[1]}", "xmpp")], [], "--systemd-sockets")
        try:
            with connect(address, TIMEOUT) as s:
                s.sendall(b"isuser:admin:example.org\n")
                s.recv(10)
        except OSError:
            pass
        assert p.process is not None
        self.assertNotEqual(p.process.wait(TIMEOUT), 0)
        self.assertIn("socket name 'xmpp' names no framing", p.output())


class StartupErrorTests(unittest.TestCase):
    """
    A systemd endpoint whose descriptor was not passed stops the daemon at start
    with one line naming it.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = writeConfig(
            os.path.join(self.directory, "xcauth.conf"),
            "http://127.0.0.1:9/index.php/apps/ojsxc/ajax/externalApi.php",
        )

    def twistd(self, listen: str, env: dict[str, str]) -> tuple[int, str]:
        environ = childEnv(env)
        for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            if variable not in env:
                environ.pop(variable, None)
        r = subprocess.run(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=-",
                "xcauth",
                "-c",
                self.config,
                "--listen",
                listen,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            env=environ,
        )
        text = (r.stdout + r.stderr).decode("utf-8", "replace")
        return r.returncode, text

    def lastLine(self, text: str) -> str:
        return [line for line in text.splitlines() if line.strip()][-1]

    def test_missingName(self) -> None:
        """
        No socket with that name: non-zero exit, and the message names it.
        """
        code, text = self.twistd("systemd:domain=INET:name=ejabberd-nosuch", {})
        self.assertNotEqual(code, 0, text)
        line = self.lastLine(text)
        self.assertIn("no socket named 'ejabberd-nosuch'", line)
        self.assertIn("FileDescriptorName=", line)
        self.assertNotIn("Traceback", text)

    def test_missingIndex(self) -> None:
        """
        No socket with that index: non-zero exit, and the message names it.
        """
        code, text = self.twistd("systemd:domain=INET:index=3", {})
        self.assertNotEqual(code, 0, text)
        line = self.lastLine(text)
        self.assertIn("index=3", line)
        self.assertIn("no socket with that index", line)
        self.assertNotIn("Traceback", text)

    def test_otherProcessesDescriptors(self) -> None:
        """
        C{LISTEN_PID} of another process: the descriptors are not ours, so the
        name is missing (and no stray descriptor is adopted).
        """
        code, text = self.twistd(
            "systemd:domain=INET:name=ejabberd",
            {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "ejabberd"},
        )
        self.assertNotEqual(code, 0, text)
        self.assertIn("no socket named 'ejabberd'", self.lastLine(text))
