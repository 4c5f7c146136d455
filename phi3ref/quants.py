"""GGML quantization formats: one table of block layouts, one dequantize function per type.

Every quantized GGML tensor is a sequence of *blocks*. A block holds ``block_size``
consecutive elements of one row in ``type_size`` bytes: one or two float16 scales and
the packed integer codes. Rows always hold a whole number of blocks.

The layouts follow ``ggml-common.h`` (the ``block_q4_0``, ``block_q4_K``, ... structs).
Element order within a block is the one ggml's reference ``dequantize_row_*`` functions
produce; the functions here are written to give bit-identical float32 results (same
operations in the same order), which the tests check against ``gguf.quants.dequantize``.

``dequantize`` and ``quantize`` have the contract of ``gguf.quants``: the last axis of a
quantized array holds whole blocks as bytes (uint8), the last axis of a float array counts
elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

QK_K = 256  # elements in a K-quant super-block

__all__ = [
    "QK_K",
    "QuantType",
    "QUANT_TYPES",
    "QUANTIZABLE_TYPES",
    "quant_type",
    "dequantize",
    "quantize",
    "row_bytes",
]


CODE_FIELDS = ("qs", "qh", "ql", "hmask")  # ggml-common.h's names of the fields that hold codes


@dataclass(frozen=True)
class QuantType:
    """Layout of one GGML tensor type: ``block_size`` elements stored in a block whose
    ``fields`` are ggml-common.h's struct fields in order, (name, bytes)."""

    qtype: QT
    block_size: int
    fields: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def type_size(self) -> int:
        """Bytes of one block."""
        return sum(size for _, size in self.fields)

    def offset(self, field: str) -> int:
        """Where ``field`` starts in a block (``KeyError`` naming the fields if it has none)."""
        at = 0
        for name, size in self.fields:
            if name == field:
                return at
            at += size
        raise KeyError(f"a {self.name} block has no field {field!r} (fields: {', '.join(n for n, _ in self.fields)})")

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Where the block's float16 scales sit: d, and dmin or m where it has one."""
        return tuple(self.offset(f) for f in ("d", "dmin", "m") if f in dict(self.fields))

    @property
    def code_fields(self) -> tuple[tuple[str, int], ...]:
        """The fields holding the elements' codes (all but the scales), (name, bytes)."""
        return tuple((name, size) for name, size in self.fields if name in CODE_FIELDS)

    @property
    def code_bits(self) -> int:
        """Bits of one element's code, its parts in every code field together (Q5_K: 4 in qs
        and 1 in qh); 0 for the float types."""
        return 8 * sum(size for _, size in self.code_fields) // self.block_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


# The one table of supported types: the struct fields of ggml-common.h, in order, so each
# line can be checked against the C source (every kernel reads its offsets from here).
QUANT_TYPES: dict[QT, QuantType] = {
    t.qtype: t
    for t in [
        QuantType(QT.F32, 1, (("f32", 4),)),
        QuantType(QT.F16, 1, (("f16", 2),)),
        QuantType(QT.BF16, 1, (("bf16", 2),)),
        QuantType(QT.Q4_0, 32, (("d", 2), ("qs", 16))),
        QuantType(QT.Q4_1, 32, (("d", 2), ("m", 2), ("qs", 16))),
        QuantType(QT.Q5_0, 32, (("d", 2), ("qh", 4), ("qs", 16))),
        QuantType(QT.Q5_1, 32, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16))),
        QuantType(QT.Q8_0, 32, (("d", 2), ("qs", 32))),
        QuantType(QT.Q2_K, QK_K, (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))),
        QuantType(QT.Q3_K, QK_K, (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))),
        QuantType(QT.Q4_K, QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))),
        QuantType(QT.Q5_K, QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))),
        QuantType(QT.Q6_K, QK_K, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))),
        QuantType(QT.IQ4_NL, 32, (("d", 2), ("qs", 16))),
        QuantType(QT.IQ4_XS, QK_K, (("d", 2), ("scales_h", 2), ("scales_l", 4), ("qs", 128))),
    ]
}


def quant_type(qtype: QT | str | int) -> QuantType:
    """Look up a supported type by enum, name (``"Q4_K"``) or GGML id; ``ValueError`` otherwise."""
    try:
        if isinstance(qtype, str):
            key = QT[qtype.upper()]
        else:
            key = QT(qtype)
    except (KeyError, ValueError):
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if key not in QUANT_TYPES:
        supported = ", ".join(t.name for t in QUANT_TYPES)
        raise ValueError(f"GGML type {key.name} is not supported by phi3ref (supported: {supported})")
    return QUANT_TYPES[key]


