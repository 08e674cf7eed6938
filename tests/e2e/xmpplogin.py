"""
Tiny XMPP login runner for the end-to-end tests (server-neutral: ejabberd, Prosody).

slixmpp is asyncio-based and the tests run under Twisted trial, so tests start this
module as a subprocess::

    python -m tests.e2e.xmpplogin --host 127.0.0.1 --port PORT \\
        --jid alice@example.org --password 'pa:ss w' [--timeout 10] [--starttls]

Exit status (and one line on stdout saying what happened):

    0  logged in: SASL succeeded, resource bound, session started   ("OK ...")
    1  authentication failed: the server answered SASL <failure/>    ("AUTHFAIL <condition> ...")
       (the condition is usually ``not-authorized``.  Beware: ejabberd 23.01 also
       answers ``not-authorized`` when its extauth program is dead or cannot be
       started, so a test expecting a refusal should also check the server side,
       e.g. ``EjabberdInstance.extauthErrors()``)
    2  anything else: connection refused, timeout, stream error, no usable SASL
       mechanism, SASLprep rejected the credentials, ...             ("ERROR ...")

With ``--roster``, after the session started the client fetches its roster and the
line is ``ROSTER {JSON}``: ``{jid: {"name": ..., "groups": [...], "subscription":
...}}`` (in-process: ``fetchRoster(host, port, jid, password, timeout)``).

Write ``--password=VALUE`` when the password may begin with ``-``
(``commandLine()`` always does).

By default the connection is plain TCP and SASL PLAIN is allowed without TLS (loopback
test servers without certificates). ``--starttls`` negotiates STARTTLS when offered,
without verifying the certificate (test servers use self-signed certificates).

In-process use (blocks the calling thread; do not call it on the Twisted reactor
thread): ``runLogin(host, port, jid, password, timeout) -> int`` or
``runLoginDetailed(...) -> (int, str)``.  From trial: ``loginDeferred(...)`` runs the
subprocess with ``getProcessOutputAndValue`` and fires ``(exitcode, line)``;
``commandLine(...)`` gives the argv.
"""

import argparse
import asyncio
import logging
import os
import ssl
import sys

EXIT_OK = 0
EXIT_AUTHFAIL = 1
EXIT_ERROR = 2


def _makeClient(jid, password, starttls, roster=False):
    # Imported lazily so that importing this module (e.g. to build the command
    # line) never needs slixmpp.
    import slixmpp

    class _LoginClient(slixmpp.ClientXMPP):
        def __init__(self):
            slixmpp.ClientXMPP.__init__(
                self,
                jid,
                password,
                plugin_config={
                    "feature_mechanisms": {
                        "unencrypted_plain": True,
                        "encrypted_plain": True,
                    }
                },
            )
            self.enable_direct_tls = False
            self.enable_starttls = bool(starttls)
            self.enable_plaintext = not starttls
            if starttls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self.ssl_context = ctx
            # No reconnection attempts: one try, then report.
            self.outcome = None
            self.result = asyncio.get_event_loop().create_future()
            self.add_event_handler("session_start", self._onSession)
            self.add_event_handler("failed_auth", self._onFailedAuth)
            self.add_event_handler("no_auth", self._onNoAuth)
            self.add_event_handler("failed_all_auth", self._onNoAuth)
            self.add_event_handler("connection_failed", self._onConnFailed)
            self.add_event_handler("stream_error", self._onStreamError)
            self.add_event_handler("disconnected", self._onDisconnected)

        def _finish(self, code, message):
            if not self.result.done():
                self.result.set_result((code, message))

        def _onSession(self, _event):
            if roster:
                asyncio.ensure_future(self._fetchRoster())
                return
            self._finish(EXIT_OK, f"OK session started as {self.boundjid.full}")

        async def _fetchRoster(self):
            import json

            try:
                await self.get_roster(timeout=10)
            except Exception as exc:
                self._finish(EXIT_ERROR, f"ERROR roster: {type(exc).__name__}: {exc}")
                return
            items = {}
            mine = self.client_roster
            for contact in mine:
                item = mine[contact]
                items[str(contact)] = {
                    "name": item["name"],
                    "groups": sorted(item["groups"]),
                    "subscription": item["subscription"],
                }
            self._finish(EXIT_OK, "ROSTER " + json.dumps(items, sort_keys=True))

        def _onFailedAuth(self, stanza):
            try:
                cond = stanza["condition"] or "failure"
                text = stanza["text"] or ""
            except Exception:
                cond, text = "failure", ""
            self._finish(EXIT_AUTHFAIL, (f"AUTHFAIL {cond} {text}").rstrip())

        def _onNoAuth(self, _event=None):
            self._finish(EXIT_ERROR, "ERROR no usable SASL mechanism offered")

        def _onConnFailed(self, err):
            self._finish(EXIT_ERROR, f"ERROR connection failed: {err}")

        def _onStreamError(self, err):
            try:
                desc = "{} {}".format(err["condition"], err["text"])
            except Exception:
                desc = repr(err)
            self._finish(EXIT_ERROR, f"ERROR stream error: {desc.strip()}")

        def _onDisconnected(self, reason=None):
            self._finish(
                EXIT_ERROR,
                "ERROR disconnected before session start%s"
                % (f": {reason}" if reason else ""),
            )

    return _LoginClient()


