"""
The shared roster sync end to end: the real C{twistd xcauth} daemon behind
Debian's real ejabberd (23.01 on Debian 12, 24.12 on Debian 13; an isolated
instance, L{tests.e2e.ejabberd}, with mod_roster, mod_vcard, mod_shared_roster and mod_http_api on loopback, extauth
through C{socat}), the fake Nextcloud answering shared rosters from a file the
test rewrites, and a real XMPP client (slixmpp, L{tests.e2e.xmpplogin}) logging in
and fetching its roster.

 - Through the HTTP API: after alice logs in, bob's roster shows alice in G1
   with her full name; after Nextcloud removes alice from G1 and she logs in
   again, she is gone from bob's roster.
 - Through C{ejabberdctl=} (a stand-in for the node's ejabberdctl): the same
   first step.
 - With an HTTP API that accepts connections but never answers: logins are
   answered at once and the sync's failure is logged once the command's time
   limit is over; a daemon stopped while a command hangs waits STOP_TIMEOUT (5 s) for it,
   cancels it and stops by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

from twisted.trial import unittest

from tests.e2e.ejabberd import EjabberdInstance, ejabberdAvailable
from tests.e2e.xmpplogin import fetchRoster, runLoginDetailed
from tests.harness import (
    XCAUTH,
    Daemon,
    FakeNextcloud,
    childEnv,
    freePort,
    waitFor,
    writeConfig,
)
from xcauth.roster.sync import STOP_TIMEOUT, groupId

# Sized for a loaded machine (parallel test jobs, other work): every ejabberdctl
# call boots an Erlang VM.
LOGIN_TIMEOUT = 60.0
SYNC_TIMEOUT = 180.0
ALICE, BOB = ("alice", "pa:ss w"), ("bob", "bob's secret")

MODULES = """\
  mod_admin_extra: {}
  mod_roster: {}
  mod_vcard: {}
  mod_shared_roster: {}
  mod_http_api: {}
