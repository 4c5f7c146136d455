"""Numba kernels: matrix products that read GGML blocks directly.

Every ``@njit`` function of phi3ref lives here; ``tests/test_kernels.py`` checks each against
a plain numpy reference. Two families:

* ``matmul_exact``: decode one weight row at a time into a small float32 scratch buffer
  (never a whole matrix) and dot it with every activation row in float32. This is the
  ``numerics="exact"`` path: the same numbers as dequantizing the weights and running the
  model in float32.
* ``matmul_ggml``: llama.cpp's CPU numerics. Activations are first converted once per
  matmul to the type ggml pairs with the weight type (its ``vec_dot_type``): Q8_K for
  K-quants and IQ4_XS, Q8_0 for Q4_0 / Q5_0 / Q8_0 / IQ4_NL, Q8_1 for Q4_1 / Q5_1, float16
  for F16, bfloat16 for BF16, float32 for F32. Each block's dot product is then an integer
  sum times one float scale per block, and the float results are added in the order the
  llama.cpp kernel for that case adds them (the accumulation modes below), so that
  phi3ref reproduces llama.cpp's logits to the last bit on x86-64. For the types of
  Phi-3's files (Q4_K, Q5_K, Q6_K; also Q4_0, Q8_0) the integer sums come from the 8-bit
  SIMD intrinsics of :mod:`phi3ref.simd` (vpdpbusd where the CPU has it), each weight block
  unpacked once per tile of tokens; other types take ``matmul_ggml_unpacked``, the plain
  scalar form that the SIMD path is tested against bit for bit.
* ``attention_scores_f16`` / ``attention_values_f16`` / ``softmax_ggml``: llama.cpp's
  attention arithmetic over the float16 KV cache, read in place, the causal mask applied
  inside (keys a row cannot see are skipped).
* ``rms_norm_ggml``, ``rope_neox_ggml``, ``swiglu_ggml``, ``round_to_f16``, ``store_f16``:
  the rest of a layer in ggml's arithmetic, one fused pass each (:mod:`phi3ref.ggml_ops`
  calls them).

``libm_cos_sin`` gives the C library's float32 cosf / sinf, which ggml calls; ``expf_ggml``
ggml's vector exp.

Weights are ``(n_rows, row_bytes)`` uint8 arrays (memmap views); the GGML type travels as
its integer id. Float16 values are decoded through a 65536-entry table, as ggml does.
All kernels are parallel over output rows, one contiguous slice of rows per thread
(``n_threads`` slices; the caller passes numba.get_num_threads()).
"""

from __future__ import annotations

import time

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import quants
from .simd import (
    OUT_STRIDE, ROW_TOKENS, dot16_f16, float_to_half, fma32, half_to_float, pow2_f64, q4_0_block, q4_k_row, q4_k_row_tiled, q4_k_rows_pairs,
    q4_k_rows8_pairs, q4_k_rows8_seq_min, q4_k_rows8_tiled, q4_k_rows_tiled, q5_k_row, q5_k_row_tiled,
    q5_k_rows8_tiled, q5_k_rows_tiled, q6_k_rows8_tiled, q6_k_row, q6_k_row_tiled, q6_k_rows_tiled, q8_0_block, scores16, values16,
)

__all__ = [
    "FASTMATH",
    "FASTMATH_GGML",
    "F16_TABLE",
    "BF16_TABLE",
    "ACT_F32",
    "ACT_F16",
    "ACT_BF16",
    "ACT_Q8_0",
    "ACT_Q8_1",
    "ACT_Q8_K",
    "activation_type",
    "quantize_activations",
    "decode_row",
    "fma_f32",
    "libm_cos_sin",
    "expf_ggml",
    "unpack_row",
    "matmul_exact",
    "matmul_f16",
    "matmul_f32",
    "matmul_ggml",
    "matmul_ggml_unpacked",
    "attention_scores_f16",
    "attention_values_f16",
    "softmax_ggml",
    "round_to_f16",
    "store_f16",
    "rms_norm_ggml",
    "rope_neox_ggml",
    "swiglu_ggml",
    "warmup",
]

# Fast-math flags, for every kernel from these two constants. Float kernels may reassociate
# (LLVM vectorizes their sums); no 'nnan'/'ninf', so NaN and infinity propagate as IEEE
# says. The ggml kernels must keep ggml's order of float operations (their fused
# multiply-adds are explicit), so they get no float flags at all.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
FASTMATH_GGML: set[str] = set()

# 16-bit float bit pattern -> float32 value (ggml keeps the same table for float16)
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)

# GGML type ids, as plain ints for the kernels
F32, F16, BF16 = int(QT.F32), int(QT.F16), int(QT.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(QT.Q4_0), int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1), int(QT.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(QT.Q2_K), int(QT.Q3_K), int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)
IQ4_NL, IQ4_XS = int(QT.IQ4_NL), int(QT.IQ4_XS)

# Activation formats (ggml's vec_dot_type of each weight type)
ACT_F32, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2, 3, 4, 5
_ACT_OF_WEIGHT = {
    F32: ACT_F32, F16: ACT_F16, BF16: ACT_BF16,
    Q4_0: ACT_Q8_0, Q5_0: ACT_Q8_0, Q8_0: ACT_Q8_0, IQ4_NL: ACT_Q8_0,
    Q4_1: ACT_Q8_1, Q5_1: ACT_Q8_1,
    Q2_K: ACT_Q8_K, Q3_K: ACT_Q8_K, Q4_K: ACT_Q8_K, Q5_K: ACT_Q8_K, Q6_K: ACT_Q8_K, IQ4_XS: ACT_Q8_K,
}
IQ4_LEVELS = quants.IQ4_LEVELS.astype(np.int32)

# Integer dot products are kept in int32 by explicit casts: Numba widens int32 operations
# to int64, which LLVM vectorizes far less well. The sums fit: a 256-block of 8-bit scales
# times 6-bit codes times 8-bit activations stays below 2^31.
I32 = np.int32


def activation_type(weight_type: int) -> int:
    """The activation format ggml pairs with a weight type (``ValueError`` if none)."""
    try:
        return _ACT_OF_WEIGHT[int(weight_type)]
    except KeyError:
        raise ValueError(f"no ggml kernel for weight type {QT(weight_type).name}") from None


# ======================================================================================
# small helpers
# ======================================================================================


@njit(inline="always")
def _f16(w, i, table):
    """The little-endian float16 at bytes w[i], w[i+1], as float32."""
    return table[np.int32(w[i]) | (np.int32(w[i + 1]) << 8)]


@njit(inline="always")
def _k_scale_min(scales_off, w, j):
    """Scale and min of sub-block j (0..7) from the 12 packed bytes of a Q4_K/Q5_K block
    (ggml's get_scale_min_k4; the bit diagram is in phi3ref/quants.py)."""
    if j < 4:
        sc = np.int32(w[scales_off + j]) & 63
        mn = np.int32(w[scales_off + j + 4]) & 63
    else:
        sc = (np.int32(w[scales_off + j + 4]) & 0xF) | ((np.int32(w[scales_off + j - 4]) >> 6) << 4)
        mn = (np.int32(w[scales_off + j + 4]) >> 4) | ((np.int32(w[scales_off + j]) >> 6) << 4)
    return sc, mn


