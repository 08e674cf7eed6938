"""
Tests for the end-to-end harness's ports (L{tests.harness}): what
L{freePort} hands out cannot be taken by another test process or by the
kernel's port-0 and outgoing allocations, and L{Daemon.ports} reads the ports
a daemon on port 0 got.
"""

from __future__ import annotations

import fcntl
import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests import harness as processes
from tests.harness import PORT_LOCKS, PORT_RANGE, Daemon, freePort


def ephemeralRange() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(n) for n in f.read().split())
    return range(low, high + 1)


class FreePortTests(SynchronousTestCase):
    def test_outsideEphemeralRange(self) -> None:
        """
        The ports handed out are below the kernel's ephemeral range, which
        port-0 binds and outgoing connections draw from.
        """
        ephemeral = ephemeralRange()
        for _ in range(5):
            port = freePort()
            self.assertIn(port, PORT_RANGE)
            self.assertNotIn(port, ephemeral)

    def test_lockedForOtherProcesses(self) -> None:
        """
        A port handed out stays locked (another open file description, as
        another process has, cannot take the lock), and this process never
        hands it out twice.
        """
        ports = {freePort() for _ in range(10)}
        self.assertEqual(len(ports), 10)
        for port in ports:
            fd = os.open(os.path.join(PORT_LOCKS, str(port)), os.O_RDWR)
            try:
                self.assertRaises(OSError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)

    def test_portInUseSkipped(self) -> None:
        """
        A port of the range that something already listens on is skipped.
        """
        # Locks of this test's own (other test processes hold ports of the
        # real range), and a range where every port but one is taken.
        self.patch(processes, "PORT_LOCKS", os.path.abspath(self.mktemp()))
        self.patch(processes, "_heldPorts", {})
        self.patch(processes, "PORT_RANGE", range(PORT_RANGE.start, PORT_RANGE.start + 40))
        taken: list[int] = []
        free: int | None = None
        for port in processes.PORT_RANGE:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
            except OSError:
                s.close()
                continue
            if free is None:
                free = port
                s.close()
                continue
            self.addCleanup(s.close)
            taken.append(port)
        assert free is not None, "no port of the range could be bound"
        port = freePort()
        self.addCleanup(os.close, processes._heldPorts.pop(port))
        self.assertNotIn(port, taken)
        self.assertEqual(port, free)


class DaemonPortsTests(SynchronousTestCase):
    def test_portsFromLog(self) -> None:
        directory = os.path.abspath(self.mktemp())
        daemon = Daemon(directory, [])
        with open(daemon.daemonLog, "w") as f:
            f.write(
                "2026-01-01T00:00:00+0000 [xcauth.daemon.service#info] listening: "
                "ejabberd=tcp:0:interface=127.0.0.1 on 127.0.0.1 port 41234\n"
                "2026-01-01T00:00:00+0000 [xcauth.daemon.service#info] listening: "
                "saslauthd=unix:/run/x/mux\n"
                "2026-01-01T00:00:00+0000 [xcauth.daemon.service#info] listening: "
                "metrics=tcp:0:interface=::1 on ::1 port 41235\n"
            )
        self.assertEqual(
            daemon.ports(),
            {"ejabberd=tcp:0:interface=127.0.0.1": 41234,
             "metrics=tcp:0:interface=::1": 41235},
        )
        self.assertEqual(daemon.port, 41234)
