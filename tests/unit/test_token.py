"""
Tests for L{xcauth.core.tokens}: the vectors of PROTOCOLS.md, expiry, key rotation and
malformed input.
"""

import base64
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xcauth.core.tokens import keyId, looksLikeToken, makeToken, verifyToken

VECTOR_1 = "AMydsCzkh8-8vjcb9U2gqV/FZQAAEfg"
VECTOR_2 = "AJP4Mvv5P8qZZJcENQhzfH$ruF%1458"


class VectorTests(SynchronousTestCase):
    def test_makeVectors(self) -> None:
        self.assertEqual(makeToken(b"01234", "tuser", "tdomain", 1000 + 3600), VECTOR_1)
        self.assertEqual(
            makeToken(b"secret", "foo", "bar", 1500894607 + 3600), VECTOR_2
        )

    def test_validBeforeExpiry(self) -> None:
        self.assertTrue(verifyToken(VECTOR_1, "tuser", "tdomain", [b"01234"], 2000))
        # Valid up to and including the expiry second.
        self.assertTrue(verifyToken(VECTOR_1, "tuser", "tdomain", [b"01234"], 4600))

    def test_expired(self) -> None:
        self.assertFalse(verifyToken(VECTOR_1, "tuser", "tdomain", [b"01234"], 4601))
        self.assertFalse(verifyToken(VECTOR_1, "tuser", "tdomain", [b"01234"], 5000))

    def test_secondVector(self) -> None:
        self.assertTrue(verifyToken(VECTOR_2, "foo", "bar", [b"secret"], 1500894607))
        self.assertFalse(verifyToken(VECTOR_2, "foo", "bar", [b"secret"], 1500894607 + 3601))

    def test_otherUserOrDomain(self) -> None:
        self.assertFalse(verifyToken(VECTOR_1, "tuser2", "tdomain", [b"01234"], 2000))
        self.assertFalse(verifyToken(VECTOR_1, "tuser", "tdomain2", [b"01234"], 2000))

    def test_wrongSecret(self) -> None:
        self.assertFalse(verifyToken(VECTOR_1, "tuser", "tdomain", [b"43210"], 2000))

    def test_keyRotation(self) -> None:
        """
        The token's key id selects the matching secret among several.
        """
        new = makeToken(b"new", "u", "d", 10_000)
        old = makeToken(b"old", "u", "d", 10_000)
        for token in (new, old):
            self.assertTrue(verifyToken(token, "u", "d", [b"new", b"old"], 5000))
        self.assertFalse(verifyToken(old, "u", "d", [b"new"], 5000))
        self.assertNotEqual(keyId(b"new"), keyId(b"old"))

    def test_tamperedMac(self) -> None:
        raw = list(VECTOR_1)
        raw[5] = "A" if raw[5] != "A" else "B"
        self.assertFalse(verifyToken("".join(raw), "tuser", "tdomain", [b"01234"], 2000))

    def test_extendedExpiryRejected(self) -> None:
        """
        Changing the expiry bytes breaks the MAC.
        """
        raw = base64.b64decode(VECTOR_1.replace("-", "O") + "=")
        later = raw[:19] + struct.pack(">I", struct.unpack(">I", raw[19:])[0] + 3600)
        tampered = base64.b64encode(later).decode().rstrip("=").replace("O", "-")
        self.assertNotEqual(tampered, VECTOR_1)
        self.assertFalse(verifyToken(tampered, "tuser", "tdomain", [b"01234"], 2000))

    def test_nonAsciiUser(self) -> None:
        token = makeToken(b"s", "jörg", "exämple.org", 10_000)
        self.assertTrue(verifyToken(token, "jörg", "exämple.org", [b"s"], 1))

    def test_looksLikeToken(self) -> None:
        self.assertTrue(looksLikeToken(VECTOR_1))
        self.assertFalse(looksLikeToken("good_password"))
        self.assertFalse(looksLikeToken(VECTOR_1 + "A"))
        self.assertFalse(looksLikeToken("B" + VECTOR_1[1:]))  # version byte != 0


class GarbageTests(SynchronousTestCase):
    @given(st.text(max_size=64))
    def test_anyTextIsNoToken(self, text: str) -> None:
        """
        Arbitrary text never verifies and never raises.
        """
        self.assertFalse(verifyToken(text, "tuser", "tdomain", [b"01234"], 2000))


class UnambiguousBindingTests(SynchronousTestCase):
    """
    A token binds one user to one domain: moving an C{@} from the user into
    the domain does not make it valid for another pair.
    """

    def test_atMovedIntoDomainRefused(self) -> None:
        token = makeToken(b"s3cret", "admin@example.org", "x", 5000)
        self.assertTrue(verifyToken(token, "admin@example.org", "x", [b"s3cret"], 1000))
        self.assertFalse(verifyToken(token, "admin", "example.org@x", [b"s3cret"], 1000))

    def test_noTokenForAmbiguousDomain(self) -> None:
        self.assertRaises(ValueError, makeToken, b"s3cret", "admin", "example.org@x", 5000)
        self.assertRaises(ValueError, makeToken, b"s3cret", "", "x", 5000)

    def test_vectorsUnchanged(self) -> None:
        self.assertTrue(verifyToken(VECTOR_1, "tuser", "tdomain", [b"01234"], 2000))
