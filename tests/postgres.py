"""
A PostgreSQL server of the tests' own, from Debian's package: C{initdb} into a
temporary directory, C{postgres} listening on a UNIX socket in that directory
and on 127.0.0.1 on a port it owns, stopped when the test process ends.

PostgreSQL refuses to run as root: when the tests run as root, the server runs
as the C{postgres} user the package creates (C{setpriv}, with the directory
given to that user).  L{server} returns the one server of the test process
(started on first use) or raises L{Unavailable} saying why it cannot start, so
tests skip with that message.

Each test takes a database of its own (L{PostgresServer.newDatabase}); the
superuser connects through the socket without a password, the C{xcauth} role
through TCP with its password (SCRAM), as a real node would.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from itertools import count
from typing import Any

from tests.harness import canConnect, freePort

#: The password of the C{xcauth} role.
PASSWORD = "pg-test-password-0123"
START_TIMEOUT = 30.0


class Unavailable(Exception):
    """
    No PostgreSQL server can run here; the message says why.
    """


def binaries() -> str | None:
    """
    The newest C{/usr/lib/postgresql/VERSION/bin} with C{initdb} and
    C{postgres}, or C{None}.
    """
    found = []
    for directory in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(directory, p), os.X_OK) for p in ("initdb", "postgres")):
            version = os.path.basename(os.path.dirname(directory))
            found.append((int(version) if version.isdigit() else 0, directory))
    return max(found)[1] if found else None


class PostgresServer:
    """
    One PostgreSQL cluster in a temporary directory.
    """

    def __init__(self, binDir: str) -> None:
        self.binDir = binDir
        self.directory = tempfile.mkdtemp(prefix="xcauth-pg-")
        self.data = os.path.join(self.directory, "data")
        self.port = freePort()
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = count(1)
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable(
                    "tests run as root and there is no postgres user to run "
                    "PostgreSQL as (install Debian's postgresql package)"
                ) from None
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.directory, 0o755)

    def _argv(self, program: str, *args: str, orphan: bool = True) -> list[str]:
        """
        The command line of C{program}; unless C{orphan}, it gets SIGINT (a
        fast shutdown) when this process dies without stopping it.
        """
        argv = [os.path.join(self.binDir, program), *args]
        if self._user is None:
            return argv
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise Unavailable("tests run as root and setpriv (util-linux) is missing")
        death = [] if orphan else ["--pdeathsig=INT"]
        return [
            setpriv, f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}",
            "--clear-groups", *death, *argv,
        ]

    @property
    def logPath(self) -> str:
        return os.path.join(self.directory, "postgres.log")

    def initdb(self) -> None:
        """
        Create the cluster: trust on the socket, SCRAM on TCP.
        """
        result = subprocess.run(
            self._argv(
                "initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "-N",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/", timeout=120,
        )
        if result.returncode != 0:
            raise Unavailable(
                "initdb failed: " + result.stdout.decode("utf-8", "replace")[-500:]
            )

    def start(self) -> None:
        """
        Start the server (again, after L{stop}) and wait until it accepts
        connections.
        """
        log = open(self.logPath, "ab")
        self.process = subprocess.Popen(
            self._argv(
                "postgres", "-D", self.data, "-k", self.directory, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200", orphan=False,
            ),
            stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
            preexec_fn=None if self._user is not None else _dieWithParent,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable("postgres exited at start: " + self.logTail())
            if canConnect(self.socketPath) and self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise Unavailable("postgres did not start in time: " + self.logTail())

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.adminInfo("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def logTail(self) -> str:
        try:
            with open(self.logPath, "rb") as f:
                return f.read()[-800:].decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def socketPath(self) -> str:
        return os.path.join(self.directory, f".s.PGSQL.{self.port}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """
        Stop the server (a fast shutdown: connections are closed).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(2)  # SIGINT: fast shutdown
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def destroy(self) -> None:
        """
        Stop the server and remove its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def adminInfo(self, dbname: str) -> str:
        """
        The libpq key/value string of the superuser on the socket.
        """
        return f"host={self.directory} port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str) -> str:
        """
        The URL a node uses: the C{xcauth} role over TCP, without the password
        (which comes from a file).
        """
        return f"postgresql://xcauth@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """
        Run C{sql} as the superuser; the rows it returns.
        """
        import psycopg

        with psycopg.connect(self.adminInfo(dbname), autocommit=True, connect_timeout=5) as c:
            cursor = c.execute(sql.encode("utf-8"))
            return cursor.fetchall() if cursor.description else []

    def newDatabase(self) -> str:
        """
        A new empty database owned by the C{xcauth} role; its name.
        """
        name = f"xcauth_test_{os.getpid()}_{next(self._databases)}"
        self.admin(f"CREATE DATABASE {name} OWNER xcauth")
        return name

    def dropDatabase(self, name: str) -> None:
        """
        Drop a database of L{newDatabase} (its connections closed first).
        """
        if self.running:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _dieWithParent() -> None:
    """
    (In the child, before C{exec}.) SIGINT when the parent dies: a test
    process killed does not leave its server running.
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 2)


_server: PostgresServer | None = None
_failure: str | None = None


def server() -> PostgresServer:
    """
    The test process's PostgreSQL server, started on first use and stopped
    when the process exits.

    @raise Unavailable: it cannot run here (the reason).
    """
    global _server, _failure
    if _failure is not None:
        raise Unavailable(_failure)
    if _server is not None:
        if not _server.running:
            _server.start()
        return _server
    try:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install psycopg)") from None
        binDir = binaries()
        if binDir is None:
            raise Unavailable(
                "no PostgreSQL server in /usr/lib/postgresql/*/bin (apt install postgresql)"
            )
        started = PostgresServer(binDir)
        atexit.register(started.destroy)
        started.initdb()
        started.start()
        started.admin(f"CREATE ROLE xcauth LOGIN PASSWORD '{PASSWORD}'")
    except Unavailable as e:
        _failure = str(e)
        raise
    _server = started
    return started


def skipUnlessPostgres(testCase: Any) -> PostgresServer:
    """
    The server, or skip C{testCase} with the reason it cannot start.
    """
    from twisted.trial.unittest import SkipTest

    try:
        return server()
    except Unavailable as e:
        raise SkipTest(f"no PostgreSQL for the tests: {e}") from None
