"""Numba kernels of the exact numerics: GGML blocks decoded row by row.

Every ``@njit`` function of the exact numerics lives here (llama.cpp's arithmetic is in
:mod:`phi3ref.ggml.kernels`, which decodes rows with this module's ``unpack_row``);
``tests/test_kernels.py`` checks each against a plain numpy reference.

* ``unpack_row`` / ``decode_row``: one block-quantized row into integer codes and scales,
  or into float32 with the arithmetic of :func:`phi3ref.quants.dequantize` (bit for bit).
* ``matmul_exact``: decode one weight row at a time into a small float32 scratch buffer
  (never a whole matrix) and dot it with every activation row in float32. This is the
  ``numerics="exact"`` path: the same numbers as dequantizing the weights and running the
  model in float32. ``matmul_f32`` / ``matmul_f16`` do the same for float weights.

Weights are ``(n_rows, row_bytes)`` uint8 arrays (memmap views); the GGML type travels as
its integer id. Float16 values are decoded through a 65536-entry table, as ggml does.
All kernels are parallel over output rows, one contiguous slice of rows per thread
(``n_threads`` slices; the caller passes numba.get_num_threads()).
"""

from __future__ import annotations

import functools
import time
from typing import Iterable

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit

from . import quants
from .jit import FASTMATH, Threaded, compile_notice, part_jit, threaded_kernel  # first: the kernel cache is set up before any kernel is decorated

__all__ = [
    "FASTMATH", "F16_TABLE", "BF16_TABLE", "block_layout", "decode_row", "read_f16", "row_scratch", "unpack_row",
    "matmul_exact", "matmul_exact_kernel", "matmul_f16", "matmul_f32", "warm_weights", "warmup", "weight_types",
]

# 16-bit float bit pattern -> float32 value (ggml keeps the same table for float16)
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TABLE = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)

# GGML type ids, as plain ints for the kernels
F32, F16, BF16 = int(QT.F32), int(QT.F16), int(QT.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(QT.Q4_0), int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1), int(QT.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(QT.Q2_K), int(QT.Q3_K), int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)
IQ4_NL, IQ4_XS = int(QT.IQ4_NL), int(QT.IQ4_XS)

# Block bytes and field offsets, from phi3ref.quants' one table (ggml-common.h's structs):
# compile-time constants of the kernels below.
def _at(qtype: QT, field: str) -> int:
    return quants.QUANT_TYPES[qtype].offset(field)


def _bytes(qtype: QT) -> int:
    return quants.QUANT_TYPES[qtype].type_size


Q4_0_BYTES, Q4_0_QS = _bytes(QT.Q4_0), _at(QT.Q4_0, "qs")
Q4_1_BYTES, Q4_1_M, Q4_1_QS = _bytes(QT.Q4_1), _at(QT.Q4_1, "m"), _at(QT.Q4_1, "qs")
Q5_0_BYTES, Q5_0_QH, Q5_0_QS = _bytes(QT.Q5_0), _at(QT.Q5_0, "qh"), _at(QT.Q5_0, "qs")
Q5_1_BYTES, Q5_1_M, Q5_1_QH, Q5_1_QS = _bytes(QT.Q5_1), _at(QT.Q5_1, "m"), _at(QT.Q5_1, "qh"), _at(QT.Q5_1, "qs")
Q8_0_BYTES, Q8_0_QS = _bytes(QT.Q8_0), _at(QT.Q8_0, "qs")
IQ4_NL_BYTES, IQ4_NL_QS = _bytes(QT.IQ4_NL), _at(QT.IQ4_NL, "qs")
Q2_K_BYTES, Q2_K_SCALES, Q2_K_QS, Q2_K_D, Q2_K_DMIN = (
    _bytes(QT.Q2_K), _at(QT.Q2_K, "scales"), _at(QT.Q2_K, "qs"), _at(QT.Q2_K, "d"), _at(QT.Q2_K, "dmin"))
Q3_K_BYTES, Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q3_K_D = (
    _bytes(QT.Q3_K), _at(QT.Q3_K, "hmask"), _at(QT.Q3_K, "qs"), _at(QT.Q3_K, "scales"), _at(QT.Q3_K, "d"))
Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = (
    _bytes(QT.Q4_K), _at(QT.Q4_K, "d"), _at(QT.Q4_K, "dmin"), _at(QT.Q4_K, "scales"), _at(QT.Q4_K, "qs"))
Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QH, Q5_K_QS = (
    _bytes(QT.Q5_K), _at(QT.Q5_K, "d"), _at(QT.Q5_K, "dmin"), _at(QT.Q5_K, "scales"), _at(QT.Q5_K, "qh"), _at(QT.Q5_K, "qs"))
