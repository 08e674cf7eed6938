"""
Run the benchmark scenarios and report them.

Every scenario starts a fresh C{twistd -n xcauth} daemon (logging to a file at
info level, as in production) listening on loopback, in front of the fake
Nextcloud (L{xcauth.testing.fakenextcloud}) with an added latency, and drives
it with load generator processes (L{bench.loadgen}) for a warm-up, then a
measured window.  Daemon CPU comes from C{/proc/PID/stat} over the window,
its peak RSS from C{VmHWM} (reset at the start of the window).

Usage::

    python -m bench [--quick] [--scenario NAME ...] [--duration S] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Any

from bench import cluster, hostile, procstat
from bench.load import (
    BENCH_USERS,
    DOMAIN,
    HOST,
    SECRET,
    Scenario,
    cachedRequests,
    finishLoad,
    isUserRequests,
    missRequests,
    passwordRequests,
    percentile,
    startLoad,
    tokenRequests,
)
from tests import harness

REPO = harness.REPO

IDLE_CONNECTIONS = 10_000


def scenarios() -> list[Scenario]:
    """
    Every scenario, in the order they run.
    """
    out = []
    for c in (1, 50, 500):
        out.append(Scenario(f"token-c{c}", "token login (no backend)", tokenRequests, c))
    for lat in (0, 50):
        for c in (1, 50, 500):
            out.append(
                Scenario(f"backend-{lat}ms-c{c}", f"password login, backend +{lat} ms",
                         passwordRequests, c, lat)
            )
    out.append(Scenario("isuser-50ms-c500", "isuser, backend +50 ms", isUserRequests, 500, 50))
    out.append(
        Scenario("idle-10k", f"token login C=1 with {IDLE_CONNECTIONS} idle connections",
                 tokenRequests, 1, kind="idle")
    )
    out.append(
        Scenario("cache-hit-c50", "password login, bcrypt cache hit, backend +50 ms",
                 cachedRequests, 50, 50, cache=True)
    )
    out.append(
        Scenario("token-c50-misses", "token login C=50 while cache misses (C=20) run",
                 tokenRequests, 50, 50, kind="busy", cache=True)
    )
    for flood, what in (("none", "no flood"), ("invalid", "invalid-request flood"),
                        ("token", "unread token-login flood")):
        for c in (1, 10):
            out.append(
                Scenario(f"flood-{flood}-c{c}", f"prosody password login, +50 ms, {what}",
                         passwordRequests, c, 50, kind="flood", framing="prosody",
                         flood=flood)
            )
    out.append(
        Scenario("bcrypt-storm", "cached user (db, bcrypt 12) during a first-login storm",
                 passwordRequests, 1, 50, kind="storm", cache=True,
                 options={"cache_storage": "db", "cache_bcrypt_rounds": "12,4"})
    )
    # In the database (its rows tell when the warm-up has cached every
    # password), with the cheap bcrypt cost the memory storage uses.
    outage = {"cache_storage": "db", "cache_bcrypt_rounds": "4,4"}
    out.append(
        Scenario("outage-fresh", f"{hostile.OUTAGE_USERS} cached users, Nextcloud hangs",
                 passwordRequests, hostile.OUTAGE_CONCURRENCY, 50, kind="outage", cache=True,
                 options=outage)
    )
    out.append(
        Scenario("outage-stale", "same, entries past cache-query-ttl=1s",
                 passwordRequests, hostile.OUTAGE_CONCURRENCY, 50, kind="outage", cache=True,
                 options=outage, stale=2.0, staleOptions={"cache_query_ttl": "1s"})
    )
    out.append(
        Scenario("guessing-100",
                 f"{hostile.GUESS_USERS} users log in (+50 ms) during name-only guessing",
                 lambda: hostile.lineRequests(range(hostile.GUESS_USERS), DOMAIN),
                 hostile.GUESS_USERS, 50, kind="guessing", framing="prosody")
    )
    out.extend(cluster.scenarios())
    return out


def cacheSupported() -> bool:
    """
    Whether this version of xcauth has the credential cache.
    """
    from xcauth.daemon import config
    names = {p[0] for p in config.ConfigOptions.optParameters}
    return "cache-storage" in names and "cache-storage" not in config.IGNORED_KEYS


def raiseFileLimit(want: int) -> int:
    """
    Raise this process's open file limit (children inherit it) towards
    C{want}; return the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


