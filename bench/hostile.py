"""
The fairness scenarios: one hostile client or one hanging Nextcloud never
degrades anyone else.

=================  ==========================================================
C{flood-*}         one connection floods a prosody listener (invalid empty
                   lines, reconnecting whenever the daemon closes it; or
                   valid token logins it never reads the answers of) while
                   another client logs in with passwords (C=1, C=10)
C{bcrypt-storm}    cache-storage=db, bcrypt cost 12: a storm of first logins
                   of new users (every one queues a hash) while a cached user
                   whose backend is slow logs in again and again
C{outage-*}        2,000 users with warm cache entries log in once (C=100)
                   while the fake Nextcloud hangs (SIGSTOP: it accepts
                   connections and never answers); entries fresh, or past
                   cache-query-ttl
C{guessing-100}    100 users who logged in before log in again and again
                   (C=100, no cache storage) while 50 connections guess
                   wrong passwords for their names without pause
=================  ==========================================================

The load generators are those of L{bench.loadgen}; the flooder is
L{floodWorker}, forked the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import procstat
from bench.load import (
    DOMAIN,
    HOST,
    SECRET,
    Scenario,
    ScenarioRunner,
    finishLoad,
    frame,
    missRequests,
    passwordRequests,
    percentile,
    startLoad,
)
from tests import harness
from xcauth.core.tokens import makeToken

#: What a flooder sends per C{send}.
FLOOD_CHUNK = 256 * 1024
#: Users of the outage scenarios.
OUTAGE_USERS = 2000
#: Warm-up passes of the outage scenarios at most.
WARM_PASSES = 8
#: Concurrency of the outage's logins and of the bcrypt storm.
OUTAGE_CONCURRENCY = 100
STORM_CONCURRENCY = 100
#: The storm's users start here (the other scenarios use the first ones).
STORM_OFFSET = 100_000
#: The cached user of the bcrypt storm: the fake answers its logins after
#: 2.5 s (a slow Nextcloud, still within the 3 s backend timeout so that its
#: first login is cached); its password is bob's.
CACHED_USER = "slow2000-bob"
CACHED_PASSWORD = "bob's secret"
#: The guessing scenario: its real users, and the guessers' connections.
GUESS_USERS = 100
GUESS_CONCURRENCY = 50


def lineRequests(users: range, domain: str) -> list[tuple[bytes, bytes]]:
    """
    Prosody-framed password logins of bench users (the backend says yes).
    """
    return [(f"auth:user{i}:{domain}:password{i}\n".encode(), b"1\n") for i in users]


def floodPayload(kind: str, secret: str, domain: str) -> bytes:
    """
    C{FLOOD_CHUNK} bytes of the flood: empty lines (invalid requests), or the
    token login of alice, valid for a day, over and over.
    """
    if kind == "invalid":
        return b"\n" * FLOOD_CHUNK
    token = makeToken(secret.encode(), "alice", domain, int(time.time()) + 86400)
    line = f"auth:alice:{domain}:{token}\n".encode()
    return (line * (FLOOD_CHUNK // len(line) + 1))[:FLOOD_CHUNK]


def flood(host: str, port: int, payload: bytes, startNs: int, endNs: int) -> dict[str, Any]:
    """
    Send C{payload} over and over as fast as the socket accepts it, never
    reading, until C{endNs}; reconnect whenever the daemon closes the
    connection.  Counts the bytes the socket accepted in C{[startNs, endNs)}.
    """
    clock = time.monotonic_ns
    sent = 0
    reconnects = 0
    refused = 0
    cpuStart: float | None = None
    s: socket.socket | None = None
    while clock() < endNs:
        if cpuStart is None and clock() >= startNs:
            t = os.times()
            cpuStart = t.user + t.system
        if s is None:
            try:
                s = socket.create_connection((host, port), timeout=1.0)
            except OSError:
                refused += 1
                time.sleep(0.01)
                continue
            s.settimeout(0.1)
        try:
            n = s.send(payload)
        except TimeoutError:
            continue
        except OSError:
            # Closed by the daemon (after MAX_INVALID invalid requests).
            s.close()
            s = None
            reconnects += 1
            continue
        if clock() >= startNs:
            sent += n
    if s is not None:
        s.close()
    t = os.times()
    cpu = t.user + t.system - (cpuStart if cpuStart is not None else t.user + t.system)
    return {"ok": 0, "errors": 0, "cpu": cpu, "latencies": b"", "bytes": sent,
            "reconnects": reconnects, "refused": refused}


def floodWorker(conn: Any, spec: dict[str, Any]) -> None:
    """
    The body of a flooder process, with the protocol of L{bench.loadgen.worker}.
    """
    conn.send(("ready", 1))
    startNs, endNs = conn.recv()
    conn.send(flood(spec["host"], spec["port"], spec["payload"], startNs, endNs))


def startFlood(host: str, port: int, payload: bytes) -> list[tuple[Any, Any]]:
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=floodWorker, args=(theirs, {"host": host, "port": port,
                                                        "payload": payload}), daemon=True)
    p.start()
    theirs.close()
    if not mine.poll(30) or mine.recv()[0] != "ready":
        raise RuntimeError("flooder did not start")
    return [(p, mine)]


def latencyFigures(results: list[dict[str, Any]]) -> tuple[array[int], dict[str, Any]]:
    """
    The measured latencies (in arrival order per worker) and their figures.
    """

    lat: array[int] = array("q")
    for r in results:
        lat.frombytes(r["latencies"])
    ordered = sorted(lat)
    return lat, {
        "requests": len(ordered),
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] / 1e6 if ordered else float("nan"),
        "ok": sum(r["ok"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "wrong": sum(r.get("wrong", 0) for r in results),
    }


class Window:
    """
    CPU and memory figures of a measured window (the columns of the table).
    """

    def __init__(self, runner: ScenarioRunner, daemon: harness.Daemon) -> None:
        self.dpid = daemon.process.pid
        self.ncPids = runner.stack.nextcloudPids() if runner.stack.nextcloud else []

    def start(self) -> None:
        procstat.resetPeak(self.dpid)
        self.cpu0 = procstat.cpuSeconds(self.dpid)
        self.nc0 = sum(procstat.cpuSeconds(p) for p in self.ncPids)
        self.busy0 = procstat.machineBusy()
        self.t0 = time.monotonic_ns()

    def stop(self) -> None:
        self.wall = (time.monotonic_ns() - self.t0) / 1e9
        self.cpu = procstat.cpuSeconds(self.dpid) - self.cpu0
        self.nc = sum(procstat.cpuSeconds(p) for p in self.ncPids) - self.nc0
        self.busy = procstat.machineBusy() - self.busy0
        self.mem = procstat.memory(self.dpid)

    def figures(self, requests: int, genCpu: float) -> dict[str, Any]:
        wall = self.wall
        out = {
            "daemon_cpu_s": self.cpu,
            "daemon_cpu_pct": 100 * self.cpu / wall,
            "daemon_cpu_s_per_1000": 1000 * self.cpu / requests if requests else float("nan"),
            "daemon_peak_rss_mb": self.mem.get("VmHWM"),
            "daemon_rss_mb": self.mem.get("VmRSS"),
            "loadgen_cpu_pct": 100 * genCpu / wall,
            "nextcloud_cpu_pct": 100 * self.nc / wall if self.ncPids else None,
            "window_s": wall,
        }
        out["other_cpu_pct"] = max(
            0.0,
            100 * self.busy / wall - out["daemon_cpu_pct"] - out["loadgen_cpu_pct"]
            - (out["nextcloud_cpu_pct"] or 0.0),
        )
        return out


def sendWindow(workers: list[tuple[Any, Any]], startNs: int, endNs: int) -> None:
    for _, conn in workers:
        conn.send((startNs, endNs))


def runFlood(runner: ScenarioRunner, s: Scenario) -> dict[str, Any]:
    """
    C{flood-KIND-cC}: the other client's latency while one connection floods.
    """

    kind = s.flood
    daemon, port = runner.stack.daemon(s)
    try:
        window = Window(runner, daemon)
        flooders = (startFlood(HOST, port, floodPayload(kind, SECRET, DOMAIN))
                    if kind != "none" else [])
        workers = startLoad(port, s.concurrency, 1, lineRequests(range(20_000), DOMAIN))
        startNs = time.monotonic_ns() + int(runner.warmup * 1e9)
        endNs = startNs + int(runner.duration * 1e9)
        sendWindow(flooders + workers, startNs, endNs)
        time.sleep(max(0, (startNs - time.monotonic_ns()) / 1e9))
        window.start()
        time.sleep(max(0, (endNs - time.monotonic_ns()) / 1e9))
        window.stop()
        results = finishLoad(workers)
        floods = finishLoad(flooders, 30) if flooders else []
        _, figures = latencyFigures(results)
        figures["rps"] = figures["requests"] / runner.duration
        genCpu = sum(r["cpu"] for r in results + floods)
        figures.update(window.figures(figures["requests"], genCpu))
        if floods:
            # The daemon's CPU goes mostly to the flood: per request of the
            # other client it would mean nothing.
            figures["daemon_cpu_s_per_1000"] = None
            figures["flood"] = kind
            figures["flood_bytes_per_s"] = sum(r["bytes"] for r in floods) / runner.duration
            figures["flood_reconnects"] = sum(r["reconnects"] for r in floods)
            figures["flood_refused"] = sum(r["refused"] for r in floods)
        figures["daemon_log_mb"] = len(daemonLog(daemon)) / 2**20
        return figures
    finally:
        daemon.stop()
        runner.checkLog(daemon)


def cacheRows(path: str) -> int:
    """
    Rows of the C{authcache} table of the state database at C{path}.
    """
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM authcache").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def daemonLog(daemon: harness.Daemon) -> str:
    """
    The daemon's whole log, the files twistd rotated away included.
    """
    parts = []
    for i in range(100, 0, -1):
        try:
            with open(f"{daemon.daemonLog}.{i}", encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        except FileNotFoundError:
            pass
    return "".join(parts) + daemon.output()


def cacheWriting(daemon: harness.Daemon) -> bool:
    """
    Whether the daemon used CPU in the last 0.3 s (hashes still being made).
    """
    pid = daemon.process.pid
    before = procstat.cpuSeconds(pid)
    time.sleep(0.3)
    return procstat.cpuSeconds(pid) - before > 0.03


def runStorm(runner: ScenarioRunner, s: Scenario) -> dict[str, Any]:
    """
    C{bcrypt-storm}: the cached user's latency while new users' hashes queue.
    """

    cached = [(frame(f"auth:{CACHED_USER}:{DOMAIN}:{CACHED_PASSWORD}"), b"\x00\x02\x00\x01")]
    daemon, port = runner.stack.daemon(s)
    directory = runner.stack.lastDirectory
    db = os.path.join(directory, "xcauth.sqlite3")
    try:
        # The cached user's first login: the backend (2.5 s) says yes and a
        # bcrypt hash (cost 12) is stored in the database.
        warm = startLoad(port, 1, 1, cached, once=True)
        now = time.monotonic_ns()
        sendWindow(warm, now, now + 30_000_000_000)
        lat, first = latencyFigures(finishLoad(warm, 40))
        if first["ok"] != 1:
            raise RuntimeError(f"the cached user's first login failed: {first}")
        harness.waitFor(lambda: cacheRows(db) >= 1, "the cached user's hash", timeout=30)
    finally:
        daemon.stop()
    # A new daemon: the password is only in the database now.
    daemon, port = runner.stack.daemon(s, directory=directory)
    try:
        window = Window(runner, daemon)
        n = 3000 * int(runner.warmup + runner.duration + 1)
        storm = startLoad(port, STORM_CONCURRENCY, 1, missRequests(STORM_OFFSET, n))
        workers = startLoad(port, 1, 1, cached)
        stormStart = time.monotonic_ns()
        startNs = stormStart + int(runner.warmup * 1e9)
        endNs = startNs + int(runner.duration * 1e9)
        sendWindow(storm, stormStart, endNs)
        # The cached user starts with the window, once the storm has filled
        # the bcrypt queue: its first login needs a bcrypt check.
        time.sleep(max(0, (startNs - time.monotonic_ns()) / 1e9))
        sendWindow(workers, time.monotonic_ns(), endNs)
        window.start()
        time.sleep(max(0, (endNs - time.monotonic_ns()) / 1e9))
        window.stop()
        results = finishLoad(workers)
        stormResults = finishLoad(storm)
        lat, figures = latencyFigures(results)
        figures["rps"] = figures["requests"] / runner.duration
        figures["first_ms"] = lat[0] / 1e6 if lat else float("nan")
        rest = sorted(lat[1:])
        figures["rest_max_ms"] = rest[-1] / 1e6 if rest else float("nan")
        _, stormFigures = latencyFigures(stormResults)
        stormSeconds = (endNs - stormStart) / 1e9
        figures["storm_logins"] = stormFigures["ok"]
        figures["storm_rps"] = stormFigures["requests"] / stormSeconds
        figures["storm_p99_ms"] = stormFigures["p99_ms"]
        figures["storm_errors"] = stormFigures["errors"]
        genCpu = sum(r["cpu"] for r in results + stormResults)
        figures.update(window.figures(figures["requests"] + stormFigures["requests"], genCpu))
    finally:
        daemon.stop()
        runner.checkLog(daemon)
    rows = cacheRows(db) - 1
    figures["storm_cached"] = rows
    figures["storm_not_cached"] = figures["storm_logins"] - rows
    figures["queue_full_logged"] = "bcrypt queue full" in daemonLog(daemon)
    return figures


@contextmanager
def hanging(pids: list[int]) -> Iterator[None]:
    """
    Stop the processes C{pids} (SIGSTOP: the kernel still completes TCP
    handshakes up to the listen backlog, nothing answers) and continue them
    at the end, whatever happens.
    """
    stopped = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


def reloadWith(daemon: harness.Daemon, directory: str, options: dict[str, str]) -> None:
    """
    Add C{options} to the daemon's config file and make it reload (SIGHUP).
    """
    path = os.path.join(directory, "xcauth.conf")
    with open(path, "a") as f:
        for key, value in options.items():
            f.write(f"{key.replace('_', '-')}={value}\n")
    before = daemonLog(daemon).count("configuration reloaded from")
    daemon.process.send_signal(signal.SIGHUP)
    harness.waitFor(lambda: daemonLog(daemon).count("configuration reloaded from") > before,
                    "the daemon to reload its configuration", timeout=30)


def runOutage(runner: ScenarioRunner, s: Scenario) -> dict[str, Any]:
    """
    C{outage-fresh} and C{outage-stale}: 2,000 cached users log in while
    the fake Nextcloud hangs.
    """

    requests = passwordRequests(OUTAGE_USERS)
    daemon, port = runner.stack.daemon(s)
    db = os.path.join(runner.stack.lastDirectory, "xcauth.sqlite3")
    try:
        # Not measured: every user logs in until every password is cached
        # (a full bcrypt queue drops new hashes: a pass caches only some).
        passes = 0
        while cacheRows(db) < OUTAGE_USERS:
            passes += 1
            if passes > WARM_PASSES:
                raise RuntimeError(f"warm-up: {cacheRows(db)} of {OUTAGE_USERS} cached "
                                   f"after {WARM_PASSES} passes")
            warm = startLoad(port, 20, 1, requests, once=True)
            now = time.monotonic_ns()
            sendWindow(warm, now, now + 120_000_000_000)
            _, w = latencyFigures(finishLoad(warm, 130))
            if w["ok"] != OUTAGE_USERS:
                raise RuntimeError(f"warm-up: {w['ok']} of {OUTAGE_USERS} logins succeeded")
            harness.waitFor(lambda: not cacheWriting(daemon), "the cache writes", timeout=60)
        if s.stale:
            # Warmed with the default cache-query-ttl (with a short one, every
            # login past it queues a new hash: the warm-up would never end).
            # Now a short one (SIGHUP reloads it), and the entries get older.
            reloadWith(daemon, runner.stack.lastDirectory, s.staleOptions)
            time.sleep(s.stale)
        window = Window(runner, daemon)
        workers = startLoad(port, s.concurrency, 1, requests, once=True)
        bound = int((OUTAGE_USERS / s.concurrency + 2) * 5 + 30)
        with hanging(runner.stack.nextcloudPids()):
            window.start()
            now = time.monotonic_ns()
            # Every user once: the loop ends when all are answered.
            for _, conn in workers:
                conn.send((now, now + bound * 1_000_000_000))
            results = finishLoad(workers, bound + 10)
            window.stop()
        lat, figures = latencyFigures(results)
        figures["total_s"] = window.wall
        figures["rps"] = figures["requests"] / window.wall
        figures["within_deadline"] = sum(1 for v in lat if v < 4_000_000_000)
        genCpu = sum(r["cpu"] for r in results)
        figures.update(window.figures(figures["requests"], genCpu))
        figures["warm_passes"] = passes
        log = daemonLog(daemon)
        figures["fallback_slow"] = log.count("backend slow: ")
        figures["fallback_unavailable"] = log.count("backend unavailable: ")
        return figures
    finally:
        daemon.stop()
        runner.checkLog(daemon)
        # The fake now has a backlog of stale requests: a fresh one for what
        # runs next.
        runner.stack.stopNextcloud()


def guessRequests(users: int, domain: str, n: int = 100_000) -> list[tuple[bytes, bytes]]:
    """
    Wrong passwords (each new) for the names of the first C{users} bench
    users, in turn: a name-only attack.
    """
    return [(f"auth:user{k % users}:{domain}:guess{k}\n".encode(), b"0\n") for k in range(n)]


def runGuessing(runner: ScenarioRunner, s: Scenario) -> dict[str, Any]:
    """
    C{guessing-100}: the real users' latency during a sustained name-only
    guessing attack on their names.
    """

    daemon, port = runner.stack.daemon(s)
    try:
        # Every real user logs in once first: their passwords are known.
        warm = startLoad(port, 20, 1, s.requests(), once=True)
        now = time.monotonic_ns()
        sendWindow(warm, now, now + 60_000_000_000)
        finishLoad(warm, 90)
        attack = startLoad(port, GUESS_CONCURRENCY, 1, guessRequests(GUESS_USERS, DOMAIN))
        workers = startLoad(port, s.concurrency, 1, s.requests())
        figures = runner.measure(daemon, workers, attack)
        figures["guesses_per_s"] = figures.pop("background_rps", 0.0)
        figures["guess_errors"] = figures.pop("background_errors", 0)
        return figures
    finally:
        daemon.stop()
        runner.checkLog(daemon)


RUNNERS: dict[str, Callable[[ScenarioRunner, Scenario], dict[str, Any]]] = {
    "guessing": runGuessing,
    "flood": runFlood,
    "storm": runStorm,
    "outage": runOutage,
}


def notes(row: dict[str, Any]) -> list[str]:
    """
    The extra lines under a fairness scenario's row.
    """
    extra = []
    if "flood_bytes_per_s" in row:
        extra.append(
            f"flood ({row['flood']}): {row['flood_bytes_per_s'] / 2**10:,.0f} KiB/s accepted, "
            f"{row['flood_reconnects']} reconnects; the other client: "
            f"{row['ok']} right answers, {row['errors']} errors"
        )
    if "storm_rps" in row:
        if row["requests"]:
            rest = (f", then max {row['rest_max_ms']:.1f} ms" if row["requests"] > 1
                    else ", no other answer within the window")
            extra.append(
                f"cached user: first login (bcrypt check) {row['first_ms']:.1f} ms{rest}; "
                f"{row['ok']} right answers, {row['errors']} errors"
            )
        else:
            extra.append("cached user: no answer within the window")
        extra.append(
            f"storm (C={STORM_CONCURRENCY}): {row['storm_rps']:.0f} logins/s "
            f"(p99 {row['storm_p99_ms']:.0f} ms, {row['storm_errors']} errors), "
            f"{row['storm_logins']} new users' passwords: {row['storm_cached']} cached, "
            f"{row['storm_not_cached']} not (dropped by the full bcrypt queue or "
            "still queued at the end)"
        )
    if "guesses_per_s" in row:
        extra.append(
            f"guessers (C={GUESS_CONCURRENCY}, wrong passwords for the {GUESS_USERS} "
            f"users' names): {row['guesses_per_s']:.0f} answered/s, "
            f"{row['guess_errors']} not refused; the real users: {row['ok']} right "
            f"answers, {row['errors']} errors"
        )
    if "total_s" in row:
        extra.append(
            f"{row['requests']} users in {row['total_s']:.1f} s: {row['ok']} got 1, "
            f"{row['wrong']} got 0, {row['errors'] - row['wrong']} no answer; "
            f"{row['within_deadline']} within 4 s; "
            f"accepted from the cache after the backend was slow: {row['fallback_slow']}, "
            f"unavailable: {row['fallback_unavailable']} (warm-up: {row['warm_passes']} passes)"
        )
    return extra
