"""Numba kernels of llama.cpp's CPU arithmetic (``numerics="ggml"``).

* ``matmul_ggml``: activations are first converted once per matmul to the type ggml pairs
  with the weight type (its ``vec_dot_type``): Q8_K for K-quants and IQ4_XS, Q8_0 for
  Q4_0 / Q5_0 / Q8_0 / IQ4_NL, Q8_1 for Q4_1 / Q5_1, float16 for F16, bfloat16 for BF16,
  float32 for F32. Each block's dot product is then an integer sum times one float scale
  per block, and the float results are added in the order the llama.cpp kernel for that
  case adds them (the accumulation modes below), so that phi3ref reproduces llama.cpp's
  logits to the last bit on x86-64. For the types of Phi-3's files (Q4_K, Q5_K, Q6_K; also
  Q4_0, Q8_0) the integer sums come from the 8-bit SIMD intrinsics of
  :mod:`phi3ref.ggml.simd` (vpdpbusd where the CPU has it), each weight block unpacked once
  per tile of tokens; other types take ``matmul_ggml_unpacked``, the plain scalar form that
  the SIMD path is tested against bit for bit. Weight rows are unpacked by
  :func:`phi3ref.kernels.unpack_row`, the exact numerics' own decoder.
* ``matmul_float_ggml``: F32 / F16 / BF16 weights, in the level's vector lanes.
* ``attention_scores_f16`` / ``attention_values_f16`` / ``softmax_ggml``: llama.cpp's
  attention arithmetic over the float16 KV cache, read in place, the causal mask applied
  inside (keys a row cannot see are skipped).
* ``rms_norm_ggml``, ``rope_neox_ggml``, ``swiglu_ggml``, ``round_to_f16``, ``store_f16``:
  the rest of a layer in ggml's arithmetic, one fused pass each (:mod:`phi3ref.ggml.ops`
  calls them).

``libm_cos_sin`` gives the C library's float32 cosf / sinf, which ggml calls; ``expf_ggml``
ggml's vector exp. Shapes and conventions are those of :mod:`phi3ref.kernels`: weights are
``(n_rows, row_bytes)`` uint8 arrays, the GGML type travels as its integer id, every kernel
runs on ``n_threads`` threads (:class:`phi3ref.jit.Threaded`), each taking a slice of its
output rows (contiguous, except the attention tiles, dealt out in turn: later query rows
see more keys; and heads or tokens in turn where the work is per head or token).
"""

from __future__ import annotations

import functools
import time
from typing import Iterable

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, types
from numba.extending import overload

from .. import quants
from ..jit import Threaded, WarmJob, compile_notice, part_jit, ready, run_helper_jobs, run_warm_jobs, threaded_kernel
from ..kernels import (  # first: phi3ref.jit sets up the kernel cache before any kernel is decorated
    BF16, F16, F16_TABLE, F32, I32, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_0_BYTES, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
    Q8_0_BYTES, block_layout, read_f16, row_scratch, unpack_row, warm_weights,
    weight_types,
)
from .simd import (
    OUT_STRIDE, ROW_TOKENS, TILE_COLS, TILE_ROWS, VECDOT_KEYS, bits_f32, exp_chunk8, exp_chunk16, f32_bits, float_to_half, fma32,
    half_to_float, max_range, pow2_f64, q4_0_block, q4_k_row, q4_k_row_tiled, q4_k_rows_pairs, q4_k_rows8_pairs,
    q4_k_rows8_seq_min, q4_k_rows8_tiled, q4_k_rows_tiled, q5_k_row, q5_k_row_tiled, q5_k_rows8_tiled, q5_k_rows_tiled,
    q6_k_rows8_tiled, q6_k_row, q6_k_row_tiled, q6_k_rows_tiled, q8_0_block, scores8, scores16, scores_tile8, scores_tile16,
    prefetch_elements, values8, values16, values_slot1, values_slot2, values_slot3, values_slot4, values_tile8, values_tile16,
    vecdot_f16_8, vecdot_f16_8_keys, vecdot_f16_16, vecdot_f16_16_keys,
)

__all__ = [
    "ACT_F32", "ACT_F16", "ACT_BF16", "ACT_Q8_0", "ACT_Q8_1", "ACT_Q8_K", "FLOAT_F32", "FLOAT_F16", "FLOAT_BF16", "FLOAT_KIND",
    "activation_type", "quantize_activations", "matmul_ggml", "matmul_ggml_unpacked", "matmul_float_ggml",
    "matmul_ggml_simd_kernel", "matmul_ggml_unpacked_kernel", "product_kernel", "matmul_float_ggml_kernel", "attention_scores_f16", "attention_scores_kernel", "attention_values_kernel", "transpose_keys_kernel", "gather_values_kernel", "attention_values_f16", "softmax_ggml", "softmax_kernel", "round_to_f16", "store_f16", "rms_norm_ggml",
    "rope_neox_ggml", "swiglu_ggml", "swiglu_kernel", "fma_f32", "libm_cos_sin", "expf_ggml", "log_sum_exp_rows", "warmup",
]

# The ggml kernels keep ggml's order of float operations (their fused multiply-adds are
# explicit), so they get no fast-math flags at all.
FASTMATH_GGML: set[str] = set()

# Activation formats (ggml's vec_dot_type of each weight type)
ACT_F32, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2, 3, 4, 5
_ACT_OF_WEIGHT = {
    F32: ACT_F32, F16: ACT_F16, BF16: ACT_BF16,
    Q4_0: ACT_Q8_0, Q5_0: ACT_Q8_0, Q8_0: ACT_Q8_0, IQ4_NL: ACT_Q8_0,
    Q4_1: ACT_Q8_1, Q5_1: ACT_Q8_1,
    Q2_K: ACT_Q8_K, Q3_K: ACT_Q8_K, Q4_K: ACT_Q8_K, Q5_K: ACT_Q8_K, Q6_K: ACT_Q8_K, IQ4_XS: ACT_Q8_K,
}


def activation_type(weight_type: int) -> int:
    """The activation format ggml pairs with a weight type (``ValueError`` if none)."""
    try:
        return _ACT_OF_WEIGHT[int(weight_type)]
    except KeyError:
        raise ValueError(f"no ggml kernel for weight type {QT(weight_type).name}") from None


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
        q, d, bsums = _q8_k_arrays(n_tok, n_in, np.empty)
        _quantize_q8_k(x, q, d, bsums, nb.get_num_threads())
        return q, d, bsums
    raise ValueError(f"unknown activation format {act}")