class Stack:
    """
    The fake Nextcloud (kept across scenarios with the same latency) and a
    fresh daemon per scenario.
    """

    def __init__(
        self, directory: str, nextcloudMode: str, nextcloudProcs: int, logRequests: str = "all"
    ) -> None:
        self.directory = directory
        self.logRequests = logRequests
        self.nextcloudMode = nextcloudMode
        self.nextcloudProcs = nextcloudProcs
        self.nextcloud: harness.Process | None = None
        self.latency: float | None = None
        self.port = 0
        self.count = 0
        self.lastDirectory = ""

    def nextcloudFor(self, latencyMs: float) -> harness.Process:
        if self.nextcloud is not None and self.latency == latencyMs:
            return self.nextcloud
        self.stopNextcloud()
        d = os.path.join(self.directory, f"nextcloud-{latencyMs:g}ms")
        os.makedirs(d, exist_ok=True)
        portFile = os.path.join(d, "port")
        if os.path.exists(portFile):
            os.unlink(portFile)
        argv = [
            sys.executable, "-m", "xcauth.testing.fakenextcloud", "--port", "0",
            "--secret", SECRET, "--latency", str(latencyMs), "--port-file", portFile,
            "--bench-users", str(BENCH_USERS),
        ]
        if self.nextcloudMode == "fast":
            argv += ["--fast", "--processes", str(self.nextcloudProcs)]
        nc = harness.Process(argv, os.path.join(d, "nextcloud.log"))
        nc.start()
        harness.waitFor(lambda: os.path.exists(portFile), "fake Nextcloud port file",
                        process=nc.process)
        with open(portFile) as f:
            self.port = int(f.read())
        self.nextcloud = nc
        self.latency = latencyMs
        return nc

    def nextcloudPids(self) -> list[int]:
        """
        The fake Nextcloud's process and its children (C{--processes}).
        """
        assert self.nextcloud is not None and self.nextcloud.process is not None
        pid = self.nextcloud.process.pid
        pids = [pid]
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        return pids

    def stopNextcloud(self) -> None:
        if self.nextcloud is not None:
            if self.nextcloud.process is not None and self.nextcloud.process.poll() is None:
                # Stopped by an outage scenario interrupted: SIGTERM needs it running.
                for pid in self.nextcloudPids():
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass
            self.nextcloud.stop()
            self.nextcloud = None

    def daemon(self, scenario: Scenario,
               directory: str | None = None) -> tuple[harness.Daemon, int]:
        """
        A fresh daemon for C{scenario} (in C{directory}: again, with the same
        state database).
        """
        if directory is None:
            self.count += 1
            directory = os.path.join(self.directory, f"{self.count:02d}-{scenario.name}")
        d = directory
        os.makedirs(d, exist_ok=True)
        url = f"http://{HOST}:{self.port}/index.php/apps/ojsxc/ajax/externalApi.php"
        # A state database of its own: never the system's (its domains table
        # could send requests elsewhere).
        options: dict[str, Any] = {"type": "ejabberd",
                                   "db": os.path.join(d, "xcauth.sqlite3"),
                                   "log_requests": self.logRequests}
        if scenario.cache:
            options["cache_storage"] = "memory"
        options.update(scenario.options)
        if os.environ.get("BENCH_METRICS"):  # metrics: serve them (counting is measured)
            options["metrics"] = f"tcp:{harness.freePort()}:interface={HOST}"  # metrics
        config = harness.writeConfig(os.path.join(d, "xcauth.conf"), url, SECRET, **options)
        port = harness.freePort()
        daemon = harness.Daemon(
            d,
            ["--config-file", config,
             "--listen", f"{scenario.framing}=tcp:{port}:interface={HOST}"],
            waitOn=[(HOST, port)],
        )
        daemon.start()
        self.lastDirectory = d
        return daemon, port


