"""Object ids: BLAKE3-256 digests, shown as 64 lowercase hex digits."""

from __future__ import annotations

import blake3

ID_SIZE = 32  # bytes; BLAKE3-256
HEX_SIZE = 2 * ID_SIZE


#: ``HASHER(data).digest()`` is ``hash_bytes(data)`` (for compiled code that hashes).
HASHER = blake3.blake3


def hash_bytes(data: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest of ``data`` (single-threaded: callers parallelise)."""
    return HASHER(data).digest()


def new_hasher() -> "blake3.blake3":
    return blake3.blake3()


def to_hex(oid: bytes) -> str:
    return oid.hex()


def from_hex(text: str) -> bytes:
    if len(text) != HEX_SIZE:
        raise ValueError(f"not a full id: {text!r}")
    return bytes.fromhex(text)


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
