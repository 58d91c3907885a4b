"""SipHash-2-4 with 64- and 128-bit output: the pure-Python twin of ``siphash.pyx`` and
the readable specification (Aumasson and Bernstein, "SipHash: a fast short-input PRF",
2012; the 128-bit variant as in their reference implementation)."""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _rounds(v: list[int], n: int) -> None:
    """``n`` SipRounds on the state ``v`` (four 64-bit words), in place."""
    v0, v1, v2, v3 = v
    for _ in range(n):
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    v[:] = [v0, v1, v2, v3]


def _siphash(key: bytes, data: bytes, wide: bool) -> bytes:
    if not isinstance(key, bytes) or len(key) != 16:
        raise ValueError("SipHash needs a 16-byte key")
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:], "little")
    v = [
        k0 ^ 0x736F6D6570736575,
        k1 ^ 0x646F72616E646F6D,
        k0 ^ 0x6C7967656E657261,
        k1 ^ 0x7465646279746573,
    ]
    if wide:
        v[1] ^= 0xEE
    whole = len(data) - len(data) % 8
    for i in range(0, whole, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v[3] ^= m
        _rounds(v, 2)
        v[0] ^= m
    # The last block: the remaining bytes, and the length's low byte on top.
    m = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v[3] ^= m
    _rounds(v, 2)
    v[0] ^= m
    v[2] ^= 0xEE if wide else 0xFF
    _rounds(v, 4)
    out = (v[0] ^ v[1] ^ v[2] ^ v[3]).to_bytes(8, "little")
    if wide:
        v[1] ^= 0xDD
        _rounds(v, 4)
        out += (v[0] ^ v[1] ^ v[2] ^ v[3]).to_bytes(8, "little")
    return out


def siphash128(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 16 bytes (the reference
    implementation's byte order)."""
    return _siphash(key, data, True)


def siphash64(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 8 bytes, little-endian."""
    return _siphash(key, data, False)
