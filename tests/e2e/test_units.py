"""
Static checks of the systemd units in C{systemd/} and of the unit the Debian
package installs (C{scripts/package-unit}).
"""

from __future__ import annotations

import glob
import os
import subprocess

from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def settings(text: str) -> dict[str, list[str]]:
    """
    Every key's values in a unit file (continuation lines joined).
    """
    values: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        if raw.startswith(("#", ";")):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit(name: str) -> dict[str, list[str]]:
    with open(os.path.join(REPO, "systemd", name)) as f:
        return settings(f.read())


class SocketPathTests(TestCase):
    def test_unixSocketsOutsideManagedDirectories(self) -> None:
        """
        No UNIX socket of a socket unit lies in a directory that the service
        creates and removes (RuntimeDirectory= and the like): a restart of the
        service would delete the path of a socket that stays open.
        """
        service = unit("xcauth.service")
        managed = [os.path.join("/run", d) for v in service.get("RuntimeDirectory", [])
                   for d in v.split()]
        managed += [os.path.join(base, d) for key, base in (
            ("StateDirectory", "/var/lib"), ("CacheDirectory", "/var/cache"),
            ("LogsDirectory", "/var/log")) for v in service.get(key, []) for d in v.split()]
        self.assertIn("/run/xcauth", managed)
        paths = []
        for path in sorted(glob.glob(os.path.join(REPO, "systemd", "*.socket"))):
            for listen in unit(os.path.basename(path)).get("ListenStream", []):
                if listen.startswith("/"):
                    paths.append(listen)
                    for directory in managed:
                        self.assertFalse(
                            listen.startswith(directory + "/"),
                            f"{os.path.basename(path)}: {listen} is in {directory}")
        self.assertIn("/run/xcauth-sockets/dovecot-auth", paths)
        self.assertIn("/run/saslauthd/mux", paths)


class PackageUnitTests(TestCase):
    def packageUnit(self) -> tuple[str, dict[str, list[str]]]:
        text = subprocess.run(
            [os.path.join(REPO, "scripts", "package-unit"),
             os.path.join(REPO, "systemd", "xcauth.service")],
            capture_output=True, text=True, check=True, timeout=30).stdout
        return text, settings(text)

    def test_systemUserAndConfigFile(self) -> None:
        """
        The package's unit runs the system's xcauth-daemon as the static user
        xcauth and reads /etc/xcauth.conf itself; everything else is the
        unit of systemd/.
        """
        text, values = self.packageUnit()
        self.assertEqual([v.split() for v in values["ExecStart"]], [[
            "/usr/bin/xcauth-daemon", "--nodaemon", "--pidfile=", "--logfile=-", "xcauth",
            "--config-file=/etc/xcauth.conf", "--systemd-sockets"]])
        self.assertEqual(values["User"], ["xcauth"])
        self.assertNotIn("DynamicUser", values)
        self.assertNotIn("RefreshOnReload", values)
        self.assertNotIn("LoadCredential", values)
        self.assertNotIn("/usr/local", text)
        self.assertNotIn("%d/", text)
        source = unit("xcauth.service")
        for key in ("StateDirectory", "WorkingDirectory", "UMask", "ProtectSystem",
                    "SystemCallFilter", "CapabilityBoundingSet", "ExecReload",
                    "RuntimeDirectory", "TimeoutStopSec"):
            self.assertEqual(values[key], source[key], key)

    def test_installedConfigInert(self) -> None:
        """
        The installed configuration is the stock backend's sample with the
        demo Nextcloud's address and credentials commented out.
        """
        text = subprocess.run(
            [os.path.join(REPO, "scripts", "installed-conf"),
             os.path.join(REPO, "xcauth-nextcloud.conf")],
            capture_output=True, text=True, check=True, timeout=30).stdout
        values = settings(text)
        self.assertEqual(values["backend"], ["nextcloud"])
        for key in ("url", "service-user", "service-password", "secret"):
            self.assertNotIn(key, values)
        self.assertNotIn("Passw0rd", text)
        self.assertNotIn("demo-secret", text)


class PackageVersionTests(TestCase):
    def test_changelogHasTheVersion(self) -> None:
        """
        The version comes from one place: debian/changelog's newest entry is
        xcauth/__init__.py's __version__ (debian/rules refuses to build
        otherwise).
        """
        from xcauth import __version__

        with open(os.path.join(REPO, "debian", "changelog")) as f:
            first = f.readline()
        self.assertTrue(first.startswith(f"xcauth ({__version__}) "), first)


class VendoredCommandsTests(TestCase):
    def test_sameEntryPointsAsSetupCfg(self) -> None:
        """
        The commands debian/rules writes for the package with vendored
        libraries (Debian 12) call the functions setup.cfg's console_scripts
        name, and those exist.
        """
        import configparser
        import importlib
        import re

        parser = configparser.ConfigParser()
        parser.read(os.path.join(REPO, "setup.cfg"))
        scripts = dict(
            (name.strip(), target.strip())
            for name, _, target in (
                line.partition("=")
                for line in parser["options.entry_points"]["console_scripts"].splitlines()
                if line.strip()
            )
        )
        with open(os.path.join(REPO, "debian", "rules")) as f:
            rules = f.read()
        match = re.search(r"for c in ((?:\S+:\S+ ?)+); do", rules)
        assert match is not None
        written = dict(pair.split(":") for pair in match.group(1).split())
        self.assertEqual({name: f"{module}:main" for name, module in written.items()}, scripts)
        for module in written.values():
            self.assertTrue(callable(importlib.import_module(module).main), module)
