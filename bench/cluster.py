"""
Two nodes: two daemons side by side, the load split evenly between them, each
with its own SQLite file (what a cluster does without a shared store) or both
on one PostgreSQL (the tests' own server, L{tests.postgres}), with
the credential cache in the database (bcrypt cost 4).

 - C{token}: token logins, no backend and no database;
 - C{backend}: password logins of users never seen, each a cache miss: a
   backend call, a bcrypt hash and a database write;
 - C{cache-hit}: the users' passwords cached beforehand through both nodes,
   then logins answered from the cache (the backend at +50 ms).

The CPU and memory columns are node A's.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import attr

from bench.load import (
    Scenario,
    ScenarioRunner,
    cachedRequests,
    finishLoad,
    passwordRequests,
    startLoad,
    tokenRequests,
)
from tests import postgres


class ClusterRunner(ScenarioRunner, Protocol):
    """
    What L{runCluster} needs of L{bench.run.Runner}.
    """

    def measure(self, daemon: Any, workers: list[Any]) -> dict[str, Any]: ...

    def checkLog(self, daemon: Any) -> None: ...

ENGINES = ("sqlite", "postgresql")
KINDS = ("token", "backend", "cache-hit")
CONCURRENCY = 50


def scenarios() -> list[Scenario]:
    """
    The two-node scenarios, SQLite and PostgreSQL next to each other.
    """
    requests = {"token": tokenRequests, "backend": passwordRequests,
                "cache-hit": cachedRequests}
    out = []
    for kind in KINDS:
        for engine in ENGINES:
            short = "pg" if engine == "postgresql" else engine
            out.append(Scenario(
                f"2nodes-{short}-{kind}", f"two nodes on {engine}: {kind}",
                requests[kind], CONCURRENCY, 50 if kind == "cache-hit" else 0,
                kind="cluster", cache=True,
                options={"cache_storage": "db", "cache_bcrypt_rounds": "4,4",
                         "engine": engine, "load": kind},
            ))
    return out


def runCluster(runner: ClusterRunner, s: Scenario) -> dict[str, Any]:
    """
    Start both nodes, warm the cache if the scenario needs it, measure.
    """
    options = dict(s.options)
    engine = options.pop("engine")
    kind = options.pop("load")
    cleanup = []
    if engine == "postgresql":
        try:
            server = postgres.server()
        except postgres.Unavailable as e:
            return {"skipped": f"no PostgreSQL: {e}"}
        name = server.newDatabase()
        cleanup.append(lambda: server.dropDatabase(name))
        pwfile = os.path.join(runner.stack.directory, f"{name}.password")
        with open(pwfile, "w") as f:
            f.write(postgres.PASSWORD + "\n")
        shared = {"db": server.url(name), "db_password_file": pwfile}
    daemons = []
    try:
        for node in ("a", "b"):
            nodeOptions = dict(options)
            if engine == "postgresql":
                nodeOptions.update(shared)
            scenario = attr.evolve(s, name=f"{s.name}-{node}", options=nodeOptions)
            daemons.append(runner.stack.daemon(scenario))
        if kind == "cache-hit":
            for _, port in daemons:
                warm = startLoad(port, 25, 1, s.requests(), once=True)
                now = time.monotonic_ns()
                for _, conn in warm:
                    conn.send((now, now + 60_000_000_000))
                finishLoad(warm, 90)
        half = s.concurrency // 2
        workers = []
        for i, (_, port) in enumerate(daemons):
            requests = s.requests()
            if kind == "backend":
                # Distinct users on each node: every login a miss.
                requests = requests[i::2]
            workers += startLoad(port, half, 1, requests)
        return runner.measure(daemons[0][0], workers)
    finally:
        for daemon, _ in daemons:
            daemon.stop()
            runner.checkLog(daemon)
        for f in cleanup:
            f()

