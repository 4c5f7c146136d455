"""The arithmetic of a forward pass: one object, chosen when a model is loaded.

:mod:`phi3ref.model` says *what* a Phi-3 layer computes; a :class:`Numerics` says *how*
each operation is done, and the model hands every one of them to it. Three exist:

* :class:`NumpyNumerics` (``"numpy"``): float32 with plain numpy; the matrix products
  decode a strip of rows with :func:`phi3ref.quants.dequantize`, then ``x @ strip.T``.
  Slow; the readable reference.
* :class:`ExactNumerics` (``"exact"``): the same numbers as HF transformers in float32,
  the matrix products by Numba kernels that decode one row at a time.
* :class:`phi3ref.ggml.GgmlNumerics` (``"ggml"``): llama.cpp's CPU arithmetic at one
  instruction-set level (:mod:`phi3ref.isa`), operation for operation; it lives with the
  rest of the llama.cpp reproduction in :mod:`phi3ref.ggml`.

Where they part ways: 1/sqrt(head_dim) (transformers in double, llama.cpp ``1.0f /
sqrtf``); llama.cpp scales q before the product and rounds it, the float16 KV cache and
the attention probabilities to float16; RoPE angles (inv_freq products against repeated
float32 products, double-precision cos / sin against the C library's ``cosf`` / ``sinf``);
exp, softmax, SiLU and RMSNorm (numpy's against ggml's polynomial and reduction orders);
the matrix products (float32 sums of decoded weights against ggml's integer block dot
products with quantized activations). Two choices follow the runtime too: transformers
applies a file's sliding window and picks the LongRoPE factors by the sequence's length;
llama.cpp ignores the window and picks the factors once, by its context size.

The arrays in and out are float32, shapes as commented; a numerics holds no state of a
pass ("ggml" holds only the level it follows).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterable

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import kernels
from .isa import Level
from .weights import Weight

__all__ = ["ExactNumerics", "Numerics", "NumpyNumerics", "float_table", "operands"]

_F32 = np.float32
# rows decoded at a time by the numpy products: bounds their float32 scratch to ~32 MiB
_STRIP_ELEMENTS = 1 << 23


def float_table(weight: Weight) -> np.ndarray:
    """The float16 or bfloat16 decoding table of a float weight's uint16 view."""
    return kernels.F16_TABLE if weight.qtype == QT.F16 else kernels.BF16_TABLE