"""


def _skipReason() -> str | None:
    reason = ejabberdAvailable()
    if reason is not None:
        return reason
    if not shutil.which("socat"):
        return "socat not installed (apt-get install socat)"
    try:
        import slixmpp  # noqa: F401
    except ImportError:
        return "slixmpp not installed (pip install -e '.[test]')"
    return None


def _api(port: int) -> tuple[str, str]:
    """
    An ejabberd_http listener with mod_http_api on 127.0.0.1:PORT/api, and the
    permission for loopback clients to run the roster sync's commands.
    """
    listener = (
        "  -\n"
        f"    port: {port}\n"
        '    ip: "127.0.0.1"\n'
        "    module: ejabberd_http\n"
        "    request_handlers:\n"
        "      /api: mod_http_api\n"
    )
    permission = (
        '  "roster sync from loopback":\n'
        "    from:\n"
        "      - mod_http_api\n"
        "    who:\n"
        "      ip: 127.0.0.1/8\n"
        "    what:\n"
        + "".join(
            f"      - {c}\n"
            for c in ("set_vcard", "srg_create", "srg_get_info", "srg_get_members", "srg_list",
                      "srg_user_add", "srg_user_del")
        )
    )
    return listener, permission


class RosterE2EMixin:
    """
    ejabberd, the daemon and the fake Nextcloud; L{rosterOptions} says how the
    daemon reaches ejabberd.
    """

    skip = _skipReason()

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.directory)
        self.rosterFile = os.path.join(self.directory, "rosters.json")
        self.writeRosters(
            alice={"alice": {"name": "Alice A", "groups": ["G1"]},
                   "bob": {"name": "Bob B", "groups": ["G1"]}},
            bob={"alice": {"name": "Alice A", "groups": ["G1"]},
                 "bob": {"name": "Bob B", "groups": ["G1"]}},
        )
        self.nextcloud = FakeNextcloud(self.directory, extraArgs=["--roster-file", self.rosterFile])
        self.addCleanup(self.nextcloud.stop)  # type: ignore[attr-defined]
        self.nextcloud.start()
        self.apiPort = freePort()
        port = freePort()
        listener, permission = _api(self.apiPort)
        self.ej = EjabberdInstance(
            os.path.join(self.directory, "ejabberd"),
            f"{shutil.which('socat')} STDIO TCP:127.0.0.1:{port}",
            modules=MODULES,
            extraListeners=listener,
            apiPermissions=permission,
        )
        os.makedirs(self.ej.dir, exist_ok=True)
        self.config = config = writeConfig(
            os.path.join(self.directory, "xcauth.conf"),
            self.nextcloud.url,
            type="ejabberd",
            deadline="15",
            timeout="10,15",
            db=os.path.join(self.directory, "xcauth.sqlite3"),
            **self.rosterOptions(),
        )
        self.daemon = Daemon(
            os.path.join(self.directory, "daemon"),
            ["-c", config, "--listen", f"ejabberd=tcp:{port}:interface=127.0.0.1"],
            waitOn=[("127.0.0.1", port)],
        )
        self.addCleanup(self.daemon.stop)  # type: ignore[attr-defined]
        # Before ejabberd: it starts its extauth programs at boot.
        self.daemon.start()
        self.addCleanup(self.ej.stop)  # type: ignore[attr-defined]
        self.ej.start()

    def rosterOptions(self) -> dict[str, str]:
        raise NotImplementedError()

    def writeRosters(self, **rosters: Any) -> None:
        with open(self.rosterFile + ".tmp", "w") as f:
            json.dump(rosters, f)
        os.replace(self.rosterFile + ".tmp", self.rosterFile)

    def login(self, user: tuple[str, str]) -> None:
        code, message = runLoginDetailed(
            "127.0.0.1", self.ej.port, f"{user[0]}@{self.ej.host}", user[1], LOGIN_TIMEOUT
        )
        self.assertEqual(code, 0, f"{message}\n{self.daemon.output()[-3000:]}")  # type: ignore[attr-defined]

    def roster(self, user: tuple[str, str]) -> dict[str, Any]:
        code, roster = fetchRoster(
            "127.0.0.1", self.ej.port, f"{user[0]}@{self.ej.host}", user[1], LOGIN_TIMEOUT
        )
        self.assertEqual(code, 0, roster)  # type: ignore[attr-defined]
        return roster  # type: ignore[no-any-return]

    def syncs(self, jid: str) -> list[str]:
        """
        The daemon's log lines of finished syncs of C{jid}.
        """
        return [
            line for line in self.daemon.output().splitlines()
            if f"roster sync of {jid}: " in line
        ]

    def waitForSyncs(self, jid: str, count: int) -> list[str]:
        waitFor(lambda: len(self.syncs(jid)) >= count, f"sync {count} of {jid}",
                timeout=SYNC_TIMEOUT)
        return self.syncs(jid)

    def assertAliceInBobsRoster(self) -> None:
        self.login(ALICE)
        lines = self.waitForSyncs("alice@example.org", 1)
        self.assertIn("roster sync of alice@example.org: 8 commands", lines[0])  # type: ignore[attr-defined]
        roster = self.roster(BOB)
        self.assertEqual(  # type: ignore[attr-defined]
            roster.get("alice@example.org", {}).get("groups"), ["G1"], roster
        )
        self.assertEqual(roster["alice@example.org"]["name"], "Alice A")  # type: ignore[attr-defined]
        self.assertEqual(roster["alice@example.org"]["subscription"], "both")  # type: ignore[attr-defined]


class HTTPAPITests(RosterE2EMixin, unittest.TestCase):
    """
    C{roster-api-url=http://127.0.0.1:PORT/api}.
    """

    def rosterOptions(self) -> dict[str, str]:
        return {"roster_api_url": f"http://127.0.0.1:{self.apiPort}/api"}

    def test_joinAndLeave(self) -> None:
        """
        Alice appears in bob's roster with her full name and group, and is gone
        once Nextcloud removed her from the group and she logged in again.
        """
        self.assertAliceInBobsRoster()
        # Bob's own sync (his login) ran, with nothing to do but look.
        self.assertIn("1 commands", self.waitForSyncs("bob@example.org", 1)[0])
        # Only alice's answer changes: her sync alone must take her out.
        self.writeRosters(
            alice=[],
            bob={"alice": {"name": "Alice A", "groups": ["G1"]},
                 "bob": {"name": "Bob B", "groups": ["G1"]}},
        )
        self.login(ALICE)
        lines = self.waitForSyncs("alice@example.org", 2)
        self.assertIn("1 commands", lines[1])
        self.assertNotIn("alice@example.org", self.roster(BOB))
        code, out = self.ej.ctl("srg_get_members", groupId("G1"), "example.org")
        self.assertEqual((code, out.split()), (0, ["bob@example.org"]))
        # The commands, while the daemon runs.
        self.assertIn("unchanged since its last sync", self.xcauth("-R", "alice", "example.org"))
        self.assertIn("forgot the roster sync state of bob@example.org",
                      self.xcauth("roster", "refresh", "bob@example.org"))
        out = self.xcauth("-R", "bob", "example.org")
        self.assertIn("roster of bob@example.org synced with", out)
        self.assertIn('  set_vcard bob example.org FN "Bob B"', out)
        self.assertIn(f"  srg_get_members {groupId('G1')} example.org", out)

    def xcauth(self, *args: str) -> str:
        result = subprocess.run(
            [XCAUTH, "-c", self.config, *args], capture_output=True, text=True,
            timeout=60, env=childEnv(), stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout


class EjabberdctlTests(RosterE2EMixin, unittest.TestCase):
    """
    C{ejabberdctl=PATH}, as configurations of older versions have it.
    """

    def rosterOptions(self) -> dict[str, str]:
        path = os.path.join(self.directory, "ejabberdctl")
        # The node's name and cookie are known before it starts.
        self.ej.ctlScript(path)
        return {"ejabberdctl": path, "roster_command_timeout": "30"}

    def test_join(self) -> None:
        self.assertAliceInBobsRoster()
        code, out = self.ej.ctl("get_vcard", "alice", "example.org", "FN")
        self.assertEqual((code, out.strip()), (0, "Alice A"))


class SilentAPIMixin(RosterE2EMixin):
    """
    An HTTP API that accepts connections and never answers; commands may take
    L{TIMEOUT} seconds.
    """

    TIMEOUT: float

    def rosterOptions(self) -> dict[str, str]:
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(16)
        self.addCleanup(self.silent.close)  # type: ignore[attr-defined]
        port = self.silent.getsockname()[1]
        return {
            "roster_api_url": f"http://127.0.0.1:{port}/api",
            "roster_command_timeout": str(self.TIMEOUT),
        }


class UnreachableAPITests(SilentAPIMixin, unittest.TestCase):
    """
    Logins while the API does not answer.
    """

    TIMEOUT = 30.0

    def test_loginsNotDelayed(self) -> None:
        """
        Logins are answered while the sync's command hangs; the failure is
        logged with the command's name once its time limit is over.
        """
        started = time.monotonic()
        self.login(ALICE)
        self.login(ALICE)
        elapsed = time.monotonic() - started
        failure = "roster sync of alice@example.org failed: set_vcard failed with timeout"
        if elapsed < self.TIMEOUT:
            # Answered before the command could have given up.
            self.assertNotIn(failure, self.daemon.output())
        self.assertLess(elapsed, self.TIMEOUT, "logins waited for the roster sync")
        waitFor(lambda: failure in self.daemon.output(), "the failure logged",
                timeout=SYNC_TIMEOUT)
        self.assertIn("no answer within 30 s", self.daemon.output())


class StopDuringSyncTests(SilentAPIMixin, unittest.TestCase):
    """
    A daemon told to stop while a sync's command hangs (for longer than the
    stop timeout) waits a bounded time for it, then stops by itself.
    """

    TIMEOUT = 120.0

    def test_stopBounded(self) -> None:
        self.login(ALICE)
        # The sync's first command reached the API (which never answers).
        self.silent.settimeout(SYNC_TIMEOUT)
        connection, _ = self.silent.accept()
        self.addCleanup(connection.close)
        started = time.monotonic()
        status = self.daemon.stop(timeout=60)
        elapsed = time.monotonic() - started
        output = self.daemon.output()
        self.assertIn("waiting for 1 roster syncs", output)
        self.assertIn(f"roster syncs still running after {STOP_TIMEOUT} s: cancelled", output)
        # A clean stop: twistd ends by raising the SIGTERM it got again once
        # it has shut down (not killed by the harness's SIGKILL).
        self.assertIn("Server Shut Down.", output)
        self.assertIn(status, (0, -15), output[-3000:])
        self.assertLess(elapsed, 60)
