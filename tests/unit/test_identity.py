"""
Tests for L{xcauth.identity}: the canonical identity of a request.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xcauth.identity import (
    MAX_USER,
    InvalidIdentity,
    canonical,
    canonicalDomain,
    canonicalOrNone,
    canonicalUser,
)

# Text built mostly from the characters that matter: case, dots, IDNA, @ : and
# control characters.
_names = st.text(
    alphabet=st.sampled_from(list("aAbBzZ09-_.@: \x00\n\tßẞİıÄäÖ。．ＡＢ\u200b\u0301é")),
    max_size=30,
) | st.text(max_size=30)


class DomainTests(SynchronousTestCase):
    def test_caseAndTrailingDot(self) -> None:
        self.assertEqual(canonicalDomain("Other.Example"), "other.example")
        self.assertEqual(canonicalDomain("other.example."), "other.example")
        self.assertEqual(canonicalDomain("OTHER.EXAMPLE."), "other.example")

    def test_idna(self) -> None:
        self.assertEqual(canonicalDomain("Bücher.Example"), "xn--bcher-kva.example")
        self.assertEqual(canonicalDomain("xn--bcher-kva.example"), "xn--bcher-kva.example")

    def test_refused(self) -> None:
        for bad in ["", ".", "a..b", "example.org@x", "x:1", "a b", "a\x00b", "a\nb",
                    "x" * 64 + ".example", ("a" * 60 + ".") * 5, "example.org.."]:
            self.assertRaises(InvalidIdentity, canonicalDomain, bad)

    @given(_names)
    def test_idempotent(self, text: str) -> None:
        try:
            once = canonicalDomain(text)
        except InvalidIdentity:
            return
        self.assertEqual(canonicalDomain(once), once)
        self.assertNotIn("@", once)
        self.assertNotIn(":", once)
        self.assertTrue(once.isascii())


class UserTests(SynchronousTestCase):
    def test_case(self) -> None:
        self.assertEqual(canonicalUser("Bob"), "bob")
        self.assertEqual(canonicalUser("ÄRGER"), "ärger")

    def test_refused(self) -> None:
        for bad in ["", "a\x00b", "a\nb", "a\x7fb", "a\u2028b", "x" * (MAX_USER + 1)]:
            self.assertRaises(InvalidIdentity, canonicalUser, bad)

    def test_atAllowed(self) -> None:
        self.assertEqual(canonicalUser("Admin@Example.org"), "admin@example.org")

    @given(_names)
    def test_idempotent(self, text: str) -> None:
        try:
            once = canonicalUser(text)
        except InvalidIdentity:
            return
        self.assertEqual(canonicalUser(once), once)


class IdentityTests(SynchronousTestCase):
    @given(_names, _names)
    def test_oneIdentityPerInput(self, user: str, domain: str) -> None:
        """
        The same input always gives the same identity (or is always refused),
        the identity is its own canonical form, and its jid splits back into
        exactly its user and domain at the last C{@}.
        """
        first = canonicalOrNone(user, domain)
        second = canonicalOrNone(user, domain)
        self.assertEqual(first, second)
        if first is None:
            return
        self.assertEqual(canonical(first.user, first.domain), first)
        splitUser, _, splitDomain = first.jid.rpartition("@")
        self.assertEqual((splitUser, splitDomain), (first.user, first.domain))

    def test_tenantVariantsAreOne(self) -> None:
        variants = ["other.example", "OTHER.EXAMPLE", "Other.Example.", "other.example."]
        self.assertEqual({canonical("Bob", d) for d in variants},
                         {canonical("bob", "other.example")})
