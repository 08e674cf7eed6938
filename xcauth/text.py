"""
Text utilities: text from clients made safe for log lines, and the checks of
configured URLs and secrets (the configuration and the domain table share them).
"""

from __future__ import annotations

from urllib.parse import urlsplit


def printable(text: str) -> str:
    """
    C{text} safe for a log line: control characters (a newline in a user name
    could forge a log line) are escaped, and it is cut at 200 characters.
    """
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:200]


def validateURL(url: str) -> str:
    """
    Check that C{url} is an absolute http(s) URL with a host and return it.

    @raise ValueError: with a message a person can act on.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"url {url!r} must be an absolute http:// or https:// URL, e.g. "
            "https://cloud.example.org/index.php/apps/ojsxc/ajax/externalApi.php"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"url {url!r} has an invalid port") from None
    return url


def splitSecrets(text: str) -> tuple[bytes, ...]:
    """
    Comma-separated secrets (the first signs requests) as bytes.
    """
    return tuple(s.strip().encode("utf-8") for s in text.split(",") if s.strip())