@njit(inline="always")
def _q3_k_scale(w, off, j):
    """6-bit scale j (0..15) of a Q3_K block, minus its bias of 32."""
    if j < 8:
        low = np.int32(w[off + 96 + j]) & 0xF
    else:
        low = np.int32(w[off + 96 + j - 8]) >> 4
    high = (np.int32(w[off + 104 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(inline="always")
def _iq4_xs_scale(w, off, j):
    low = (np.int32(w[off + 4 + j // 2]) >> (4 * (j % 2))) & 0xF
    high = ((np.int32(w[off + 2]) | (np.int32(w[off + 3]) << 8)) >> (2 * j)) & 3
    return (low | (high << 4)) - 32


# ======================================================================================
# exact numerics: decode a row to float32, then float dot products
# ======================================================================================
# weight rows unpacked: integer codes and their scales
# ======================================================================================
#
# Every block-quantized row is unpacked the same way, whatever its type:
#   wq  int8   (n_in,)            the integer code of each element, offsets applied
#   wsc int32  (n_in // sub,)     each sub-block's integer scale (1 where the type has none)
#   wmn int32  (n_in // sub,)     each sub-block's integer min (K-quants with mins; else 0)
#   wd  f32    (n_blocks,)        each block's float scale d
#   wm  f32    (n_blocks,)        each block's float min scale (dmin, or Q4_1/Q5_1's m; else 0)
# so that element i of sub-block j in block b is
#   (wd[b] * wsc[j]) * wq[i] - wm[b] * wmn[j]     (K-quants)
#   (wd[b] * wsc[j]) * wq[i] + wm[b]              (Q4_1, Q5_1)
# The exact kernel expands that to float32; the ggml kernel keeps it integer.


@njit(inline="always")
def block_layout(qtype):
    """(elements per block, elements per sub-block, kind of min) of a block type;
    kind: 0 none, 1 subtracted integer mins (Q2_K, Q4_K, Q5_K), 2 added float min (Q4_1, Q5_1)."""
    if qtype == Q2_K or qtype == Q3_K or qtype == Q6_K:
        return 256, 16, 1 if qtype == Q2_K else 0
    if qtype == Q4_K or qtype == Q5_K:
        return 256, 32, 1
    if qtype == IQ4_XS:
        return 256, 32, 0
    return 32, 32, 2 if (qtype == Q4_1 or qtype == Q5_1) else 0


@njit(cache=True)
def unpack_row(w, qtype, wq, wsc, wmn, wd, wm, table):
    """Unpack one row (its bytes ``w``) into codes and scales, see the table above."""
    n = wq.shape[0]
    if qtype == Q4_0 or qtype == IQ4_NL or qtype == Q8_0 or qtype == Q5_0 or qtype == Q4_1 or qtype == Q5_1:
        size = 18 if (qtype == Q4_0 or qtype == IQ4_NL) else 34 if qtype == Q8_0 else 22 if qtype == Q5_0 else 20 if qtype == Q4_1 else 24
        for blk in range(n // 32):
            off, o = blk * size, blk * 32
            wd[blk] = _f16(w, off, table)
            wm[blk] = _f16(w, off + 2, table) if (qtype == Q4_1 or qtype == Q5_1) else np.float32(0)
            wsc[blk] = 1
            wmn[blk] = 0
            if qtype == Q8_0:
                for j in range(32):
                    wq[o + j] = np.int8(w[off + 2 + j])
                continue
            qs = off + (2 if (qtype == Q4_0 or qtype == IQ4_NL) else 6 if qtype == Q5_0 else 4 if qtype == Q4_1 else 8)
            qh = np.uint32(0)
            if qtype == Q5_0 or qtype == Q5_1:
                hoff = qs - 4  # Q5: 32 fifth bits as a little-endian uint32, bit j = element j
                qh = np.uint32(w[hoff]) | (np.uint32(w[hoff + 1]) << 8) | (np.uint32(w[hoff + 2]) << 16) | (np.uint32(w[hoff + 3]) << 24)
            for j in range(16):
                b = np.int32(w[qs + j])
                q0, q1 = b & 0xF, b >> 4  # byte j holds elements j and j + 16
                if qtype == Q5_0 or qtype == Q5_1:
                    q0 |= np.int32((qh >> j) & 1) << 4
                    q1 |= np.int32((qh >> (j + 16)) & 1) << 4
                if qtype == Q4_0:
                    q0, q1 = q0 - 8, q1 - 8
                elif qtype == Q5_0:
                    q0, q1 = q0 - 16, q1 - 16
                elif qtype == IQ4_NL:
                    q0, q1 = IQ4_LEVELS[q0], IQ4_LEVELS[q1]
                wq[o + j] = q0
                wq[o + j + 16] = q1
    elif qtype == Q2_K:
        for blk in range(n // 256):
            off, o = blk * 84, blk * 256
            wd[blk], wm[blk] = _f16(w, off + 80, table), _f16(w, off + 82, table)
            for j in range(16):
                sc = np.int32(w[off + j])  # low nibble: scale, high nibble: min
                wsc[16 * blk + j], wmn[16 * blk + j] = sc & 0xF, sc >> 4
            for i in range(256):
                # two halves of 128; byte l of a half holds elements l, l+32, l+64, l+96
                half, sh, l = i // 128, (i % 128) // 32, i % 32
                wq[o + i] = (np.int32(w[off + 16 + half * 32 + l]) >> (2 * sh)) & 3
    elif qtype == Q3_K:
        for blk in range(n // 256):
            off, o = blk * 110, blk * 256
            wd[blk], wm[blk] = _f16(w, off + 108, table), np.float32(0)
            for j in range(16):
                wsc[16 * blk + j], wmn[16 * blk + j] = _q3_k_scale(w, off, j), 0
            for i in range(256):
                half, sh, l = i // 128, (i % 128) // 32, i % 32
                q = (np.int32(w[off + 32 + half * 32 + l]) >> (2 * sh)) & 3
                if (np.int32(w[off + l]) >> (i // 32)) & 1 == 0:  # a clear high bit means -4
                    q -= 4
                wq[o + i] = q
    elif qtype == Q4_K or qtype == Q5_K:
        size = 144 if qtype == Q4_K else 176
        qs_off = 16 if qtype == Q4_K else 48
        for blk in range(n // 256):
            off, o = blk * size, blk * 256
            wd[blk], wm[blk] = _f16(w, off, table), _f16(w, off + 2, table)
            for j in range(8):
                wsc[8 * blk + j], wmn[8 * blk + j] = _k_scale_min(off + 4, w, j)
                base = off + qs_off + (j // 2) * 32
                shift = 4 * (j % 2)  # 32 bytes give sub-blocks 2k (low nibbles) and 2k+1 (high)
                for l in range(32):
                    q = (np.int32(w[base + l]) >> shift) & 0xF
                    if qtype == Q5_K:
                        q |= ((np.int32(w[off + 16 + l]) >> j) & 1) << 4
                    wq[o + 32 * j + l] = q
    elif qtype == Q6_K:
        for blk in range(n // 256):
            off, o = blk * 210, blk * 256
            wd[blk], wm[blk] = _f16(w, off + 208, table), np.float32(0)
            for j in range(16):
                wsc[16 * blk + j], wmn[16 * blk + j] = np.int8(w[off + 192 + j]), 0
            for i in range(256):
                # per half of 128: low 4 bits from 64 bytes (low nibbles first), top 2 from 32
                half, k, p = i // 128, (i % 128) // 64, i % 64
                low = (np.int32(w[off + half * 64 + p]) >> (4 * k)) & 0xF
                sh, l = (i % 128) // 32, i % 32
                high = (np.int32(w[off + 128 + half * 32 + l]) >> (2 * sh)) & 3
                wq[o + i] = (low | (high << 4)) - 32
    elif qtype == IQ4_XS:
        for blk in range(n // 256):
            off, o = blk * 136, blk * 256
            wd[blk], wm[blk] = _f16(w, off, table), np.float32(0)
            for j in range(8):
                wsc[8 * blk + j], wmn[8 * blk + j] = _iq4_xs_scale(w, off, j), 0
                for l in range(16):
                    b = np.int32(w[off + 8 + 16 * j + l])
                    wq[o + 32 * j + l] = IQ4_LEVELS[b & 0xF]
                    wq[o + 32 * j + l + 16] = IQ4_LEVELS[b >> 4]


@njit(inline="always")
def _row_scratch(n_in):
    return (
        np.empty(n_in, dtype=np.int8),
        np.empty(n_in // 16, dtype=np.int32),
        np.empty(n_in // 16, dtype=np.int32),
        np.empty(n_in // 32, dtype=np.float32),
        np.empty(n_in // 32, dtype=np.float32),
    )


@njit(cache=True, fastmath=FASTMATH)
def decode_row(w, qtype, out, table):
    """Decode one block-quantized row into ``out`` (float32), with the arithmetic of
    phi3ref.quants.dequantize (bit for bit)."""
    wq, wsc, wmn, wd, wm = _row_scratch(out.shape[0])
    unpack_row(w, qtype, wq, wsc, wmn, wd, wm, table)
    _expand(qtype, wq, wsc, wmn, wd, wm, out)


@njit(inline="always")
def _expand(qtype, wq, wsc, wmn, wd, wm, out):
    bs, sub, kind = block_layout(qtype)
    for j in range(out.shape[0] // sub):
        b = j * sub // bs
        dl = wd[b] * np.float32(wsc[j])
        ml = wm[b] * np.float32(wmn[j]) if kind == 1 else wm[b]
        for l in range(sub):
            i = j * sub + l
            if kind == 1:
                out[i] = dl * np.float32(wq[i]) - ml
            elif kind == 2:
                out[i] = dl * np.float32(wq[i]) + ml
            else:
                out[i] = dl * np.float32(wq[i])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matmul_exact(w, qtype, x, out, table, n_threads):
    """out[t, r] = sum_i W[r, i] * x[t, i] with W decoded row by row to float32.

    w: (n_rows, row_bytes) uint8; x: (n_tokens, n_in) float32; out: (n_tokens, n_rows) float32.
    """
    n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        row = np.empty(n_in, dtype=np.float32)
        wq, wsc, wmn, wd, wm = _row_scratch(n_in)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            unpack_row(w[r], qtype, wq, wsc, wmn, wd, wm, table)
            _expand(qtype, wq, wsc, wmn, wd, wm, row)
            for k in range(n_tok):
                acc = np.float32(0)
                for i in range(n_in):
                    acc += row[i] * x[k, i]
                out[k, r] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matmul_f32(w, x, out, n_threads):
    """out[t, r] = sum_i w[r, i] * x[t, i] for float32 weights (n_rows, n_in)."""
    n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            for k in range(n_tok):
                acc = np.float32(0)
                for i in range(n_in):
                    acc += w[r, i] * x[k, i]
                out[k, r] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matmul_f16(w, x, out, table, n_threads):
    """As :func:`matmul_f32` for 16-bit float weights given as uint16 bit patterns
    (n_rows, n_in), decoded through ``table`` (F16_TABLE or BF16_TABLE)."""
    n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        row = np.empty(n_in, dtype=np.float32)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            for i in range(n_in):
                row[i] = table[w[r, i]]
            for k in range(n_tok):
                acc = np.float32(0)
                for i in range(n_in):
                    acc += row[i] * x[k, i]
                out[k, r] = acc


# ======================================================================================
# ggml numerics: activations quantized per matmul, integer block dot products
# ======================================================================================


def _f16_round(v: np.ndarray) -> np.ndarray:
    """float32 -> the float32 value of its float16 rounding (ggml's FP32_TO_FP16, nearest even)."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(np.float32)


def _bf16_round(v: np.ndarray) -> np.ndarray:
    """float32 -> its bfloat16 rounding (ggml_compute_fp32_to_bf16: nearest even)."""
    return quants.dequantize(quants.quantize(v, QT.BF16), QT.BF16)


def quantize_activations(x: np.ndarray, act: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert activations x (n_tokens, n_in) float32 to ggml's vec_dot_type ``act``.

    Returns ``(q, d, s)``: ``q`` int8 codes (n_tokens, n_in); ``d`` the per-block scale
    (Q8_0 / Q8_1: the float16-rounded value ggml stores; Q8_K: float32); ``s`` per-block
    sums (Q8_1: float16 of d * sum(q); Q8_K: int32 sums of each 16 codes, ggml's bsums).
    For F16 / BF16 ``d`` holds the rounded activations themselves; F32 returns ``x`` as ``d``.
    The arithmetic is that of ggml's x86 quantize_row_q8_0 / q8_1 and quantize_row_q8_K_ref.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok, n_in = x.shape
    empty_q, empty_s = np.zeros((n_tok, 1), np.int8), np.zeros((n_tok, 1), np.float32)
    if act == ACT_F32:
        return empty_q, x, empty_s
    if act == ACT_F16:
        return empty_q, _f16_round(x), empty_s
    if act == ACT_BF16:
        return empty_q, _bf16_round(x), empty_s
    if act in (ACT_Q8_0, ACT_Q8_1):
        blocks = x.reshape(n_tok, n_in // 32, 32)
        amax = np.abs(blocks).max(axis=-1)
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        codes = np.rint(blocks * inv[..., None])  # ties to even, as _mm256_round_ps
        q = codes.astype(np.int8).reshape(n_tok, n_in)
        s = _f16_round(d * codes.sum(axis=-1, dtype=np.float32)) if act == ACT_Q8_1 else empty_s
        return q, _f16_round(d), s
    if act == ACT_Q8_K:
        q = np.empty((n_tok, n_in), dtype=np.int8)
        d = np.empty((n_tok, n_in // 256), dtype=np.float32)
        bsums = np.empty((n_tok, n_in // 16), dtype=np.int32)
        _quantize_q8_k(x, q, d, bsums)
        return q, d, bsums
    raise ValueError(f"unknown activation format {act}")


@njit(cache=True, fastmath=FASTMATH_GGML)
def _quantize_q8_k(x, q, d, bsums):
    """quantize_row_q8_K_ref: per 256-block, the first value of largest magnitude sets
    iscale = -127 / max; codes nearest_int(iscale * x) (ties to even), at most 127."""
    n_tok, n_in = x.shape
    for t in range(n_tok):
        for b in range(n_in // 256):
            o = 256 * b
            mx = x[t, o]
            amax = abs(mx)
            for i in range(1, 256):
                if abs(x[t, o + i]) > amax:
                    amax, mx = abs(x[t, o + i]), x[t, o + i]
            if amax == 0:
                d[t, b] = 0
                q[t, o : o + 256] = 0
            else:
                iscale = np.float32(-127) / mx
                d[t, b] = np.float32(1) / iscale
                for i in range(256):
                    q[t, o + i] = np.int8(min(np.float32(127), np.rint(iscale * x[t, o + i])))
            for g in range(16):
                total = I32(0)
                for i in range(16):
                    total = I32(total + I32(q[t, o + 16 * g + i]))
                bsums[t, 16 * b + g] = total
    return q


# How llama.cpp's x86 CPU backend (AVX2 / AVX-512) sums a row's block results in float32:
#   SEQ      one accumulator, acc = fma(d_w * d_x, float(block integer sum), acc), block
#            after block: the repacked 8x8 GEMV/GEMM kernels of Q4_0 and IQ4_NL
#   SEQ_MIN  the same with a second accumulator for the mins, subtracted at the end:
#            the repacked Q4_K (and, with AVX-512, Q2_K) kernels; their GEMM, which takes
#            the tokens four at a time, accumulates every 64 elements instead of every 256
#            (the GEMV does the remaining n_tokens % 4 tokens)
#   LANES    eight float lanes; lane k takes the integer sum of elements 4k..4k+3 of every
#            32 (what _mm256_maddubs_epi16 + _mm256_madd_epi16 or VNNI leave per lane), is
#            fma-accumulated block after block and the lanes are added pairwise at the end
#            (hsum_float_8); mins, where a type has them, go to a scalar added last: ggml's
#            vec_dot for Q8_0, Q5_0, Q4_1, Q5_1, Q5_K, Q6_K, Q3_K, IQ4_XS and llamafile's
#            tinyBLAS for Q8_0 / Q5_0 batches.
#   TILED    ggml's tiled K-quant GEMM, taken for batches of 8 or more tokens by K-quant
#            weights that are not repacked: per 256-block r = float(isum) * d_w, then
#            r = fma(-dmin_w, float(min sum), r), and out += r * d_x.
# llama.cpp repacks a Q4_0 / IQ4_NL / Q4_K / Q2_K weight when its row count is a multiple
# of 8. Where a case is not reproduced exactly (Q2_K / Q4_K vec_dot for row counts that are
# not, float weights), the nearest scheme is used.
MODE_SEQ, MODE_SEQ_MIN, MODE_LANES, MODE_TILED = 0, 1, 2, 3


@njit(inline="always")
def accumulation_mode(qtype, n_rows, n_tokens):
    """The summation scheme llama.cpp's x86 backend uses for a weight (see above)."""
    repacked = n_rows % 8 == 0
    if (qtype == Q4_0 or qtype == IQ4_NL) and repacked:
        return MODE_SEQ
    if (qtype == Q4_K or qtype == Q2_K) and repacked:
        return MODE_SEQ_MIN
    k_quant = qtype == Q2_K or qtype == Q3_K or qtype == Q4_K or qtype == Q5_K or qtype == Q6_K or qtype == IQ4_XS
    if k_quant and n_tokens >= 8:
        return MODE_TILED
    if qtype == Q4_K or qtype == Q2_K:
        return MODE_SEQ_MIN
    return MODE_LANES


@njit(inline="always")
def _fma(a, b, c):
    """float32 fused multiply-add, a * b + c rounded once (ggml's _mm256_fmadd_ps)."""
    return fma32(np.float32(a), np.float32(b), np.float32(c))


@njit(inline="always")
def _hsum8(lanes):
    """hsum_float_8: (lanes 4-7 + lanes 0-3), then (0 + 2) + (1 + 3)."""
    t0, t1 = lanes[4] + lanes[0], lanes[5] + lanes[1]
    t2, t3 = lanes[6] + lanes[2], lanes[7] + lanes[3]
    return (t0 + t2) + (t1 + t3)


@njit(inline="always")
def _dot_unpacked(qtype, mode, wq, wsc, wmn, wd, wm, q, d, s, t, n_tok, lanes, parts):
    """An unpacked weight row against token t's converted activations, summed as llama.cpp
    sums it (``mode``): integer code products weighted by the integer sub-block scales, one
    float scale per block; mins through the activations' block sums, never per element."""
    bs, sub, kind = block_layout(qtype)
    n_blocks = wq.shape[0] // bs
    spb = bs // sub  # sub-blocks per block
    acc = np.float32(0)  # SEQ / SEQ_MIN accumulator
    acc_min = np.float32(0)  # SEQ_MIN mins, LANES scalar mins
    for k in range(8):
        lanes[k] = 0
    # the repacked Q4_K GEMM (tokens in groups of four) sums its mins per pair below
    q4_k_gemm = mode == MODE_SEQ_MIN and qtype == Q4_K and t < n_tok - n_tok % 4
    for b in range(n_blocks):
        dx = d[t, b]
        # mins: ggml's sum over the block of min x (sum of the activation codes it covers)
        msum = 0
        if kind == 1 and not q4_k_gemm:
            for j in range(spb):
                part = 0
                for k in range(sub // 16):
                    part += np.int32(s[t, (b * bs + j * sub) // 16 + k])
                msum += wmn[b * spb + j] * part
        if mode == MODE_LANES:
            if qtype == Q6_K:
                # Q6_K multiplies the unsigned codes (0..63) and takes 32 * scale * bsum
                # off each lane: lane k covers 16-element groups 2k and 2k+1
                for k in range(8):
                    g0, g1 = 2 * k, 2 * k + 1
                    lane = -32 * (wsc[b * 16 + g0] * np.int32(s[t, b * 16 + g0]) + wsc[b * 16 + g1] * np.int32(s[t, b * 16 + g1]))
                    for c in range(bs // 32):
                        for e in range(32 * c + 4 * k, 32 * c + 4 * k + 4):
                            lane += wsc[(b * bs + e) // sub] * (np.int32(wq[b * bs + e]) + 32) * np.int32(q[t, b * bs + e])
                    lanes[k] = _fma(wd[b] * dx, np.float32(lane), lanes[k])
            else:
                for k in range(8):
                    lane = 0
                    for c in range(bs // 32):
                        for e in range(32 * c + 4 * k, 32 * c + 4 * k + 4):
                            lane += wsc[(b * bs + e) // sub] * np.int32(wq[b * bs + e]) * np.int32(q[t, b * bs + e])
                    lanes[k] = _fma(wd[b] * dx, np.float32(lane), lanes[k])
            if kind == 1:  # Q5_K: summs += (-d_x * dmin) * min_sum
                acc_min = _fma(-dx * wm[b], np.float32(msum), acc_min)
            elif kind == 2:  # Q4_1 / Q5_1: summs += m * s, s = fp16(d_x * sum(q_x))
                acc_min = _fma(wm[b], np.float32(s[t, b]), acc_min)
        else:
            # integer sum of each sub-block, then weighted by the sub-block scales
            isum = I32(0)
            for j in range(spb):
                base = b * bs + j * sub
                part = I32(0)
                for l in range(sub):
                    part = I32(part + I32(wq[base + l]) * I32(q[t, base + l]))
                parts[j] = I32(wsc[b * spb + j] * part)
                isum = I32(isum + parts[j])
            if mode == MODE_TILED:
                r = np.float32(isum) * wd[b]
                if kind == 1:
                    r = _fma(-wm[b], np.float32(msum), r)
                acc = acc + r * dx
            elif q4_k_gemm:
                # repacked GEMM: one fma per pair of 32-element sub-blocks
                for pair in range(4):
                    j0 = b * 8 + 2 * pair
                    g = 2 * j0  # Q8_K sums of 16 codes: four per pair
                    mp = I32(wmn[j0] * (I32(s[t, g]) + I32(s[t, g + 1])) + wmn[j0 + 1] * (I32(s[t, g + 2]) + I32(s[t, g + 3])))
                    acc = _fma(wd[b] * dx, np.float32(I32(parts[2 * pair] + parts[2 * pair + 1])), acc)
                    acc_min = _fma(wm[b] * dx, np.float32(mp), acc_min)
            else:
                acc = _fma(wd[b] * dx, np.float32(isum), acc)
                if kind == 1:
                    acc_min = _fma(wm[b] * dx, np.float32(msum), acc_min)
    if mode == MODE_LANES:
        return _hsum8(lanes) + acc_min
    if mode == MODE_SEQ_MIN:
        return acc - acc_min
    return acc


# --------------------------------------------------------------------------------------
# SIMD paths for the types that carry Phi-3's weights (Q4_K, Q5_K, Q6_K; Q4_0 and Q8_0 for
# other mixes), all bit-identical to _dot_unpacked. The K-quants go through phi3ref.simd's
# row kernels (a row against one token or a group of tokens, float sums inside the
# intrinsic) and, for prompts of Q4_K / Q5_K, its eight-row kernels. Q4_0 / Q8_0 take the
# tile path: the intrinsics give each block's integer sums for a tile of tokens (the block
# unpacked once per tile), then the float operations below, in _dot_unpacked's order.
# --------------------------------------------------------------------------------------

TOKEN_TILE = 32  # (a multiple of ROW_TOKENS) tokens whose activation codes (32 x n_in bytes) stay in cache together
ROW_GROUP = 8  # weight rows that meet each tile of tokens while it is in cache


@njit(inline="always")
def has_simd_path(qtype):
    return qtype == Q4_K or qtype == Q5_K or qtype == Q6_K or qtype == Q8_0 or qtype == Q4_0


@njit(inline="always")
def _lanes_sum(ints, o):
    return I32(ints[o] + ints[o + 1] + ints[o + 2] + ints[o + 3] + ints[o + 4] + ints[o + 5] + ints[o + 6] + ints[o + 7])


@njit(inline="always")
def _simd_block_ints(row, qtype, b, q, s, t0, nt, ints, scales, table):
    """Integer phase for block b of a Q4_0 / Q8_0 row: phi3ref.simd's lane sums for tokens
    t0..t0+nt into ints[(b * nt + t) * OUT_STRIDE ...], the block's float16 scale into scales[b]."""
    n_in = q.shape[1]
    dest = ints[b * nt * OUT_STRIDE :]
    off, xoff = b * (18 if qtype == Q4_0 else 34), t0 * n_in + b * 32
    if qtype == Q4_0:
        q4_0_block(row, off, q, xoff, s, 0, n_in, nt, dest)
    else:
        q8_0_block(row, off, q, xoff, s, 0, n_in, nt, dest)
    scales[b, 0] = _f16(row, off, table)


@njit(inline="always")
def _simd_token(mode, ints, scales, d, tt, t, nt, n_blocks, lanes):
    """Float phase for one token: the block results summed in ``mode``'s order (those of
    _dot_unpacked, operation for operation): SEQ for repacked Q4_0, LANES otherwise."""
    acc = np.float32(0)
    for k in range(8):
        lanes[k] = 0
    for b in range(n_blocks):
        o = (b * nt + t) * OUT_STRIDE
        dd = scales[b, 0] * d[tt, b]
        if mode == MODE_SEQ:
            acc = _fma(dd, np.float32(_lanes_sum(ints, o)), acc)
        else:
            for k in range(8):
                lanes[k] = _fma(dd, np.float32(ints[o + k]), lanes[k])
    if mode == MODE_LANES:
        return _hsum8(lanes) + np.float32(0)
    return acc


@njit(inline="always")
def _rows_simd(w, qtype, mode, r0, r1, q, d, s, out, ints, scales, lanes, table):
    """Rows r0..r1 of a Q4_0 / Q8_0 weight against every token: out[t, r]. Rows go in groups
    of ROW_GROUP and tokens in tiles of TOKEN_TILE, so that a group's weights and a tile's
    activation codes stay in cache while they meet; per row and tile, first every block's
    integer sums (SIMD), then each token's float sums."""
    n_tok, n_in = out.shape[0], q.shape[1]
    n_blocks = n_in // 32
    for g0 in range(r0, r1, ROW_GROUP):
        for t0 in range(0, n_tok, TOKEN_TILE):
            nt = min(TOKEN_TILE, n_tok - t0)
            for r in range(g0, min(r1, g0 + ROW_GROUP)):
                row = w[r]
                for b in range(n_blocks):
                    _simd_block_ints(row, qtype, b, q, s, t0, nt, ints, scales, table)
                for t in range(nt):
                    out[t0 + t, r] = _simd_token(mode, ints, scales, d, t0 + t, t, nt, n_blocks, lanes)


@njit(inline="always")
def has_row_path(qtype):
    """Whether phi3ref.simd's row kernels cover a weight type (in every accumulation mode)."""
    return qtype == Q4_K or qtype == Q5_K or qtype == Q6_K


@njit(inline="always")
def _row_kernel(qtype, mode, n_group, row, q, d, s, out, r, t):
    """The row kernel for ``mode`` over tokens t..t + n_group (n_group = 1 or ROW_TOKENS)."""
    n_rows, n_in = out.shape[1], q.shape[1]
    n_blocks = n_in // 256
    xo, do, so, oo = t * n_in, t * n_blocks, t * (n_in // 16), t * n_rows + r
    if mode == MODE_TILED:
        if n_group == ROW_TOKENS:
            if qtype == Q4_K:
                q4_k_rows_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
            elif qtype == Q5_K:
                q5_k_rows_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
            else:
                q6_k_rows_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
        elif qtype == Q4_K:
            q4_k_row_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
        elif qtype == Q5_K:
            q5_k_row_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
        else:
            q6_k_row_tiled(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
    elif qtype == Q4_K:  # SEQ_MIN: the GEMM's groups of four, the GEMV for the rest
        if n_group == ROW_TOKENS:
            q4_k_rows_pairs(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
        else:
            q4_k_row(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
    elif qtype == Q5_K:  # LANES
        q5_k_row(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)
    else:
        q6_k_row(row, 0, q, xo, d, do, s, so, n_in, n_blocks, out, oo, n_rows)


@njit(inline="always")
def _rows_k(w, qtype, mode, r0, r1, q, d, s, out):
    """Rows r0..r1 of a K-quant weight against every token with the row kernels: tokens in
    tiles of TOKEN_TILE (their codes stay in cache while every row of the slice meets them),
    in each tile groups of ROW_TOKENS where the mode sums tokens that way (Q4_K's GEMM up to
    the last multiple of four tokens; the tiled GEMM anywhere), single tokens otherwise."""
    n_tok = out.shape[0]
    grouped_end = n_tok - n_tok % ROW_TOKENS
    if mode == MODE_LANES:  # vec_dot: every token on its own
        grouped_end = 0
    for t0 in range(0, n_tok, TOKEN_TILE):
        t1 = min(n_tok, t0 + TOKEN_TILE)
        g1 = max(t0, min(t1, grouped_end))
        for r in range(r0, r1):
            row = w[r]
            for t in range(t0, g1, ROW_TOKENS):
                _row_kernel(qtype, mode, ROW_TOKENS, row, q, d, s, out, r, t)
            for t in range(g1, t1):
                _row_kernel(qtype, mode, 1, row, q, d, s, out, r, t)


ROWS8_MIN_TOKENS = 4  # below this, a token's row kernel streams the weights faster
# tokens that meet a thread's whole slice of weights in the eight-row kernels: each tile
# streams the slice from memory once, so bigger tiles read the weights less often, while
# a block's activations of the tile (tile x 256 bytes, rows n_in apart) must stay in L1/L2.
# On full-size Phi-3 matrices 64 was ~15% faster than 32; 128 no faster.
ROWS8_TOKEN_TILE = 64


@njit(inline="always")
def has_rows8_path(qtype, mode, n_tok):
    """Whether phi3ref.simd's eight-row kernels cover this product (Q4_K / Q5_K / Q6_K
    batches summed per token, not in vec_dot lanes)."""
    return (qtype == Q4_K or qtype == Q5_K or qtype == Q6_K) and mode != MODE_LANES and n_tok >= ROWS8_MIN_TOKENS


@njit(inline="always")
def _rows8_k(w, qtype, mode, r0, r1, q, d, s, out, acc):
    """Rows r0..r1 (a multiple of 8 of them) with the eight-row kernels, tokens in tiles of
    ROWS8_TOKEN_TILE; Q4_K's GEMM takes tokens up to the last multiple of four, its GEMV the rest."""
    n_tok = out.shape[0]
    grouped_end = n_tok - n_tok % ROW_TOKENS
    for t0 in range(0, n_tok, ROWS8_TOKEN_TILE):
        t1 = min(n_tok, t0 + ROWS8_TOKEN_TILE)
        g1 = max(t0, min(t1, grouped_end))
        for r in range(r0, r1, 8):
            if mode == MODE_TILED:
                if qtype == Q4_K:
                    q4_k_rows8_tiled(w, r, q, d, s, t0, t1 - t0, acc, out)
                elif qtype == Q5_K:
                    q5_k_rows8_tiled(w, r, q, d, s, t0, t1 - t0, acc, out)
                else:
                    q6_k_rows8_tiled(w, r, q, d, s, t0, t1 - t0, acc, out)
            else:
                if g1 > t0:
                    q4_k_rows8_pairs(w, r, q, d, s, t0, g1 - t0, acc, out)
                if t1 > g1:
                    q4_k_rows8_seq_min(w, r, q, d, s, g1, t1 - g1, acc, out)


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def matmul_ggml(w, qtype, q, d, s, out, table, n_threads):
    """out[t, r] = dot(W[r], activations of token t) in ggml's numerics, for block-quantized
    weights. ``q, d, s`` come from :func:`quantize_activations` in the weight type's
    activation format. Q4_0, Q8_0, Q4_K, Q5_K and Q6_K take the SIMD paths (a few tokens:
    phi3ref.simd's row kernels for the K-quants; otherwise each weight block unpacked once
    per tile of tokens), every other type :func:`matmul_ggml_unpacked`."""
    n_rows, n_tok = w.shape[0], out.shape[0]
    if not has_simd_path(qtype):
        matmul_ggml_unpacked(w, qtype, q, d, s, out, table, n_threads)
        return
    mode = accumulation_mode(qtype, n_rows, n_tok)
    per = (n_rows + n_threads - 1) // n_threads
    if has_rows8_path(qtype, mode, n_tok):
        per8 = (n_rows // 8 + n_threads - 1) // n_threads * 8  # whole groups of eight rows per thread
        for th in prange(n_threads):
            acc = np.empty(ROWS8_TOKEN_TILE * 16, dtype=np.float32)
            _rows8_k(w, qtype, mode, th * per8, min(n_rows // 8 * 8, (th + 1) * per8), q, d, s, out, acc)
        if n_rows % 8:  # the last rows, one at a time
            _rows_k(w, qtype, mode, n_rows // 8 * 8, n_rows, q, d, s, out)
        return
    if has_row_path(qtype):
        for th in prange(n_threads):
            _rows_k(w, qtype, mode, th * per, min(n_rows, (th + 1) * per), q, d, s, out)
        return
    for th in prange(n_threads):
        n_blocks = q.shape[1] // 32  # an upper bound for every type
        ints = np.empty(n_blocks * min(n_tok, TOKEN_TILE) * OUT_STRIDE, dtype=np.int32)
        scales = np.empty((n_blocks, 2), dtype=np.float32)
        lanes = np.empty(8, dtype=np.float32)
        _rows_simd(w, qtype, mode, th * per, min(n_rows, (th + 1) * per), q, d, s, out, ints, scales, lanes, table)


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def matmul_ggml_unpacked(w, qtype, q, d, s, out, table, n_threads):
    """:func:`matmul_ggml` for any block type, the plain way: each weight row is unpacked
    to codes and scales once (:func:`unpack_row`), then dotted with every token's codes in
    scalar loops. The reference the SIMD path is tested against, bit for bit."""
    n_rows, n_tok, n_in = w.shape[0], out.shape[0], q.shape[1]
    mode = accumulation_mode(qtype, n_rows, n_tok)
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        wq, wsc, wmn, wd, wm = _row_scratch(n_in)
        lanes = np.zeros(8, dtype=np.float32)
        parts = np.zeros(16, dtype=np.int32)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            unpack_row(w[r], qtype, wq, wsc, wmn, wd, wm, table)
            for t in range(n_tok):
                out[t, r] = _dot_unpacked(qtype, mode, wq, wsc, wmn, wd, wm, q, d, s, t, n_tok, lanes, parts)


# ======================================================================================
# attention in ggml's numerics: float16 KV cache, products summed as llamafile's tinyBLAS
# does on AVX-512 (16 float lanes, lane i takes elements i, i + 16, ... in order, then the
# lanes reduced pairwise); products of two float16 values are exact in float32, so its
# fused multiply-adds are plain float32 additions here.
# ======================================================================================


@njit(inline="always")
def _reduce16(acc, j):
    """_mm512_reduce_add_ps of acc[0..15, j]: halves added pairwise (16 -> 8 -> 4 -> 2 -> 1)."""
    h0, h1, h2, h3 = acc[8, j] + acc[0, j], acc[9, j] + acc[1, j], acc[10, j] + acc[2, j], acc[11, j] + acc[3, j]
    h4, h5, h6, h7 = acc[12, j] + acc[4, j], acc[13, j] + acc[5, j], acc[14, j] + acc[6, j], acc[15, j] + acc[7, j]
    q0, q1, q2, q3 = h4 + h0, h5 + h1, h6 + h2, h7 + h3
    return (q0 + q2) + (q1 + q3)


SCORES16_MIN_ROWS = 8  # from this many query rows per head the keys are transposed first
VALUES_CHUNK = 16  # (head, query row) items whose value sums grow together when rows are few


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def _attention_scores_by_16(q, k_cache, end, first, last, out, n_threads):
    """attention_scores_f16 for many query rows: the keys are converted to float32 once,
    transposed (n_head_kv, head_dim, positions padded to 16), and phi3ref.simd.scores16
    computes sixteen positions per call; chunks of sixteen keys that a row does not see
    are -inf."""
    n_kv, rows, hd = q.shape
    n_sets = first.size
    end_pad = (end + 15) // 16 * 16
    keys = np.empty((n_kv, hd, end_pad), dtype=np.float32)
    for h in prange(n_kv):
        for j in range(hd):
            for p in range(end):
                keys[h, j, p] = half_to_float(k_cache[p, h, j])
            for p in range(end, end_pad):
                keys[h, j, p] = 0
    n_items = n_kv * rows
    per = (n_items + n_threads - 1) // n_threads
    for th in prange(n_threads):
        for item in range(th * per, min(n_items, (th + 1) * per)):
            h = item // rows  # item = h * rows + r: q[h, r] and out[h, r] start at item * hd, item * end
            r = item % rows
            lo, hi = first[r % n_sets], last[r % n_sets]
            for p0 in range(0, end, 16):
                n_valid = min(16, end - p0)
                if p0 + 15 < lo or p0 > hi:
                    for i in range(n_valid):
                        out[h, r, p0 + i] = -np.inf
                else:
                    scores16(q, item * hd, keys, h * hd * end_pad + p0, end_pad, hd, out, item * end + p0, n_valid)


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def attention_scores_f16(q, k_cache, end, first, last, out, n_threads):
    """out[h, r, p] = q[h, r] . k_cache[p, h] for positions p < end, summed over head_dim
    in tinyBLAS's lanes. q: (n_head_kv, rows, head_dim) float32 holding float16 values;
    k_cache: (n_ctx, n_head_kv, head_dim) uint16 float16 bit patterns (the cache itself, no
    copy); out: (n_head_kv, rows, end) float32. Row r needs only the keys first[t] ..
    last[t] (t = r % len(first), as in softmax_ggml): keys it does not need may be left out
    (-inf) — whole chunks of sixteen for many rows, single keys for few."""
    n_kv, rows, hd = q.shape
    if rows >= SCORES16_MIN_ROWS:
        _attention_scores_by_16(q, k_cache, end, first, last, out, n_threads)
        return
    n_sets = first.size
    n_items = n_kv * rows
    per = (n_items + n_threads - 1) // n_threads
    for th in prange(n_threads):
        # positions outermost: a position's keys for this thread's heads are contiguous in the cache
        for p in range(end):
            for item in range(th * per, min(n_items, (th + 1) * per)):
                h, r = item // rows, item % rows  # q[h, r] starts at item * hd
                if first[r % n_sets] <= p <= last[r % n_sets]:
                    out[h, r, p] = dot16_f16(q, item * hd, k_cache, (p * n_kv + h) * hd, hd)
                else:
                    out[h, r, p] = -np.inf


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def attention_values_f16(probs, v_cache, end, first, last, out, n_threads):
    """out[h, r, j] = sum over positions p < end of probs[h, r, p] * v_cache[p, h, j], lanes
    over positions (lane p % 16). probs: (n_head_kv, rows, end) float32 holding float16
    values; v_cache: (n_ctx, n_head_kv, head_dim) uint16; out: (n_head_kv, rows, head_dim).
    Row r adds only positions first[t] .. last[t] (t = r % len(first)): the others have
    probability 0 after the causal mask, and a 0 product adds nothing (ggml multiplies them
    anyway, which differs only for an infinite or NaN value in the cache)."""
    n_kv, rows, hd = out.shape
    n_sets = first.size
    n_items = n_kv * rows
    per = (n_items + n_threads - 1) // n_threads
    if rows >= SCORES16_MIN_ROWS:  # many rows: sixteen outputs of one row per call, lanes in registers
        for th in prange(n_threads):
            for item in range(th * per, min(n_items, (th + 1) * per)):
                h, t = item // rows, item % rows % n_sets
                for j0 in range(0, hd, 16):
                    values16(probs, item * end, v_cache, h * hd + j0, n_kv * hd, first[t], min(last[t], end - 1), out, item * hd + j0, min(16, hd - j0))
        return
    # Few query rows (decoding): VALUES_CHUNK (head, row) items at a time, positions outside,
    # so that each position's values of those heads are read once, contiguously.
    for th in prange(n_threads):
        acc = np.empty((VALUES_CHUNK, 16, hd), dtype=np.float32)
        i0, i1 = th * per, min(n_items, (th + 1) * per)
        for c0 in range(i0, i1, VALUES_CHUNK):
            c1 = min(i1, c0 + VALUES_CHUNK)
            acc[:] = 0
            for p in range(end):
                lane = p % 16
                for item in range(c0, c1):
                    h, r = item // rows, item % rows
                    if first[r % n_sets] <= p <= last[r % n_sets]:
                        pr = probs[h, r, p]
                        for j in range(hd):
                            acc[item - c0, lane, j] += pr * half_to_float(v_cache[p, h, j])
            for item in range(c0, c1):
                for j in range(hd):
                    out[item // rows, item % rows, j] = _reduce16(acc[item - c0], j)


def _hexf(literal: str) -> np.float32:
    """A C hexadecimal float literal (0x1.8p23f) as float32."""
    return np.float32(float.fromhex(literal))


# ggml_v_expf's constants, as its source spells them
_EXP_SHIFTER, _EXP_LOG2E = _hexf("0x1.8p23"), _hexf("0x1.715476p+0")
_EXP_LN2_HI, _EXP_LN2_LO = _hexf("0x1.62e4p-1"), _hexf("0x1.7f7d1cp-20")
_EXP_C5, _EXP_C4, _EXP_C3 = _hexf("0x1.0e4020p-7"), _hexf("0x1.573e2ep-5"), _hexf("0x1.555e66p-3")
_EXP_C2, _EXP_C1 = _hexf("0x1.fffdb6p-2"), _hexf("0x1.ffffecp-1")


@njit(inline="always")
def _v_expf(x):
    """ggml_v_expf (AVX-512) for one lane: exp(x) = 2^n * p(b), n = round(x / ln 2), b the
    remainder; |n| > 192 gives 0 or inf (masked scores are -inf)."""
    z = fma32(x, _EXP_LOG2E, _EXP_SHIFTER)
    n = z - _EXP_SHIFTER
    b = fma32(-n, _EXP_LN2_LO, fma32(-n, _EXP_LN2_HI, x))
    u = b * b
    j = fma32(fma32(fma32(_EXP_C5, b, _EXP_C4), u, fma32(_EXP_C3, b, _EXP_C2)), u, fma32(_EXP_C1, b, np.float32(1)))
    # _mm512_scalef_ps(j, n) = j * 2^n with one rounding: the product is exact in float64.
    # Written as selects, without calls, so that LLVM vectorizes loops over _v_expf.
    overflow = abs(n) > np.float32(192)  # an ordered compare, as ggml's: NaN passes through
    n_int = np.int64(n) if abs(n) <= np.float32(192) else np.int64(0)  # (for NaN, j is NaN)
    scaled = np.float32(np.float64(j) * pow2_f64(n_int))
    return (np.float32(0) if n <= 0 else np.float32(np.inf)) if overflow else scaled


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def softmax_ggml(scores, first, last, out, n_threads):
    """ggml_soft_max (scale 1) with llama.cpp's causal mask, on each row of scores (rows, n):
    row r sees the keys first[t] .. last[t] (inclusive, t = r % len(first): rows cycle over
    the tokens), every other entry is masked (-inf in llama.cpp's mask, so exactly 0 in
    out). exp(x - max) by the vector exp, each 16 lanes' sum (lanes from key 0) reduced in
    float32 and accumulated in double, then multiplied by the float32 reciprocal; a chunk
    of masked keys adds 0. llama.cpp's KV cache view is a multiple of 256 cells, so every
    element takes the vector path."""
    n_rows, n = scores.shape
    n_sets = first.size
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        lanes = np.empty((16, 1), dtype=np.float32)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            lo, hi = first[r % n_sets], min(last[r % n_sets], n - 1)
            mx = np.float32(-np.inf)
            for i in range(lo, hi + 1):
                mx = max(mx, scores[r, i])
            for i in range(lo):
                out[r, i] = 0
            for i in range(hi + 1, n):
                out[r, i] = 0
            for i in range(lo, hi + 1):
                out[r, i] = _v_expf(scores[r, i] - mx)
            total = 0.0
            for c in range(lo - lo % 16, hi + 1, 16):
                for i in range(16):
                    lanes[i, 0] = out[r, c + i] if c + i < n else np.float32(0)
                total += np.float64(_reduce16(lanes, 0))
            inv = np.float32(1.0 / total)
            for i in range(lo, hi + 1):
                out[r, i] = out[r, i] * inv


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def round_to_f16(x, n_threads):
    """Round every element of x (float32, C-contiguous) in place to the nearest float16
    value: what ggml's conversion to float16 does to a product's operand."""
    flat = x.reshape(-1)
    per = (flat.size + n_threads - 1) // n_threads
    for th in prange(n_threads):
        for i in range(th * per, min(flat.size, (th + 1) * per)):
            flat[i] = half_to_float(float_to_half(flat[i]))


@njit(cache=True, fastmath=FASTMATH_GGML)
def store_f16(x, out):
    """out = x converted to float16 (bit patterns, uint16), row by row: (rows, n) each;
    the KV cache's store."""
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[r, i] = float_to_half(x[r, i])


# ======================================================================================
# the rest of a layer in ggml's numerics: RMSNorm, RoPE, SwiGLU
# ======================================================================================


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def rms_norm_ggml(x, weight, eps, out, n_threads):
    """ggml_rms_norm followed by ggml_mul with the norm's weight, on each row of x (rows, n):
    the float32 squares summed in double in order, the mean rounded to float32, scale =
    1 / sqrtf(mean + eps); out = (x * scale) * weight."""
    n_rows, n = x.shape
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            total = 0.0
            for i in range(n):
                total += np.float64(x[r, i] * x[r, i])
            mean = np.float32(total / n)
            scale = np.float32(1) / np.sqrt(mean + eps)
            for i in range(n):
                out[r, i] = (x[r, i] * scale) * weight[i]


@njit(cache=True, fastmath=FASTMATH_GGML)
def rope_neox_ggml(x, cos, sin, n_rot, out):
    """ggml's NEOX rotation (rotate_pairs) of x (n_tokens, n_heads, head_dim) by the angles
    of each token, cos / sin (n_tokens, n_rot / 2): dim i with dim i + n_rot / 2, the first
    product of each line fused into the addition (ggml is compiled with contraction);
    dims from n_rot on copied."""
    n_tok, n_heads, hd = x.shape
    half = n_rot // 2
    for t in range(n_tok):
        for h in range(n_heads):
            for i in range(half):
                x1, x2, c, s = x[t, h, i], x[t, h, half + i], cos[t, i], sin[t, i]
                out[t, h, i] = fma32(x1, c, -(x2 * s))
                out[t, h, half + i] = fma32(x1, s, x2 * c)
            for i in range(n_rot, hd):
                out[t, h, i] = x[t, h, i]


@njit(parallel=True, cache=True, fastmath=FASTMATH_GGML)
def swiglu_ggml(gate_up, n_ff, out, n_threads):
    """ggml_vec_swiglu_f32 on each row of gate_up (rows, 2 n_ff), gate first then up
    (Phi-3's fused projection): out = silu(gate) * up, silu(x) = x / (1 + exp(-x)); the
    vector exp for the row's whole 16-lane chunks, the C library's expf for the rest."""
    n_rows = gate_up.shape[0]
    full = n_ff - n_ff % 16
    per = (n_rows + n_threads - 1) // n_threads
    for th in prange(n_threads):
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            for i in range(full):
                g = gate_up[r, i]
                out[r, i] = g / (np.float32(1) + _v_expf(-g)) * gate_up[r, n_ff + i]
            for i in range(full, n_ff):
                g = gate_up[r, i]
                out[r, i] = g / (np.float32(1) + np.exp(-g)) * gate_up[r, n_ff + i]


@njit(cache=True)
def fma_f32(a, b, c):
    """float32 a * b + c with one rounding, as the kernels compute it (for tests and callers
    outside Numba)."""
    return fma32(np.float32(a), np.float32(b), np.float32(c))


@njit(cache=True)
def libm_cos_sin(theta):
    """cosf and sinf of a float32 array, as the C library computes them (glibc's are not
    always correctly rounded, and ggml's RoPE calls them): Numba lowers float32 np.cos /
    np.sin to those calls."""
    c = np.empty_like(theta)
    s = np.empty_like(theta)
    flat_t, flat_c, flat_s = theta.ravel(), c.ravel(), s.ravel()
    for i in range(flat_t.size):
        flat_c[i] = np.cos(flat_t[i])
        flat_s[i] = np.sin(flat_t[i])
    return c, s


@njit(cache=True, fastmath=FASTMATH_GGML)
def expf_ggml(x, out):
    """exp of each row of x (rows, n) as a ggml vector loop computes it: lanes of 16
    through ggml_v_expf, the remaining n % 16 through the C library's expf (Numba lowers
    float32 np.exp to that call)."""
    n_rows, n = x.shape
    full = n - n % 16
    for r in range(n_rows):
        for i in range(full):
            out[r, i] = _v_expf(x[r, i])
        for i in range(full, n):
            out[r, i] = np.exp(x[r, i])


def warmup() -> float:
    """Compile (or load from numba's on-disk cache) every kernel for every type it serves;
    return the seconds it took, reported apart from run time."""
    from .quants import QUANT_TYPES

    def read_only(a: np.ndarray) -> np.ndarray:
        a.setflags(write=False)  # as the weights are (memmap views of the file): Numba types them apart
        return a

    start = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    out = np.empty((2, 4), dtype=np.float32)
    matmul_f32(read_only(np.zeros((4, 256), np.float32)), x, out, nb.get_num_threads())
    matmul_f16(read_only(np.zeros((4, 256), np.uint16)), x, out, F16_TABLE, nb.get_num_threads())
    libm_cos_sin(x)
    expf_ggml(x, np.empty_like(x))
    fma_f32(1.0, 1.0, 1.0)
    one = np.zeros(1, np.int64)
    softmax_ggml(x, one, one, np.empty_like(x), nb.get_num_threads())
    round_to_f16(x.reshape(2, 4, 64).copy(), nb.get_num_threads())  # (n_head_kv, rows, head_dim), as attention rounds
    rms_norm_ggml(x, x[0], np.float32(1e-5), np.empty_like(x), nb.get_num_threads())
    swiglu_ggml(x, 128, np.empty((2, 128), np.float32), nb.get_num_threads())
    heads = x.reshape(2, 4, 64)
    for layout in (heads, x[:, :128].reshape(2, 2, 64)):  # contiguous, and a view of a fused projection
        angles = np.ascontiguousarray(x[:, :32])  # (n_tokens, n_rot / 2)
        rope_neox_ggml(layout, angles, angles, 64, np.empty(layout.shape, np.float32))
        store_f16(layout.reshape(2, -1), np.empty((2, layout[0].size), np.uint16))
    cache16 = np.zeros((3, 1, 16), dtype=np.uint16)  # (n_ctx, n_head_kv, head_dim)
    scores = np.empty((1, 2, 3), dtype=np.float32)
    attention_scores_f16(np.zeros((1, 2, 16), np.float32), cache16, 3, one, one, scores, nb.get_num_threads())
    attention_values_f16(scores, cache16, 3, one, one, np.empty((1, 2, 16), np.float32), nb.get_num_threads())
    for qtype, t in QUANT_TYPES.items():
        if t.block_size == 1:
            continue
        qt = int(qtype)
        w = read_only(np.zeros((4, 256 // t.block_size * t.type_size), dtype=np.uint8))
        matmul_exact(w, qt, x, out, F16_TABLE, nb.get_num_threads())
        q, d, s = quantize_activations(x, activation_type(qt))
        matmul_ggml(w, qt, q, d, s, out, F16_TABLE, nb.get_num_threads())
    return time.perf_counter() - start
