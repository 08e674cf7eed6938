"""
The Dovecot authentication protocol's wire format (pure functions, no I/O):
TAB-separated fields with Dovecot's escaping, the server's handshake, the
client's C{VERSION}, C{CPID} and C{AUTH} lines, the mechanisms' data and the
answer lines.  The protocol itself: L{xcauth.framing.dovecot}.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

import attr

#: Longest line accepted, as Dovecot's C{AUTH_CLIENT_MAX_LINE_LENGTH}; a longer
#: one closes the connection, as Dovecot does.  A PLAIN response of a long
#: login and password is a few hundred bytes of base64.
MAX_LINE = 16384

#: The protocol version this server speaks.
MAJOR_VERSION = 1
MINOR_VERSION = 2

#: The mechanisms offered, with Dovecot's security flags for them.
MECHANISMS = (("PLAIN", "plaintext"), ("LOGIN", "plaintext"))

#: LOGIN's challenges, as Dovecot's mech-login.c sends them.
LOGIN_USER_PROMPT = b"Username:"
LOGIN_PASSWORD_PROMPT = b"Password:"

#: Reasons sent with failures (shown to the user by some clients).
TEMP_REASON = "Temporary authentication failure"
AUTHZ_REASON = "Authorization identity differs from the login"

# 0x01 "l" is LF in the protocol's older documentation (Dovecot 2.3's
# unescaping reads it as "l"); no client escapes a plain "l", so both are LF.
_UNESCAPES = {
    ord("0"): b"\0",
    ord("1"): b"\1",
    ord("t"): b"\t",
    ord("r"): b"\r",
    ord("n"): b"\n",
    ord("l"): b"\n",
}


def unescape(value: bytes) -> bytes:
    """
    Undo Dovecot's tab escaping (0x01 followed by C{0 1 t r n}, or C{l} for
    LF as older documentation has it; any other character after 0x01 stands
    for itself; a 0x01 at the end is dropped).
    """
    if b"\1" not in value:
        return value
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c != 1:
            out.append(c)
            i += 1
            continue
        if i + 1 < n:
            nxt = value[i + 1]
            out += _UNESCAPES.get(nxt, bytes([nxt]))
        i += 2
    return bytes(out)


def escape(value: bytes) -> bytes:
    """
    Dovecot's tab escaping of one value (C{\\1}, TAB, CR, LF, and NUL as
    Dovecot 2.3's C{str_tabescape} writes it, 0x01 C{0}).
    """
    return (
        value.replace(b"\1", b"\x011")
        .replace(b"\0", b"\x010")
        .replace(b"\t", b"\x01t")
        .replace(b"\r", b"\x01r")
        .replace(b"\n", b"\x01n")
    )


def splitFields(line: bytes) -> list[bytes]:
    """
    The TAB-separated, unescaped fields of a line.
    """
    return [unescape(f) for f in line.split(b"\t")]


def formatLine(*fields: bytes) -> bytes:
    """
    One line of TAB-separated, escaped fields (the first is the command).
    """
    return b"\t".join([fields[0], *(escape(f) for f in fields[1:])]) + b"\n"


def handshake(spid: int, cuid: int, cookie: bytes) -> bytes:
    """
    What the server sends on connect, in Dovecot's order.
    """
    lines = [b"VERSION\t%d\t%d\n" % (MAJOR_VERSION, MINOR_VERSION)]
    lines += [b"MECH\t%s\t%s\n" % (m.encode(), f.encode()) for m, f in MECHANISMS]
    lines.append(b"SPID\t%d\n" % spid)
    lines.append(b"CUID\t%d\n" % cuid)
    lines.append(b"COOKIE\t" + binascii.hexlify(cookie) + b"\n")
    lines.append(b"DONE\n")
    return b"".join(lines)


def parseVersion(line: bytes) -> tuple[int, int] | None:
    """
    C{(major, minor)} of a client's C{VERSION} line, or C{None}.
    """
    fields = line.split(b"\t")
    if len(fields) < 3 or fields[0] != b"VERSION":
        return None
    major, minor = fields[1], fields[2]
    if not (_isNumber(major) and _isNumber(minor)):
        return None
    return int(major), int(minor)


def parseCPID(line: bytes) -> int | None:
    """
    The client's process id from its C{CPID} line (positive), or C{None}.
    """
    command, tab, value = line.partition(b"\t")
    if command != b"CPID" or not tab or not _isNumber(value) or int(value) == 0:
        return None
    return int(value)


#: Digits of a number field at most (a process id, a version, a request id
#: fit in 10): longer ones are refused before C{int()}, which would raise on
#: thousands of digits.
MAX_DIGITS = 10


def _isNumber(text: bytes) -> bool:
    """
    Whether C{text} is 1 to L{MAX_DIGITS} ASCII digits.
    """
    return 0 < len(text) <= MAX_DIGITS and text.isdigit()


_NAME = re.compile(rb"\A[A-Za-z0-9_-]{1,32}\Z")


def safeName(name: bytes) -> str:
    """
    A command or mechanism name for a log line, quoted, if it looks like one;
    anything else (which a confused client might fill with a password) is
    described, not shown.
    """
    if _NAME.match(name):
        return repr(name.decode("ascii"))
    return f"of {len(name)} bytes (not shown)"


def parseId(text: bytes) -> int | None:
    """
    A request id (1 to 2**32 - 1), or C{None}.
    """
    if not _isNumber(text):
        return None
    value = int(text)
    return value if 0 < value < 2**32 else None


def decodeBase64(text: bytes) -> bytes | None:
    """
    Strict base64 (C{None} if it is not); C{=} alone stands for empty data.
    """
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


@attr.s(frozen=True, auto_attribs=True)
class AuthCommand:
    """
    A parsed C{AUTH} line.

    @ivar response: the initial response's base64 text (C{None}: none given).
    """

    id: int
    mechanism: str
    service: str
    params: dict[str, str] = attr.ib(repr=False)
    response: bytes | None = attr.ib(repr=False)


@attr.s(frozen=True, auto_attribs=True)
class ProtocolError:
    """
    A line that breaks the protocol: the connection is closed.  The reason is
    safe to log.
    """

    reason: str


def parseAuth(fields: Sequence[bytes], minor: int) -> AuthCommand | ProtocolError:
    """
    Parse the fields of an C{AUTH} line (after the command), for a client of
    protocol version 1.C{minor}.
    """
    if len(fields) < 2:
        return ProtocolError("AUTH without id and mechanism")
    requestId = parseId(fields[0])
    if requestId is None:
        return ProtocolError("AUTH with an invalid id")
    try:
        mechanism = fields[1].decode("ascii")
    except UnicodeDecodeError:
        return ProtocolError("AUTH with a mechanism name that is not ASCII")
    if mechanism.upper() not in {m for m, _ in MECHANISMS}:
        return ProtocolError(f"unsupported mechanism {safeName(fields[1])}")
    params: dict[str, str] = {}
    response: bytes | None = None
    rest = list(fields[2:])
    while rest:
        field = rest.pop(0)
        name, eq, value = field.partition(b"=")
        if name == b"resp" and eq:
            response = value
            if rest:
                return ProtocolError("AUTH parameters after resp")
            break
        params[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    service = params.get("service")
    if not service:
        return ProtocolError("AUTH without service")
    if response is not None and response == b"" and minor < 2:
        # Protocol 1.1 and older: an empty resp= means "no initial response"
        # (Exim, Prosody's module send it so).
        response = None
    return AuthCommand(requestId, mechanism.upper(), service, params, response)


def parsePlain(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """
    PLAIN's C{authzid NUL authcid NUL password}, or C{None} if it does not
    have exactly two NULs.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def splitDovecotLogin(login: str, realm: str | None, defaultDomain: str | None) -> tuple[str, str] | None:
    """
    The user and domain of a login: C{user@domain} split at the last C{@}; a
    login without C{@} in the realm, else the default domain.  C{None} if no
    domain can be found or a part is empty.
    """
    user, at, domain = login.rpartition("@")
    if not at:
        user, domain = login, realm or defaultDomain or ""
    if not user or not domain:
        return None
    return user, domain


def okLine(requestId: int, login: str) -> bytes:
    """
    C{OK ID user=LOGIN}.
    """
    return formatLine(b"OK", b"%d" % requestId, b"user=" + login.encode("utf-8"))


def failLine(requestId: int, *extra: str) -> bytes:
    """
    C{FAIL ID [extra...]}.
    """
    return formatLine(b"FAIL", b"%d" % requestId, *(e.encode("utf-8") for e in extra))


def tempFailLine(requestId: int, login: str | None = None) -> bytes:
    """
    A temporary failure, in Dovecot 2.3's and 2.2's words (with the login,
    when known, as Dovecot sends it).
    """
    user = [] if login is None else ["user=" + login]
    return failLine(requestId, *user, "code=temp_fail", "temp", "reason=" + TEMP_REASON)


def contLine(requestId: int, challenge: bytes) -> bytes:
    """
    C{CONT ID BASE64}.
    """
    return b"CONT\t%d\t%s\n" % (requestId, base64.b64encode(challenge))