def row_bytes(qtype: QT | str, n_elements: int) -> int:
    """Bytes taken by a row of ``n_elements`` elements; ``ValueError`` if it is not whole blocks."""
    t = quant_type(qtype)
    if n_elements % t.block_size:
        raise ValueError(f"a {t.name} row holds whole blocks of {t.block_size}; {n_elements} elements do not")
    return n_elements // t.block_size * t.type_size


# --------------------------------------------------------------------------------------
# helpers shared by the block decoders
# --------------------------------------------------------------------------------------

_F32 = np.float32


def _f16(b: np.ndarray) -> np.ndarray:
    """Bytes (..., 2) little-endian float16 -> float32 (..., 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) 4-bit codes: all low nibbles first, then all high nibbles.

    This is how ggml packs a 32-element run into 16 bytes: byte j holds element j in its
    low nibble and element j + 16 in its high nibble.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, n_planes: int) -> np.ndarray:
    """(n, k) bytes -> (n, n_planes, k): plane b holds bit b of every byte."""
    shifts = np.arange(n_planes, dtype=np.uint8).reshape(1, n_planes, 1)
    return (packed[:, None, :] >> shifts) & 1


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 4, k): plane s holds bits 2s..2s+1 of every byte."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    return (packed[:, None, :] >> shifts) & 3


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 scale bytes of Q4_K / Q5_K into eight 6-bit scales and eight 6-bit mins.

    Byte layout (capital letters: scales 0-7 = A-H, small letters: mins 0-7 = a-h;
    each letter is one bit of that value, most significant bit left)::

         0: EEAAAAAA    4: eeaaaaaa    8: eeeeEEEE
         1: FFBBBBBB    5: ffbbbbbb    9: ffffFFFF
         2: GGCCCCCC    6: ggcccccc   10: ggggGGGG
         3: HHDDDDDD    7: hhdddddd   11: hhhhHHHH

    Scales/mins 0-3 are the low six bits of bytes 0-3 / 4-7. Scales/mins 4-7 take their
    low four bits from bytes 8-11 and their top two bits from the top of bytes 0-3 / 4-7.
    """
    lo_sc, lo_m, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def _pack_k_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_k_scale_min`: eight 6-bit scales and mins -> 12 bytes."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


# The 16 non-uniform levels of IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml-common.h).
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


# --------------------------------------------------------------------------------------
# one block decoder per type: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32
# --------------------------------------------------------------------------------------


def _dq_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(_F32, copy=False)


def _dq_f16(b: np.ndarray) -> np.ndarray:
    return _f16(b)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(_F32)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(_F32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20]).astype(_F32)
    return d * q + m


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Legacy 5-bit codes: low nibble from qs, bit 4 of element j is bit j of the uint32 qh."""
    high = _bits(qh, 8).transpose(0, 2, 1).reshape(-1, 32)  # element 8*byte + bit
    return _nibbles(qs) | (high << 4)


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    q = _q5_codes(b[:, 2:6], b[:, 6:22]).astype(np.int8) - np.int8(16)
    return d * q.astype(_F32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _q5_codes(b[:, 4:8], b[:, 8:24]).astype(_F32)
    return d * q + m


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(_F32) * d


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    # Each scale byte: low nibble scales the 16 elements, high nibble their min.
    dl = (d * (scales & 0x0F).astype(_F32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(_F32)).reshape(n, 16, 1)
    # 2-bit codes: two halves of 128 elements; in each, byte l of the 32 holds elements
    # l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7.
    q = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16).astype(_F32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # Sixteen 6-bit scales, stored biased by 32. Letters A-P are scales 0-15, each letter
    # one bit (most significant left): low nibbles in bytes 0-7, top two bits in 8-11.
    #    0: IIIIAAAA    4: MMMMEEEE    8: MMIIEEAA
    #    1: JJJJBBBB    5: NNNNFFFF    9: NNJJFFBB
    #    2: KKKKCCCC    6: OOOOGGGG   10: OOKKGGCC
    #    3: LLLLDDDD    7: PPPPHHHH   11: PPLLHHDD
    low = _nibbles(scales[:, 0:8])  # (n, 16)
    high = _crumbs(scales[:, 8:12]).reshape(n, 16)  # plane s, byte j -> scale 4s + j
    sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(_F32)
    dl = (d * sc).reshape(n, 16, 1)
    # Low two bits as in Q2_K; the third bit of element i is bit i // 32 of hmask[i % 32],
    # and a *clear* bit means "subtract 4".
    low_q = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16)
    hbit = _bits(hmask, 8).reshape(n, 16, 16)
    q = (low_q.astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)).astype(_F32)
    return (dl * q).reshape(n, QK_K)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:144]
    dl = (d * sc.astype(_F32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(_F32)).reshape(n, 8, 1)
    # Four runs of 32 bytes; each gives 64 elements: 32 low nibbles, then 32 high ones.
    q = _nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32).astype(_F32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176]
    dl = (d * sc.astype(_F32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(_F32)).reshape(n, 8, 1)
    low = _nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32)
    # Bit 4 of element i is bit i // 32 of qh[i % 32].
    high = _bits(qh, 8)  # (n, 8, 32)
    q = (low | (high << 4)).astype(_F32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(_F32)
    d = _f16(b[:, 208:210])
    dl = (d * sc).reshape(n, 16, 1)
    # Two halves of 128 elements. Low four bits: 64 bytes of ql per half, low nibbles are
    # elements 0-63, high nibbles 64-127. Top two bits: 32 bytes of qh per half, bits
    # 2s..2s+1 of byte l belong to element 32s + l.
    low = _nibbles(ql.reshape(n * 2, 64)).reshape(n * 2, 128)
    high = _crumbs(qh.reshape(n * 2, 32)).reshape(n * 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(_F32)
    return (dl * q).reshape(n, QK_K)


def _dq_iq4_nl(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])
    return d * IQ4_LEVELS[_nibbles(b[:, 2:18])].astype(_F32)


def _dq_iq4_xs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    scales_h = np.ascontiguousarray(b[:, 2:4]).view("<u2")  # (n, 1): 2 bits per sub-block
    scales_l = b[:, 4:8]  # 4 bits per sub-block, sub-block 2j in the low nibble of byte j
    low = np.stack([scales_l & 0x0F, scales_l >> 4], axis=-1).reshape(n, 8)
    high = (scales_h >> (2 * np.arange(8, dtype=np.uint16))) & 3  # (n, 8)
    ls = ((low | (high.astype(np.uint8) << 4)).astype(np.int8) - np.int8(32)).astype(_F32)
    dl = (d * ls).reshape(n, 8, 1)
    # Eight sub-blocks of 32, each packed like an IQ4_NL block in 16 bytes.
    q = IQ4_LEVELS[_nibbles(b[:, 8:136].reshape(n * 8, 16))].reshape(n, 8, 32).astype(_F32)
    return (dl * q).reshape(n, QK_K)


_DEQUANTIZE_BLOCKS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _dq_f32,
    QT.F16: _dq_f16,
    QT.BF16: _dq_bf16,
    QT.Q4_0: _dq_q4_0,
    QT.Q4_1: _dq_q4_1,
    QT.Q5_0: _dq_q5_0,
    QT.Q5_1: _dq_q5_1,
    QT.Q8_0: _dq_q8_0,
    QT.Q2_K: _dq_q2_k,
    QT.Q3_K: _dq_q3_k,
    QT.Q4_K: _dq_q4_k,
    QT.Q5_K: _dq_q5_k,
    QT.Q6_K: _dq_q6_k,
    QT.IQ4_NL: _dq_iq4_nl,
    QT.IQ4_XS: _dq_iq4_xs,
}
assert _DEQUANTIZE_BLOCKS.keys() == QUANT_TYPES.keys()

# Bound the float32 temporaries of one call: decode this many blocks at a time.
_CHUNK_BYTES = 1 << 22


def dequantize(raw: np.ndarray, qtype: QT | str) -> np.ndarray:
    """Decode GGML blocks to float32.

    ``raw`` is a uint8 array whose last axis holds whole blocks (a memmap view is fine:
    it is read, never copied whole). Returns a new float32 array with the same leading
    axes and ``n_blocks * block_size`` elements on the last axis.
    """
    t = quant_type(qtype)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        if t.block_size == 1 and raw.dtype.itemsize == t.type_size:
            raw = raw.view(np.uint8)  # already-typed F32/F16 arrays, as gguf allows
        else:
            raise ValueError(f"dequantize({t.name}) takes uint8 bytes, got an array of {raw.dtype}")
    if raw.ndim == 0 or raw.shape[-1] % t.type_size:
        raise ValueError(
            f"dequantize({t.name}): last axis of {raw.shape[-1] if raw.ndim else 0} bytes "
            f"is not a whole number of {t.type_size}-byte blocks"
        )
    out_shape = (*raw.shape[:-1], raw.shape[-1] // t.type_size * t.block_size)
    blocks = raw.reshape(-1, t.type_size)
    out = np.empty((blocks.shape[0], t.block_size), dtype=_F32)
    step = max(1, _CHUNK_BYTES // t.type_size)
    decode = _DEQUANTIZE_BLOCKS[t.qtype]
    # Random or hostile bytes may hold float16 inf/NaN scales: decode them as IEEE says,
    # without warnings (ggml does the same).
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = decode(blocks[start : start + step])
    return out.reshape(out_shape)


# --------------------------------------------------------------------------------------
# quantization: float32 (n_blocks, block_size) -> (n_blocks, type_size) uint8
# --------------------------------------------------------------------------------------


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: halves go away from zero (``np.round`` would round them to even)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), x)


def _to_f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d).astype(_F32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles`: (n, 2k) codes -> (n, k) bytes."""
    k = q.shape[-1] // 2
    return (q[:, :k] | (q[:, k:] << 4)).astype(np.uint8)


def _symmetric_scale(x: np.ndarray, levels: int) -> np.ndarray:
    """The signed value of largest magnitude divided by -levels, as ggml's reference does,
    so that this element maps exactly onto the most negative code."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, idx, axis=-1) / _F32(-levels)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    d = _symmetric_scale(x, 8)
    q = np.minimum(np.trunc(x * _safe_inverse(d) + _F32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_to_f16_bytes(d), _pack_nibbles(q)], axis=-1)


