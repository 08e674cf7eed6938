"""
Keyed hashes of passwords, for indexing in-memory state by password (shared
logins in flight, hashes being made) without keeping the password itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os


class PasswordKeys:
    """
    HMAC-SHA256 of passwords under a random key that exists only in this
    process's memory (never stored, never logged).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)

    def __call__(self, password: str) -> bytes:
        """
        The keyed hash of C{password}.
        """
        return hmac.new(self._key, password.encode("utf-8"), hashlib.sha256).digest()
