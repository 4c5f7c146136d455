"""phi3ref.dequantize / quantize against gguf.quants, the independent numpy reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from phi3ref import QUANT_TYPES, dequantize, quantize
from phi3ref.quants import QUANTIZABLE_TYPES, quant_type, row_bytes

ALL_TYPES = list(QUANT_TYPES)
BLOCK_TYPES = [t for t in ALL_TYPES if QUANT_TYPES[t].block_size > 1]

# Byte offsets of the float16 scale fields of each block (the table's, checked below).
SCALE_OFFSETS = {qtype: list(t.scale_offsets) for qtype, t in QUANT_TYPES.items()}


def test_the_table_places_the_scales_as_ggml_common_h():
    """The table's fields put d (and dmin / m) where ggml-common.h's structs do, written
    out once more by hand; a field the block lacks is named in the error."""
    assert {q.name: SCALE_OFFSETS[q] for q in BLOCK_TYPES} == {
        "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
        "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
    }
    assert (QUANT_TYPES[QT.Q5_K].offset("qh"), QUANT_TYPES[QT.Q6_K].offset("scales"), QUANT_TYPES[QT.Q3_K].offset("scales")) == (16, 192, 96)
    with pytest.raises(KeyError, match="a Q4_0 block has no field 'dmin' \\(fields: d, qs\\)"):
        QUANT_TYPES[QT.Q4_0].offset("dmin")


def reference(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    # Compare bit patterns: equal values, equal signs of zero, equal NaNs.
    mismatch = ours.view(np.uint32) != ref.view(np.uint32)
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, first at {np.argwhere(mismatch)[0]}"


def test_code_bits_are_the_formats_widths():
    """Each type's code width, from its code fields' bytes: ggml's names of the formats."""
    widths = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8, QT.Q2_K: 2, QT.Q3_K: 3,
              QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6, QT.IQ4_NL: 4, QT.IQ4_XS: 4, QT.F32: 0, QT.F16: 0, QT.BF16: 0}
    assert {t: QUANT_TYPES[t].code_bits for t in widths} == widths
    assert set(QUANT_TYPES) <= set(widths), "a type without its expected width here"


