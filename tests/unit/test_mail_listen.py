"""
Tests for selecting the mail framings in listen entries: C{FRAMING=}, systemd
descriptor names, C{--type}, the C{group=} argument of UNIX sockets, and UNIX
sockets inherited from systemd.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.protocols.wire import Echo
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import writeConfig
from xcauth.daemon.config import ConfigError
from xcauth.daemon.listen import (
    framingFromSystemdName,
    groupID,
    splitListen,
    splitUnixGroup,
    systemdUNIXForm,
    unixSocketPath,
)
from xcauth.daemon.systemdunix import SystemdUNIXEndpoint
from xcauth.daemon.tap import Options


class FramingSelectionTests(SynchronousTestCase):
    def test_explicit(self) -> None:
        self.assertEqual(splitListen("postfix=tcp:23665:interface=127.0.0.1", "generic"),
                         ("postfix", "tcp:23665:interface=127.0.0.1"))
        self.assertEqual(splitListen("saslauthd=unix:/run/saslauthd/mux", "generic"),
                         ("saslauthd", "unix:/run/saslauthd/mux"))

    def test_systemdNames(self) -> None:
        for name, framing in (("postfix", "postfix"), ("postfix-v6", "postfix"),
                              ("saslauthd", "saslauthd"), ("saslauthd-v6", "saslauthd"),
                              ("saslauthd-unix", "saslauthd")):
            self.assertEqual(
                framingFromSystemdName(f"systemd:domain=INET:name={name}"), framing
            )
        self.assertEqual(framingFromSystemdName("systemd:domain=UNIX:name=saslauthd-unix"),
                         "saslauthd")


class GroupTests(SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(
            splitUnixGroup("unix:/run/saslauthd/mux:mode=660:group=sasl"),
            ("unix:/run/saslauthd/mux:mode=660", "sasl"),
        )
        self.assertEqual(splitUnixGroup("unix:/run/x:group=sasl:mode=660"),
                         ("unix:/run/x:mode=660", "sasl"))
        self.assertEqual(splitUnixGroup("unix:/run/x:mode=660"), ("unix:/run/x:mode=660", None))
        self.assertEqual(splitUnixGroup("tcp:23666"), ("tcp:23666", None))

    def test_escapedColon(self) -> None:
        """
        A path with an escaped C{:} is one argument.
        """
        self.assertEqual(splitUnixGroup("unix:/run/a\\:group=b:group=c"),
                         ("unix:/run/a\\:group=b", "c"))
        self.assertEqual(unixSocketPath("unix:/run/a\\:b:mode=660"), "/run/a:b")
        self.assertEqual(unixSocketPath("unix:mode=660:address=/run/m"), "/run/m")

    def test_errors(self) -> None:
        for entry in ("tcp:23666:group=sasl", "systemd:domain=UNIX:name=x:group=sasl",
                      "unix:/x:group=", "unix:/x:group=a:group=b"):
            self.assertRaises(ConfigError, splitUnixGroup, entry)

    def test_groupID(self) -> None:
        name = grp.getgrgid(os.getegid()).gr_name
        self.assertEqual(groupID("x", name), os.getegid())
        self.assertEqual(groupID("x", "12345"), 12345)
        e = self.assertRaises(ConfigError, groupID, "unix:/x:group=no-such-group-xc",
                              "no-such-group-xc")
        self.assertIn("no group named 'no-such-group-xc'", str(e))


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        config = writeConfig(self.mktemp(), "http://127.0.0.1:9/x")
        options = Options()
        options.parseOptions(["--config-file", config, *args])
        return options

    def test_typeAccepted(self) -> None:
        for framing in ("saslauthd", "postfix"):
            options = self.parse("--type", framing, "--listen", "tcp:0:interface=127.0.0.1")
            self.assertEqual(
                [(li.framing, li.entry) for li in options.listeners],
                [(framing, "tcp:0:interface=127.0.0.1")],
            )

    def test_helpMentionsMailFramings(self) -> None:
        text = str(Options())
        for framing in ("saslauthd", "postfix"):
            self.assertIn(framing, text)

    def test_unixGroupAccepted(self) -> None:
        name = grp.getgrgid(os.getegid()).gr_name
        entry = f"saslauthd=unix:{self.mktemp()}:mode=660:group={name}"
        options = self.parse("--listen", entry)
        self.assertEqual(options.listeners[0].framing, "saslauthd")

    def test_unknownGroupStopsStart(self) -> None:
        e = self.assertRaises(
            SystemExit, self.parse,
            "--listen", "saslauthd=unix:/tmp/x:mode=660:group=no-such-group-xc",
        )
        self.assertIn("no group named", str(e))


class SystemdUNIXSocketTests(TestCase):
    """
    A UNIX socket inherited from systemd keeps its mode and its file.
    """

    def listeningSocket(self) -> tuple[socket.socket, str]:
        directory = tempfile.mkdtemp(prefix="xcauth-sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "mux")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        os.chmod(path, 0o640)
        sock.listen(5)
        self.addCleanup(sock.close)
        return sock, path

    def test_keptAsItIs(self) -> None:
        from twisted.internet import reactor

        sock, path = self.listeningSocket()
        endpoint = SystemdUNIXEndpoint(reactor, os.dup(sock.fileno()))
        factory = ServerFactory.forProtocol(Echo)
        d = endpoint.listen(factory)

        def listening(port: Any) -> Any:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
            self.assertEqual(port.getHost().name, path.encode())
            client = ClientFactory.forProtocol(Protocol)
            connected = UNIXClientEndpoint(reactor, path).connect(client)

            def close(protocol: Any) -> Any:
                protocol.transport.loseConnection()
                return port.stopListening()

            return connected.addCallback(close)

        def stopped(_: Any) -> None:
            self.assertTrue(os.path.exists(path))
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

        return d.addCallback(listening).addCallback(stopped)

    def test_systemdUNIXDescriptions(self) -> None:
        """
        C{systemd:domain=UNIX:...} listeners use the endpoint type that keeps
        the socket as it is; other descriptions are left alone.
        """
        self.assertEqual(
            systemdUNIXForm("systemd:domain=UNIX:name=saslauthd-unix"),
            "xcauth-systemd-unix:name=saslauthd-unix",
        )
        self.assertEqual(systemdUNIXForm("systemd:index=0:domain=UNIX"),
                         "xcauth-systemd-unix:index=0")
        for other in ("systemd:domain=INET:name=ejabberd", "unix:/run/x:mode=660",
                      "tcp:1:interface=127.0.0.1"):
            self.assertEqual(systemdUNIXForm(other), other)

    def test_endpointPlugin(self) -> None:
        """
        Twisted finds the C{xcauth-systemd-unix} endpoint type through its
        plugin: a name systemd did not pass is a C{KeyError} (which the options
        turn into "no socket named ... was passed by systemd").
        """
        from twisted.internet import reactor

        self.assertRaises(
            KeyError, serverFromString, reactor, "xcauth-systemd-unix:name=not-passed"
        )
        self.assertRaises(
            ValueError, serverFromString, reactor, "xcauth-systemd-unix:name=a:index=0"
        )