class Runner:
    def __init__(self, stack: Stack, warmup: float, duration: float, procs: int,
                 profile: str | None = None) -> None:
        self.profile = profile
        self.stack = stack
        self.warmup = warmup
        self.duration = duration
        self.procs = procs

    def measure(self, daemon: harness.Daemon, workers: list[tuple[Any, Any]],
                background: list[tuple[Any, Any]] = ()) -> dict[str, Any]:
        """
        Run C{workers} (and C{background}, not counted) through the warm-up and
        the measured window; return the figures.
        """
        dpid = daemon.process.pid
        ncPids = self.stack.nextcloudPids() if self.stack.nextcloud else []
        startNs = time.monotonic_ns() + int(self.warmup * 1e9)
        endNs = startNs + int(self.duration * 1e9)
        for _, conn in list(workers) + list(background):
            conn.send((startNs, endNs))
        time.sleep(max(0, (startNs - time.monotonic_ns()) / 1e9))
        procstat.resetPeak(dpid)
        spy = self.startProfile(dpid)
        cpu0 = procstat.cpuSeconds(dpid)
        nc0 = sum(procstat.cpuSeconds(p) for p in ncPids)
        busy0 = procstat.machineBusy()
        t0 = time.monotonic_ns()
        time.sleep(max(0, (endNs - time.monotonic_ns()) / 1e9))
        cpu1 = procstat.cpuSeconds(dpid)
        nc1 = sum(procstat.cpuSeconds(p) for p in ncPids)
        busy1 = procstat.machineBusy()
        wall = (time.monotonic_ns() - t0) / 1e9
        mem = procstat.memory(dpid)
        if spy is not None:
            spy.wait(30)
        results = finishLoad(workers)
        bgResults = finishLoad(list(background)) if background else []
        lat = array("q")
        for r in results:
            lat.frombytes(r["latencies"])
        ordered = sorted(lat)
        ok = sum(r["ok"] for r in results)
        errors = sum(r["errors"] for r in results)
        count = len(ordered)
        daemonCpu = cpu1 - cpu0
        figures = {
            "requests": count,
            "rps": count / self.duration,
            "p50_ms": percentile(ordered, 0.50),
            "p99_ms": percentile(ordered, 0.99),
            "max_ms": ordered[-1] / 1e6 if ordered else float("nan"),
            "errors": errors,
            "ok": ok,
            "daemon_cpu_s": daemonCpu,
            "daemon_cpu_pct": 100 * daemonCpu / wall,
            "daemon_cpu_s_per_1000": 1000 * daemonCpu / count if count else float("nan"),
            "daemon_peak_rss_mb": mem.get("VmHWM"),
            "daemon_rss_mb": mem.get("VmRSS"),
            "loadgen_procs": len(results),
            "loadgen_cpu_pct": 100 * sum(r["cpu"] for r in results) / self.duration,
            "nextcloud_cpu_pct": 100 * (nc1 - nc0) / wall if ncPids else None,
        }
        if bgResults:
            bgCount = sum(len(r["latencies"]) // 8 for r in bgResults)
            figures["background_rps"] = bgCount / self.duration
            figures["background_errors"] = sum(r["errors"] for r in bgResults)
            figures["loadgen_cpu_pct"] += 100 * sum(r["cpu"] for r in bgResults) / self.duration
        # Whatever else ran on the machine meanwhile (other programs, the
        # kernel's own threads): a high figure means a disturbed run.
        figures["other_cpu_pct"] = max(
            0.0,
            100 * (busy1 - busy0) / wall
            - figures["daemon_cpu_pct"]
            - figures["loadgen_cpu_pct"]
            - (figures["nextcloud_cpu_pct"] or 0.0),
        )
        return figures

    def startProfile(self, pid: int) -> subprocess.Popen[bytes] | None:
        """
        Sample the daemon with py-spy during the window (C{--profile DIR}).
        """
        if not self.profile:
            return None
        os.makedirs(self.profile, exist_ok=True)
        self.profileCount = getattr(self, "profileCount", 0) + 1
        out = os.path.join(self.profile, f"{self.profileCount:02d}-{self.current}")
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        return subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(self.duration))),
             "--rate", "250", "--nonblocking", "--format", "raw", "-o", out + ".txt"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def run(self, s: Scenario) -> dict[str, Any]:
        self.current = s.name
        self.stack.nextcloudFor(s.latencyMs)
        if s.kind in hostile.RUNNERS:
            return hostile.RUNNERS[s.kind](self, s)
        if s.kind == "cluster":
            return cluster.runCluster(self, s)
        daemon, port = self.stack.daemon(s)
        try:
            procs = s.procs or self.procs or 1
            if s.kind == "idle":
                return self.runIdle(s, daemon, port)
            background = []
            if s.kind == "busy":
                n = int(2000 * (self.warmup + self.duration) + 1000)
                background = startLoad(port, 20, 1, missRequests(0, n))
            elif s.cache:
                # Fill the cache: one backend login per user before the run.
                warm = startLoad(port, 50, 1, s.requests(), once=True)
                now = time.monotonic_ns()
                for _, conn in warm:
                    conn.send((now, now + 60_000_000_000))
                finishLoad(warm, 90)
            workers = startLoad(port, s.concurrency, procs, s.requests())
            return self.measure(daemon, workers, background)
        finally:
            daemon.stop()
            self.checkLog(daemon)

    def runIdle(self, s: Scenario, daemon: harness.Daemon, port: int) -> dict[str, Any]:
        dpid = daemon.process.pid
        time.sleep(0.5)
        before = procstat.memory(dpid)["VmRSS"]
        files = procstat.openFiles(dpid)
        t0 = time.monotonic()
        idle = startLoad(port, IDLE_CONNECTIONS, 1, [], idle=True,
                         probe=s.requests()[0])
        harness.waitFor(lambda: procstat.openFiles(dpid) >= files + IDLE_CONNECTIONS,
                        "the daemon to accept the idle connections", timeout=120)
        connectSeconds = time.monotonic() - t0
        time.sleep(0.5)
        after = procstat.memory(dpid)["VmRSS"]
        try:
            workers = startLoad(port, s.concurrency, 1, s.requests())
            figures = self.measure(daemon, workers)
        finally:
            for _, conn in idle:
                conn.send("stop")
            finishLoad(idle)
        figures.update(
            rss_before_idle_mb=before,
            rss_with_idle_mb=after,
            idle_connections=IDLE_CONNECTIONS,
            idle_connect_s=connectSeconds,
        )
        return figures

    def checkLog(self, daemon: harness.Daemon) -> None:
        text = daemon.output()
        if "Traceback" in text or "Unhandled" in text:
            print(f"  note: the daemon logged errors, see {daemon.daemonLog}", file=sys.stderr)


