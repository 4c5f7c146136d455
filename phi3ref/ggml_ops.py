"""Elementwise operations with llama.cpp's CPU arithmetic (``numerics="ggml"``).

llama.cpp does not compute exp, SiLU, softmax or RMSNorm the textbook way: on x86 with
AVX-512 it evaluates exp with a polynomial (``ggml_v_expf``), sums softmax terms with a
fixed reduction tree, squares in float32 and sums in double for RMSNorm. A one-ulp
difference anywhere can flip the rounding of an 8-bit activation code in the next
quantized matmul, so these are reproduced operation for operation. Fused multiply-adds are
emulated in float64: the product of two float32 values is exact there, so only the final
rounding differs from a hardware FMA, and only when a double rounding hits a tie.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import kernels

__all__ = ["attention_scores", "attention_values", "cos_sin", "expf", "fma", "rms_scale", "silu", "softmax"]

_F32, _F64 = np.float32, np.float64
_VEC = 16  # AVX-512 lanes: full vectors take the polynomial, the tail takes libm expf


def _H(literal: str) -> np.float32:
    """A C hexadecimal float literal (0x1.8p23f) as float32."""
    return _F32(float.fromhex(literal))


def fma(a, b, c) -> np.ndarray:
    """float32 fma(a, b, c) = a * b + c with one rounding (to float32)."""
    return (np.asarray(a, _F64) * np.asarray(b, _F64) + np.asarray(c, _F64)).astype(_F32)


def _v_expf(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf, AVX-512 variant: exp(x) = 2^n * p(b), n = round(x / ln 2), b the remainder.
    Inputs beyond +-192 ln 2 (masked scores are -inf) give inf or 0, as in ggml."""
    with np.errstate(all="ignore"):
        return _v_expf_unchecked(np.asarray(x, _F32))


def _v_expf_unchecked(x: np.ndarray) -> np.ndarray:
    r = _H("0x1.8p23")
    z = fma(x, _H("0x1.715476p+0"), r)
    n = z - r
    b = fma(-n, _H("0x1.7f7d1cp-20"), fma(-n, _H("0x1.62e4p-1"), x))
    u = b * b
    j = fma(
        fma(fma(_H("0x1.0e4020p-7"), b, _H("0x1.573e2ep-5")), u, fma(_H("0x1.555e66p-3"), b, _H("0x1.fffdb6p-2"))),
        u,
        fma(_H("0x1.ffffecp-1"), b, _F32(1.0)),
    )
    res = np.ldexp(j, np.nan_to_num(np.clip(n, -300, 300)).astype(np.int32)).astype(_F32)  # _mm512_scalef_ps
    out_of_range = np.abs(n) > 192
    return np.where(out_of_range, np.where(n <= 0, _F32(0), _F32(np.inf)), res).astype(_F32)


def _libm_expf(x: np.ndarray) -> np.ndarray:
    return kernels.libm_expf(np.ascontiguousarray(x, _F32))


def expf(x: np.ndarray) -> np.ndarray:
    """exp along the last axis as a ggml vector loop does it: lanes of 16 through the
    polynomial, the remaining ``n % 16`` through libm."""
    x = np.asarray(x, _F32)
    n = x.shape[-1]
    full = n - n % _VEC
    out = np.empty_like(x)
    out[..., :full] = _v_expf(x[..., :full])
    out[..., full:] = _libm_expf(x[..., full:])
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
