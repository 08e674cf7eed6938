"""
The documentation cannot drift: docs/configuration.md is what the settings
table generates (C{make docs}), and every relative link of README.md and
docs/ names a file that exists.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generator() -> ModuleType:
    path = os.path.join(REPO, "scripts", "configuration_doc.py")
    spec = importlib.util.spec_from_file_location("configuration_doc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConfigurationPageTests(SynchronousTestCase):
    def test_checkedInPageIsGenerated(self) -> None:
        """
        The page in docs/ is exactly what the settings table gives; after a
        change of the table, C{make docs} writes it again.
        """
        with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
            checkedIn = f.read()
        self.assertEqual(checkedIn, generator().render(),
                         "docs/configuration.md is stale: run make docs")

    def test_everySettingHasItsRow(self) -> None:
        """
        Each setting of the table, the daemon's listen and its flags have a row
        with their default.
        """
        from xcauth.daemon.config import SETTINGS
        page = generator().render()
        for s in SETTINGS:
            row = next((line for line in page.splitlines()
                        if line.startswith("| ") and f"`--{s.name}`" in line), None)
            self.assertIsNotNone(row, s.name)
            assert row is not None
            if s.default is not None:
                self.assertIn(f"| `{s.default}` |", row)
        for name in ("--listen", "--systemd-sockets", "--demo", "--debug", "--config-file"):
            self.assertIn(f"`{name}", page)


class LinkTests(SynchronousTestCase):
    def test_relativeLinksExist(self) -> None:
        """
        Every relative link (not http:, not an anchor alone) of README.md and
        docs/*.md names an existing file.
        """
        pages = [os.path.join(REPO, "README.md")] + sorted(
            glob.glob(os.path.join(REPO, "docs", "*.md")))
        missing = []
        for page in pages:
            with open(page, encoding="utf-8") as f:
                text = f.read()
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                path = os.path.normpath(
                    os.path.join(os.path.dirname(page), target.split("#")[0]))
                if not os.path.exists(path):
                    missing.append(f"{os.path.relpath(page, REPO)}: {target}")
        self.assertEqual(missing, [])