async def _login(host, port, jid, password, timeout, starttls, roster=False):
    client = _makeClient(jid, password, starttls, roster)
    client.connect(host, int(port))
    try:
        code, message = await asyncio.wait_for(asyncio.shield(client.result), timeout)
    except TimeoutError:
        code, message = EXIT_ERROR, f"ERROR timeout after {timeout}s"
    # Close politely but never wait long for it.
    try:
        client.cancel_connection_attempt()
    except Exception:
        pass
    try:
        if client.is_connected():
            await asyncio.wait_for(client.disconnect(wait=1.0), 2.0)
    except Exception:
        pass
    try:
        client.abort()
    except Exception:
        pass
    return code, message


def runLoginDetailed(host, port, jid, password, timeout=10.0, starttls=False,
                     roster=False):
    """Log in once; return ``(exitcode, one_line_message)``. Blocks the caller.
    With ``roster``, the message is ``ROSTER {JSON}`` (see the module's text)."""
    # Without any logging configuration, slixmpp's errors ("No appropriate login
    # method.") would reach stderr through logging.lastResort: the result line says
    # it all.  Configured logging still sees them (propagation is unchanged).
    logging.getLogger("slixmpp").addHandler(logging.NullHandler())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        try:
            return loop.run_until_complete(
                _login(host, port, jid, password, timeout, starttls, roster)
            )
        except Exception as exc:
            return EXIT_ERROR, f"ERROR {type(exc).__name__}: {exc}"
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except Exception:
            pass
        loop.close()
        asyncio.set_event_loop(None)


def fetchRoster(host, port, jid, password, timeout=10.0):
    """Log in and fetch the roster: ``(0, {jid: {name, groups, subscription}})``,
    or ``(exitcode, message)`` when that failed. Blocks the caller."""
    import json

    code, message = runLoginDetailed(host, port, jid, password, timeout, roster=True)
    if code == EXIT_OK and message.startswith("ROSTER "):
        return code, json.loads(message[len("ROSTER "):])
    return (code if code != EXIT_OK else EXIT_ERROR), message


def runLogin(host, port, jid, password, timeout=10.0, starttls=False):
    """Log in once; return 0 (logged in), 1 (SASL failure) or 2 (other error)."""
    return runLoginDetailed(host, port, jid, password, timeout, starttls)[0]


def commandLine(host, port, jid, password, timeout=10.0, starttls=False, python=None):
    """argv list for running this module as a subprocess (cwd = project root, or
    the project root on PYTHONPATH)."""
    argv = [
        python or sys.executable,
        "-m",
        "tests.e2e.xmpplogin",
        "--host",
        str(host),
        "--port",
        str(port),
        # "--opt=value": a password may start with "-".
        "--jid=" + jid,
        "--password=" + password,
        "--timeout",
        str(timeout),
    ]
    if starttls:
        argv.append("--starttls")
    return argv


def loginDeferred(host, port, jid, password, timeout=10.0, starttls=False):
    """Twisted: run this module as a subprocess; Deferred firing (exitcode, line).

    Use this from trial tests (the reactor keeps running, so a daemon under test in
    the same process can answer ejabberd/Prosody while the client logs in)."""
    from twisted.internet import utils

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = commandLine(host, port, jid, password, timeout, starttls)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    d = utils.getProcessOutputAndValue(argv[0], argv[1:], env=env, path=root)

    def done(result):
        out, err, code = result
        lines = out.decode("utf-8", "replace").strip().splitlines()
        line = lines[-1] if lines else err.decode("utf-8", "replace").strip()[-500:]
        return code, line

    return d.addCallback(done)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tests.e2e.xmpplogin", description="Try one XMPP client login."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument(
        "--starttls",
        action="store_true",
        help="use STARTTLS if offered (certificate not verified)",
    )
    p.add_argument("--roster", action="store_true",
                   help="fetch the roster after login and print it as JSON")
    p.add_argument("--debug", action="store_true", help="slixmpp debug log on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.CRITICAL, stream=sys.stderr
    )
    code, message = runLoginDetailed(
        args.host, args.port, args.jid, args.password, args.timeout, args.starttls,
        args.roster,
    )
    print(message, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
