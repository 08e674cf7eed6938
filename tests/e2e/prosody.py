"""
Start an isolated Prosody (Debian 12: prosody 0.12.x, Lua 5.4) for end-to-end tests of
``prosody/mod_auth_xcauth.lua``.

Everything lives in a temporary directory: ``prosody.cfg.lua``, ``data/``, ``certs/``
(empty), ``prosody.pid``, ``prosody.log`` (Prosody's own log, debug level) and
``console.log`` (its stdout/stderr). Only one c2s port on 127.0.0.1 is bound: no s2s,
no components, no HTTP. The system-wide Prosody configuration (/etc/prosody) is never
read, and the system-wide Prosody service is never touched.

Usage (blocking; call from setUp or a thread, not from inside a reactor callback that
must stay responsive)::

    reason = prosodyAvailable()
    if reason:
        raise unittest.SkipTest(reason)
    p = ProsodyInstance(tmpdir, '127.0.0.1:23663')   # or an absolute UNIX socket path
    p.start()                  # waits (at most startTimeout, default 20 s) for the c2s port
    ... log in to 127.0.0.1:p.port as user@example.org (tests/e2e/xmpplogin.py) ...
    p.stop()                   # SIGTERM, then SIGKILL after 10 s; idempotent
    text = p.logText()

``ProsodyInstance`` is also a context manager (start on enter, stop on exit).
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.harness import freePort

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_DIR = os.path.join(REPO, "prosody")
PLUGIN_FILE = os.path.join(PLUGIN_DIR, "mod_auth_xcauth.lua")
PROSODY_LIB = "/usr/lib/prosody"


_running = set()  # instances started and not yet stopped, stopped at interpreter exit


@atexit.register
def _stopAll():
    for inst in list(_running):
        try:
            inst.stop(timeout=5.0)
        except Exception:
            pass


class ProsodyError(RuntimeError):
    """Prosody did not start (the message carries the tail of its logs)."""


def _prosodyBinary():
    return shutil.which("prosody")


def prosodyVersion():
    """The installed Prosody version string (e.g. '0.12.3'), or None."""
    try:
        with open(os.path.join(PROSODY_LIB, "prosody.version")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def prosodyAvailable():
    """None if an isolated Prosody can be run here, else a reason to skip."""
    if os.name != "posix":
        return "Prosody tests need a POSIX system"
    if not _prosodyBinary():
        return "prosody is not installed (apt-get install prosody)"
    if not os.path.exists(os.path.join(PROSODY_LIB, "util", "async.lua")):
        return f"Prosody libraries not found in {PROSODY_LIB}"
    version = prosodyVersion()
    if version:
        try:
            major, minor = (int(x) for x in version.split(".")[:2])
        except ValueError:
            major, minor = 0, 12  # e.g. a nightly build: assume new enough
        if (major, minor) < (0, 12):
            return f"Prosody {version} is too old (0.12 or newer needed)"
    if not os.path.exists(PLUGIN_FILE):
        return f"{PLUGIN_FILE} is missing"
    return None



def _lua(value):
    """A Lua literal for a Python str/int/float/bool/list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "{ " + ", ".join(_lua(v) for v in value) + " }"
    s = str(value)
    out = ['"']
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\{ord(ch):03d}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class ProsodyInstance:
    """One isolated Prosody process.

    tmpdir        directory to hold everything (created if missing; not removed)
    xcauthSocket  value of ``xcauth_socket``: "IP:PORT" or an absolute UNIX socket path
    host          the single VirtualHost
    timeout       value of ``xcauth_timeout`` (seconds the module waits for an answer)
    connections   value of ``xcauth_connections`` (None: the module's default, 4)
    port          c2s port (default: a free one, chosen at start())
    logLevel      minimum level written to prosody.log
    extraGlobal / extraHost   raw Lua appended to the global / VirtualHost section
    startTimeout  seconds start() waits for the c2s port
    """

    def __init__(
        self,
        tmpdir,
        xcauthSocket,
        host="example.org",
        timeout=5,
        port=None,
        connections=None,
        logLevel="debug",
        extraGlobal="",
        extraHost="",
        startTimeout=20.0,
    ):
        self.tmpdir = os.path.abspath(tmpdir)
        self.xcauthSocket = xcauthSocket
        self.host = host
        self.timeout = timeout
        self.connections = connections
        self.port = port
        self.logLevel = logLevel
        self.extraGlobal = extraGlobal
        self.extraHost = extraHost
        self.startTimeout = startTimeout
        self.configPath = os.path.join(self.tmpdir, "prosody.cfg.lua")
        self.dataDir = os.path.join(self.tmpdir, "data")
        self.certDir = os.path.join(self.tmpdir, "certs")
        self.pidPath = os.path.join(self.tmpdir, "prosody.pid")
        self.logPath = os.path.join(self.tmpdir, "prosody.log")
        self.consolePath = os.path.join(self.tmpdir, "console.log")
        # The admin shell's UNIX socket: a short path (about 100 bytes at most).
        self.adminDir = tempfile.mkdtemp(prefix="xcauth-prosody-")
        self.adminSocket = os.path.join(self.adminDir, "admin.sock")
        self.process = None

    # -- configuration ---------------------------------------------------
    def configText(self):
        g = []
        add = g.append
        add("-- Generated by tests/e2e/prosody.py: an isolated Prosody for one test.")
        if os.geteuid() == 0:
            # Prosody refuses to run as root (it would try to switch to the
            # 'prosody' user, which cannot read a root-owned temp dir).
            add("run_as_root = true")
        add(f"pidfile = {_lua(self.pidPath)}")
        add(f"data_path = {_lua(self.dataDir)}")
        add(f"certificates = {_lua(self.certDir)}")
        add(f"plugin_paths = {_lua([PLUGIN_DIR])}")
        add(
            f'log = {{ {{ levels = {{ min = {_lua(self.logLevel)} }}, to = "file",'
            f" filename = {_lua(self.logPath)} }} }}"
        )
        add('interfaces = { "127.0.0.1" }')
        add('local_interfaces = { "127.0.0.1" }')
        add('c2s_interfaces = { "127.0.0.1" }')
        add(f"c2s_ports = {{ {int(self.port)} }}")
        add("c2s_direct_tls_ports = {}")
        add("s2s_ports = {}")
        add("s2s_direct_tls_ports = {}")
        add("component_ports = {}")
        add("http_ports = {}")
        add("https_ports = {}")
        add('modules_enabled = { "roster", "saslauth", "disco", "ping", "admin_shell" }')
        # s2s is autoloaded by Prosody; offline needs storage we do not care about.
        add('modules_disabled = { "s2s", "s2s_auth_certs", "offline" }')
        add('storage = "internal"')
        add("c2s_require_encryption = false")
        add("allow_unencrypted_plain_auth = true")
        add('authentication = "xcauth"')
        add(f"admin_socket = {_lua(self.adminSocket)}")
        add(f"xcauth_socket = {_lua(self.xcauthSocket)}")
        add(f"xcauth_timeout = {_lua(self.timeout)}")
        if self.connections is not None:
            add(f"xcauth_connections = {int(self.connections)}")
        if self.extraGlobal:
            add(self.extraGlobal)
        add("")
        add(f"VirtualHost {_lua(self.host)}")
        if self.extraHost:
            add(self.extraHost)
        return "\n".join(g) + "\n"

    # -- lifecycle -------------------------------------------------------
    def start(self):
        if self.process is not None:
            raise ProsodyError("already started")
        reason = prosodyAvailable()
        if reason:
            raise ProsodyError(reason)
        for d in (self.tmpdir, self.dataDir, self.certDir):
            os.makedirs(d, exist_ok=True)
        if self.port is None:
            self.port = freePort()
        with open(self.configPath, "w") as f:
            f.write(self.configText())
        console = open(self.consolePath, "ab")
        try:
            self.process = subprocess.Popen(
                [_prosodyBinary(), "-F", "--config", self.configPath],
                cwd=self.tmpdir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self._env(),
            )
        finally:
            console.close()
        _running.add(self)
        # The log file is appended to: a restart in the same tmpdir must not see
        # the previous run's shutdown lines.
        self._logStart = len(self.logText())
        deadline = time.monotonic() + self.startTimeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                _running.discard(self)
                raise ProsodyError(
                    f"prosody exited with status {code} during startup\n{self._tails()}"
                )
            # Some fatal startup errors (e.g. mod_posix's "Refusing to run as root")
            # start a shutdown that can hang, with or without the port bound.
            if "Shutting down" in self._newLog():
                self.stop()
                raise ProsodyError(f"prosody shut down during startup\n{self._tails()}")
            if self._portOpen():
                # Ports are bound before every module has loaded: look once more.
                time.sleep(0.3)
                if self.process.poll() is None and "Shutting down" not in self._newLog():
                    return self
                continue
            if time.monotonic() > deadline:
                self.stop()
                raise ProsodyError(
                    f"prosody did not open c2s port {self.port} within"
                    f" {self.startTimeout:g}s\n{self._tails()}"
                )
            time.sleep(0.05)

    def _env(self):
        env = dict(os.environ)
        env.pop("PROSODY_CONFIG", None)
        return env

    def _portOpen(self):
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        except OSError:
            return False
        s.close()
        return True

    def stop(self, timeout=10.0):
        """Stop Prosody (SIGTERM, then SIGKILL); returns its exit status or None."""
        p = self.process
        _running.discard(self)
        shutil.rmtree(self.adminDir, ignore_errors=True)
        if p is None:
            return None
        self.process = None
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    # -- logs ------------------------------------------------------------
    def logText(self):
        """Prosody's log file (empty string if not written yet)."""
        return self._read(self.logPath)

    def _newLog(self):
        return self.logText()[getattr(self, "_logStart", 0) :]

    def consoleText(self):
        """What Prosody wrote to stdout/stderr."""
        return self._read(self.consolePath)

    @staticmethod
    def _read(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _tails(self, lines=40):
        parts = []
        for name, text in (("console", self.consoleText()), ("log", self.logText())):
            if text:
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"--- {name} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
