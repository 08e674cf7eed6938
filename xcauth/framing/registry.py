"""
The framing names accepted by C{--type}, C{--listen FRAMING=...} and systemd
file descriptor names, and the protocol each one serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xcauth.framing.base import ServerContext
from xcauth.framing.dovecot import DovecotProtocol
from xcauth.framing.ejabberd import EjabberdAutoProtocol, EjabberdProtocol
from xcauth.framing.lines import EjabberdLineProtocol, XMPPLineProtocol
from xcauth.framing.postfix import PostfixProtocol
from xcauth.framing.saslauthd import SaslauthdProtocol

#: Protocol classes for network listeners, by framing name.
FRAMINGS: dict[str, Callable[[ServerContext], Any]] = {
    "prosody": XMPPLineProtocol,
    "generic": XMPPLineProtocol,
    "ejabberd": EjabberdAutoProtocol,
    "ejabberd-line": EjabberdLineProtocol,
    "saslauthd": SaslauthdProtocol,
    "postfix": PostfixProtocol,
    "dovecot": DovecotProtocol,
}

#: Protocol classes for stdin/stdout, where the framing is known: an ejabberd
#: program spawned by ejabberd always speaks binary.
STDIO_FRAMINGS: dict[str, Callable[[ServerContext], Any]] = dict(FRAMINGS, ejabberd=EjabberdProtocol)


def framingNames() -> list[str]:
    """
    The framing names, for messages and help texts.
    """
    return sorted(FRAMINGS)
