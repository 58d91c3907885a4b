"""SipHash-2-4 (compiled; twin: siphash_py.py): a keyed pseudo-random function for short
inputs, the auth policy's token-cache key."""

def siphash128(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 16 bytes (the reference
    implementation's byte order). ``ValueError`` for another key length."""

def siphash64(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 8 bytes, little-endian."""
