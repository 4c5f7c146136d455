"""The non-matmul operations of a layer with llama.cpp's CPU arithmetic (``numerics="ggml"``).

llama.cpp does not compute exp, SiLU, softmax or RMSNorm the textbook way: it evaluates
exp with a polynomial (``ggml_v_expf``), sums softmax terms with a fixed reduction tree,
squares in float32 and sums in double for RMSNorm, fuses the first product of each RoPE
line into its addition, and rounds what it converts to float16. A one-ulp difference
anywhere can flip the rounding of an 8-bit activation code in the next quantized matmul,
so these are reproduced operation for operation, each by one Numba kernel of
:mod:`phi3ref.ggml.kernels` (fused, parallel over rows where the rows are many). Where the
arithmetic depends on the instruction set llama.cpp was built for (the exp polynomial,
vector widths, the attention products' lanes), the functions take the
:class:`phi3ref.isa.Level` to follow.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import kernels
from ..isa import Level

__all__ = [
    "attention_scores", "attention_values", "cos_sin", "expf", "log_sum_exp", "rms_norm", "rope", "round_to_f16",
    "softmax", "store_f16", "swiglu",
]

_F32 = np.float32


def _exp_lanes(level: Level) -> int:
    """The lanes of ggml's exp loops at ``level``: 16 go with AVX-512's ggml_v_expf, 8 with
    AVX2's (ggml has no other pair, nor do the kernels)."""
    if level.exp_scalef != (level.lanes == 16):
        raise ValueError(f"level {level.name}: ggml's exp loops pair 16 lanes with the AVX-512 ggml_v_expf and 8 with "
                         f"the AVX2 one, not {level.lanes} lanes with the {'AVX-512' if level.exp_scalef else 'AVX2'} one")
    return level.lanes


def expf(x: np.ndarray, level: Level) -> np.ndarray:
    """exp along the last axis as a ggml vector loop does it at ``level``: whole vectors
    (16 or 8 values) through that level's ``ggml_v_expf`` polynomial, the rest through
    libm (:func:`phi3ref.ggml.kernels.expf_ggml`)."""
    x = np.ascontiguousarray(x, _F32)
    out = np.empty_like(x)
    kernels.expf_ggml(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]), _exp_lanes(level))
    return out


