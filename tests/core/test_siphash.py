"""SipHash-2-4 on both implementations: the reference implementation's known answers,
agreement between the compiled module and its twin, and the argument contract."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.conftest import load

KEY = bytes(range(16))

# The reference implementation's vectors (github.com/veorq/SipHash, vectors.h): the tag
# of the n-byte message 00 01 .. (n-1) under the key 00 01 .. 0f.
SIP64 = [
    0x726FDB47DD0E0E31, 0x74F839C593DC67FD, 0x0D6C8009D9A94F5A, 0x85676696D7FB7E2D,
    0xCF2794E0277187B7, 0x18765564CD99A68D, 0xCBC9466E58FEE3CE, 0xAB0200F58B01D137,
    0x93F5F5799A932462, 0x9E0082DF0BA9E4B0, 0x7A5DBBC594DDB9F3, 0xF4B32F46226BADA7,
    0x751E8FBC860EE5FB, 0x14EA5627C0843D90, 0xF723CA908E7AF2EE, 0xA129CA6149BE45E5,
    0x3F2ACC7F57C29BDB, 0x699AE9F52CBE4794, 0x4BC1B3F0968DD39C, 0xBB6DC91DA77961BD,
    0xBED65CF21AA2EE98, 0xD0F2CBB02E3B67C7, 0x93536795E3A33E88, 0xA80C038CCD5CCEC8,
    0xB8AD50C6F649AF94, 0xBCE192DE8A85B8EA, 0x17D835B85BBB15F3, 0x2F2E6163076BCFAD,
    0xDE4DAAACA71DC9A5, 0xA6A2506687956571, 0xAD87A3535C49EF28, 0x32D892FAD841C342,
    0x7127512F72F27CCE, 0xA7F32346F95978E3, 0x12E0B01ABB051238, 0x15E034D40FA197AE,
    0x314DFFBE0815A3B4, 0x027990F029623981, 0xCADCD4E59EF40C4D, 0x9ABFD8766A33735C,
    0x0E3EA96B5304A7D0, 0xAD0C42D6FC585992, 0x187306C89BC215A9, 0xD4A60ABCF3792B95,
    0xF935451DE4F21DF2, 0xA9538F0419755787, 0xDB9ACDDFF56CA510, 0xD06C98CD5C0975EB,
    0xE612A3CB9ECBA951, 0xC766E62CFCADAF96, 0xEE64435A9752FE72, 0xA192D576B245165A,
    0x0A8787BF8ECB74B2, 0x81B3E73D20B49B6F, 0x7FA8220BA3B2ECEA, 0x245731C13CA42499,
    0xB78DBFAF3A8D83BD, 0xEA1AD565322A1A0B, 0x60E61C23A3795013, 0x6606D7E446282B93,
    0x6CA4ECB15C5F91E1, 0x9F626DA15C9625F3, 0xE51B38608EF25F57, 0x958A324CEB064572,
]  # fmt: skip
SIP128 = [
    "a3817f04ba25a8e66df67214c7550293",
    "da87c1d86b99af44347659119b22fc45",
    "8177228da4a45dc7fca38bdef60affe4",
    "9c70b60c5267a94e5f33b6b02985ed51",
    "f88164c12d9c8faf7d0f6e7c7bcd5579",
    "1368875980776f8854527a07690e9627",
    "14eeca338b208613485ea0308fd7a15e",
    "a1f1ebbed8dbc153c0b84aa61ff08239",
]


@pytest.mark.parametrize("n", range(64))
def test_siphash64_known_answers(impl: str, n: int) -> None:
    """Every 64-bit reference vector, both implementations (block boundaries included:
    lengths 0-63 cover every tail length 0-7 eight times)."""
    sip = load("siphash", impl)
    assert sip.siphash64(KEY, bytes(range(n))) == SIP64[n].to_bytes(8, "little")


@pytest.mark.parametrize("n", range(len(SIP128)))
def test_siphash128_known_answers(impl: str, n: int) -> None:
    """The 128-bit variant's reference vectors (its own initialisation and finalisation
    constants, not the 64-bit tag twice)."""
    sip = load("siphash", impl)
    assert sip.siphash128(KEY, bytes(range(n))).hex() == SIP128[n]


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=600))
def test_compiled_and_twin_agree(key: bytes, data: bytes) -> None:
    """Operation by operation, the compiled module and the specification agree."""
    compiled, twin = load("siphash", "compiled"), load("siphash", "python")
    assert compiled.siphash128(key, data) == twin.siphash128(key, data)
    assert compiled.siphash64(key, data) == twin.siphash64(key, data)


def test_long_inputs_and_lengths_past_255(impl: str) -> None:
    """Only the length's low byte enters the last block (the specification): inputs of
    256+ bytes still hash, and equal results need equal inputs."""
    sip = load("siphash", impl)
    twin = load("siphash", "python")
    data = os.urandom(4096)
    assert sip.siphash128(KEY, data) == twin.siphash128(KEY, data)
    assert sip.siphash128(KEY, data[:300]) != sip.siphash128(KEY, data[:301])


def test_the_key_matters(impl: str) -> None:
    """A keyed function: another key, another digest (what makes cache keys unforgeable
    without the process's key)."""
    sip = load("siphash", impl)
    other = bytes(range(1, 17))
    assert sip.siphash128(KEY, b"token") != sip.siphash128(other, b"token")
    assert len(sip.siphash128(KEY, b"token")) == 16
    assert len(sip.siphash64(KEY, b"token")) == 8


@pytest.mark.parametrize("key", [b"", bytes(15), bytes(17), bytes(32)])
def test_key_of_another_length_is_refused(impl: str, key: bytes) -> None:
    sip = load("siphash", impl)
    with pytest.raises(ValueError, match="16-byte key"):
        sip.siphash128(key, b"x")
    with pytest.raises(ValueError, match="16-byte key"):
        sip.siphash64(key, b"x")


def test_data_must_be_bytes(impl: str) -> None:
    sip = load("siphash", impl)
    with pytest.raises(TypeError):
        sip.siphash128(KEY, None)
    with pytest.raises(TypeError):
        sip.siphash128(KEY, "text")