class Numerics(ABC):
    """How a forward pass computes. Shapes: n tokens in the batch, ``end`` positions
    attended to (the cache's first ``end``), h query heads in ``n_head_kv`` groups of
    ``group``, d = head_dim. ``first`` / ``last`` (n,): the token t sees the keys
    first[t] .. last[t], inclusive (the causal mask, narrowed by a sliding window)."""

    name: str
    kv_dtype: type  # what the KV cache stores
    applies_sliding_window: bool  # by default: whether the file's sliding window narrows the mask
    level: Level | None = None  # the llama.cpp build followed ("ggml" only)

    @abstractmethod
    def longrope_context(self, n_ctx: int) -> int | None:
        """The length that picks LongRoPE's factors for a model of ``n_ctx`` positions, or
        None: each pass picks them by its sequence's length."""

    @abstractmethod
    def matmul(self, weight: Weight, x: np.ndarray) -> np.ndarray:
        """``x @ W.T``: x (n, n_in) -> (n, n_rows)."""

    @abstractmethod
    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
        """x / sqrt(mean(x^2) + eps) * weight, per row of x (n, n_embd)."""

    @abstractmethod
    def rope_angles(self, positions: np.ndarray, n_rot: int, base: float, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of pos * base^(-2i / n_rot) / factors[i]: (n, n_rot / 2) each."""

    @abstractmethod
    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
        """x (n, heads, d) rotated NEOX-style: within the first n_rot dims, dim i with dim
        i + n_rot / 2; the dims from n_rot on pass through."""

    @abstractmethod
    def store(self, cache_rows: np.ndarray, x: np.ndarray) -> None:
        """Write x (n, n_head_kv, d) into ``cache_rows``, the KV cache's rows of its positions."""

    @abstractmethod
    def attention_scores(self, q: np.ndarray, keys: np.ndarray, end: int, first: np.ndarray, last: np.ndarray,
                         every: bool) -> np.ndarray:
        """q (n, h, d) against the first ``end`` cached keys (n_ctx, n_head_kv, d), scaled
        by 1 / sqrt(d): (n_head_kv, group, n, end). Scores a token does not see may be
        left -inf unless ``every``. The array may be the numerics' own scratch, valid
        until its next call (the pass hands hooks a copy)."""

    @abstractmethod
    def softmax(self, scores: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Softmax over the keys each token sees (the others get 0): (n_head_kv, group, n, end).
        ``scores`` may be overwritten (the probabilities may be returned in it)."""

    @abstractmethod
    def attention_values(self, probs: np.ndarray, values: np.ndarray, end: int, first: np.ndarray,
                         last: np.ndarray) -> np.ndarray:
        """probs (n_head_kv, group, n, end) times the first ``end`` cached values
        (n_ctx, n_head_kv, d): (n_head_kv, group, n, d). ``probs`` may be overwritten."""

    @abstractmethod
    def swiglu(self, gate_up: np.ndarray, n_ff: int) -> np.ndarray:
        """silu(gate) * up of the fused projection (n, 2 n_ff), gate first: (n, n_ff)."""

    @abstractmethod
    def warmup(self, weights: Iterable[Weight] | None = None) -> float:
        """Compile (or load from Numba's cache) the kernels this numerics uses for a model
        of ``weights`` (its weight matrices; None: of every weight type), and only those;
        the seconds it took."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactNumerics(Numerics):
    """float32 as HF transformers computes it; the matrix products by Numba kernels."""

    name = "exact"
    kv_dtype = np.float32
    applies_sliding_window = True

    def warmup(self, weights: Iterable[Weight] | None = None) -> float:
        return kernels.warmup(None if weights is None else [(int(w.qtype), w.n_rows) for w in weights])

    def longrope_context(self, n_ctx: int) -> None:
        return None

    def matmul(self, weight: Weight, x: np.ndarray) -> np.ndarray:
        x, out = operands(weight, x)
        threads = nb.get_num_threads()
        if weight.qtype == QT.F32:
            kernels.matmul_f32(weight.float_view, x, out, threads)
        elif weight.float_view is not None:
            kernels.matmul_f16(weight.float_view, x, out, float_table(weight), threads)
        else:
            kernels.matmul_exact(weight.raw, int(weight.qtype), x, out, kernels.F16_TABLE, threads)
        return out

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
        mean_sq = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float64).astype(_F32)  # (n, 1)
        return (x * (1 / np.sqrt(mean_sq + eps))) * weight  # torch.rsqrt, then the weight

    def rope_angles(self, positions: np.ndarray, n_rot: int, base: float, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # transformers: inv_freq = 1 / (factor * base^(2i/n_rot)) in float32; cos / sin in double
        exponent = np.arange(0, n_rot, 2, dtype=_F32) / _F32(n_rot)
        inv_freq = (_F32(1) / (factors * _F32(base) ** exponent)).astype(_F32)
        theta = positions.astype(_F32)[:, None] * inv_freq[None, :]  # (n, n_rot / 2)
        return np.cos(theta.astype(np.float64)).astype(_F32), np.sin(theta.astype(np.float64)).astype(_F32)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
        half = n_rot // 2
        c, s = cos[:, None, :], sin[:, None, :]  # (n, 1, n_rot / 2)
        x1, x2 = x[..., :half], x[..., half:n_rot]  # (n, heads, n_rot / 2) each
        out = np.array(x, dtype=_F32)
        out[..., :half] = x1 * c - x2 * s
        out[..., half:n_rot] = x2 * c + x1 * s
        return out

    def store(self, cache_rows: np.ndarray, x: np.ndarray) -> None:
        cache_rows[...] = x

    def attention_scores(self, q: np.ndarray, keys: np.ndarray, end: int, first: np.ndarray, last: np.ndarray,
                         every: bool) -> np.ndarray:
        n, h, d = q.shape
        n_head_kv = keys.shape[1]
        qh = q.transpose(1, 0, 2).reshape(n_head_kv, h // n_head_kv * n, d)  # (n_head_kv, group * n, d)
        k = keys[:end].transpose(1, 2, 0)  # (n_head_kv, d, end)
        scale = _F32(1.0 / math.sqrt(d))  # transformers: the scale in double, then float32
        return ((qh @ k) * scale).reshape(n_head_kv, h // n_head_kv, n, end)  # (n_head_kv, group, n, end)

    def softmax(self, scores: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        key = np.arange(scores.shape[-1])
        allowed = (key >= first[:, None]) & (key <= last[:, None])  # (n, end)
        s = scores + np.where(allowed, _F32(0), _F32(-np.inf))  # the additive mask of transformers
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def attention_values(self, probs: np.ndarray, values: np.ndarray, end: int, first: np.ndarray,
                         last: np.ndarray) -> np.ndarray:
        n_head_kv, group, n, _ = probs.shape
        v = values[:end].transpose(1, 0, 2)  # (n_head_kv, end, d)
        out = probs.reshape(n_head_kv, group * n, end) @ v  # (n_head_kv, group * n, d)
        return out.reshape(n_head_kv, group, n, v.shape[-1])

    def swiglu(self, gate_up: np.ndarray, n_ff: int) -> np.ndarray:
        gate, up = gate_up[:, :n_ff], gate_up[:, n_ff:]  # (n, n_ff) each
        with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x << 0: silu -> -0
            e = np.exp(-gate)
        return gate / (_F32(1) + e) * up


class NumpyNumerics(ExactNumerics):
    """As "exact", with the matrix products in plain numpy (slow; the readable reference)."""

    name = "numpy"

    def warmup(self, weights: Iterable[Weight] | None = None) -> float:
        return 0.0  # no kernel

    def matmul(self, weight: Weight, x: np.ndarray) -> np.ndarray:
        x, out = operands(weight, x)
        strip = max(1, _STRIP_ELEMENTS // weight.n_in)
        for start in range(0, weight.n_rows, strip):
            out[:, start : start + strip] = x @ weight.dequantize(start, start + strip).T
        return out


def operands(weight: Weight, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as a C-contiguous float32 matrix that fits ``weight``, and the product's buffer."""
    x = np.ascontiguousarray(x, dtype=_F32)
    if x.ndim != 2 or x.shape[1] != weight.n_in:
        raise ValueError(f"{weight.name}: input of shape {x.shape} does not match weight shape {weight.shape}")
    return x, np.empty((x.shape[0], weight.n_rows), dtype=_F32)
