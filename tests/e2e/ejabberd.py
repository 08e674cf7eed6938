"""
Start an isolated instance of Debian's real ejabberd for one test.

Nothing of the system installation is used except the code: no /etc/ejabberd, no
/var/lib/ejabberd, no ejabberdctl (it would ``su`` to the ejabberd user and refuses to
start when any other beam process is around), no system service and no epmd.  The
Erlang VM is started directly the way ``ejabberdctl foreground`` would, with:

* its own directory: ``ejabberd.yml``, ``spool/`` (mnesia), ``log/`` (``ejabberd.log``,
  ``error.log``, ``erl.out`` = the VM's stdout/stderr), ``HOME`` pointing there;
* a unique short node name (``xcauthNNNN@localhost``) and a random cookie;
* Erlang distribution WITHOUT epmd (``-start_epmd false -erl_epmd_port DISTPORT``,
  OTP >= 23.1), listening on 127.0.0.1 only (``inet_dist_use_interface``);
  ``ERL_EPMD_ADDRESS=127.0.0.1`` is set as well in case anything starts an epmd;
* one c2s listener on 127.0.0.1:PORT, no STARTTLS (SASL PLAIN over plain TCP);
* ``auth_method: external`` with the given ``extauth_program`` and
  ``extauth_pool_size``, ``auth_use_cache: false``.

It works as root and as an ordinary user (the VM and the extauth program run as the
calling user).  Boot to "accepting c2s connections" takes about 0.6 s here; a graceful
stop (SIGTERM -> init:stop) about 1 s.

Typical trial use::

    from tests.e2e.ejabberd import EjabberdInstance, ejabberdAvailable

    class T(unittest.TestCase):
        skip = ejabberdAvailable()          # None when ejabberd is installed

        def setUp(self):
            self.ej = EjabberdInstance(self.mktemp(), 'socat STDIO TCP:127.0.0.1:%d' % p)
            self.addCleanup(self.ej.stop)
            self.ej.start()                 # blocking, bounded (30 s); or: return self.ej.startD()

Then run ``tests.e2e.xmpplogin`` as a subprocess against ``127.0.0.1:self.ej.port`` with a
JID in ``self.ej.host`` (see ``tests.e2e.xmpplogin.loginDeferred``).

The extauth program is started by ejabberd itself at boot (the whole pool, before
any login), through ``/bin/sh -c`` (shell quoting applies to ``extauthProgram``).  It
inherits this process's environment plus ``env``.  On stop it sees EOF on stdin.
"""

import errno
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time

from tests.harness import freePort

EJABBERDCTL = "/usr/sbin/ejabberdctl"
DEFAULT_ERL = "/usr/bin/erl"


def _ctlSetting(name):
    """Read NAME='value' / NAME="value" from Debian's ejabberdctl, or None."""
    try:
        with open(EJABBERDCTL) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(rf'^\s*{re.escape(name)}=["\']?([^"\'\s]+)["\']?\s*$', text, re.M)
    return m.group(1) if m else None


def _erlLibs():
    """Directory holding ejabberd-*/ebin (Debian: /usr/lib/x86_64-linux-gnu)."""
    candidates = []
    libs = _ctlSetting("ERL_LIBS")
    if libs:
        candidates.append(libs)
    candidates += sorted(glob.glob("/usr/lib/*-linux-gnu*")) + [
        "/usr/lib",
        "/usr/lib/erlang/lib",
    ]
    for c in candidates:
        if glob.glob(os.path.join(c, "ejabberd-*", "ebin", "ejabberd.beam")):
            return c
    return None


def _erl():
    erl = _ctlSetting("ERL") or DEFAULT_ERL
    return erl if os.access(erl, os.X_OK) else shutil.which("erl")


def ejabberdAvailable():
    """None if an ejabberd we can start is installed, else a reason to skip."""
    erl = _erl()
    if not erl:
        return "ejabberd not installed (no erl binary; apt-get install ejabberd)"
    if not _erlLibs():
        return "ejabberd not installed (no ejabberd-*/ebin/ejabberd.beam; apt-get install ejabberd)"
    return None



def _yamlStr(s):
    # A JSON string literal is a valid YAML double-quoted scalar.
    return json.dumps(str(s))


