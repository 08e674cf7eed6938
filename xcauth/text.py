"""
Text from clients made safe for log lines.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """
    C{text} safe for a log line: control characters (a newline in a user name
    could forge a log line) are escaped, and it is cut at 200 characters.
    """
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:200]
