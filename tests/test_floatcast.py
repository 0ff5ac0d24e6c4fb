"""The compiled casts (mindformers_conv/_floatcast.c) against dtypes.cast, bit for bit: every 16-bit pattern,
and for fp32 every high half with the low halves that decide rounding plus every 7th mantissa of the exponents
around fp16's subnormals; on this CPU's fast loops (F16C where it has them) and on the portable ones."""

import numpy as np
import pytest
import torch

from mindformers_conv import _floatcast, dtypes  # built by `pip install -e .` (make setup); tests need it
from mindformers_conv.tensor_ref import raw_bytes

UNSIGNED = {2: np.uint16, 4: np.uint32}
PAIRS = _floatcast.pairs()


def every_16_bit_pattern() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def rounding_cases() -> np.ndarray:
    """fp32 patterns where bf16 and fp16 rounding, overflow, subnormals and NaN payloads change."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x0800, 0x0FFF, 0x1000, 0x1001, 0x17FF, 0x1800, 0x1FFF, 0x2000, 0x7FFF, 0x8000, 0x8001,
                    0xFFFF], dtype=np.uint32)
    exponents = np.arange(100, 115, dtype=np.uint32) << 23  # fp16 subnormals and the first normals
    mantissas = np.arange(0, 1 << 23, 7, dtype=np.uint32)
    positive = np.concatenate([(high[:, None] | low).ravel(), (exponents[:, None] | mantissas).ravel(),
                               np.random.default_rng(0).integers(0, 1 << 31, 1 << 20, dtype=np.uint32)])
    return np.concatenate([positive, positive | 0x80000000])


def expected(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    x = torch.from_numpy(bits.view({2: np.int16, 4: np.int32}[bits.itemsize])).view(dtypes.BY_CODE[source].torch)
    return raw_bytes(dtypes.cast(x, dtypes.BY_CODE[target])).numpy().view(UNSIGNED[dtypes.BY_CODE[target].itemsize])


def test_the_extension_casts_every_pair_of_fp32_fp16_bf16():
    assert sorted(PAIRS) == sorted((a, b) for a in ("F32", "F16", "BF16") for b in ("F32", "F16", "BF16") if a != b)


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_a_compiled_cast_is_dtypes_cast_bit_for_bit(pair, portable):
    source, target = pair
    bits = every_16_bit_pattern() if dtypes.BY_CODE[source].itemsize == 2 else rounding_cases()
    for part in (bits, bits[3:]):  # the second ends in a partial block of 8
        out = np.empty(part.size, UNSIGNED[dtypes.BY_CODE[target].itemsize])
        _floatcast.cast(part, out, source, target, portable=portable)
        want = expected(part, source, target)
        wrong = np.flatnonzero(out != want)
        assert wrong.size == 0, [f"{part[i]:#x} -> {out[i]:#x}, not {want[i]:#x}" for i in wrong[:5]]


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_buffers_at_any_address_are_cast(pair, portable):
    """A tensor in a .ckpt starts at any byte: source and output at odd addresses give the same bytes."""
    source, target = (dtypes.BY_CODE[c] for c in pair)
    n = 1000  # 125 blocks of 8 and no tail, then a tail of 5
    bits = np.random.default_rng(5).integers(0, 256, n * source.itemsize, dtype=np.uint8).tobytes()
    for count in (n, n - 5):
        want = bytearray(count * target.itemsize)
        _floatcast.cast(bits[:count * source.itemsize], want, source.code, target.code, portable=portable)
        src, out = bytearray(b"x" + bits[:count * source.itemsize]), bytearray(count * target.itemsize + 3)
        _floatcast.cast(memoryview(src)[1:], memoryview(out)[3:], source.code, target.code, portable=portable)
        assert out[3:] == want


def test_bad_buffers_are_refused():
    src, dst = bytearray(16), bytearray(16)
    with pytest.raises(ValueError, match="no cast from F64 to F16"):
        _floatcast.cast(src, dst, "F64", "F16")
    with pytest.raises(ValueError, match="16 bytes of BF16 do not fill 16 bytes of F32"):
        _floatcast.cast(src, dst, "BF16", "F32")
    with pytest.raises(TypeError):
        _floatcast.cast(src, bytes(16), "BF16", "F16")  # read-only output
