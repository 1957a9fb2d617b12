"""Sticky-session cookies: the `_backend` cookie of a sticky route names the backend that
served the client, sealed so that a client can neither read nor forge it.

The value is `urlsafe_base64(nonce || AES-GCM(key, nonce, addr))` without padding, under the
router's 32-byte `COOKIE_KEY`. Flynn sealed it with NaCl secretbox; AES-GCM from
`cryptography` gives the same guarantee (secret and authenticated) with a library we already
depend on. A cookie from another key, a tampered one or garbage decodes to None, and the
request is then routed as if it had no cookie.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
TAG_SIZE = 16
MAX_VALUE = 512  # far above any "ip:port"; longer values are not worth decrypting
CACHE_SIZE = 4096


class StickyCookies:
    """Seals backend addresses into cookie values and opens them again. Both directions are
    cached (an address's sealed value is reused for every client, a cookie's address is
    remembered), so a busy sticky route costs one dict lookup per request, not a cipher."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the cookie key must be 32 bytes")
        self._aead = AESGCM(key)
        self._sealed: dict[str, str] = {}
        self._opened: dict[str, str | None] = {}

    @classmethod
    def from_base64(cls, text: str) -> StickyCookies:
        """The key as the router's environment carries it (`COOKIE_KEY`)."""
        return cls(decode_key(text))

    def encode(self, addr: str) -> str:
        value = self._sealed.get(addr)
        if value is None:
            nonce = os.urandom(NONCE_SIZE)
            sealed = nonce + self._aead.encrypt(nonce, addr.encode(), None)
            value = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
            if len(self._sealed) >= CACHE_SIZE:
                self._sealed.clear()
            self._sealed[addr] = value
        return value

    def decode(self, value: str) -> str | None:
        try:
            return self._opened[value]
        except KeyError:
            pass
        addr = self._open(value)
        if len(self._opened) >= CACHE_SIZE:
            self._opened.clear()
        self._opened[value] = addr
        return addr

    def _open(self, value: str) -> str | None:
        if not value or len(value) > MAX_VALUE:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < NONCE_SIZE + TAG_SIZE:
            return None
        try:
            plain = self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], None)
        except InvalidTag:
            return None
        try:
            return plain.decode("ascii")
        except UnicodeDecodeError:
            return None


def decode_key(text: str) -> bytes:
    """`COOKIE_KEY`: base64 of 32 bytes, standard or URL-safe alphabet (bootstrap's gen-random
    writes the latter), padded or not. Raises ValueError otherwise."""
    text = text.strip()
    raw = text.replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(key) != 32:
        raise ValueError(f"{len(key)} bytes, not 32")
    return key