COLUMNS = [
    ("scenario", "{:<18}", "name"),
    ("C", "{:>5}", "concurrency"),
    ("req/s", "{:>8.0f}", "rps"),
    ("p50 ms", "{:>7.2f}", "p50_ms"),
    ("p99 ms", "{:>7.2f}", "p99_ms"),
    ("max ms", "{:>7.1f}", "max_ms"),
    ("err", "{:>4}", "errors"),
    ("CPU s/1k", "{:>8.3f}", "daemon_cpu_s_per_1000"),
    ("dCPU%", "{:>5.0f}", "daemon_cpu_pct"),
    ("RSS MB", "{:>6.1f}", "daemon_peak_rss_mb"),
    ("genCPU%", "{:>7.0f}", "loadgen_cpu_pct"),
    ("ncCPU%", "{:>6.0f}", "nextcloud_cpu_pct"),
    ("othCPU%", "{:>7.0f}", "other_cpu_pct"),
]


def formatRow(row: dict[str, Any]) -> str:
    cells = []
    for _, fmt, key in COLUMNS:
        value = row.get(key)
        width = len(fmt.format(*([0] if "f" in fmt or ">" in fmt else [""])))
        if value is None:
            cells.append(" " * max(0, width - 1) + "-")
        else:
            cells.append(fmt.format(value))
    return "  ".join(cells)


def header() -> str:
    cells = []
    for title, fmt, _ in COLUMNS:
        width = len(fmt.format(*([0] if "f" in fmt or ">" in fmt else [""])))
        cells.append(title.ljust(width) if "<" in fmt else title.rjust(width))
    return "  ".join(cells)


def notes(row: dict[str, Any]) -> str:
    extra = []
    if "rss_with_idle_mb" in row:
        extra.append(
            f"RSS {row['rss_before_idle_mb']:.1f} MB before, {row['rss_with_idle_mb']:.1f} MB "
            f"with {row['idle_connections']} idle connections "
            f"(opened in {row['idle_connect_s']:.1f} s)"
        )
    if "background_rps" in row:
        extra.append(
            f"background cache misses: {row['background_rps']:.0f}/s, "
            f"{row['background_errors']} errors"
        )
    if row.get("skipped"):
        extra.append(f"skipped: {row['skipped']}")
    lines = (["; ".join(extra)] if extra else []) + hostile.notes(row)
    return "\n".join(f"{'':<18}  {line}" for line in lines)


