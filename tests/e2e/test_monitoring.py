"""
Tests for C{monitoring/}: the Prometheus alert rules load and fire as their
unit tests say (C{promtool check rules}, C{promtool test rules}, from Debian's
C{prometheus} package), and every query of the Grafana dashboard parses and
names only metrics the daemon serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase

from xcauth.daemon.metrics import Metrics
from xcauth.interfaces import Outcome

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MONITORING = os.path.join(REPO, "monitoring")
DASHBOARD = os.path.join(MONITORING, "xcauth-dashboard.json")
ALERTS = os.path.join(MONITORING, "xcauth-alerts.yml")

#: Grafana's variables, replaced by values Prometheus parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$instance": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise SkipTest("promtool is missing (apt-get install prometheus; make test "
                       "installs it)")
    return path


def run(*args: str, cwd: str = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def servedNames() -> set[str]:
    """
    Every sample name a daemon with every kind of series serves.
    """
    clock = Clock()
    m = Metrics(clock, process=False, backends=("jsxc", "nextcloud"))
    m.serving("prosody", lambda: 1)
    m.request("prosody", "auth", "true", 0.01)
    m.backend(Outcome.YES, "nextcloud", m.now())
    m.throttle("https://cloud.example.org", 0.0, True)
    text = generate_latest(m.registry).decode("utf-8")
    return {s.name for family in text_string_to_metric_families(text)
            for s in family.samples}


def dashboardQueries() -> list[tuple[str, str]]:
    """
    C{(panel title, PromQL)} of every target and query variable of the
    dashboard.
    """
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    queries: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return queries


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


class AlertRulesTests(TestCase):
    def test_rulesLoad(self) -> None:
        result = run("check", "rules", ALERTS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 6 rules found", result.stdout)

    def test_rulesFire(self) -> None:
        """
        promtool's unit tests of the rules: each alert fires on the series
        that should raise it (after its "for"), not before.
        """
        result = run("test", "rules", "xcauth-alerts.test.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_rulesNameServedMetrics(self) -> None:
        with open(ALERTS) as f:
            names = set(re.findall(r"\bxcauth_[a-z_]+\b", f.read()))
        self.assertTrue(names)
        self.assertEqual(names - servedNames(), set())


class DashboardTests(TestCase):
    def test_importable(self) -> None:
        """
        The dashboard is one JSON object Grafana imports: a title, a uid, a
        Prometheus data source variable every panel uses, unique panel ids.
        """
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        self.assertEqual(dashboard["uid"], "xcauth-overview")
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        ids = [p["id"] for p in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
                self.assertTrue(panel["targets"], panel["title"])

    def test_queriesParse(self) -> None:
        """
        Every query parses (promtool checks each as a recording rule).
        """
        queries = dashboardQueries()
        self.assertGreaterEqual(len(queries), 15)
        rules = ["groups:", "  - name: dashboard", "    rules:"]
        for i, (_, expr) in enumerate(queries):
            rules += [f"      - record: dashboard:query_{i}",
                      f"        expr: {json.dumps(substitute(expr))}"]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("\n".join(rules) + "\n")
        result = run("check", "rules", path)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(queries)} rules found", result.stdout)

    def test_brokenQueryRefused(self) -> None:
        """
        The check above can fail: a broken query is refused.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("groups:\n  - name: x\n    rules:\n      - record: x:y\n"
                    "        expr: 'sum by (result) (rate(xcauth_requests_total[5m])'\n")
        self.assertNotEqual(run("check", "rules", path).returncode, 0)

    def test_queriesNameServedMetrics(self) -> None:
        """
        Every xcauth metric a query names is one the daemon serves (a renamed
        family would leave an empty panel).
        """
        served = servedNames()
        for title, expr in dashboardQueries():
            for name in re.findall(r"\bxcauth_[a-z_]+\b", expr):
                self.assertIn(name, served, f"{title}: {expr}")
        self.assertIn("xcauth_cache_decisions_total", served)
