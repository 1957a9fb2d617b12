"""Sticky-session cookies: what one key seals, that key opens, and nothing else opens."""

from __future__ import annotations

import base64
import os

import pytest
from flynn_router.sticky import StickyCookies


def test_round_trip() -> None:
    cookies = StickyCookies(os.urandom(32))
    for addr in ("10.0.0.1:5000", "[fd00::1]:8080", "127.0.0.2:65535"):
        value = cookies.encode(addr)
        assert cookies.decode(value) == addr
        # a value a cookie can carry as it is, and one that hides the address
        assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert addr not in value


def test_a_fresh_instance_with_the_same_key_opens_old_cookies() -> None:
    key = os.urandom(32)
    value = StickyCookies(key).encode("10.0.0.1:5000")
    assert StickyCookies(key).decode(value) == "10.0.0.1:5000"
    assert StickyCookies.from_base64(base64.b64encode(key).decode()).decode(value) == (
        "10.0.0.1:5000"
    )


def test_seals_are_random_per_instance() -> None:
    key = os.urandom(32)
    assert StickyCookies(key).encode("10.0.0.1:5000") != StickyCookies(key).encode("10.0.0.1:5000")


def test_another_key_opens_nothing() -> None:
    value = StickyCookies(os.urandom(32)).encode("10.0.0.1:5000")
    assert StickyCookies(os.urandom(32)).decode(value) is None


def test_tampered_values_open_to_nothing() -> None:
    cookies = StickyCookies(os.urandom(32))
    value = cookies.encode("10.0.0.1:5000")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        assert cookies.decode(text) is None, i
    assert cookies.decode(value[:-4]) is None
    assert cookies.decode(value + "AAAA") is None


@pytest.mark.parametrize(
    "garbage",
    ["", "=", "!!!", "a", "a" * 1000, "é", base64.urlsafe_b64encode(b"x" * 20).decode(), "=" * 40],
)
def test_garbage_opens_to_nothing(garbage: str) -> None:
    assert StickyCookies(os.urandom(32)).decode(garbage) is None


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        StickyCookies(b"short")


def test_the_cookie_key_is_read_in_either_base64_alphabet_padded_or_not() -> None:
    import base64

    from flynn_router.sticky import decode_key

    key = bytes(range(200, 232))  # has bytes that encode to '+' '/' or '-' '_'
    for text in (
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),  # bootstrap's gen-random
    ):
        assert decode_key(text) == key
    with pytest.raises(ValueError, match="16 bytes"):
        decode_key(base64.b64encode(key[:16]).decode())
    with pytest.raises(ValueError, match="not base64"):
        decode_key("not a key!")