def _asymmetric_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    return (hi - lo) / _F32(levels), lo


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    d, m = _asymmetric_scale(x, 15)
    q = np.minimum(np.trunc((x - m) * _safe_inverse(d) + _F32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(m), _pack_nibbles(q)], axis=-1)


def _pack_q5_high(q: np.ndarray) -> np.ndarray:
    """Bit 4 of the 32 codes -> 4 bytes (uint32 little-endian, bit j = element j)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    d = _symmetric_scale(x, 16)
    q = np.minimum(np.trunc(x * _safe_inverse(d) + _F32(16.5)), 31).astype(np.uint8)
    return np.concatenate([_to_f16_bytes(d), _pack_q5_high(q), _pack_nibbles(q & 0x0F)], axis=-1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    d, m = _asymmetric_scale(x, 31)
    q = np.minimum(np.trunc((x - m) * _safe_inverse(d) + _F32(0.5)), 31).astype(np.uint8)
    parts = [_to_f16_bytes(d), _to_f16_bytes(m), _pack_q5_high(q), _pack_nibbles(q & 0x0F)]
    return np.concatenate(parts, axis=-1)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1, keepdims=True) / _F32(127)
    q = _round_half_away(x * _safe_inverse(d)).astype(np.int8)
    return np.concatenate([_to_f16_bytes(d), q.view(np.uint8)], axis=-1)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """Round up to a float16 value >= x (x >= 0), returned as float32."""
    h = x.astype(np.float16)
    low = h.astype(_F32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(_F32)


def _k_scales_mins(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Scales and mins for Q4_K / Q5_K: eight sub-blocks of 32 elements per 256-block.

    A sub-block j is stored as ``x ~ (d * sc[j]) * q - (dmin * m[j])`` with 6-bit
    ``sc[j], m[j]`` and ``0 <= q <= levels``. The offset can only be subtracted, so a
    sub-block whose values are all positive starts at zero (as in ggml). Scales and mins
    are rounded *up* so that every value stays inside the representable range and the
    per-element error stays within half a step. (ggml additionally searches for the scale
    that minimises the squared error; any valid choice decodes the same way.)
    """
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)  # (n, 8) <= 0
    hi = sub.max(axis=-1)
    dmin = _f16_at_least((-lo).max(axis=-1) / _F32(63))
    m = np.minimum(np.ceil(-lo / np.where(dmin == 0, 1, dmin)[:, None]), 63)  # (n, 8)
    offset = dmin[:, None] * m  # what is subtracted, >= -lo
    need = (np.maximum(hi, 0) + offset) / _F32(levels)  # step each sub-block needs
    d = _f16_at_least(need.max(axis=-1) / 63)
    sc = np.minimum(np.ceil(need / np.where(d == 0, 1, d)[:, None]), 63)
    step = d[:, None] * sc
    inv = _safe_inverse(step.astype(_F32))
    q = np.clip(_round_half_away((sub + offset[..., None]) * inv[..., None]), 0, levels)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8).reshape(n, QK_K)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _k_scales_mins(x, 15)
    n = x.shape[0]
    qs = _pack_nibbles(q.reshape(n * 4, 64)).reshape(n, 128)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(dmin), _pack_k_scale_min(sc, m), qs], axis=-1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _k_scales_mins(x, 31)
    n = x.shape[0]
    qs = _pack_nibbles((q & 0x0F).reshape(n * 4, 64)).reshape(n, 128)
    # bit 4 of element 32*j + l goes to bit j of qh[l]
    high = ((q >> 4) & 1).reshape(n, 8, 32)
    qh = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
    parts = [_to_f16_bytes(d), _to_f16_bytes(dmin), _pack_k_scale_min(sc, m), qh, qs]
    return np.concatenate(parts, axis=-1)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    """Sixteen sub-blocks of 16 elements, ``x ~ (d * sc[j]) * q`` with int8 ``sc[j]`` and
    ``-32 <= q <= 31``. A sub-block's step is its largest magnitude / 31.5, rounded up to
    a multiple of the float16 ``d``, so every value lands within half a step of a code.
    (ggml instead searches the scale that minimises the squared error.)"""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    need = np.abs(sub).max(axis=-1) / _F32(31.5)  # (n, 16)
    d = _f16_at_least(need.max(axis=-1) / _F32(127))
    sc = np.minimum(np.ceil(need / np.where(d == 0, 1, d)[:, None]), 127)
    step = (d[:, None] * sc).astype(_F32)
    q = np.clip(_round_half_away(sub * _safe_inverse(step)[..., None]), -32, 31)
    u = (q + 32).astype(np.uint8).reshape(n * 2, 128)  # two halves of 128
    ql = _pack_nibbles(u & 0x0F).reshape(n, 128)
    crumbs = (u >> 4).reshape(n * 2, 4, 32)
    qh = (crumbs << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).sum(axis=1, dtype=np.uint8)
    return np.concatenate([ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), _to_f16_bytes(d)], axis=-1)


