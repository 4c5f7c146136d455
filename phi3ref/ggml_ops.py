"""Elementwise operations with llama.cpp's CPU arithmetic (``numerics="ggml"``).

llama.cpp does not compute exp, SiLU, softmax or RMSNorm the textbook way: on x86 with
AVX-512 it evaluates exp with a polynomial (``ggml_v_expf``), sums softmax terms with a
fixed reduction tree, squares in float32 and sums in double for RMSNorm. A one-ulp
difference anywhere can flip the rounding of an 8-bit activation code in the next
quantized matmul, so these are reproduced operation for operation: exp, softmax and the
attention products in Numba kernels (``phi3ref.kernels``) with hardware fused multiply-adds;
RoPE's multiply-adds here in numpy, emulated in float64 (the product of two float32 values
is exact there, so only a double rounding at a tie can differ from a hardware FMA).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import kernels

__all__ = ["attention_scores", "attention_values", "cos_sin", "expf", "fma", "rms_scale", "silu", "softmax"]

_F32, _F64 = np.float32, np.float64


def fma(a, b, c) -> np.ndarray:
    """float32 fma(a, b, c) = a * b + c with one rounding (to float32)."""
    return (np.asarray(a, _F64) * np.asarray(b, _F64) + np.asarray(c, _F64)).astype(_F32)


def expf(x: np.ndarray) -> np.ndarray:
    """exp along the last axis as a ggml vector loop does it: lanes of 16 through the
    ``ggml_v_expf`` polynomial, the remaining ``n % 16`` through libm
    (:func:`phi3ref.kernels.expf_ggml`)."""
    x = np.ascontiguousarray(x, _F32)
    out = np.empty_like(x)
    kernels.expf_ggml(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return out


def cos_sin(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cosf and sinf from the C library, as ggml's RoPE cache calls them."""
    return kernels.libm_cos_sin(np.ascontiguousarray(theta, _F32))


def silu(x: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32's SiLU, x / (1 + exp(-x)), per row of the last axis."""
    x = np.asarray(x, _F32)
    return x / (_F32(1) + expf(-x))


def softmax(scores: np.ndarray) -> np.ndarray:
    """ggml_soft_max (scale 1, mask already added) over the last axis: exp by the vector
    exp, lane sums in float32 accumulated in double, times the float32 reciprocal
    (:func:`phi3ref.kernels.softmax_ggml`)."""
    x = np.ascontiguousarray(scores, _F32)
    out = np.empty_like(x)
    kernels.softmax_ggml(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]), nb.get_num_threads())
    return out


def attention_scores(q: np.ndarray, k_cache: np.ndarray, end: int) -> np.ndarray:
    """q (n_head_kv, rows, head_dim), float16-valued, against the float16 keys of positions
    < end in one layer's cache (n_ctx, n_head_kv, head_dim): (n_head_kv, rows, end), summed
    as llamafile's tinyBLAS sums on AVX-512 (:func:`phi3ref.kernels.attention_scores_f16`)."""
    q = np.ascontiguousarray(q, _F32)
    out = np.empty((q.shape[0], q.shape[1], end), dtype=_F32)
    kernels.attention_scores_f16(q, k_cache.view(np.uint16), end, out, nb.get_num_threads())
    return out


def attention_values(probs: np.ndarray, v_cache: np.ndarray, end: int) -> np.ndarray:
    """probs (n_head_kv, rows, end), float16-valued, times the float16 values of positions
    < end in one layer's cache (n_ctx, n_head_kv, head_dim): (n_head_kv, rows, head_dim)
    (:func:`phi3ref.kernels.attention_values_f16`)."""
    probs = np.ascontiguousarray(probs, _F32)
    out = np.empty((probs.shape[0], probs.shape[1], v_cache.shape[-1]), dtype=_F32)
    kernels.attention_values_f16(probs, v_cache.view(np.uint16), end, out, nb.get_num_threads())
    return out


def rms_scale(x: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm's per-row scale 1 / sqrt(mean(x^2) + eps): squares in float32, their
    sum in double, the mean rounded to float32."""
    x = np.asarray(x, _F32)
    mean = ((x * x).astype(_F64).sum(axis=-1, keepdims=True) / x.shape[-1]).astype(_F32)
    return _F32(1) / np.sqrt(mean + _F32(eps))