def cos_sin(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cosf and sinf from the C library, as ggml's RoPE cache calls them."""
    return kernels.libm_cos_sin(np.ascontiguousarray(theta, _F32))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm times the norm's weight, per row of x (n_tokens, n): squares in
    float32, their sum in double, the mean rounded to float32 (:func:`phi3ref.ggml.kernels.rms_norm_ggml`)."""
    x = np.asarray(x, _F32)
    out = np.empty(x.shape, dtype=_F32)
    kernels.rms_norm_ggml(x, np.asarray(weight, _F32), _F32(eps), out, nb.get_num_threads())
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
    """x (n_tokens, n_heads, head_dim) rotated NEOX-style by the angles of each token,
    cos / sin (n_tokens, n_rot / 2): ggml's rotate_pairs with its fused multiply-adds
    (:func:`phi3ref.ggml.kernels.rope_neox_ggml`)."""
    x = np.asarray(x, _F32)
    out = np.empty(x.shape, dtype=_F32)
    kernels.rope_neox_ggml(x, np.ascontiguousarray(cos, _F32), np.ascontiguousarray(sin, _F32), n_rot, out)
    return out


def swiglu(gate_up: np.ndarray, n_ff: int, level: Level) -> np.ndarray:
    """ggml_vec_swiglu_f32 at ``level``: silu(gate) * up per row of the fused projection's
    output (n_tokens, 2 n_ff), gate first (:func:`phi3ref.ggml.kernels.swiglu_ggml`)."""
    gate_up = np.asarray(gate_up, _F32)
    out = np.empty((gate_up.shape[0], n_ff), dtype=_F32)
    kernels.swiglu_ggml(gate_up, n_ff, out, _exp_lanes(level), nb.get_num_threads())
    return out


def _key_ranges(first: np.ndarray | None, last: np.ndarray | None, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token key ranges for the attention kernels; None means every key."""
    if first is None or last is None:
        return np.zeros(1, np.int64), np.full(1, n_keys - 1, np.int64)
    return np.asarray(first, np.int64), np.asarray(last, np.int64)


def softmax(scores: np.ndarray, level: Level, first: np.ndarray | None = None, last: np.ndarray | None = None,
            in_place: bool = False) -> np.ndarray:
    """ggml_soft_max over the last axis at ``level``. With ``first`` / ``last`` (one entry
    per token, the rows cycling over the tokens), row r sees only the keys first[t] ..
    last[t] (inclusive), as llama.cpp's causal mask allows them; the others get
    probability 0 (:func:`phi3ref.ggml.kernels.softmax_ggml`, which works in place).
    ``in_place``: the probabilities overwrite ``scores`` when it is a C-contiguous float32
    array; otherwise they go to a new array."""
    x = np.ascontiguousarray(scores, _F32)
    if not in_place and np.may_share_memory(x, scores):
        x = x.copy()
    rows = x.reshape(-1, x.shape[-1])  # (rows, n)
    first, last = _key_ranges(first, last, x.shape[-1])
    _check_ranges("softmax", first, last, x.shape[-1])
    kernels.softmax_ggml(rows, first, last, _exp_lanes(level), nb.get_num_threads())
    return x


def round_to_f16(x: np.ndarray) -> np.ndarray:
    """Round x (float32, C-contiguous) in place to float16 values, as ggml's conversion
    to float16 rounds an operand; returns x."""
    if x.dtype != _F32 or not x.flags.c_contiguous:
        raise ValueError(f"round_to_f16 needs a C-contiguous float32 array, got {x.dtype} {x.shape}")
    kernels.round_to_f16(x, nb.get_num_threads())
    return x


def store_f16(cache: np.ndarray, x: np.ndarray) -> None:
    """Write x (n_tokens, ...) float32 into ``cache``, a float16 slice of the KV cache of the
    same shape, rounding as ggml's float16 conversion does."""
    if cache.shape != x.shape or cache.dtype != np.float16:
        raise ValueError(f"store_f16: cannot write {x.dtype} {x.shape} into {cache.dtype} {cache.shape}")
    n = x.shape[0]
    kernels.store_f16(np.asarray(x, _F32).reshape(n, -1), cache.view(np.uint16).reshape(n, -1))


def _check_ranges(name: str, first: np.ndarray, last: np.ndarray, n_keys: int) -> None:
    """Key ranges as the kernels index with them unchecked: one per token, 0 <= first[t]
    <= last[t] and first[t] < n_keys (a last past the keys sees up to the last key)."""
    if first.size == 0 or first.size != last.size:
        raise ValueError(f"{name}: first and last need one key index per token (got {first.size} and {last.size})")
    if first.min() < 0 or np.any(first > last) or first.max() >= n_keys:
        raise ValueError(f"{name}: every token needs keys first..last with 0 <= first <= last and first < {n_keys} "
                         f"(got first {first.tolist()[:8]}, last {last.tolist()[:8]})")


def _check_attention(name: str, x: np.ndarray, cache: np.ndarray, end: int, first: np.ndarray, last: np.ndarray) -> None:
    """What the attention kernels read unchecked: x (n_head_kv, rows, ...) against a cache
    (n_ctx, n_head_kv, head_dim), positions < end, key ranges from 0."""
    if x.ndim != 3 or cache.ndim != 3 or x.shape[0] != cache.shape[1]:
        raise ValueError(f"{name}: {x.shape} does not match a cache of shape {cache.shape} (n_head_kv first)")
    if not 0 < end <= cache.shape[0]:
        raise ValueError(f"{name}: end={end} is outside the cache's {cache.shape[0]} positions")
    _check_ranges(name, first, last, end)


def attention_scores(
    q: np.ndarray, k_cache: np.ndarray, end: int, level: Level, *, batched: bool,
    first: np.ndarray | None = None, last: np.ndarray | None = None, out: np.ndarray | None = None,
) -> np.ndarray:
    """q (n_head_kv, rows, head_dim), float16-valued, against the float16 keys of positions
    < end in one layer's cache (n_ctx, n_head_kv, head_dim): (n_head_kv, rows, end), summed
    as llama.cpp at ``level`` sums its kq product — tinyBLAS when the batch has two tokens
    or more (``batched``), ggml_vec_dot_f16 otherwise
    (:func:`phi3ref.ggml.kernels.attention_scores_f16`). With ``first`` / ``last`` (as for
    :func:`softmax`), scores of keys a row does not see may be left out (-inf); without,
    every score is computed. ``out``: where to write them (a C-contiguous float32 array of
    that shape, overlapping none of the inputs), else a new array."""
    q = np.ascontiguousarray(q, _F32)
    first, last = _key_ranges(first, last, end)
    _check_attention("attention_scores", q, k_cache, end, first, last)
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"attention_scores: head_dim {q.shape[2]} of q, {k_cache.shape[2]} of the keys")
    shape = (q.shape[0], q.shape[1], end)
    if out is None:
        out = np.empty(shape, dtype=_F32)
    elif out.shape != shape or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError(f"attention_scores: out must be a C-contiguous float32 array of shape {shape}")
    elif any(np.shares_memory(out, a) for a in (q, k_cache, first, last)):
        # the kernel is compiled on the promise that what it writes overlaps nothing it reads
        raise ValueError("attention_scores: out must not overlap q, k_cache, first or last")
    k16 = np.ascontiguousarray(k_cache).view(np.uint16)
    kernels.attention_scores_f16(q, k16, end, first, last, out, level.lanes, bool(batched), nb.get_num_threads())
    return out