Q6_K_BYTES, Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = (
    _bytes(QT.Q6_K), _at(QT.Q6_K, "ql"), _at(QT.Q6_K, "qh"), _at(QT.Q6_K, "scales"), _at(QT.Q6_K, "d"))
IQ4_XS_BYTES, IQ4_XS_D, IQ4_XS_SCALES_H, IQ4_XS_SCALES_L, IQ4_XS_QS = (
    _bytes(QT.IQ4_XS), _at(QT.IQ4_XS, "d"), _at(QT.IQ4_XS, "scales_h"), _at(QT.IQ4_XS, "scales_l"), _at(QT.IQ4_XS, "qs"))

# d, the float16 scale, opens every block the kernels read it from at ``off``
assert all(quants.QUANT_TYPES[t].offset("d") == 0 for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.IQ4_NL, QT.IQ4_XS))

IQ4_LEVELS = quants.IQ4_LEVELS.astype(np.int32)

# Integer dot products are kept in int32 by explicit casts: Numba widens int32 operations
# to int64, which LLVM vectorizes far less well. The sums fit: a 256-block of 8-bit scales
# times 6-bit codes times 8-bit activations stays below 2^31.
I32 = np.int32


# ======================================================================================
# small helpers
# ======================================================================================


@njit(inline="always")
def read_f16(w, i, table):
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
    sc = off + Q3_K_SCALES  # 12 bytes: the low 4 bits of scales 0..7 (low nibbles) and 8..15 (high) in 8, their top 2 bits in 4
    if j < 8:
        low = np.int32(w[sc + j]) & 0xF
    else:
        low = np.int32(w[sc + j - 8]) >> 4
    high = (np.int32(w[sc + 8 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(inline="always")
def _iq4_xs_scale(w, off, j):
    low = (np.int32(w[off + IQ4_XS_SCALES_L + j // 2]) >> (4 * (j % 2))) & 0xF
    high = ((np.int32(w[off + IQ4_XS_SCALES_H]) | (np.int32(w[off + IQ4_XS_SCALES_H + 1]) << 8)) >> (2 * j)) & 3
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
        # d first in every one of these blocks; then m (Q4_1, Q5_1), qh (Q5_0, Q5_1), qs
        if qtype == Q4_0:
            size, qs_at, m_at, qh_at = Q4_0_BYTES, Q4_0_QS, 0, 0
        elif qtype == IQ4_NL:
            size, qs_at, m_at, qh_at = IQ4_NL_BYTES, IQ4_NL_QS, 0, 0
        elif qtype == Q8_0:
            size, qs_at, m_at, qh_at = Q8_0_BYTES, Q8_0_QS, 0, 0
        elif qtype == Q5_0:
            size, qs_at, m_at, qh_at = Q5_0_BYTES, Q5_0_QS, 0, Q5_0_QH
        elif qtype == Q4_1:
            size, qs_at, m_at, qh_at = Q4_1_BYTES, Q4_1_QS, Q4_1_M, 0
        else:
            size, qs_at, m_at, qh_at = Q5_1_BYTES, Q5_1_QS, Q5_1_M, Q5_1_QH
        for blk in range(n // 32):
            off, o = blk * size, blk * 32
            wd[blk] = read_f16(w, off, table)
            wm[blk] = read_f16(w, off + m_at, table) if (qtype == Q4_1 or qtype == Q5_1) else np.float32(0)
            wsc[blk] = 1
            wmn[blk] = 0
            if qtype == Q8_0:
                for j in range(32):
                    wq[o + j] = np.int8(w[off + qs_at + j])
                continue
            qs = off + qs_at
            qh = np.uint32(0)
            if qtype == Q5_0 or qtype == Q5_1:
                hoff = off + qh_at  # Q5: 32 fifth bits as a little-endian uint32, bit j = element j
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
            off, o = blk * Q2_K_BYTES, blk * 256
            wd[blk], wm[blk] = read_f16(w, off + Q2_K_D, table), read_f16(w, off + Q2_K_DMIN, table)
            for j in range(16):
                sc = np.int32(w[off + Q2_K_SCALES + j])  # low nibble: scale, high nibble: min
                wsc[16 * blk + j], wmn[16 * blk + j] = sc & 0xF, sc >> 4
            for i in range(256):
                # two halves of 128; byte l of a half holds elements l, l+32, l+64, l+96
                half, sh, l = i // 128, (i % 128) // 32, i % 32
                wq[o + i] = (np.int32(w[off + Q2_K_QS + half * 32 + l]) >> (2 * sh)) & 3
    elif qtype == Q3_K:
        for blk in range(n // 256):
            off, o = blk * Q3_K_BYTES, blk * 256
            wd[blk], wm[blk] = read_f16(w, off + Q3_K_D, table), np.float32(0)
            for j in range(16):
                wsc[16 * blk + j], wmn[16 * blk + j] = _q3_k_scale(w, off, j), 0
            for i in range(256):
                half, sh, l = i // 128, (i % 128) // 32, i % 32
                q = (np.int32(w[off + Q3_K_QS + half * 32 + l]) >> (2 * sh)) & 3
                if (np.int32(w[off + Q3_K_HMASK + l]) >> (i // 32)) & 1 == 0:  # a clear high bit means -4
                    q -= 4
                wq[o + i] = q
    elif qtype == Q4_K or qtype == Q5_K:
        if qtype == Q4_K:
            size, d_at, dmin_at, sc_at, qs_off = Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS
        else:  # Q5_K: the fifth bits (qh) before qs
            size, d_at, dmin_at, sc_at, qs_off = Q5_K_BYTES, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QS
        for blk in range(n // 256):
            off, o = blk * size, blk * 256
            wd[blk], wm[blk] = read_f16(w, off + d_at, table), read_f16(w, off + dmin_at, table)
            for j in range(8):
                wsc[8 * blk + j], wmn[8 * blk + j] = _k_scale_min(off + sc_at, w, j)
                base = off + qs_off + (j // 2) * 32
                shift = 4 * (j % 2)  # 32 bytes give sub-blocks 2k (low nibbles) and 2k+1 (high)
                for l in range(32):
                    q = (np.int32(w[base + l]) >> shift) & 0xF
                    if qtype == Q5_K:
                        q |= ((np.int32(w[off + Q5_K_QH + l]) >> j) & 1) << 4
                    wq[o + 32 * j + l] = q
    elif qtype == Q6_K:
        for blk in range(n // 256):
            off, o = blk * Q6_K_BYTES, blk * 256
            wd[blk], wm[blk] = read_f16(w, off + Q6_K_D, table), np.float32(0)
            for j in range(16):
                wsc[16 * blk + j], wmn[16 * blk + j] = np.int8(w[off + Q6_K_SCALES + j]), 0
            for i in range(256):
                # per half of 128: low 4 bits from 64 bytes (low nibbles first), top 2 from 32
                half, k, p = i // 128, (i % 128) // 64, i % 64
                low = (np.int32(w[off + Q6_K_QL + half * 64 + p]) >> (4 * k)) & 0xF
                sh, l = (i % 128) // 32, i % 32
                high = (np.int32(w[off + Q6_K_QH + half * 32 + l]) >> (2 * sh)) & 3
                wq[o + i] = (low | (high << 4)) - 32
    elif qtype == IQ4_XS:
        for blk in range(n // 256):
            off, o = blk * IQ4_XS_BYTES, blk * 256
            wd[blk], wm[blk] = read_f16(w, off + IQ4_XS_D, table), np.float32(0)
            for j in range(8):
                wsc[8 * blk + j], wmn[8 * blk + j] = _iq4_xs_scale(w, off, j), 0
                for l in range(16):
                    b = np.int32(w[off + IQ4_XS_QS + 16 * j + l])
                    wq[o + 32 * j + l] = IQ4_LEVELS[b & 0xF]
                    wq[o + 32 * j + l + 16] = IQ4_LEVELS[b >> 4]


@njit(inline="always")
def row_scratch(n_in):
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
    wq, wsc, wmn, wd, wm = row_scratch(out.shape[0])
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


def matmul_exact(w, qtype, x, out, table, n_threads) -> None:
    """out[t, r] = sum_i W[r, i] * x[t, i] with W decoded row by row to float32.

    w: (n_rows, row_bytes) uint8; x: (n_tokens, n_in) float32; out: (n_tokens, n_rows)
    float32. One kernel per weight type, compiled at its first call (:func:`matmul_exact_kernel`).
    """
    matmul_exact_kernel(qtype)(w, x, out, table, n_threads)


@functools.cache
def matmul_exact_kernel(qtype: int):
    """:func:`matmul_exact` for one block type: ``qtype`` is a constant of its code."""

    def part(th, n_threads, w, x, out, table):
        # unpack_row is a cached function of its own: an int, not the constant, so that
        # every type shares its one compiled signature
        any_type = qtype + 0
        n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
        per = (n_rows + n_threads - 1) // n_threads
        row = np.empty(n_in, dtype=np.float32)
        wq, wsc, wmn, wd, wm = row_scratch(n_in)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            unpack_row(w[r], any_type, wq, wsc, wmn, wd, wm, table)
            _expand(qtype, wq, wsc, wmn, wd, wm, row)
            for k in range(n_tok):
                acc = np.float32(0)
                for i in range(n_in):
                    acc += row[i] * x[k, i]
                out[k, r] = acc

    return threaded_kernel(part, f"matmul_exact_{QT(qtype).name}", fastmath=FASTMATH)


@part_jit(fastmath=FASTMATH)
def _matmul_f32_part(th, n_threads, w, x, out):
    """Thread th's rows of :data:`matmul_f32`."""
    n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
    per = (n_rows + n_threads - 1) // n_threads
    for r in range(th * per, min(n_rows, (th + 1) * per)):
        for k in range(n_tok):
            acc = np.float32(0)
            for i in range(n_in):
                acc += w[r, i] * x[k, i]
            out[k, r] = acc


matmul_f32 = Threaded(_matmul_f32_part)
"""matmul_f32(w, x, out, n_threads): out[t, r] = sum_i w[r, i] * x[t, i] for float32
weights (n_rows, n_in). out must not overlap w or x (its part is compiled noalias:
phi3ref.jit.PartCompiler)."""


@part_jit(fastmath=FASTMATH)
def _matmul_f16_part(th, n_threads, w, x, out, table):
    """Thread th's rows of :data:`matmul_f16`."""
    n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
    per = (n_rows + n_threads - 1) // n_threads
    row = np.empty(n_in, dtype=np.float32)
    for r in range(th * per, min(n_rows, (th + 1) * per)):
        for i in range(n_in):
            row[i] = table[w[r, i]]
        for k in range(n_tok):
            acc = np.float32(0)
            for i in range(n_in):
                acc += row[i] * x[k, i]
            out[k, r] = acc


matmul_f16 = Threaded(_matmul_f16_part)
"""matmul_f16(w, x, out, table, n_threads): as :data:`matmul_f32` for 16-bit float weights
given as uint16 bit patterns (n_rows, n_in), decoded through ``table`` (F16_TABLE or
BF16_TABLE); out must not overlap the others."""


def read_only(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only as the weights are (memmap views of the file): Numba compiles
    separate signatures for read-only arrays, so a warm-up must use them too."""
    a.setflags(write=False)
    return a


def warm_weights(weights: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, np.ndarray]]:
    """What a warm-up multiplies to compile the matrix products of ``weights`` ((type id,
    row count) of each weight matrix; None: of every type): (type id, a small read-only
    weight of that type, in the weight's class of row count), once per type and class.
    Block types: uint8 rows of 256 elements; F32: float32; F16 / BF16: uint16. The class of
    row count is its residue's share in the kernel choice: ggml takes other kernels for a
    row count that is not a multiple of 8 (see phi3ref.ggml.kernels.accumulation_mode)."""
    if weights is None:
        weights = [(int(t), n) for t in quants.QUANT_TYPES for n in (8, 4)]
    made = {}
    for qtype, n_rows in weights:
        t = quants.QUANT_TYPES[QT(qtype)]
        rows = 8 if n_rows % 8 == 0 else 4
        if (qtype, rows) not in made:
            if t.block_size > 1:
                zeros = np.zeros((rows, 256 // t.block_size * t.type_size), dtype=np.uint8)
            else:
                zeros = np.zeros((rows, 256), dtype=np.float32 if qtype == F32 else np.uint16)
            made[(qtype, rows)] = read_only(zeros)
    return [(qtype, w) for (qtype, _), w in made.items()]


def weight_types(weights: Iterable[tuple[int, int]] | None) -> str:
    """The weight types of a warm-up, for its notice: "Q4_K, Q6_K weights"."""
    if weights is None:
        return "every weight type"
    return ", ".join(QT(t).name for t in sorted({t for t, _ in weights})) + " weights"


def warmup(weights: Iterable[tuple[int, int]] | None = None) -> float:
    """Compile (or load from Numba's on-disk cache) the exact numerics' matrix products of
    ``weights`` ((type id, row count) of each weight matrix; None: every type); return the
    seconds it took, reported apart from run time (and said on stderr while it lasts)."""
    start = time.perf_counter()
    threads = nb.get_num_threads()
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    weights = None if weights is None else list(weights)
    with compile_notice(f"{weight_types(weights)} in exact numerics"):
        for qt, w in warm_weights(weights):
            out = np.empty((2, w.shape[0]), dtype=np.float32)
            if qt == F32:
                matmul_f32(w, x, out, threads)
            elif qt in (F16, BF16):
                matmul_f16(w, x, out, F16_TABLE if qt == F16 else BF16_TABLE, threads)
            else:
                matmul_exact(w, qt, x, out, F16_TABLE, threads)
    return time.perf_counter() - start
