"""
C{make install DESTDIR=... PREFIX=...} into a temporary directory: the venv's
interpreter is the system's, the installed config is inert (the daemon says
what to set), the units have ExecReload= and RuntimeDirectory=, and an
interpreter the service user cannot run is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import REPO, childEnv, freePort

SYSTEM_PYTHON = "/usr/bin/python3"
PREFIX = "/opt/xcauth-test"


class InstallTests(TestCase):
    def test_install(self) -> None:
        if not os.access(SYSTEM_PYTHON, os.X_OK) or shutil.which("make") is None:
            raise SkipTest(f"needs make and {SYSTEM_PYTHON}")
        destdir = os.path.abspath(self.mktemp())
        env = childEnv()
        env.pop("PYTHON", None)
        p = subprocess.run(
            ["make", "--no-print-directory", "install", f"DESTDIR={destdir}",
             f"PREFIX={PREFIX}", "SYSCONFDIR=/etc", "SYSTEMD_UNIT_DIR=/etc/systemd/system"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        self.assertEqual(p.returncode, 0, p.stdout[-3000:] + p.stderr[-3000:])
        venv = f"{destdir}{PREFIX}/lib/xcauth/venv"
        python = os.path.join(venv, "bin", "python")
        self.assertEqual(os.path.realpath(python), os.path.realpath(SYSTEM_PYTHON))
        with open(os.path.join(venv, "pyvenv.cfg")) as f:
            self.assertIn("home = /usr/bin\n", f.read())
        for name in ("xcauth", "xcauth-daemon"):
            self.assertEqual(os.readlink(f"{destdir}{PREFIX}/bin/{name}"),
                             f"{PREFIX}/lib/xcauth/venv/bin/{name}")
        with open(f"{venv}/bin/xcauth-daemon") as f:
            # pip writes "#!/bin/sh" and an exec line when the build path is long.
            head = "".join(f.readlines()[:3])
        self.assertIn(f"{PREFIX}/lib/xcauth/venv/bin/python3", head)
        self.assertNotIn(destdir, head)
        with open(f"{destdir}/etc/systemd/system/xcauth.service") as f:
            unit = f.read()
        self.assertIn(f"ExecStart={PREFIX}/lib/xcauth/venv/bin/twistd", unit)
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID\n", unit)
        self.assertIn("RuntimeDirectory=xcauth\n", unit)

        config = f"{destdir}/etc/xcauth.conf"
        self.assertEqual(os.stat(config).st_mode & 0o777, 0o640)
        with open(config) as f:
            text = f.read()
        self.assertNotIn("demo-secret", text)
        self.assertNotIn("\nurl=", text)
        self.assertNotIn("\nsecret=", text)
        self.assertNotIn("\nservice-password=", text)
        # New installations start from the stock backend.
        self.assertIn("\nbackend=nextcloud\n", text)
        # The installed daemon (its venv, the system interpreter) refuses the
        # inert config with one line saying what to set.
        p = subprocess.run(
            [python, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "xcauth", "-c", config,
             "--listen", f"tcp:{freePort()}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60, cwd=destdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(
            p.stderr.strip().splitlines()[-1],
            "xcauth: no backend url: set url= (your Nextcloud's address), "
            "service-user= and service-password-file= in the config file",
        )

    def test_unusableInterpreterRefused(self) -> None:
        """
        An interpreter under /root or /home (pyenv's) is refused before
        anything is installed.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        fake = os.path.join(directory, "python3")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho /root/.pyenv/versions/3.11.7/bin/python3.11\n")
        os.chmod(fake, 0o755)
        destdir = os.path.join(directory, "root")
        p = subprocess.run(
            ["make", "--no-print-directory", "install", f"PYTHON={fake}",
             f"DESTDIR={destdir}", f"PREFIX={PREFIX}"],
            cwd=REPO, env=childEnv(), capture_output=True, text=True, timeout=60,
        )
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(
            f"make install: {fake} cannot run as the xcauth service user: it is "
            "/root/.pyenv/versions/3.11.7/bin/python3.11, hidden from the service by "
            "ProtectHome=yes; install with PYTHON=/usr/bin/python3", p.stderr,
        )
        self.assertFalse(os.path.exists(destdir))