def commitId() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help="0.5 s warm-up and 2 s per scenario instead of 1 s and 5 s")
    parser.add_argument("--duration", type=float, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per scenario")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="run only this scenario (repeatable; a prefix such as "
                             "'backend-50ms' selects all that start with it)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--loadgen-procs", type=int, default=0,
                        help="load generator processes per scenario (default: 1)")
    parser.add_argument("--nextcloud", choices=["fast", "web"], default="fast",
                        help="fake Nextcloud server: fast (minimal HTTP/1.1 server) or "
                             "web (twisted.web, as in the tests)")
    parser.add_argument("--nextcloud-procs", type=int, default=1,
                        help="fake Nextcloud processes (fast mode, SO_REUSEPORT)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    parser.add_argument("--profile", metavar="DIR",
                        help="sample the daemon with py-spy during each window and write "
                             "collapsed stacks to DIR (pip install py-spy)")
    parser.add_argument("--no-json", action="store_true", help="write no JSON file")
    parser.add_argument("--log-requests", choices=["all", "failures", "none"], default="all",
                        help="the daemon's log-requests (default: all, the most a "
                        "production daemon logs; the daemon's own default is failures)")
    args = parser.parse_args(argv)

    chosen = scenarios()
    if args.list:
        for s in chosen:
            print(f"{s.name:<18} {s.title}")
        return
    if args.scenario:
        names = {s.name for s in chosen}
        chosen = [
            s for s in chosen
            if any(s.name == p or (p not in names and s.name.startswith(p))
                   for p in args.scenario)
        ]
        if not chosen:
            parser.error("no scenario matches; see --list")
    duration = args.duration or (2.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    limit = raiseFileLimit(IDLE_CONNECTIONS * 2 + 1000)
    hasCache = cacheSupported()

    directory = tempfile.mkdtemp(prefix="xcauth-bench-")
    stack = Stack(directory, args.nextcloud, args.nextcloud_procs, args.log_requests)
    runner = Runner(stack, warmup, duration, args.loadgen_procs, args.profile)
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commitId(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "duration_s": duration,
        "warmup_s": warmup,
        "nextcloud": args.nextcloud,
        "nextcloud_procs": args.nextcloud_procs,
        "file_limit": limit,
    }
    try:
        import twisted

        meta["twisted"] = twisted.__version__
    except ImportError:
        pass
    print(f"xcauth bench {meta['commit']} {meta['date']}, {meta['cpus']} CPUs, "
          f"Python {meta['python']}, Twisted {meta.get('twisted')}, {duration:g} s per "
          f"scenario after {warmup:g} s warm-up, fake Nextcloud: {args.nextcloud}")
    print(header())
    rows = []
    try:
        for s in chosen:
            row: dict[str, Any] = {"name": s.name, "title": s.title,
                                   "concurrency": s.concurrency,
                                   "backend_latency_ms": s.latencyMs}
            if s.cache and not hasCache:
                row["skipped"] = "this version has no credential cache"
            elif s.kind == "idle" and limit < IDLE_CONNECTIONS + 1000:
                row["skipped"] = f"open file limit {limit} too low (ulimit -n)"
            else:
                try:
                    row.update(runner.run(s))
                except Exception as e:  # a benchmark reports and goes on
                    row["failed"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            if "skipped" in row or "failed" in row:
                print(f"{s.name:<18}  {row.get('skipped') or row.get('failed')}")
            else:
                print(formatRow(row))
                if notes(row):
                    print(notes(row))
            sys.stdout.flush()
    finally:
        stack.stopNextcloud()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"logs in {directory}")
    print("C: concurrent connections; p50/p99/max: latency; err: errors; CPU s/1k: daemon "
          "CPU seconds per 1000 requests; dCPU%: daemon CPU (100 = one core); RSS: daemon "
          "peak RSS; genCPU%/ncCPU%/othCPU%: load generator / fake Nextcloud / "
          "everything else on the machine (100 = one core)")
    if not args.no_json:
        os.makedirs(os.path.join(REPO, "results"), exist_ok=True)
        path = os.path.join(REPO, "results",
                            f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump({"meta": meta, "scenarios": rows}, f, indent=2)
        print(f"JSON: {os.path.relpath(path, REPO)}")