def _erlStr(s):
    return '"{}"'.format(str(s).replace("\\", "\\\\").replace('"', '\\"'))


class EjabberdError(Exception):
    pass


def _procTable():
    """{pid: (ppid, starttime)} from /proc (Linux)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        try:
            table[int(name)] = (int(rest[1]), rest[19])
        except (IndexError, ValueError):
            continue
    return table


def _descendants(pid):
    """[(pid, starttime)] of all live descendants of pid."""
    table = _procTable()
    children = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append((c, table[c][1]))
            todo.append(c)
    return out


def _killIfSame(pid, starttime, sig=signal.SIGKILL):
    """Signal pid only if it is still the process we saw (no pid reuse)."""
    try:
        info = _procTable().get(pid)
        if info is not None and info[1] == starttime:
            os.kill(pid, sig)
    except OSError:
        pass


class EjabberdInstance:
    """One private ejabberd node.

    Attributes after construction: ``dir``, ``host``, ``port`` (c2s, 127.0.0.1),
    ``distPort``, ``node``, ``cookie``, ``configPath``, ``spoolDir``, ``logDir``,
    ``logPath`` (ejabberd.log), ``outPath`` (VM stdout/stderr), ``process`` (Popen or None),
    ``bootSeconds`` (after start()).

    ``modules``: YAML text of the ``modules:`` mapping body (default: only
    mod_admin_extra, which gives ``ctl('check_account', user, host)`` etc.).
    ``extraConfig``: YAML text appended at top level (must not repeat keys).
    ``env``: extra environment for the VM and thus for the extauth program.
    ``extraListeners``: YAML text of more ``listen:`` items (each starting with
    ``  -``), e.g. an ``ejabberd_http`` listener with ``mod_http_api``.
    ``apiPermissions``: YAML text of more ``api_permissions:`` entries.
    """

    STARTED_RE = "Start accepting TCP connections at 127.0.0.1:%d for ejabberd_c2s"

    def __init__(
        self,
        tmpdir,
        extauthProgram,
        host="example.org",
        poolSize=1,
        port=None,
        env=None,
        modules=None,
        extraConfig="",
        loglevel="info",
        authUseCache=False,
        extraListeners="",
        apiPermissions="",
    ):
        self.dir = os.path.abspath(tmpdir)
        self.extauthProgram = extauthProgram
        self.host = host
        self.poolSize = int(poolSize)
        self.port = port or freePort()
        self.distPort = freePort()
        while self.distPort == self.port:
            self.distPort = freePort()
        self.node = f"xcauth{secrets.token_hex(4)}@localhost"
        self.cookie = secrets.token_hex(16)
        self.env = dict(env or {})
        self.modules = modules
        self.extraConfig = extraConfig
        self.loglevel = loglevel
        self.authUseCache = authUseCache
        self.extraListeners = extraListeners
        self.apiPermissions = apiPermissions
        self.configPath = os.path.join(self.dir, "ejabberd.yml")
        self.spoolDir = os.path.join(self.dir, "spool")
        self.logDir = os.path.join(self.dir, "log")
        self.logPath = os.path.join(self.logDir, "ejabberd.log")
        self.outPath = os.path.join(self.logDir, "erl.out")
        self.process = None
        self.bootSeconds = None
        self._out = None

    # -- configuration -------------------------------------------------
    def configText(self):
        modules = self.modules
        if modules is None:
            modules = "  mod_admin_extra: {}\n"
        lines = [
            "hosts:",
            f"  - {_yamlStr(self.host)}",
            f"loglevel: {self.loglevel}",
            "log_rotate_count: 0",
            "auth_method: external",
            f"extauth_program: {_yamlStr(self.extauthProgram)}",
            f"extauth_pool_size: {self.poolSize:d}",
            "auth_use_cache: %s" % ("true" if self.authUseCache else "false"),
            "listen:",
            "  -",
            f"    port: {self.port:d}",
            '    ip: "127.0.0.1"',
            "    module: ejabberd_c2s",
            "    starttls: false",
            "    starttls_required: false",
            "    max_stanza_size: 262144",
            "    access: c2s",
            *self.extraListeners.rstrip("\n").splitlines(),
            "acl:",
            "  local:",
            '    user_regexp: ""',
            "access_rules:",
            "  local:",
            "    allow: local",
            "  c2s:",
            "    allow: all",
            "api_permissions:",
            '  "console commands":',
            "    from:",
            "      - ejabberd_ctl",
            "    who: all",
            '    what: "*"',
            *self.apiPermissions.rstrip("\n").splitlines(),
            "modules:",
        ]
        text = "\n".join(lines) + "\n" + (modules if modules.strip() else "  {}\n")
        if not text.endswith("\n"):
            text += "\n"
        if self.extraConfig:
            text += self.extraConfig.rstrip("\n") + "\n"
        return text

    def _environ(self):
        e = dict(os.environ)
        e.update(self.env)
        e.update(
            {
                "HOME": self.dir,
                "ERL_LIBS": _erlLibs() or "",
                "EJABBERD_CONFIG_PATH": self.configPath,
                "EJABBERD_LOG_PATH": self.logPath,
                "ERL_CRASH_DUMP": os.path.join(self.logDir, "erl_crash.dump"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        # Do not let a system-wide ejabberdctl.cfg / pid path leak in.
        for k in (
            "EJABBERD_PID_PATH",
            "ERL_DIST_PORT",
            "ERL_AFLAGS",
            "ERL_ZFLAGS",
            "ERL_FLAGS",
            "CONTRIB_MODULES_CONF_DIR",
        ):
            e.pop(k, None)
        return e

    def _distArgs(self):
        return [
            "-setcookie",
            self.cookie,
            "-erl_epmd_port",
            str(self.distPort),
            "-start_epmd",
            "false",
            "-kernel",
            "inet_dist_use_interface",
            "{127,0,0,1}",
        ]

    def command(self):
        """argv that starts the node in the foreground (as 'ejabberdctl foreground')."""
        return (
            [_erl(), "-sname", self.node]
            + self._distArgs()
            + [
                "+K",
                "true",
                "+P",
                "250000",
                "-env",
                "ERL_CRASH_DUMP_BYTES",
                "0",
                "-mnesia",
                "dir",
                _erlStr(self.spoolDir),
                "-s",
                "ejabberd",
                "-noinput",
            ]
        )

    # -- lifecycle -----------------------------------------------------
    def _spawn(self):
        reason = ejabberdAvailable()
        if reason:
            raise EjabberdError(reason)
        if self.process is not None:
            raise EjabberdError("already started")
        for d in (self.dir, self.spoolDir, self.logDir):
            os.makedirs(d, exist_ok=True)
        with open(self.configPath, "w") as f:
            f.write(self.configText())
        self._out = open(self.outPath, "ab")
        self._t0 = time.monotonic()
        # New session: the VM, erl_child_setup and the extauth programs share a
        # process group and no terminal signals reach them.  (erl_child_setup
        # puts each extauth program in a session of its own: see stop().)
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.spoolDir,
            env=self._environ(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )

    def _checkReady(self):
        """True when ready, False when not yet; raises if the VM died."""
        rc = self.process.poll()
        if rc is not None:
            raise EjabberdError(
                f"ejabberd exited with status {rc} during start:\n{self.tail()}"
            )
        try:
            with open(self.logPath, errors="replace") as f:
                log = f.read()
        except OSError:
            return False
        if (self.STARTED_RE % self.port) not in log:
            return False
        self.bootSeconds = time.monotonic() - self._t0
        return True

    def start(self, timeout=90.0):
        """Start and block until c2s accepts connections (at most ``timeout`` s)."""
        self._spawn()
        deadline = time.monotonic() + timeout
        try:
            while not self._checkReady():
                if time.monotonic() > deadline:
                    raise EjabberdError(
                        f"ejabberd not ready after {timeout}s:\n{self.tail()}"
                    )
                time.sleep(0.05)
        except Exception:
            self.stop()
            raise
        return self

    def startD(self, timeout=90.0):
        """Like start() but returns a Deferred (polls on the reactor, never blocks)."""
        from twisted.internet import defer, reactor, task

        try:
            self._spawn()
        except Exception:
            return defer.fail()
        deadline = time.monotonic() + timeout

        @defer.inlineCallbacks
        def poll():
            try:
                while not self._checkReady():
                    if time.monotonic() > deadline:
                        raise EjabberdError(
                            f"ejabberd not ready after {timeout}s:\n{self.tail()}"
                        )
                    yield task.deferLater(reactor, 0.05, lambda: None)
            except Exception:
                self.stop()
                raise
            defer.returnValue(self)

        return poll()

    def running(self):
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=10.0):
        """Graceful stop (SIGTERM = init:stop), then SIGKILL the whole process group.

        Idempotent, bounded by about ``timeout`` + 2 s, never raises for an
        already dead node.  Returns the VM's exit status (or None)."""
        p = self.process
        if p is None:
            return None
        pgid = p.pid  # session/group leader: start_new_session=True
        # erl_child_setup calls setsid() for every port program, so the extauth
        # programs are NOT in our process group: remember the whole tree now.
        tree = _descendants(p.pid) if p.poll() is None else []
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (a stuck VM, erl_child_setup, an extauth program that
        # ignores EOF on stdin or a pool worker ejabberd restarted): SIGKILL.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.EPERM):
                raise
        for pid, starttime in tree:
            _killIfSame(pid, starttime)
        try:
            p.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
        if self._out is not None:
            self._out.close()
            self._out = None
        return p.returncode

    # -- helpers -------------------------------------------------------
    def ctl(self, *args, timeout=60.0):
        """Run an ejabberdctl command against this node: returns (exitcode, output).

        E.g. ``ctl('status')``, ``ctl('connected_users')``,
        ``ctl('check_account', 'alice', 'example.org')`` (mod_admin_extra; this
        makes ejabberd send ``isuser`` to the extauth program)."""
        argv = (
            [
                _erl(),
                "-sname",
                f"ctl{secrets.token_hex(4)}@localhost",
                "-hidden",
                "-noinput",
            ]
            + self._distArgs()
            + ["-dist_listen", "false", "-s", "ejabberd_ctl", "-extra", self.node]
            + [str(a) for a in args]
        )
        try:
            r = subprocess.run(
                argv,
                cwd=self.dir,
                env=self._environ(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            return None, (e.output or b"").decode("utf-8", "replace")
        return r.returncode, r.stdout.decode("utf-8", "replace")

    def ctlScript(self, path):
        """Write an ``ejabberdctl`` stand-in for this node at ``path`` (what
        ``ctl()`` runs, as a program taking the command and its arguments) and
        return its path."""
        env = self._environ()
        keep = ("HOME", "ERL_LIBS", "EJABBERD_CONFIG_PATH", "EJABBERD_LOG_PATH",
                "ERL_CRASH_DUMP", "ERL_EPMD_ADDRESS")
        quote = shlex.quote
        lines = ["#!/bin/sh"]
        lines += [f"export {k}={quote(env[k])}" for k in keep]
        for k in ("ERL_AFLAGS", "ERL_ZFLAGS", "ERL_FLAGS"):
            lines.append(f"unset {k}")
        lines.append(f"cd {quote(self.dir)} || exit 3")
        argv = (
            [_erl(), "-sname", "ctl$$@localhost", "-hidden", "-noinput"]
            + self._distArgs()
            + ["-dist_listen", "false", "-s", "ejabberd_ctl", "-extra", self.node]
        )
        lines.append("exec " + " ".join(
            a if a == "ctl$$@localhost" else quote(a) for a in argv) + ' "$@"')
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o755)
        return path

    def logText(self, name="ejabberd.log"):
        try:
            with open(os.path.join(self.logDir, name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def extauthErrors(self):
        """ejabberd's log lines about extauth trouble (program failed to start or
        died, call failed/timed out).  A login refused because the extauth program
        is broken looks exactly like a wrong password to the client (SASL
        not-authorized), so tests expecting a refusal should check this is empty."""
        return [
            line
            for line in self.logText().splitlines()
            if "Failed to start external authentication program" in line
            or "External authentication program failed" in line
            or ("extauth" in line and "[error]" in line)
        ]

    def tail(self, lines=40):
        out = self.logText("erl.out").splitlines()
        return "\n".join(out[-lines:])

    def __repr__(self):
        return f"<EjabberdInstance {self.node} c2s=127.0.0.1:{self.port} dist={self.distPort} dir={self.dir}>"