def _q_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _q_f16(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8)


def _q_bf16(x: np.ndarray) -> np.ndarray:
    # round to nearest even on the 16 dropped bits; NaN stays a (quiet) NaN
    n = x.astype("<f4").view(np.uint32).astype(np.uint64)
    rounded = ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((n[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.astype("<u2").view(np.uint8)


_QUANTIZE_BLOCKS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _q_f32,
    QT.F16: _q_f16,
    QT.BF16: _q_bf16,
    QT.Q4_0: _q_q4_0,
    QT.Q4_1: _q_q4_1,
    QT.Q5_0: _q_q5_0,
    QT.Q5_1: _q_q5_1,
    QT.Q8_0: _q_q8_0,
    QT.Q4_K: _q_q4_k,
    QT.Q5_K: _q_q5_k,
    QT.Q6_K: _q_q6_k,
}

QUANTIZABLE_TYPES: tuple[QT, ...] = tuple(_QUANTIZE_BLOCKS)


def quantize(x: np.ndarray, qtype: QT | str) -> np.ndarray:
    """Encode float values as GGML blocks.

    ``x``'s last axis must hold whole blocks of the type. Returns uint8 with the same
    leading axes and ``n_blocks * type_size`` bytes on the last axis, decodable by
    :func:`dequantize` and by ``gguf.quants.dequantize``.
    """
    t = quant_type(qtype)
    if t.qtype not in _QUANTIZE_BLOCKS:
        names = ", ".join(q.name for q in QUANTIZABLE_TYPES)
        raise ValueError(f"quantize: no encoder for {t.name} (phi3ref encodes {names})")
    x = np.asarray(x, dtype=_F32)
    if x.ndim == 0 or x.shape[-1] % t.block_size:
        raise ValueError(
            f"quantize({t.name}): last axis of {x.shape[-1] if x.ndim else 0} elements "
            f"is not a whole number of {t.block_size}-element blocks"
        )
    if not np.isfinite(x).all() and t.block_size > 1:
        raise ValueError(f"quantize({t.name}): input holds NaN or infinity")
    out_shape = (*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)
    blocks = x.reshape(-1, t.block_size)
    out = np.empty((blocks.shape[0], t.type_size), dtype=np.uint8)
    step = max(1, _CHUNK_BYTES // (4 * t.block_size))
    encode = _QUANTIZE_BLOCKS[t.qtype]
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = encode(blocks[start : start + step])
    return out.reshape(out_shape)