def attention_values(
    probs: np.ndarray, v_cache: np.ndarray, end: int, level: Level, *, batched: bool,
    first: np.ndarray | None = None, last: np.ndarray | None = None,
) -> np.ndarray:
    """probs (n_head_kv, rows, end), float16-valued, times the float16 values of positions
    < end in one layer's cache (n_ctx, n_head_kv, head_dim): (n_head_kv, rows, head_dim),
    summed as llama.cpp at ``level`` sums its kqv product (tinyBLAS for a batch,
    ggml_vec_dot_f16 for one token; :func:`phi3ref.ggml.kernels.attention_values_f16`). With
    ``first`` / ``last`` (as for :func:`softmax`), the positions a row does not see
    (probability 0) are skipped."""
    probs = np.ascontiguousarray(probs, _F32)
    first, last = _key_ranges(first, last, end)
    _check_attention("attention_values", probs, v_cache, end, first, last)
    if probs.shape[2] != end:
        raise ValueError(f"attention_values: probabilities of {probs.shape[2]} positions for end={end}")
    out = np.empty((probs.shape[0], probs.shape[1], v_cache.shape[-1]), dtype=_F32)
    v16 = np.ascontiguousarray(v_cache).view(np.uint16)
    kernels.attention_values_f16(probs, v16, end, first, last, out, level.lanes, bool(batched), nb.get_num_threads())
    return out


def log_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``logits`` (m, n_vocab): the largest logit (float32) and log of the sum of
    expf(logit - largest), added in double in index order (float64) — the two parts of
    llama.cpp's perplexity tool's log-softmax (:func:`phi3ref.ggml.kernels.log_sum_exp_rows`)."""
    logits = np.ascontiguousarray(logits, _F32)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"log_sum_exp takes logits (m, n_vocab), got shape {logits.shape}")
    top = np.empty(logits.shape[0], _F32)
    out = np.empty(logits.shape[0], np.float64)
    kernels.log_sum_exp_rows(logits, top, out)
    return top, out