def test_table_matches_gguf():
    for qtype, t in QUANT_TYPES.items():
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[qtype], qtype.name


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    t = QUANT_TYPES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(3, 5, 4 * t.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference(raw, qtype)
    assert_bit_exact(dequantize(raw, qtype), ref)
    assert dequantize(raw, qtype.name).shape == (3, 5, 4 * t.block_size)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_zero_blocks(qtype):
    t = QUANT_TYPES[qtype]
    raw = np.zeros((2, 3 * t.type_size), dtype=np.uint8)
    ours = dequantize(raw, qtype)
    assert_bit_exact(ours, reference(raw, qtype))
    assert not ours.any()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    "scale_bits",
    [0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0400, 0x3C00, 0x0000, 0x8000],
    ids=["f16max", "-f16max", "subnormal", "-subnormal", "smallest-normal", "one", "zero", "-zero"],
)
def test_extreme_scales(qtype, scale_bits):
    t = QUANT_TYPES[qtype]
    rng = np.random.default_rng(scale_bits)
    raw = rng.integers(0, 256, size=(16, t.type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        raw[:, off : off + 2] = np.array([scale_bits], dtype="<u2").view(np.uint8)
    # all codes at their maximum in half of the blocks
    raw[8:, :] |= np.array([0xFF if all(not (o <= i < o + 2) for o in SCALE_OFFSETS[qtype]) else 0 for i in range(t.type_size)], dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference(raw, qtype)
    assert_bit_exact(dequantize(raw, qtype), ref)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_float_extremes(qtype):
    values = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6e-8, 3.4e38, np.inf, -np.inf, np.nan, 1e-40], dtype=np.float32)
    if qtype == QT.F16:
        with np.errstate(over="ignore"):
            raw = values.astype("<f2").view(np.uint8)
    elif qtype == QT.BF16:
        raw = (values.view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    else:
        raw = values.view(np.uint8)
    assert_bit_exact(dequantize(raw, qtype), reference(raw, qtype))


def test_memmap_view_is_not_copied(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, 144 * 2), dtype=np.uint8)
    path = tmp_path / "blocks.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    assert_bit_exact(dequantize(mm[10:20], QT.Q4_K), reference(raw[10:20], QT.Q4_K))


def test_dequantize_errors():
    with pytest.raises(ValueError, match="whole number of 144-byte blocks"):
        dequantize(np.zeros(100, dtype=np.uint8), "Q4_K")
    with pytest.raises(ValueError, match="takes uint8"):
        dequantize(np.zeros(144, dtype=np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unknown GGML quantization type 'Q9_X'"):
        dequantize(np.zeros(144, dtype=np.uint8), "Q9_X")
    with pytest.raises(ValueError, match="IQ2_XXS is not supported"):
        dequantize(np.zeros(66, dtype=np.uint8), QT.IQ2_XXS)


def test_row_bytes():
    assert row_bytes("Q4_K", 3072) == 12 * 144
    assert row_bytes(QT.F16, 5) == 10
    with pytest.raises(ValueError, match="whole blocks of 256"):
        row_bytes("Q6_K", 100)
    assert quant_type(12).name == "Q4_K"


# ---- quantization -------------------------------------------------------------------


def _worst_case_error(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))| that the format permits with the
    scale choices documented in phi3ref.quants (half a quantization step, plus what the
    float16 scales and 6-/8-bit sub-block scales cost)."""
    eps16 = 2.0**-10
    t = QUANT_TYPES[qtype]
    blocks = x.reshape(-1, t.block_size).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    if qtype == QT.Q8_0:
        bound = 0.5 * amax / 127 * (1 + eps16) + amax * eps16 / 2
    elif qtype in (QT.Q4_0, QT.Q5_0):
        # ggml's reference maps the largest-magnitude value onto -2^(b-1); the opposite
        # extreme can then be one full step away.
        levels = 8 if qtype == QT.Q4_0 else 16
        bound = amax / levels * (1 + eps16) + amax * eps16
    elif qtype in (QT.Q4_1, QT.Q5_1):
        levels = 15 if qtype == QT.Q4_1 else 31
        step = (hi - lo) / levels
        bound = 0.5 * step * (1 + eps16) + levels * step * eps16 + np.abs(lo) * eps16
    elif qtype in (QT.Q4_K, QT.Q5_K):
        levels = 15 if qtype == QT.Q4_K else 31
        sub = blocks.reshape(-1, 8, 32)
        rng_j = np.maximum(sub.max(axis=2), 0) - np.minimum(sub.min(axis=2), 0)  # (n, 8)
        spread = rng_j.max(axis=1, keepdims=True)
        bound_j = 0.5 * rng_j / levels + 1.1 * spread / (63 * levels) * 2
        bound = np.repeat(bound_j, 32, axis=1)
    elif qtype == QT.Q6_K:
        sub = np.abs(blocks.reshape(-1, 16, 16)).max(axis=2)  # (n, 16)
        bound_j = 0.5 * sub / 31.5 + 0.5 * 1.01 * sub.max(axis=1, keepdims=True) / (31.5 * 127)
        bound = np.repeat(bound_j, 16, axis=1)
    elif qtype == QT.F16:
        bound = np.abs(blocks) * eps16 / 2 + 2.0**-25  # subnormal spacing below 2^-14
    elif qtype == QT.BF16:
        bound = np.abs(blocks) * 2.0**-8
    else:
        bound = np.zeros_like(blocks)
    return (np.broadcast_to(bound, blocks.shape) * (1 + 1e-6) + 1e-30).reshape(x.shape)


def _inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "normal": rng.standard_normal((4, n)).astype(np.float32),
        "heavy-tailed": (rng.standard_t(2, size=(4, n)) * 0.02).astype(np.float32),
        "all-positive": (rng.random((4, n)) * 3 + 0.5).astype(np.float32),
        "all-negative": (-rng.random((4, n)) * 3 - 0.5).astype(np.float32),
        "constant": np.full((2, n), -0.75, dtype=np.float32),
        "zeros": np.zeros((2, n), dtype=np.float32),
        "wide-range": (rng.standard_normal((2, n)) * np.logspace(-3, 3, n)).astype(np.float32),
    }


@pytest.mark.parametrize("qtype", QUANTIZABLE_TYPES, ids=lambda t: t.name)
def test_quantize_round_trip(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    for label, x in _inputs(rng, 512).items():
        raw = quantize(x, qtype)
        t = QUANT_TYPES[qtype]
        assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], 512 // t.block_size * t.type_size)
        ours = dequantize(raw, qtype)
        # the bytes are valid GGML: the independent decoder agrees bit for bit
        assert_bit_exact(ours, reference(raw, qtype))
        err = np.abs(ours.astype(np.float64) - x)
        bound = _worst_case_error(x, qtype)
        worst = np.argmax(err - bound)
        assert (err <= bound).all(), f"{label}: error {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g} at {worst}"
        if label == "zeros":
            assert not ours.any()


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16], ids=lambda t: t.name)
def test_legacy_quantize_matches_ggml_reference(qtype):
    """For these types phi3ref follows ggml's reference quantizer exactly (as gguf-py does)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype).view(np.uint8).reshape(8, -1))


def test_k_quant_error_is_typical_of_the_format():
    """Beyond the worst case: relative RMS error on Gaussian weights, as in llama.cpp's
    quantize-stats (roughly 4.5e-2 for Q4_K, 2e-2 for Q5_K, 1e-2 for Q6_K with its scale search)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    limits = {QT.Q4_K: 0.12, QT.Q5_K: 0.06, QT.Q6_K: 0.03, QT.Q8_0: 0.01}
    for qtype, limit in limits.items():
        rel_rms = np.sqrt(np.mean((dequantize(quantize(x, qtype), qtype) - x) ** 2))
        assert rel_rms < limit, (qtype.name, rel_rms)


def test_quantize_errors():
    with pytest.raises(ValueError, match="whole number of 256-element blocks"):
        quantize(np.zeros(300, dtype=np.float32), "Q4_K")
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize(np.array([np.nan] * 32, dtype=np.float32), "Q8_0")
    with pytest.raises(ValueError, match="no encoder for Q2_K"):
        quantize(np.zeros(256, dtype=np.float32), "Q2_K")
