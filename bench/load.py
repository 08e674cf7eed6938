"""
What the benchmark's scenarios share: the daemon's address and secret, the
requests in ejabberd's framing, the L{Scenario} record and the load generator
processes (L{bench.loadgen}) that drive a daemon.  L{bench.run} runs the plain
scenarios, L{bench.hostile} the hostile ones; both build on this module.
"""

from __future__ import annotations

import multiprocessing
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import attr

from bench import loadgen
from xcauth.core.tokens import makeToken

HOST = "127.0.0.1"
SECRET = "bench-secret-0123456789"
DOMAIN = "example.org"
TRUE = b"\x00\x02\x00\x01"
#: Bench users the fake Nextcloud knows besides the demo users (cache misses).
BENCH_USERS = 200_000
FALSE = b"\x00\x02\x00\x00"


class ScenarioRunner(Protocol):
    """
    What a scenario's function gets: the runner with its L{bench.run.Stack}
    (the fake Nextcloud and the daemon).
    """

    stack: Any


def frame(text: str) -> bytes:
    """
    One request in ejabberd's binary framing.
    """
    data = text.encode("utf-8")
    return struct.pack(">H", len(data)) + data


def tokenRequests(n: int = 1000) -> list[tuple[bytes, bytes]]:
    """
    Token logins of C{n} different users, valid for a day.
    """
    expiry = int(time.time()) + 86400
    secret = SECRET.encode()
    return [
        (frame(f"auth:u{i}:{DOMAIN}:{makeToken(secret, f'u{i}', DOMAIN, expiry)}"), TRUE)
        for i in range(n)
    ]


def passwordRequests(n: int = 20_000) -> list[tuple[bytes, bytes]]:
    """
    Password logins of C{n} bench users (the backend says yes).  Many users,
    so that concurrent requests are never for the same user and password
    (the daemon would share one backend request between those).
    """
    return [(frame(f"auth:user{i}:{DOMAIN}:password{i}"), TRUE) for i in range(n)]


def cachedRequests() -> list[tuple[bytes, bytes]]:
    """
    Password logins of 1000 bench users, for the cache hits.
    """
    return passwordRequests(1000)


def missRequests(offset: int, n: int) -> list[tuple[bytes, bytes]]:
    """
    Password logins of C{n} bench users from C{offset} on, each once: every
    one a cache miss.
    """
    return [
        (frame(f"auth:user{i}:{DOMAIN}:password{i}"), TRUE)
        for i in range(offset, min(offset + n, BENCH_USERS))
    ]


def isUserRequests(n: int = 20_000) -> list[tuple[bytes, bytes]]:
    """
    C{isuser} of C{n} bench users (all exist).
    """
    return [(frame(f"isuser:user{i}:{DOMAIN}"), TRUE) for i in range(n)]


@attr.s(auto_attribs=True)
class Scenario:
    """
    One row of the table.

    @ivar kind: C{load} (closed loop), C{idle} (idle connections, then a
        token login probe), C{busy} (token logins while cache misses load the
        worker threads), C{flood}, C{storm}, C{outage}, C{guessing}
        (L{bench.hostile}).
    """

    name: str
    title: str
    requests: Callable[[], list[tuple[bytes, bytes]]]
    concurrency: int
    latencyMs: float = 0.0
    kind: str = "load"
    cache: bool = False
    procs: int = 0
    #: The listener's framing (C{ejabberd} or C{prosody}).
    framing: str = "ejabberd"
    #: More config options (as for L{harness.writeConfig}).
    options: dict[str, Any] = attr.Factory(dict)
    #: C{flood} scenarios: what the flooder sends (C{invalid}, C{token}, C{none}).
    flood: str = "none"
    #: C{outage} scenarios: seconds to wait before the outage (entries stale).
    stale: float = 0.0
    #: C{outage} scenarios: config options reloaded (SIGHUP) before the wait.
    staleOptions: dict[str, str] = attr.Factory(dict)


def startLoad(port: int, connections: int, procs: int, requests: list[tuple[bytes, bytes]],
              idle: bool = False, once: bool = False,
              probe: tuple[bytes, bytes] | None = None) -> list[tuple[Any, Any]]:
    """
    Start C{procs} load generator processes sharing C{connections}; wait until
    every one is connected.
    """
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, connections))
    workers = []
    for i in range(procs):
        share = connections // procs + (1 if i < connections % procs else 0)
        mine, theirs = ctx.Pipe()
        # Each process starts at another place in the request list.
        shift = (len(requests) * i) // procs
        spec = {
            "host": HOST, "port": port, "connections": share, "idle": idle,
            "requests": requests[shift:] + requests[:shift], "once": once, "probe": probe,
        }
        p = ctx.Process(target=loadgen.worker, args=(theirs, spec), daemon=True)
        p.start()
        theirs.close()
        workers.append((p, mine))
    for _, conn in workers:
        if not conn.poll(120):
            raise RuntimeError("load generator did not connect within 120 s")
        status, detail = conn.recv()
        if status != "ready":
            raise RuntimeError(f"load generator: {detail}")
    return workers


def finishLoad(workers: list[tuple[Any, Any]], timeout: float = 60.0) -> list[dict[str, Any]]:
    results = []
    for p, conn in workers:
        if not conn.poll(timeout):
            p.kill()
            raise RuntimeError("load generator did not report")
        results.append(conn.recv())
        p.join(10)
    return results


def percentile(sorted_: list[int], q: float) -> float:
    if not sorted_:
        return float("nan")
    return sorted_[min(len(sorted_) - 1, int(q * len(sorted_)))] / 1e6
