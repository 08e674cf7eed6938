"""
Time-limited login tokens, verified locally without a backend call.

A token is 23 bytes::

    version(1)=0x00 | mac(16) | keyid(2) | expiry(4, big-endian unix seconds)

with ``keyid = sha256(secret)[0:2]`` and
``mac = HMAC-SHA256(secret, 0x00 | keyid | expiry | utf8("user@domain"))[0:16]``.
Its text form is standard base64 without ``=`` padding, with ``O``, ``I`` and
``l`` replaced by ``-``, ``$`` and ``%``.

The MAC's message joins user and domain with ``@``; a user name may hold an
``@`` (Nextcloud allows it), a domain never does, so ``user@domain`` names
exactly one pair.  A domain with an ``@`` (or an empty part) is refused: a
token for user ``admin@example.org`` at ``x`` is never one for ``admin`` at
``example.org@x``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import struct
from collections.abc import Sequence

TOKEN_VERSION = 0
TOKEN_LENGTH = 23
# Base64 of 23 bytes without padding is 31 characters.
TOKEN_TEXT_LENGTH = 31

_ENCODE = str.maketrans("OIl", "-$%")
_DECODE = str.maketrans("-$%", "OIl")


@functools.lru_cache(maxsize=64)
def keyId(secret: bytes) -> bytes:
    """
    The two-byte key identifier that names C{secret} inside a token (kept
    for the few secrets configured: a token login asks it of each).
    """
    return hashlib.sha256(secret).digest()[:2]


def _mac(secret: bytes, kid: bytes, expiry: bytes, user: str, domain: str) -> bytes:
    message = bytes([TOKEN_VERSION]) + kid + expiry + f"{user}@{domain}".encode("utf-8")
    # hmac.digest: the one-shot HMAC in C, without an HMAC object.
    return hmac.digest(secret, message, "sha256")[:16]


def makeToken(secret: bytes, user: str, domain: str, expiry: int) -> str:
    """
    Make the text form of a token for C{user@domain} valid until C{expiry}
    (unix seconds, inclusive).

    @raise ValueError: the user or domain is empty, or the domain holds an
        C{@} (the token would be ambiguous).
    """
    if not _unambiguous(user, domain):
        raise ValueError("a token needs a user and a domain without @")
    kid = keyId(secret)
    packedExpiry = struct.pack(">I", expiry)
    raw = (
        bytes([TOKEN_VERSION])
        + _mac(secret, kid, packedExpiry, user, domain)
        + kid
        + packedExpiry
    )
    return base64.b64encode(raw).decode("ascii").rstrip("=").translate(_ENCODE)


def _unambiguous(user: str, domain: str) -> bool:
    return bool(user) and bool(domain) and "@" not in domain


def _decode(text: str) -> bytes | None:
    if len(text) != TOKEN_TEXT_LENGTH or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text.translate(_DECODE) + "=", validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != TOKEN_LENGTH or raw[0] != TOKEN_VERSION:
        return None
    return raw


def looksLikeToken(text: str) -> bool:
    """
    Whether C{text} has the shape of a token (length, alphabet, version byte).
    """
    return _decode(text) is not None


def verifyToken(
    text: str, user: str, domain: str, secrets: Sequence[bytes], now: float
) -> bool:
    """
    Check a token for C{user@domain} at time C{now} (unix seconds).

    The token's key id selects which of C{secrets} made it, so several secrets can
    be valid at once while a secret is being rotated.  The MAC is compared in
    constant time.  Anything that is not a well-formed, unexpired token made with
    one of C{secrets} for exactly this user and domain gives C{False}, and so
    does a domain with an C{@} (see the module docstring).
    """
    if not _unambiguous(user, domain):
        return False
    raw = _decode(text)
    if raw is None:
        return False
    mac, kid, packedExpiry = raw[1:17], raw[17:19], raw[19:23]
    (expiry,) = struct.unpack(">I", packedExpiry)
    if expiry < now:
        return False
    for secret in secrets:
        if keyId(secret) == kid and hmac.compare_digest(
            _mac(secret, kid, packedExpiry, user, domain), mac
        ):
            return True
    return False
