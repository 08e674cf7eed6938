"""
The canonical identity of a request: the one C{user@domain} that every step
after the framing uses (the tenant lookup, penalties, the credential cache,
tokens, the roster sync, log lines, the Dovecot C{user=} answer).

 - A domain is lower-cased, loses one trailing dot, and an internationalised
   name is written in its ASCII (IDNA, UTS #46 non-transitional) form:
   C{Bücher.Example.} is C{xn--bcher-kva.example}.  Its labels are letters,
   digits, C{-} and C{_}, 1 to 63 characters each, 253 characters in all: no
   C{@}, no C{:}, no empty label, no space or control character.
 - A user name is compared as Nextcloud compares user ids: its user backend
   (C{lib/private/User/Database.php}) looks a login name up by
   C{mb_strtolower()} in the C{uid_lower} column, and the JSXC app and the OCS
   API both go through it, so C{Bob} and C{bob} are one account for both
   backends.  Python's C{str.lower()} is the same full Unicode case mapping as
   PHP's C{mb_strtolower()} (since PHP 7.3).  A user name is 1 to
   L{MAX_USER} characters without control or line-separator characters.

Anything else is refused before anyone is asked (L{InvalidIdentity}).
"""

from __future__ import annotations

import re
import unicodedata

import attr
import idna

#: Longest user name accepted, in characters (Nextcloud's user ids are at most
#: 64; a login name in the form of an e-mail address is longer).
MAX_USER = 255

#: Longest domain, in characters of its ASCII form (RFC 1035).
MAX_DOMAIN = 253

#: Longest label of a domain (RFC 1035).
MAX_LABEL = 63

#: Unicode categories a user name may not hold: control characters,
#: surrogates, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

_LABEL = re.compile(r"\A[a-z0-9_-]{1,63}\Z")


class InvalidIdentity(ValueError):
    """
    A user name or domain that cannot name anyone; C{str()} says why, safe to
    log (it never repeats the name).
    """


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Identity:
    """
    A canonical C{user@domain}.
    """

    user: str
    domain: str

    @property
    def jid(self) -> str:
        """
        C{user@domain}: unambiguous, since a domain holds no C{@}.
        """
        return f"{self.user}@{self.domain}"


def canonicalDomain(domain: str) -> str:
    """
    The canonical form of a domain.

    @raise InvalidIdentity: it cannot be a domain.
    """
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        raise InvalidIdentity("empty domain")
    if len(domain) > 4 * MAX_DOMAIN:
        raise InvalidIdentity("domain too long")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise InvalidIdentity("domain is not a valid internationalised name") from None
        if domain.endswith("."):
            domain = domain[:-1]
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN:
        raise InvalidIdentity("domain too long")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise InvalidIdentity(
                "domain with an empty or over-long label, or a character other "
                "than letters, digits, - and _"
            )
    return domain


def canonicalUser(user: str) -> str:
    """
    The canonical form of a user name (see the module docstring).

    @raise InvalidIdentity: it cannot be a user name.
    """
    if not user:
        raise InvalidIdentity("empty user name")
    if len(user) > MAX_USER:
        raise InvalidIdentity(f"user name over {MAX_USER} characters")
    lowered = user.lower()
    if len(lowered) > MAX_USER or not lowered.isprintable() and any(
        unicodedata.category(c) in _REFUSED_CATEGORIES for c in lowered
    ):
        raise InvalidIdentity("user name with a control character or over-long")
    return lowered


def canonical(user: str, domain: str) -> Identity:
    """
    The canonical identity of C{user} at C{domain}.

    @raise InvalidIdentity: either cannot name anyone.
    """
    return Identity(canonicalUser(user), canonicalDomain(domain))


def canonicalOrNone(user: str, domain: str) -> Identity | None:
    """
    L{canonical}, or C{None} for an invalid identity.
    """
    try:
        return canonical(user, domain)
    except InvalidIdentity:
        return None