def _q8_k_arrays(n_tok: int, n_in: int, alloc=np.zeros) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of Q8_K activations, made by ``alloc``: codes (n_tok, n_in) int8, block
    scales (n_tok, n_in / 256) float32, sums of each 16 codes (n_tok, n_in / 16) int32."""
    return (alloc((n_tok, n_in), dtype=np.int8), alloc((n_tok, n_in // 256), dtype=np.float32),
            alloc((n_tok, n_in // 16), dtype=np.int32))


# error_model="numpy": an infinite activation divides by -0 here as in C (giving inf, which
# the model then reports), not a ZeroDivisionError from inside the kernel. Tokens on several
# threads: on one, it was 3% of a 512-token prompt on two threads.
@part_jit(fastmath=FASTMATH_GGML, error_model="numpy")
def _quantize_q8_k_part(th, n_threads, x, q, d, bsums):
    """quantize_row_q8_K_ref, thread th's tokens: per 256-block, the first value of largest
    magnitude sets iscale = -127 / max; codes nearest_int(iscale * x) (ties to even), at
    most 127."""
    n_tok, n_in = x.shape
    for t in range(th, n_tok, n_threads):
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


_quantize_q8_k = Threaded(_quantize_q8_k_part)


# How llama.cpp's x86 CPU backend (AVX2 / AVX-512) sums a row's block results in float32:
#   SEQ      one accumulator, acc = fma(d_w * d_x, float(block integer sum), acc), block
#            after block: the repacked 8x8 GEMV/GEMM kernels of Q4_0 and IQ4_NL
#   SEQ_MIN  the same with a second accumulator for the mins, subtracted at the end:
#            the repacked Q4_K (and, with AVX-512, Q2_K) kernels; their GEMM, which takes
#            the tokens four at a time, accumulates every 64 elements (Q4_K) or 128 (Q2_K)
#            instead of every 256 (the GEMV does the remaining n_tokens % 4 tokens)
#   LANES    eight float lanes; lane k takes the integer sum of elements 4k..4k+3 of every
#            32 (what _mm256_maddubs_epi16 + _mm256_madd_epi16 or VNNI leave per lane), is
#            fma-accumulated block after block and the lanes are added pairwise at the end
#            (hsum_float_8): ggml's vec_dot for Q8_0, Q5_0, Q4_1, Q5_1, Q2_K..Q6_K, IQ4_XS
#            and llamafile's tinyBLAS for Q8_0 / Q4_0 / Q5_0 / IQ4_NL batches. Mins, where
#            a type has them: Q4_1 / Q5_1 / Q5_K a scalar added last; Q4_K four lanes of
#            pairs of sub-blocks, added (0 + 2) + (1 + 3) last; Q2_K into the same eight
#            lanes, before each block's products
#   LANES2   IQ4_NL's vec_dot (one token, not repacked): LANES with two accumulators, for
#            the even and the odd blocks, added lane by lane at the end; an odd last block
#            is fma-added to the sum
#   TILED    ggml's tiled K-quant GEMM, taken for batches of 8 or more tokens by K-quant
#            weights that are not repacked: per 256-block r = float(isum) * d_w, then
#            r = fma(-dmin_w, float(min sum), r), and out = fma(r, d_x, out).
# llama.cpp repacks a Q4_0 / IQ4_NL / Q4_K weight (Q2_K only with AVX-512) when its row
# count is a multiple of 8. Float weights are matmul_float_ggml's (below).
MODE_SEQ, MODE_SEQ_MIN, MODE_LANES, MODE_TILED, MODE_LANES2 = 0, 1, 2, 3, 4
MODE_NAMES = ("seq", "seq_min", "lanes", "tiled", "lanes2")  # by value: in the names of the kernels made per mode


@njit(inline="always")
def accumulation_mode(qtype, n_rows, n_tokens, repack_q2_k):
    """The summation scheme llama.cpp's x86 backend uses for a weight (see above);
    ``repack_q2_k``: whether the level repacks Q2_K (phi3ref.isa.Level.repack_q2_k)."""
    repacked = n_rows % 8 == 0
    if (qtype == Q4_0 or qtype == IQ4_NL) and repacked:
        return MODE_SEQ
    if (qtype == Q4_K or (qtype == Q2_K and repack_q2_k)) and repacked:
        return MODE_SEQ_MIN
    k_quant = qtype == Q2_K or qtype == Q3_K or qtype == Q4_K or qtype == Q5_K or qtype == Q6_K or qtype == IQ4_XS
    if k_quant and n_tokens >= 8:
        return MODE_TILED
    if qtype == IQ4_NL and n_tokens == 1:
        return MODE_LANES2
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
    float scale per block; mins through the activations' block sums, never per element.
    ``lanes``: 16 float32 scratch (two sets of eight), ``parts``: 16 int32 scratch."""
    bs, sub, kind = block_layout(qtype)
    n_blocks = wq.shape[0] // bs
    spb = bs // sub  # sub-blocks per block
    acc = np.float32(0)  # SEQ / SEQ_MIN accumulator
    acc_min = np.float32(0)  # SEQ_MIN mins, LANES scalar mins
    for k in range(16):
        lanes[k] = 0
    # the repacked K GEMM (tokens in groups of four) sums per group of sub-blocks below:
    # Q4_K two of 32 elements, Q2_K eight of 16
    k_gemm = mode == MODE_SEQ_MIN and t < n_tok - n_tok % 4
    group = 2 if qtype == Q4_K else 8
    for b in range(n_blocks):
        dx = d[t, b]
        # mins: ggml's sum over the block of min x (sum of the activation codes it covers)
        msum = 0
        if kind == 1 and not k_gemm:
            for j in range(spb):
                part = 0
                for k in range(sub // 16):
                    part += np.int32(s[t, (b * bs + j * sub) // 16 + k])
                msum += wmn[b * spb + j] * part
        if mode == MODE_LANES or mode == MODE_LANES2:
            # LANES2 (IQ4_NL's vec_dot) alternates two sets of lanes, odd last block apart
            base = 8 * (b % 2) if mode == MODE_LANES2 else 0
            tail = mode == MODE_LANES2 and b == n_blocks - 1 and n_blocks % 2 == 1
            if qtype == Q2_K:  # mins first, into the same lanes: lane k has sub-blocks 2k, 2k + 1
                for k in range(8):
                    g0 = b * 16 + 2 * k
                    prod = wmn[g0] * np.int32(s[t, g0]) + wmn[g0 + 1] * np.int32(s[t, g0 + 1])
                    lanes[k] = _fma(-dx * wm[b], np.float32(prod), lanes[k])
            elif qtype == Q4_K:  # mins in four lanes: lane p has sub-blocks 2p, 2p + 1 (32 each)
                for p in range(4):
                    j0 = b * 8 + 2 * p
                    g = 2 * j0  # Q8_K sums of 16 codes: two per sub-block
                    prod = wmn[j0] * (np.int32(s[t, g]) + np.int32(s[t, g + 1])) + wmn[j0 + 1] * (np.int32(s[t, g + 2]) + np.int32(s[t, g + 3]))
                    lanes[8 + p] = _fma(-dx * wm[b], np.float32(prod), lanes[8 + p])
            total = 0
            for k in range(8):
                lane = 0
                if qtype == Q6_K:
                    # Q6_K multiplies the unsigned codes (0..63) and takes 32 * scale * bsum
                    # off each lane: lane k covers 16-element groups 2k and 2k+1
                    g0, g1 = 2 * k, 2 * k + 1
                    lane = -32 * (wsc[b * 16 + g0] * np.int32(s[t, b * 16 + g0]) + wsc[b * 16 + g1] * np.int32(s[t, b * 16 + g1]))
                    for c in range(bs // 32):
                        for e in range(32 * c + 4 * k, 32 * c + 4 * k + 4):
                            lane += wsc[(b * bs + e) // sub] * (np.int32(wq[b * bs + e]) + 32) * np.int32(q[t, b * bs + e])
                else:
                    for c in range(bs // 32):
                        for e in range(32 * c + 4 * k, 32 * c + 4 * k + 4):
                            lane += wsc[(b * bs + e) // sub] * np.int32(wq[b * bs + e]) * np.int32(q[t, b * bs + e])
                total += lane
                if not tail:
                    lanes[base + k] = _fma(wd[b] * dx, np.float32(lane), lanes[base + k])
            if tail:  # the scalar loop after the pairs: sumf += d * (sumi1 + sumi2), below
                acc, acc_min = dx * wd[b], np.float32(total)
            if kind == 1 and qtype == Q5_K:  # summs += (-d_x * dmin) * min_sum
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
                acc = _fma(r, dx, acc)
            elif k_gemm:
                # repacked GEMM: one fma per group of sub-blocks, the mins likewise
                for g0 in range(0, spb, group):
                    isum_g, msum_g = I32(0), I32(0)
                    for j in range(g0, g0 + group):
                        isum_g = I32(isum_g + parts[j])
                        for k in range(sub // 16):  # Q8_K sums of 16 codes
                            msum_g = I32(msum_g + wmn[b * spb + j] * I32(s[t, (b * bs + j * sub) // 16 + k]))
                    acc = _fma(wd[b] * dx, np.float32(isum_g), acc)
                    acc_min = _fma(wm[b] * dx, np.float32(msum_g), acc_min)
            else:
                acc = _fma(wd[b] * dx, np.float32(isum), acc)
                if kind == 1:
                    acc_min = _fma(wm[b] * dx, np.float32(msum), acc_min)
    if mode == MODE_LANES2:
        for k in range(8):
            lanes[k] = lanes[k] + lanes[8 + k]
        return _fma(acc, acc_min, _hsum8(lanes)) if n_blocks % 2 == 1 else _hsum8(lanes)
    if mode == MODE_LANES:
        if qtype == Q4_K:
            return _hsum8(lanes) + ((lanes[8] + lanes[10]) + (lanes[9] + lanes[11]))
        if kind == 0 or qtype == Q2_K:
            return _hsum8(lanes)
        return _hsum8(lanes) + acc_min
    if mode == MODE_SEQ_MIN:
        return acc - acc_min
    return acc


# --------------------------------------------------------------------------------------
# SIMD paths for the types that carry Phi-3's weights (Q4_K, Q5_K, Q6_K; Q4_0 and Q8_0 for
# other mixes), all bit-identical to _dot_unpacked. The K-quants go through phi3ref.ggml.simd's
# row kernels (a row against one token or a group of tokens, float sums inside the
# intrinsic) and, for prompts of Q4_K / Q5_K, its eight-row kernels. Q4_0 / Q8_0 take the
# tile path: the intrinsics give each block's integer sums for a tile of tokens (the block
# unpacked once per tile), then the float operations below, in _dot_unpacked's order.
# --------------------------------------------------------------------------------------

TOKEN_TILE = 32  # (a multiple of ROW_TOKENS) tokens whose activation codes (32 x n_in bytes) stay in cache together
ROW_GROUP = 8  # weight rows that meet each tile of tokens while it is in cache


def has_simd_path(qtype: int) -> bool:
    """Whether a weight type takes a SIMD kernel (:func:`matmul_ggml_simd_kernel`)."""
    return qtype == Q4_K or qtype == Q5_K or qtype == Q6_K or qtype == Q8_0 or qtype == Q4_0


@njit(inline="always")
def _lanes_sum(ints, o):
    return I32(ints[o] + ints[o + 1] + ints[o + 2] + ints[o + 3] + ints[o + 4] + ints[o + 5] + ints[o + 6] + ints[o + 7])


@njit(inline="always")
def _simd_block_ints(row, qtype, b, q, s, t0, nt, ints, scales, table):
    """Integer phase for block b of a Q4_0 / Q8_0 row: phi3ref.ggml.simd's lane sums for tokens
    t0..t0+nt into ints[(b * nt + t) * OUT_STRIDE ...], the block's float16 scale into scales[b]."""
    n_in = q.shape[1]
    dest = ints[b * nt * OUT_STRIDE :]
    off, xoff = b * (Q4_0_BYTES if qtype == Q4_0 else Q8_0_BYTES), t0 * n_in + b * 32
    if qtype == Q4_0:
        q4_0_block(row, off, q, xoff, s, 0, n_in, nt, dest)
    else:
        q8_0_block(row, off, q, xoff, s, 0, n_in, nt, dest)
    scales[b, 0] = read_f16(row, off, table)


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
        return _hsum8(lanes)
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


def has_row_path(qtype: int) -> bool:
    """Whether phi3ref.ggml.simd's row kernels cover a weight type (in every accumulation mode)."""
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
            t = t0
            while t < t1:  # one call site: Numba compiles each inlined copy anew
                n_group = ROW_TOKENS if t < g1 else 1
                _row_kernel(qtype, mode, n_group, row, q, d, s, out, r, t)
                t += n_group


@njit(inline="always")
def _rows_k_single(w, qtype, mode, r0, r1, q, d, s, out):
    """Rows r0..r1 of a K-quant weight against every token, each token on its own (the row
    kernel of one token): what a product takes below ROWS8_MIN_TOKENS tokens, or summed
    in vec_dot lanes; tokens in tiles of TOKEN_TILE as in :func:`_rows_k`."""
    n_tok = out.shape[0]
    for t0 in range(0, n_tok, TOKEN_TILE):
        t1 = min(n_tok, t0 + TOKEN_TILE)
        for r in range(r0, r1):
            row = w[r]
            for t in range(t0, t1):
                _row_kernel(qtype, mode, 1, row, q, d, s, out, r, t)


ROWS8_MIN_TOKENS = 4  # below this, a token's row kernel streams the weights faster
# tokens that meet a thread's whole slice of weights in the eight-row kernels: each tile
# streams the slice from memory once, so bigger tiles read the weights less often, while
# a block's activations of the tile (tile x 256 bytes, rows n_in apart) must stay in L1/L2.
# On full-size Phi-3 matrices 64 was ~15% faster than 32; 128 no faster.
ROWS8_TOKEN_TILE = 64


def has_rows8_path(qtype: int, mode: int, n_tok: int) -> bool:
    """Whether phi3ref.ggml.simd's eight-row kernels cover this product (Q4_K / Q5_K / Q6_K
    batches summed per token, not in vec_dot lanes)."""
    return has_row_path(qtype) and mode != MODE_LANES and n_tok >= ROWS8_MIN_TOKENS


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


def matmul_ggml(w, qtype, q, d, s, out, table, repack_q2_k, n_threads) -> None:
    """out[t, r] = dot(W[r], activations of token t) in ggml's numerics, for block-quantized
    weights. ``q, d, s`` come from :func:`quantize_activations` in the weight type's
    activation format; ``repack_q2_k`` is the level's (phi3ref.isa). Q4_0, Q8_0, Q4_K,
    Q5_K and Q6_K take the SIMD paths (:func:`matmul_ggml_simd_kernel`), every other type
    (and Q4_K's vec_dot, for row counts llama.cpp does not repack) :func:`matmul_ggml_unpacked`:
    :func:`product_kernel` chooses, so that only the kernels a weight takes are ever
    compiled."""
    product_kernel(qtype, w.shape[0], out.shape[0], repack_q2_k)(w, q, d, s, out, table, repack_q2_k, n_threads)


def product_kernel(qtype: int, n_rows: int, n_tok: int, repack_q2_k: bool):
    """The compiled kernel :func:`matmul_ggml` multiplies a weight of type ``qtype`` and
    ``n_rows`` rows with ``n_tok`` tokens by: the SIMD kernel of the product's summation
    mode, eight-row or not, with or without rows beyond the last group of eight, where
    the type has one; else the unpacked kernel."""
    mode = accumulation_mode.py_func(qtype, n_rows, n_tok, repack_q2_k)
    if not has_simd_path(qtype) or (qtype == Q4_K and mode == MODE_LANES):
        return matmul_ggml_unpacked_kernel(qtype)
    rows8 = has_rows8_path(qtype, mode, n_tok)
    return matmul_ggml_simd_kernel(qtype, mode, rows8, rows8 and n_rows % 8 != 0)


def matmul_ggml_unpacked(w, qtype, q, d, s, out, table, repack_q2_k, n_threads) -> None:
    """:func:`matmul_ggml` for any block type, the plain way (:func:`matmul_ggml_unpacked_kernel`):
    the reference the SIMD path is tested against, bit for bit."""
    matmul_ggml_unpacked_kernel(qtype)(w, q, d, s, out, table, repack_q2_k, n_threads)


# the products below ROWS8_MIN_TOKENS tokens take each token on its own (_rows_k_single):
# no group of ROW_TOKENS fits in them
assert ROWS8_MIN_TOKENS <= ROW_TOKENS


@functools.cache
def matmul_ggml_simd_kernel(qtype: int, mode: int, rows8: bool = False, tail: bool = False):
    """The SIMD path of :func:`matmul_ggml` for one weight type (Q4_0, Q8_0, Q4_K, Q5_K,
    Q6_K) and summation ``mode``, compiled at its first call with both as constants of its
    code, so that it holds only the kernels that mode sums with. Q4_K, Q5_K, Q6_K:
    ``rows8`` the eight-row kernels (a prompt; ``tail``: the rows beyond the last group of
    eight, one at a time, by the last thread), else the row kernel of one token, token by
    token (a prompt's kernels and one token's are compiled apart: neither holds the other's). Q4_0,
    Q8_0: each weight block unpacked once per tile of tokens. :func:`product_kernel`
    chooses the variant of a product's shape; its arguments are :func:`matmul_ggml`'s."""
    if rows8:
        tail_rows = int(tail)

        def part(th, n_threads, w, q, d, s, out, table, repack_q2_k):
            n_rows = w.shape[0]
            per8 = (n_rows // 8 + n_threads - 1) // n_threads * 8  # whole groups of eight rows per thread
            acc = np.empty(ROWS8_TOKEN_TILE * 16, dtype=np.float32)
            _rows8_k(w, qtype, mode, th * per8, min(n_rows // 8 * 8, (th + 1) * per8), q, d, s, out, acc)
            if tail_rows == 1 and th == n_threads - 1:  # a comparison of constants: Numba prunes it
                _rows_k(w, qtype, mode, n_rows // 8 * 8, n_rows, q, d, s, out)
    elif has_row_path(qtype):
        def part(th, n_threads, w, q, d, s, out, table, repack_q2_k):
            n_rows = w.shape[0]
            per = (n_rows + n_threads - 1) // n_threads
            _rows_k_single(w, qtype, mode, th * per, min(n_rows, (th + 1) * per), q, d, s, out)
    else:
        def part(th, n_threads, w, q, d, s, out, table, repack_q2_k):
            n_rows, n_tok = w.shape[0], out.shape[0]
            per = (n_rows + n_threads - 1) // n_threads
            n_blocks = q.shape[1] // 32  # an upper bound for every type
            ints = np.empty(n_blocks * min(n_tok, TOKEN_TILE) * OUT_STRIDE, dtype=np.int32)
            scales = np.empty((n_blocks, 2), dtype=np.float32)
            lanes = np.empty(8, dtype=np.float32)
            _rows_simd(w, qtype, mode, th * per, min(n_rows, (th + 1) * per), q, d, s, out, ints, scales, lanes, table)

    shape = ("_rows8" if rows8 else "") + ("_tail" if tail else "")
    return threaded_kernel(part, f"matmul_ggml_simd_{MODE_NAMES[mode]}{shape}_{QT(qtype).name}", fastmath=FASTMATH_GGML)


@functools.cache
def matmul_ggml_unpacked_kernel(qtype: int):
    """:func:`matmul_ggml_unpacked` for one weight type, compiled at its first call: each
    weight row is unpacked to codes and scales once (:func:`unpack_row`), then dotted with
    every token's codes in scalar loops."""

    def part(th, n_threads, w, q, d, s, out, table, repack_q2_k):
        # unpack_row is a cached function of its own: an int, not the constant, so that
        # every type shares its one compiled signature
        any_type = qtype + 0
        n_rows, n_tok, n_in = w.shape[0], out.shape[0], q.shape[1]
        mode = accumulation_mode(qtype, n_rows, n_tok, repack_q2_k)
        per = (n_rows + n_threads - 1) // n_threads
        wq, wsc, wmn, wd, wm = row_scratch(n_in)
        lanes = np.zeros(16, dtype=np.float32)
        parts = np.zeros(16, dtype=np.int32)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            unpack_row(w[r], any_type, wq, wsc, wmn, wd, wm, table)
            for t in range(n_tok):
                out[t, r] = _dot_unpacked(qtype, mode, wq, wsc, wmn, wd, wm, q, d, s, t, n_tok, lanes, parts)

    return threaded_kernel(part, f"matmul_ggml_unpacked_{QT(qtype).name}", fastmath=FASTMATH_GGML)


# ======================================================================================
# attention in ggml's numerics: the float16 KV cache and llama.cpp's two products over it.
# A batch of two tokens or more goes through llamafile's tinyBLAS (``lanes`` float lanes:
# lane i takes elements i, i + lanes, ... in order, the lanes then reduced in a tree), when
# the product's shape allows it (scores: head_dim a multiple of lanes; values: head_dim a
# multiple of 4; llama.cpp's KV view is a multiple of 256 cells, so the positions always
# are); otherwise, and for a single token, ggml_vec_dot_f16 (four accumulators of
# ``lanes`` lanes, see phi3ref.ggml.simd). Products of two float16 values are exact in float32,
# so the fused multiply-adds of both are plain float32 additions here.
# ======================================================================================


def tinyblas_scores(batched: bool, head_dim: int, lanes: int) -> bool:
    """Whether llama.cpp's kq product goes through tinyBLAS (else ggml_vec_dot_f16)."""
    return bool(batched) and head_dim % lanes == 0


def tinyblas_values(batched: bool, head_dim: int) -> bool:
    """Whether llama.cpp's kqv product goes through tinyBLAS (else ggml_vec_dot_f16)."""
    return bool(batched) and head_dim % 4 == 0


@njit(inline="always")
def _tree(v, o, n):
    """v[o .. o + n] (n = 8 or 16) summed as _reduce_halves in phi3ref.ggml.simd: the upper half
    onto the lower until four remain, then (0 + 2) + (1 + 3)."""
    if n == 16:
        a0, a1, a2, a3 = v[o + 8] + v[o], v[o + 9] + v[o + 1], v[o + 10] + v[o + 2], v[o + 11] + v[o + 3]
        a4, a5, a6, a7 = v[o + 12] + v[o + 4], v[o + 13] + v[o + 5], v[o + 14] + v[o + 6], v[o + 15] + v[o + 7]
        b0, b1, b2, b3 = a4 + a0, a5 + a1, a6 + a2, a7 + a3
    else:
        b0, b1, b2, b3 = v[o + 4] + v[o], v[o + 5] + v[o + 1], v[o + 6] + v[o + 2], v[o + 7] + v[o + 3]
    return (b0 + b2) + (b1 + b3)


@njit(inline="always")
def _vec_reduce(acc, lanes, tmp):
    """GGML_F16_VEC_REDUCE of acc[0 .. 4 lanes] (four accumulators of ``lanes`` lanes, one
    after the other): (0 + 2) + (1 + 3) lane by lane, then the lanes: the tree for 16, the
    AVX hadd order ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)) for 8. ``tmp``: >= lanes floats."""
    for i in range(lanes):
        tmp[i] = (acc[i] + acc[2 * lanes + i]) + (acc[lanes + i] + acc[3 * lanes + i])
    if lanes == 16:
        return _tree(tmp, 0, 16)
    return ((tmp[0] + tmp[4]) + (tmp[1] + tmp[5])) + ((tmp[2] + tmp[6]) + (tmp[3] + tmp[7]))


SCORES_CHUNK = 16  # positions per call of phi3ref.ggml.simd's scores kernels


@njit(inline="always")
def _scores_vecdot(th, n_threads, q, k_cache, end, first, last, out, lanes):
    """ggml_vec_dot_f16 per (head, row, position), thread th's share of the (head, row)
    items; positions outermost, VECDOT_KEYS at a time (their double-precision tails
    overlap), so that a position's keys of this thread's heads are read contiguously from
    the cache."""
    n_kv, rows, hd = q.shape
    n_sets = first.size
    n_items = n_kv * rows
    per = (n_items + n_threads - 1) // n_threads
    group = VECDOT_KEYS
    for p0 in range(0, end, group):
        for item in range(th * per, min(n_items, (th + 1) * per)):
            h, r = item // rows, item % rows  # q[h, r] starts at item * hd
            lo, hi = first[r % n_sets], last[r % n_sets]
            if p0 + group <= end and lo <= p0 and p0 + group - 1 <= hi:  # out[h, r, p] at item * end + p
                if lanes == 16:
                    vecdot_f16_16_keys(q, item * hd, k_cache, (p0 * n_kv + h) * hd, n_kv * hd, hd, out, item * end + p0, 1)
                else:
                    vecdot_f16_8_keys(q, item * hd, k_cache, (p0 * n_kv + h) * hd, n_kv * hd, hd, out, item * end + p0, 1)
                continue
            for p in range(p0, min(end, p0 + group)):
                if lo <= p <= hi:
                    if lanes == 16:
                        out[h, r, p] = vecdot_f16_16(q, item * hd, k_cache, (p * n_kv + h) * hd, hd)
                    else:
                        out[h, r, p] = vecdot_f16_8(q, item * hd, k_cache, (p * n_kv + h) * hd, hd)
                else:
                    out[h, r, p] = -np.inf


def _keys_width(lanes: int) -> int:
    """Positions per tinyBLAS scores tile: the block of transposed keys a tile reads."""
    return SCORES_CHUNK * TILE_COLS[lanes]


@njit(inline="always")
def _transpose_keys(th, n_threads, k_cache, end, keys, width):
    """tinyBLAS's kq, first step (thread th's heads): the keys converted to float32 once and
    transposed, keys[h, block, element, position in the block] (blocks of ``width``
    positions, padded with 0: a tile's keys are one contiguous block, where rows of a
    power-of-two stride would share a few L1 sets)."""
    n_kv, n_blocks, hd = keys.shape[0], keys.shape[1], keys.shape[2]
    for h in range(th, n_kv, n_threads):  # a position's keys read in a row; the hd lines written stay in L1
        for p in range(n_blocks * width):
            for j in range(hd):
                keys[h, p // width, j, p % width] = half_to_float(k_cache[p, h, j]) if p < end else 0


@njit(inline="always")
def _scores_tinyblas(th, n_threads, q, keys, end, first, last, out, lanes, tile, width):
    """tinyBLAS's kq, second step (thread th's tiles): phi3ref.ggml.simd's tiles compute
    ``tile`` rows of one head times a block of transposed keys per call (the last rows one
    by one); chunks of keys that no row of a tile sees are -inf."""
    n_kv, rows, hd = q.shape
    n_blocks = keys.shape[1]
    n_sets = first.size
    n_tiles = (rows + tile - 1) // tile
    n_units = n_kv * n_tiles
    for unit in range(th, n_units, n_threads):  # interleaved: later rows see more keys
        h, r0 = unit // n_tiles, unit % n_tiles * tile
        n = min(tile, rows - r0)
        lo, hi = end, -1  # the keys any row of the tile sees
        for r in range(r0, r0 + n):
            lo, hi = min(lo, first[r % n_sets]), max(hi, last[r % n_sets])
        for p0 in range(0, end, width):
            n_valid = min(width, end - p0)
            k0 = (h * n_blocks + p0 // width) * hd * width
            if p0 + width - 1 < lo or p0 > hi:
                for r in range(r0, r0 + n):
                    for i in range(n_valid):
                        out[h, r, p0 + i] = -np.inf
            elif n == tile:  # q[h, r] and out[h, r] start at (h * rows + r) * hd, (h * rows + r) * end
                if lanes == 16:
                    scores_tile16(q, (h * rows + r0) * hd, hd, keys, k0, width, hd, out, (h * rows + r0) * end + p0, end, n_valid)
                else:
                    scores_tile8(q, (h * rows + r0) * hd, hd, keys, k0, width, hd, out, (h * rows + r0) * end + p0, end, n_valid)
            else:  # the last rows, one by one, sixteen positions per call
                for r in range(r0, r0 + n):
                    item = h * rows + r
                    for c0 in range(0, n_valid, SCORES_CHUNK):
                        m = min(SCORES_CHUNK, n_valid - c0)
                        if lanes == 16:
                            scores16(q, item * hd, keys, k0 + c0, width, hd, out, item * end + p0 + c0, m)
                        else:
                            scores8(q, item * hd, keys, k0 + c0, width, hd, out, item * end + p0 + c0, m)


def attention_scores_f16(q, k_cache, end, first, last, out, lanes, batched, n_threads) -> None:
    """out[h, r, p] = q[h, r] . k_cache[p, h] for positions p < end, as llama.cpp's kq
    product sums it: tinyBLAS with ``lanes`` lanes when ``batched`` (the batch has two
    tokens or more) and head_dim is a multiple of lanes, else ggml_vec_dot_f16. q:
    (n_head_kv, rows, head_dim) float32 holding float16 values; k_cache: (n_ctx, n_head_kv,
    head_dim) uint16 float16 bit patterns (the cache itself, no copy); out: (n_head_kv,
    rows, end) float32. Row r needs only the keys first[t] .. last[t] (t = r % len(first),
    as in softmax_ggml): keys it does not need may be left out (-inf) — in the tinyBLAS
    form, chunks of keys that no row of its tile needs (others are computed), single keys in
    the other. One kernel per lane count and form (the level's; a prompt's or one
    token's; tinyBLAS's in two: the keys transposed, then the tiles), compiled at its first
    call."""
    n_kv, _, hd = q.shape
    if tinyblas_scores(batched, hd, lanes):
        width = _keys_width(lanes)
        keys = np.empty((n_kv, (end + width - 1) // width, hd, width), dtype=np.float32)  # (head, block, element, position)
        transpose_keys_kernel(lanes)(k_cache, end, keys, n_threads)
        attention_scores_kernel(lanes, True)(q, keys, end, first, last, out, n_threads)
    else:
        ready(attention_scores_kernel(lanes, False))(q, k_cache, end, first, last, out, n_threads)  # may still be compiling in a helper


@functools.cache
def transpose_keys_kernel(lanes: int) -> Threaded:
    """:func:`_transpose_keys` into blocks of a ``lanes`` tile's positions (a constant of
    its code), compiled at its first call."""
    width = _keys_width(lanes)

    def part(th, n_threads, k_cache, end, keys):
        _transpose_keys(th, n_threads, k_cache, end, keys, width)
    return threaded_kernel(part, f"attention_keys_transposed_{lanes}", fastmath=FASTMATH_GGML)


@functools.cache
def attention_scores_kernel(lanes: int, tinyblas: bool):
    """:func:`attention_scores_f16` for ``lanes`` (8 or 16) in tinyBLAS's form (over the
    transposed keys) or ggml_vec_dot_f16's (over the cache), constants of its code."""
    tile, width = TILE_ROWS[lanes], _keys_width(lanes)
    if tinyblas:
        def part(th, n_threads, q, keys, end, first, last, out):
            _scores_tinyblas(th, n_threads, q, keys, end, first, last, out, lanes, tile, width)
    else:
        def part(th, n_threads, q, k_cache, end, first, last, out):
            _scores_vecdot(th, n_threads, q, k_cache, end, first, last, out, lanes)
    form = "tinyblas" if tinyblas else "vecdot"
    return threaded_kernel(part, f"attention_scores_{form}_{lanes}", fastmath=FASTMATH_GGML)


VALUES_CHUNK = 16  # (head, query row) items whose ggml_vec_dot_f16 accumulators grow together
VALUES_SPAN = 256  # positions per pass over the accumulator slots: a multiple of every 4 * lanes (32, 64)
VALUES_ROWS = 4  # query rows of one KV head per call of phi3ref.ggml.simd's values_slot kernels


@njit(inline="always")
def _values_slot(probs, poff, pstride, v_cache, voff, vstride, p0, count, pstep, acc, aoff, astride, n_rows):
    """phi3ref.ggml.simd's values_slot kernel for ``n_rows`` (1 .. VALUES_ROWS) rows."""
    if n_rows == 1:
        values_slot1(probs, poff, pstride, v_cache, voff, vstride, p0, count, pstep, acc, aoff, astride)
    elif n_rows == 2:
        values_slot2(probs, poff, pstride, v_cache, voff, vstride, p0, count, pstep, acc, aoff, astride)
    elif n_rows == 3:
        values_slot3(probs, poff, pstride, v_cache, voff, vstride, p0, count, pstep, acc, aoff, astride)
    else:
        values_slot4(probs, poff, pstride, v_cache, voff, vstride, p0, count, pstep, acc, aoff, astride)


@njit(inline="always")
def _values_vecdot(th, n_threads, probs, v_cache, end, first, last, out, lanes):
    """ggml_vec_dot_f16 of each value row (one output element over the positions) with a
    row of probabilities, thread th's share of the (head, row) items: position p in lane
    p % lanes of accumulator (p // lanes) % 4, that is in slot p % (4 lanes) of the output,
    each slot adding its positions in order. VALUES_CHUNK items at a time, so that each
    position's values of those heads are read once from memory. Within a span of
    VALUES_SPAN positions, slot by slot: phi3ref.ggml.simd's values_slot kernels add a
    slot's positions of the span to sixteen outputs of up to VALUES_ROWS rows at once,
    the accumulators in registers and each value converted once for all the rows that
    share its KV head and token (the heads of a group). llama.cpp's KV view is a multiple
    of 256 cells, so no position is left over for the double tail."""
    n_kv, rows, hd = out.shape
    n_sets = first.size
    n_items = n_kv * rows
    per = (n_items + n_threads - 1) // n_threads
    step = 4 * lanes
    whole = hd - hd % 16  # outputs in whole vectors of sixteen; the rest one by one
    per_slot = VALUES_SPAN // step
    acc = np.empty((VALUES_CHUNK, step, hd), dtype=np.float32)  # (item, slot, output element)
    tmp = np.empty(16, dtype=np.float32)
    i0, i1 = th * per, min(n_items, (th + 1) * per)
    for c0 in range(i0, i1, VALUES_CHUNK):
        c1 = min(i1, c0 + VALUES_CHUNK)
        h0, h1 = c0 // rows, (c1 - 1) // rows + 1  # the heads of the chunk's items
        acc[:] = 0
        for s0 in range(0, end, VALUES_SPAN):
            s1 = min(end, s0 + VALUES_SPAN)
            for slot in range(step):
                # the next span's positions, a slot's share of them at a time: this walk
                # jumps 4 lanes positions at a time, which the CPU's prefetchers miss
                for q in range(s1 + slot * per_slot, min(end, s1 + (slot + 1) * per_slot)):
                    prefetch_elements(v_cache, (q * n_kv + h0) * hd, (h1 - h0) * hd)
                for h in range(h0, h1):
                    ra, rb = max(c0 - h * rows, 0), min(c1 - h * rows, rows)  # the chunk's rows of head h
                    for r0 in range(ra, min(rb, ra + n_sets)):  # rows r0, r0 + n_sets, ... < rb: one token's
                        t = r0 % n_sets
                        p0 = max(s0 + slot, first[t])
                        p0 += (slot - p0 % step) % step  # the slot's first position from there
                        p1 = min(s1 - 1, last[t])
                        if p0 > p1:
                            continue
                        count = (p1 - p0) // step + 1
                        n_r = (rb - r0 + n_sets - 1) // n_sets
                        for k0 in range(0, n_r, VALUES_ROWS):
                            m = min(VALUES_ROWS, n_r - k0)
                            r = r0 + k0 * n_sets
                            item = h * rows + r  # probs[h, r] starts at item * end
                            aoff = ((item - c0) * step + slot) * hd  # acc[item - c0, slot]
                            for j0 in range(0, whole, 16):
                                _values_slot(probs, item * end, n_sets * end, v_cache, h * hd + j0, n_kv * hd, p0, count, step,
                                             acc, aoff + j0, n_sets * step * hd, m)
                            for k in range(m):
                                a = acc[item - c0 + k * n_sets, slot]
                                for p in range(p0, p1 + 1, step):
                                    pr = probs[h, r + k * n_sets, p]
                                    for j in range(whole, hd):
                                        a[j] += pr * half_to_float(v_cache[p, h, j])
        for item in range(c0, c1):
            for j in range(hd):
                out[item // rows, item % rows, j] = _vec_reduce(acc[item - c0, :, j], lanes, tmp)


def attention_values_f16(probs, v_cache, end, first, last, out, lanes, batched, n_threads) -> None:
    """out[h, r, j] = sum over positions p < end of probs[h, r, p] * v_cache[p, h, j], as
    llama.cpp's kqv product sums it: tinyBLAS with ``lanes`` lanes over positions (lane
    p % lanes) when ``batched`` and head_dim is a multiple of 4, else ggml_vec_dot_f16.
    probs: (n_head_kv, rows, end) float32 holding float16 values; v_cache: (n_ctx,
    n_head_kv, head_dim) uint16; out: (n_head_kv, rows, head_dim). Row r adds only
    positions first[t] .. last[t] (t = r % len(first)): the others have probability 0
    after the causal mask, and a 0 product adds nothing (ggml multiplies them anyway, which
    differs only for an infinite or NaN value in the cache). One kernel per lane
    count and form (the level's; a prompt's or one token's; tinyBLAS's in two: the values
    gathered, then the tiles), compiled at its first call."""
    n_kv, _, hd = out.shape
    if tinyblas_values(batched, hd):
        width = _values_width(lanes)
        values = np.empty((n_kv, hd // width, end, width), dtype=np.uint16)  # (head, block of outputs, position, output)
        gather_values_kernel(lanes)(v_cache, end, values, n_threads)
        attention_values_kernel(lanes, True)(probs, v_cache, end, first, last, out, values, n_threads)
    else:
        ready(attention_values_kernel(lanes, False))(probs, v_cache, end, first, last, out, n_threads)  # may still be compiling in a helper


def _values_width(lanes: int) -> int:
    """Outputs per tinyBLAS values tile: the block of gathered values a tile reads."""
    return 16 * TILE_COLS[lanes]


@njit(inline="always")
def _gather_values(th, n_threads, v_cache, end, values, width):
    """tinyBLAS's kqv, first step (thread th's heads): the values of the outputs in whole
    tiles gathered per block of ``width`` outputs, values[h, block, position, output in the
    block]: a tile's values are one contiguous stream (the cache's rows, n_head_kv *
    head_dim apart, would share a few L1 sets)."""
    n_kv, n_blocks = values.shape[0], values.shape[1]
    for h in range(th, n_kv, n_threads):
        for p in range(end):
            for j in range(n_blocks * width):
                values[h, j // width, p, j % width] = v_cache[p, h, j]


@functools.cache
def gather_values_kernel(lanes: int) -> Threaded:
    """:func:`_gather_values` into blocks of a ``lanes`` tile's outputs (a constant of its
    code), compiled at its first call."""
    width = _values_width(lanes)

    def part(th, n_threads, v_cache, end, values):
        _gather_values(th, n_threads, v_cache, end, values, width)
    return threaded_kernel(part, f"attention_values_gathered_{lanes}", fastmath=FASTMATH_GGML)


@functools.cache
def attention_values_kernel(lanes: int, tinyblas: bool):
    """:func:`attention_values_f16` for ``lanes`` (8 or 16) in tinyBLAS's form (over the
    gathered values, then the cache for the outputs past the last whole tile) or
    ggml_vec_dot_f16's, constants of its code."""
    tile, width = TILE_ROWS[lanes], _values_width(lanes)
    if tinyblas:
        def part(th, n_threads, probs, v_cache, end, first, last, out, values):
            _values_tinyblas(th, n_threads, probs, v_cache, end, first, last, out, values, lanes, tile, width)
    else:
        def part(th, n_threads, probs, v_cache, end, first, last, out):
            _values_vecdot(th, n_threads, probs, v_cache, end, first, last, out, lanes)
    form = "tinyblas" if tinyblas else "vecdot"
    return threaded_kernel(part, f"attention_values_{form}_{lanes}", fastmath=FASTMATH_GGML)


@njit(inline="always")
def _values_tinyblas(th, n_threads, probs, v_cache, end, first, last, out, values, lanes, tile, width):
    """tinyBLAS's kqv, second step (thread th's tiles): phi3ref.ggml.simd's tiles compute
    ``tile`` rows of one head times a block of gathered values' outputs per call; the last
    rows and outputs row by row, sixteen per call, from the cache."""
    n_kv, rows, hd = out.shape
    n_blocks = values.shape[1]
    n_sets = first.size
    whole = n_blocks * width  # outputs in whole tiles
    n_tiles = (rows + tile - 1) // tile
    n_units = n_kv * n_tiles
    ranges = np.empty((2, tile), dtype=np.int64)  # each row's first and last position
    for unit in range(th, n_units, n_threads):  # interleaved: later rows see more positions
        h, r0 = unit // n_tiles, unit % n_tiles * tile
        n = min(tile, rows - r0)
        j_rows = 0  # outputs done for the whole tile
        if n == tile:
            for i in range(tile):
                t = (r0 + i) % n_sets
                ranges[0, i], ranges[1, i] = first[t], min(last[t], end - 1)
            for j0 in range(0, whole, width):
                if lanes == 16:
                    values_tile16(probs, (h * rows + r0) * end, end, values, (h * n_blocks + j0 // width) * end * width, width, ranges, out, (h * rows + r0) * hd + j0, hd)
                else:
                    values_tile8(probs, (h * rows + r0) * end, end, values, (h * n_blocks + j0 // width) * end * width, width, ranges, out, (h * rows + r0) * hd + j0, hd)
            j_rows = whole
        for r in range(r0, r0 + n):  # the rest: row by row, sixteen outputs per call
            item, t = h * rows + r, r % n_sets
            lo, hi = first[t], min(last[t], end - 1)
            for j0 in range(j_rows, hd, 16):
                n_valid = min(16, hd - j0)
                if lanes == 16:
                    values16(probs, item * end, v_cache, h * hd + j0, n_kv * hd, lo, hi, out, item * hd + j0, n_valid)
                else:
                    values8(probs, item * end, v_cache, h * hd + j0, n_kv * hd, lo, hi, out, item * hd + j0, n_valid)


# ======================================================================================
# float weights (F32, F16, BF16) in ggml's numerics. ggml converts the activations to the
# weight's type first (F16 / BF16: rounded to nearest even), then: one token through
# ggml_vec_dot_f32 / _f16 / _bf16 (four accumulators of ``lanes`` lanes, except BF16's
# own layout), a batch through llamafile's tinyBLAS (kn lanes, fma per element, the tree)
# when the row length is a multiple of kn and the row count of 4, else vec_dot again.
# With AVX512-BF16, BF16 products go through vdpbf16ps (pairs, odd element first,
# subnormals flushed). Products of two float16 / bfloat16 values are exact in float32.
# ======================================================================================

FLOAT_F32, FLOAT_F16, FLOAT_BF16 = 0, 1, 2
FLOAT_KIND = {F32: FLOAT_F32, F16: FLOAT_F16, BF16: FLOAT_BF16}  # of each float weight type


def _float_row(w, r, row, table):
    """row = W[r] as float32: float32 weights copied, 16-bit ones decoded through table."""
    row[:] = w[r] if w.dtype == np.float32 else table[w[r]]


@overload(_float_row, inline="always")
def _float_row_impl(w, r, row, table):
    if w.dtype == types.float32:
        def copy(w, r, row, table):
            for i in range(row.shape[0]):
                row[i] = w[r, i]
        return copy

    def decode(w, r, row, table):
        for i in range(row.shape[0]):
            row[i] = table[w[r, i]]
    return decode


@njit(inline="always")
def _ftz(v):
    """v with a subnormal result flushed to zero of the same sign (vdpbf16ps's FTZ / DAZ)."""
    return v * np.float32(0) if abs(v) < np.float32(1.1754944e-38) else v


@njit(inline="always")
def _dp_pair(acc, w0, x0, w1, x1):
    """One lane of vdpbf16ps: the odd pair's product added first, then the even one's,
    each rounded, inputs and results that are subnormal taken as zero."""
    acc = _ftz(acc + _ftz(w1) * _ftz(x1))
    return _ftz(acc + _ftz(w0) * _ftz(x0))


@njit(inline="always")
def _float_vec_dot(kind, row, x, t, n, lanes, bf16_dot, acc, tmp):
    """ggml_vec_dot_{f32,f16,bf16} of row (float32 values) with token t's activations."""
    if kind == FLOAT_BF16:
        total = 0.0
        if bf16_dot:  # two dpbf16 accumulators over 64 elements: [0, 32) and [32, 64)
            whole = n - n % 64
            for k in range(32):
                acc[k] = 0
            for c in range(0, whole, 64):
                for half in range(2):
                    for i in range(16):
                        e = c + 32 * half + 2 * i
                        acc[16 * half + i] = _dp_pair(acc[16 * half + i], row[e], x[t, e], row[e + 1], x[t, e + 1])
            total += np.float64(_tree(acc, 0, 16))
            total += np.float64(_tree(acc, 16, 16))
        elif lanes == 16:  # two accumulators: elements 32 c + i and 32 c + 16 + i
            whole = n - n % 32
            for k in range(32):
                acc[k] = 0
            for c in range(0, whole, 32):
                for i in range(32):
                    acc[i] = acc[i] + row[c + i] * x[t, c + i]
            total += np.float64(_tree(acc, 0, 16))
            total += np.float64(_tree(acc, 16, 16))
        else:  # four of eight lanes: elements 32 c + 8 j + i, then (1 + 3) + (2 + 4)
            whole = n - n % 32
            for k in range(32):
                acc[k] = 0
            for c in range(0, whole, 32):
                for i in range(32):
                    acc[i] = acc[i] + row[c + i] * x[t, c + i]
            for i in range(8):
                tmp[i] = (acc[i] + acc[16 + i]) + (acc[8 + i] + acc[24 + i])
            total += np.float64(_tree(tmp, 0, 8))
        for e in range(whole, n):
            total += np.float64(row[e] * x[t, e])
        return np.float32(total)
    # F32 / F16: GGML_F32_VEC / GGML_F16_VEC, four accumulators of ``lanes`` lanes
    step = 4 * lanes
    whole = n - n % step
    for k in range(step):
        acc[k] = 0
    for c in range(0, whole, step):
        for k in range(step):
            acc[k] = _fma(row[c + k], x[t, c + k], acc[k])
    reduced = _vec_reduce(acc, lanes, tmp)
    if kind == FLOAT_F32:  # leftovers in float: sumf += x * y, contracted
        for e in range(whole, n):
            reduced = _fma(row[e], x[t, e], reduced)
        return reduced
    total = np.float64(reduced)  # F16: leftovers in double
    for e in range(whole, n):
        total += np.float64(row[e] * x[t, e])
    return np.float32(total)


@njit(inline="always")
def _float_tinyblas(kind, row, x, t, n, kn, bf16_dot, acc):
    """llamafile tinyBLAS for one output: kn lanes, lane i taking elements i, i + kn, ...
    by fma, then the tree; BF16 with vdpbf16ps (kn = 32): sixteen lanes of pairs."""
    if kind == FLOAT_BF16 and bf16_dot:
        for i in range(16):
            acc[i] = 0
        for c in range(0, n, 32):
            for i in range(16):
                e = c + 2 * i
                acc[i] = _dp_pair(acc[i], row[e], x[t, e], row[e + 1], x[t, e + 1])
        return _tree(acc, 0, 16)
    for i in range(kn):
        acc[i] = 0
    for c in range(0, n, kn):
        for i in range(kn):
            acc[i] = _fma(row[c + i], x[t, c + i], acc[i])
    return _tree(acc, 0, kn)


def matmul_float_ggml(w, kind, x, out, table, lanes, bf16_dot, n_threads) -> None:
    """out[t, r] = dot(W[r], x[t]) for float weights as llama.cpp sums it: ``kind``
    FLOAT_F32 (w float32), FLOAT_F16 / FLOAT_BF16 (w uint16 bit patterns, decoded through
    ``table``); x (n_tokens, n_in) float32, already rounded to the weight's type; the
    level's ``lanes`` and ``bf16_dot`` (phi3ref.isa). One kernel per kind, compiled at its
    first call (:func:`matmul_float_ggml_kernel`)."""
    matmul_float_ggml_kernel(kind)(w, x, out, table, lanes, bf16_dot, n_threads)


@functools.cache
def matmul_float_ggml_kernel(kind: int):
    """:func:`matmul_float_ggml` for one kind of float weight: ``kind`` is a constant of its code."""

    def part(th, n_threads, w, x, out, table, lanes, bf16_dot):
        n_rows, n_in, n_tok = w.shape[0], x.shape[1], x.shape[0]
        kn = 32 if (kind == FLOAT_BF16 and bf16_dot) else lanes
        tiny = n_tok >= 2 and n_in % kn == 0 and n_rows % 4 == 0
        per = (n_rows + n_threads - 1) // n_threads
        row = np.empty(n_in, dtype=np.float32)
        acc = np.empty(64, dtype=np.float32)
        tmp = np.empty(16, dtype=np.float32)
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            _float_row(w, r, row, table)
            for t in range(n_tok):
                if tiny:
                    out[t, r] = _float_tinyblas(kind, row, x, t, n_in, kn, bf16_dot, acc)
                else:
                    out[t, r] = _float_vec_dot(kind, row, x, t, n_in, lanes, bf16_dot, acc, tmp)

    return threaded_kernel(part, f"matmul_float_ggml_{next(QT(t).name for t, k in FLOAT_KIND.items() if k == kind)}", fastmath=FASTMATH_GGML)


def _hexf(literal: str) -> np.float32:
    """A C hexadecimal float literal (0x1.8p23f) as float32."""
    return np.float32(float.fromhex(literal))


# ggml_v_expf's constants, as its source spells them (both forms share them)
_EXP_SHIFTER, _EXP_LOG2E = _hexf("0x1.8p23"), _hexf("0x1.715476p+0")
_EXP_LN2_HI, _EXP_LN2_LO = _hexf("0x1.62e4p-1"), _hexf("0x1.7f7d1cp-20")
_EXP_C5, _EXP_C4, _EXP_C3 = _hexf("0x1.0e4020p-7"), _hexf("0x1.573e2ep-5"), _hexf("0x1.555e66p-3")
_EXP_C2, _EXP_C1 = _hexf("0x1.fffdb6p-2"), _hexf("0x1.ffffecp-1")
_U32 = 0xFFFFFFFF


@njit(inline="always")
def _v_expf_scalef(x):
    """ggml_v_expf (AVX-512) for one lane: exp(x) = 2^n * p(b), n = round(x / ln 2), b the
    remainder; |n| > 192 gives 0 or inf (masked scores are -inf)."""
    z = fma32(x, _EXP_LOG2E, _EXP_SHIFTER)
    n = z - _EXP_SHIFTER
    b = fma32(-n, _EXP_LN2_LO, fma32(-n, _EXP_LN2_HI, x))
    u = b * b
    j = fma32(fma32(fma32(_EXP_C5, b, _EXP_C4), u, fma32(_EXP_C3, b, _EXP_C2)), u, fma32(_EXP_C1, b, np.float32(1)))
    # _mm512_scalef_ps(j, n) = j * 2^n with one rounding: the product is exact in float64.
    # Written as selects, without calls, so that LLVM vectorizes loops over _v_expf_scalef.
    overflow = abs(n) > np.float32(192)  # an ordered compare, as ggml's: NaN passes through
    n_int = np.int64(n) if abs(n) <= np.float32(192) else np.int64(0)  # (for NaN, j is NaN)
    scaled = np.float32(np.float64(j) * pow2_f64(n_int))
    return (np.float32(0) if n <= 0 else np.float32(np.inf)) if overflow else scaled


@njit(inline="always")
def _v_expf_bits(x):
    """ggml_v_expf (AVX2, also SSE and NEON) for one lane: the same polynomial without its
    constant term, j = p(b) - 1, and 2^n as k from the exponent bits of z: exp = k + j * k.
    Where |n| > 126 the scale is split in two (s2 * s1) so that it does not overflow, and
    |n| > 192 gives s1 * s1 (0 or inf). Selects only, so loops over it vectorize."""
    z = fma32(x, _EXP_LOG2E, _EXP_SHIFTER)
    n = z - _EXP_SHIFTER
    b = fma32(-n, _EXP_LN2_LO, fma32(-n, _EXP_LN2_HI, x))
    e = (np.uint64(f32_bits(z)) << np.uint64(23)) & _U32  # _mm256_slli_epi32(z, 23)
    k = bits_f32(np.uint32((e + 0x3F800000) & _U32))  # + the bits of 1.0f
    u = b * b
    j = fma32(fma32(fma32(_EXP_C5, b, _EXP_C4), u, fma32(_EXP_C3, b, _EXP_C2)), u, _EXP_C1 * b)
    g = np.uint64(0x82000000) if n <= 0 else np.uint64(0)
    s1 = bits_f32(np.uint32((g + 0x7F000000) & _U32))
    s2 = bits_f32(np.uint32((e - g) & _U32))
    an = abs(n)
    big = s1 * s1 if an > np.float32(192) else fma32(s2, j, s2) * s1
    return big if an > np.float32(126) else fma32(k, j, k)


@njit(inline="always")
def _v_expf(x, scalef):
    """ggml_v_expf in the level's form (``scalef``: AVX-512's, else AVX2's)."""
    return _v_expf_scalef(x) if scalef else _v_expf_bits(x)


@njit(inline="always")
def _exp_chunk(scores, soff, out, ooff, mx, c0, lo, hi, n, lanes):
    """phi3ref.ggml.simd's exp_chunk with the level's lanes: 16 with AVX-512's ggml_v_expf,
    8 with AVX2's (ggml's pairs; phi3ref.ggml.ops checks a level's)."""
    if lanes == 16:
        return exp_chunk16(scores, soff, out, ooff, mx, c0, lo, hi, n)
    return exp_chunk8(scores, soff, out, ooff, mx, c0, lo, hi, n)


def softmax_ggml(scores, first, last, lanes, n_threads) -> None:
    """ggml_soft_max (scale 1) with llama.cpp's causal mask, in place on each row of scores
    (rows, n; C-contiguous): row r sees the keys first[t] .. last[t] (inclusive, t = r %
    len(first): rows cycle over the tokens; 0 <= first[t] <= last[t], first[t] < n), every
    other entry is masked (-inf in llama.cpp's mask, so exactly 0 here). exp(x - max) by the
    level's vector exp, each ``lanes`` values' sum (chunks from key 0) reduced in float32
    and accumulated in double, then multiplied by the float32 reciprocal; a chunk of masked
    keys adds 0. llama.cpp's KV cache view is a multiple of 256 cells, so every element
    takes the vector path."""
    softmax_kernel(lanes)(scores, first, last, n_threads)


@functools.cache
def softmax_kernel(lanes: int):
    """:func:`softmax_ggml` with ``lanes`` (8 or 16: the level's exp form) a constant of its code."""
    if lanes not in (8, 16):
        raise ValueError(f"ggml's exp loops take 8 or 16 lanes, not {lanes}")

    def part(th, n_threads, scores, first, last):
        n_rows, n = scores.shape
        n_sets = first.size
        per = (n_rows + n_threads - 1) // n_threads
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            lo, hi = first[r % n_sets], min(last[r % n_sets], n - 1)
            mx = max_range(scores, r * n, lo, hi)
            c_lo = lo - lo % lanes  # the chunks that hold a seen key
            c_hi = c_lo
            total = 0.0
            for c0 in range(c_lo, hi + 1, lanes):
                total += np.float64(_exp_chunk(scores, r * n, scores, r * n, mx, c0, lo, hi, n, lanes))
                c_hi = min(n, c0 + lanes)
            for i in range(c_lo):
                scores[r, i] = 0
            for i in range(c_hi, n):
                scores[r, i] = 0
            inv = np.float32(1.0 / total)
            for i in range(lo, hi + 1):
                scores[r, i] = scores[r, i] * inv

    return threaded_kernel(part, f"softmax_ggml_{lanes}", fastmath=FASTMATH_GGML)


@part_jit(fastmath=FASTMATH_GGML)
def _round_to_f16_part(th, n_threads, x):
    """Thread th's share of :data:`round_to_f16`."""
    flat = x.reshape(-1)  # (elements,): x is C-contiguous
    per = (flat.size + n_threads - 1) // n_threads
    for i in range(th * per, min(flat.size, (th + 1) * per)):
        flat[i] = half_to_float(float_to_half(flat[i]))


round_to_f16 = Threaded(_round_to_f16_part)
"""round_to_f16(x, n_threads): round every element of x (float32, C-contiguous) in place to
the nearest float16 value: what ggml's conversion to float16 does to a product's operand."""


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


@part_jit(fastmath=FASTMATH_GGML)
def _rms_norm_part(th, n_threads, x, weight, eps, out):
    """Thread th's rows of :data:`rms_norm_ggml`."""
    n_rows, n = x.shape
    per = (n_rows + n_threads - 1) // n_threads
    for r in range(th * per, min(n_rows, (th + 1) * per)):
        total = 0.0
        for i in range(n):
            total += np.float64(x[r, i] * x[r, i])
        mean = np.float32(total / n)
        scale = np.float32(1) / np.sqrt(mean + eps)
        for i in range(n):
            out[r, i] = (x[r, i] * scale) * weight[i]


rms_norm_ggml = Threaded(_rms_norm_part)
"""rms_norm_ggml(x, weight, eps, out, n_threads): ggml_rms_norm followed by ggml_mul with the
norm's weight, on each row of x (rows, n): the float32 squares summed in double in order,
the mean rounded to float32, scale = 1 / sqrtf(mean + eps); out = (x * scale) * weight.
out must not overlap x or weight (its part is compiled noalias: phi3ref.jit.PartCompiler)."""


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


def swiglu_ggml(gate_up, n_ff, out, lanes, n_threads) -> None:
    """ggml_vec_swiglu_f32 on each row of gate_up (rows, 2 n_ff), gate first then up
    (Phi-3's fused projection): out = silu(gate) * up, silu(x) = x / (1 + exp(-x)); the
    level's vector exp for the row's whole chunks of ``lanes`` (16: AVX-512's ggml_v_expf,
    8: AVX2's), the C library's expf for the rest."""
    swiglu_kernel(lanes)(gate_up, n_ff, out, n_threads)


@functools.cache
def swiglu_kernel(lanes: int):
    """:func:`swiglu_ggml` with ``lanes`` (8 or 16, and so the exp form) a constant of its code."""
    if lanes not in (8, 16):
        raise ValueError(f"ggml's exp loops take 8 or 16 lanes, not {lanes}")
    scalef = lanes == 16

    def part(th, n_threads, gate_up, n_ff, out):
        n_rows = gate_up.shape[0]
        full = n_ff - n_ff % lanes
        per = (n_rows + n_threads - 1) // n_threads
        for r in range(th * per, min(n_rows, (th + 1) * per)):
            for i in range(full):
                g = gate_up[r, i]
                out[r, i] = g / (np.float32(1) + _v_expf(-g, scalef)) * gate_up[r, n_ff + i]
            for i in range(full, n_ff):
                g = gate_up[r, i]
                out[r, i] = g / (np.float32(1) + np.exp(-g)) * gate_up[r, n_ff + i]

    return threaded_kernel(part, f"swiglu_ggml_{lanes}", fastmath=FASTMATH_GGML)


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
def expf_ggml(x, out, lanes):
    """exp of each row of x (rows, n) as a ggml vector loop computes it: whole chunks of
    ``lanes`` through the level's ggml_v_expf, the remaining n % lanes through the C
    library's expf (Numba lowers float32 np.exp to that call). The chunks go through the
    vector form softmax_ggml uses (phi3ref.ggml.simd's exp_chunk), which the tests hold to
    the numpy reference here, and swiglu's per-lane form to this. x, out: C-contiguous."""
    n_rows, n = x.shape
    full = n - n % lanes
    for r in range(n_rows):
        for c0 in range(0, full, lanes):
            _exp_chunk(x, r * n, out, r * n, np.float32(0), c0, 0, full - 1, n, lanes)
        for i in range(full, n):
            out[r, i] = np.exp(x[r, i])


@njit(cache=True, fastmath=FASTMATH_GGML)
def log_sum_exp_rows(logits, top, out):
    """Per row of ``logits`` (m, n) float32, as llama.cpp's perplexity tool computes its
    log-softmax: ``top[r]`` the largest logit (float32) and ``out[r]`` log of the sum of
    expf(logit - top), the terms added in double in index order."""
    for r in range(logits.shape[0]):
        m = logits[r, 0]
        for i in range(1, logits.shape[1]):
            if logits[r, i] > m:
                m = logits[r, i]
        total = 0.0
        for i in range(logits.shape[1]):
            total += np.float64(np.exp(logits[r, i] - m))  # float32 expf, as the C loop calls it
        top[r] = m
        out[r] = np.log(total)


def warmup(weights: Iterable[tuple[int, int]] | None = None, lanes: int = 16, helper: bool = False) -> float:
    """Compile (or load from Numba's on-disk cache) the ggml kernels a model uses: those of
    attention and the rest of a layer, and the matrix products of ``weights`` ((type id,
    row count) of each weight matrix; None: every type), for each kernel a model of those
    weights can take; return the seconds it took, reported apart from run time (and said
    on stderr while it lasts). A cold cache is filled by two processes
    (:func:`phi3ref.jit.run_warm_jobs`), the helper compiling one token's attention kernels
    last, in the background; ``helper``: run as that helper (the parts named on stdin).
    Kernels only the tests call (``fma_f32``, ``expf_ggml``) are left to compile when called."""
    start = time.perf_counter()
    weights = None if weights is None else [(int(t), int(n)) for t, n in weights]
    jobs = _warm_jobs(weights, lanes)
    if helper:
        run_helper_jobs(jobs)
        return time.perf_counter() - start

    def helper_call() -> str:
        return f"from phi3ref.ggml.kernels import warmup; warmup({weights!r}, {lanes!r}, helper=True)"

    with compile_notice(f"{weight_types(weights)} in ggml numerics"):
        run_warm_jobs(jobs, helper_call)
    return time.perf_counter() - start


def _warm_jobs(weights: list[tuple[int, int]] | None, lanes: int) -> list[WarmJob]:
    """The parts of :func:`warmup`: attention, the rest of a layer, and one per weight type
    and class of row count; each calls its kernels on small arrays of the types, layouts
    and flags a model passes."""
    threads = nb.get_num_threads()
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    one = np.zeros(1, np.int64)

    cache16 = np.zeros((3, 1, 16), dtype=np.uint16)  # (n_ctx, n_head_kv, head_dim)
    scores = np.zeros((1, 2, 3), dtype=np.float32)

    def kq(batched):  # a prompt's form (tinyBLAS), or one token's (ggml_vec_dot_f16)
        return lambda: attention_scores_f16(np.zeros((1, 2, 16), np.float32), cache16, 3, one, one, scores, lanes, batched, threads)

    def kqv(batched):
        return lambda: attention_values_f16(scores, cache16, 3, one, one, np.empty((1, 2, 16), np.float32), lanes, batched, threads)

    def exps():
        softmax_ggml(x.copy(), one, one, lanes, threads)
        swiglu_ggml(x, 128, np.empty((8, 128), np.float32), lanes, threads)

    def layer():
        libm_cos_sin(x)
        round_to_f16(x.reshape(8, 4, 64).copy(), threads)  # (n_head_kv, rows, head_dim), as attention rounds
        rms_norm_ggml(x, x[0], np.float32(1e-5), np.empty_like(x), threads)
        heads = x.reshape(8, 4, 64)
        for layout in (heads, x[:, :128].reshape(8, 2, 64)):  # contiguous, and a view of a fused projection
            angles = np.ascontiguousarray(x[:, :32])  # (n_tokens, n_rot / 2)
            rope_neox_ggml(layout, angles, angles, 64, np.empty(layout.shape, np.float32))
            store_f16(layout.reshape(8, -1), np.empty((8, layout[0].size), np.uint16))

    def activations(n_tok, act):
        if act == ACT_Q8_K:  # the arrays quantize_activations returns, without its kernel (the "q8k" job's)
            return _q8_k_arrays(n_tok, x.shape[1])
        return quantize_activations(x[:n_tok], act)

    def product(qt, ws, counts):
        def run():
            for w in ws:  # each class of row count
                for n_tok in counts:
                    q, d, s = activations(n_tok, activation_type(qt))
                    out = np.empty((n_tok, w.shape[0]), dtype=np.float32)
                    if qt in FLOAT_KIND:
                        matmul_float_ggml(w, FLOAT_KIND[qt], d, out, F16_TABLE, lanes, False, threads)
                    else:
                        matmul_ggml(w, qt, q, d, s, out, F16_TABLE, True, threads)
        return run

    def product_kernels(qt, ws, n_tok):
        if qt in FLOAT_KIND:
            return [matmul_float_ggml_kernel(FLOAT_KIND[qt])]
        return list({id(k): k for k in (product_kernel(qt, w.shape[0], n_tok, True) for w in ws)}.values())

    # seconds, measured one after the other in one process with a cold cache (phi3-mini
    # Q4_K_M, 8 lanes, on an AMD EPYC Zen 3; the first job of a launcher's argument types
    # compiles it, about 0.5 s): only their order matters (the longest first) and the
    # bound on a wait for the helper
    jobs = [
        WarmJob("kq", 3.4, kq(True), lambda: [attention_scores_kernel(lanes, True), transpose_keys_kernel(lanes)]),
        WarmJob("kq1", 1.6, kq(False), lambda: [attention_scores_kernel(lanes, False)], later=True),
        WarmJob("kqv", 3.6, kqv(True), lambda: [attention_values_kernel(lanes, True), gather_values_kernel(lanes)]),
        WarmJob("kqv1", 1.5, kqv(False), lambda: [attention_values_kernel(lanes, False)], later=True),
        WarmJob("exp", 2.5, exps, lambda: [softmax_kernel(lanes), swiglu_kernel(lanes)]),
        WarmJob("layer", 4.0, layer, lambda: [round_to_f16, rms_norm_ggml, rope_neox_ggml, store_f16, libm_cos_sin]),
    ]
    by_type: dict[int, list[np.ndarray]] = {}
    for qt, w in warm_weights(weights):
        by_type.setdefault(qt, []).append(w)
    if any(activation_type(qt) == ACT_Q8_K for qt in by_type):
        jobs.append(WarmJob("q8k", 1.4, lambda: quantize_activations(x[:1], ACT_Q8_K), lambda: [_quantize_q8_k]))
    for qt, ws in by_type.items():
        # ggml takes other kernels for a batch of 8 tokens or more: a prompt's (n_tok 8) in one
        # job, and one token's, where they are other kernels, in a job of its own (not later:
        # a prompt's last layer and head run for its last position alone, one token)
        prompt = product_kernels(qt, ws, 8)
        one_token = [k for k in product_kernels(qt, ws, 1) if all(k is not p for p in prompt)]
        if not one_token:
            jobs.append(WarmJob(QT(qt).name, 2.0, product(qt, ws, (8, 1)), lambda ks=prompt: ks))
        else:
            jobs.append(WarmJob(QT(qt).name, 1.5, product(qt, ws, (8,)), lambda ks=prompt: ks))
            jobs.append(WarmJob(f"{QT(qt).name}-1", 0.8, product(qt, ws, (1,)), lambda ks=one_token: ks))
    return jobs
