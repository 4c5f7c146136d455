"""llama.cpp's CPU arithmetic as one :class:`phi3ref.numerics.Numerics`.

Each operation of a layer is llama.cpp's, at one instruction-set level
(:class:`phi3ref.isa.Level`): the matrix products by :mod:`phi3ref.ggml.kernels` on
quantized activations, the rest by :mod:`phi3ref.ggml.ops`. What differs from the exact
numerics, operation by operation, is listed in :mod:`phi3ref.numerics`.
"""

from __future__ import annotations

import sys
from typing import Iterable

import numba as nb
import numpy as np

from ..isa import Level
from ..isa import resolve as resolve_isa
from ..kernels import F16_TABLE
from ..numerics import Numerics, float_table, operands
from ..weights import Weight
from . import kernels, ops

__all__ = ["GgmlNumerics"]

_F32 = np.float32


class GgmlNumerics(Numerics):
    """llama.cpp's CPU arithmetic as its build for ``level`` computes (phi3ref.ggml.ops)."""

    name = "ggml"
    kv_dtype = np.float16
    # llama.cpp ignores a Phi-3 file's sliding window ("Phi SWA is currently disabled")
    applies_sliding_window = False

    def __init__(self, level: str | Level | None = None):
        self.level = resolve_isa(level)  # a name, a Level, or None: $PHI3REF_ISA, else this CPU's
        # the scores of the last attention (and its probabilities, in place): one array
        # reused layer after layer rather than n_head x n_tokens x n_keys fresh floats
        # whose page faults cost as much as the softmax over them
        self._scores = np.empty(0, dtype=_F32)

    def _scores_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        # still referenced by a view (a hook ran another model's pass on these numerics
        # between this layer's scores and values): a new array, the old one left to its pass
        in_use = sys.getrefcount(self._scores) > 2  # the attribute and the call's argument
        if in_use or size > self._scores.size or size < self._scores.size // 4:  # or grown, or let go after a prompt
            self._scores = np.empty(size, dtype=_F32)
        return self._scores[:size].reshape(shape)  # (n_head_kv, rows, end)

    def warmup(self, weights: Iterable[Weight] | None = None) -> float:
        return kernels.warmup(None if weights is None else [(int(w.qtype), w.n_rows) for w in weights], self.level.lanes)

    def longrope_context(self, n_ctx: int) -> int:
        # llama.cpp picks the factors once, by its context size, rounded up to a multiple of 256
        return -(-n_ctx // 256) * 256

    def matmul(self, weight: Weight, x: np.ndarray) -> np.ndarray:
        x, out = operands(weight, x)
        threads, level = nb.get_num_threads(), self.level
        q, d, s = kernels.quantize_activations(x, kernels.activation_type(int(weight.qtype)))
        if weight.float_view is not None:
            # ggml converts the activations to the weight's type (d holds them), then sums
            # in the level's lanes
            kernels.matmul_float_ggml(weight.float_view, kernels.FLOAT_KIND[int(weight.qtype)], d, out, float_table(weight),
                                      level.lanes, level.bf16_dot, threads)
        else:
            kernels.matmul_ggml(weight.raw, int(weight.qtype), q, d, s, out, F16_TABLE, level.repack_q2_k, threads)
        return out

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
        return ops.rms_norm(x, weight, eps)

    def rope_angles(self, positions: np.ndarray, n_rot: int, base: float, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # ggml_rope_cache_init: theta = pos * base^(-2i/n_rot), built by repeated float32
        # products, divided by the factor; then the C library's cosf / sinf
        theta_scale = _F32(base) ** _F32(-2.0 / n_rot)
        theta = np.empty((positions.size, n_rot // 2), dtype=_F32)  # (n, n_rot / 2)
        running = positions.astype(_F32)
        for i in range(n_rot // 2):
            theta[:, i] = running / factors[i]
            running = running * theta_scale
        return ops.cos_sin(theta)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int) -> np.ndarray:
        # ggml's rotate_pairs, compiled with contraction: the first product of each line is
        # fused into the addition of the second (rounded) one
        return ops.rope(x, cos, sin, n_rot)

    def store(self, cache_rows: np.ndarray, x: np.ndarray) -> None:
        ops.store_f16(cache_rows, np.ascontiguousarray(x, _F32))  # rounded as ggml rounds to float16

    def attention_scores(self, q: np.ndarray, keys: np.ndarray, end: int, first: np.ndarray, last: np.ndarray,
                         every: bool) -> np.ndarray:
        n, h, d = q.shape
        n_head_kv = keys.shape[1]
        qh = q.transpose(1, 0, 2).reshape(n_head_kv, h // n_head_kv * n, d)  # (n_head_kv, group * n, d): rows cycle over the tokens
        # llama.cpp scales q before the product (1.0f / sqrtf), then converts it to the
        # cache's float16
        qh = ops.round_to_f16(np.ascontiguousarray(qh, _F32) * (_F32(1) / np.sqrt(_F32(d))))
        # masked scores are not computed unless every one is wanted (llama.cpp's kq holds
        # them all); its kernels differ for one token and for a batch
        ranges = (None, None) if every else (first, last)
        scores = ops.attention_scores(qh, keys, end, self.level, batched=n >= 2, first=ranges[0], last=ranges[1],
                                      out=self._scores_buffer((n_head_kv, qh.shape[1], end)))
        return scores.reshape(n_head_kv, h // n_head_kv, n, end)  # (n_head_kv, group, n, end)

    def softmax(self, scores: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        # in place: the scores are the pass's own array (a hook got a copy), and a fresh
        # array of n_head x n_tokens x n_keys floats costs its page faults at every layer
        return ops.softmax(scores, self.level, first, last, in_place=True)

    def attention_values(self, probs: np.ndarray, values: np.ndarray, end: int, first: np.ndarray,
                         last: np.ndarray) -> np.ndarray:
        n_head_kv, group, n, _ = probs.shape
        # converted for the float16 V product, in place (the pass's own array: a hook got a copy)
        p16 = ops.round_to_f16(np.ascontiguousarray(probs, _F32).reshape(n_head_kv, group * n, end))
        out = ops.attention_values(p16, values, end, self.level, batched=n >= 2, first=first, last=last)  # (n_head_kv, group * n, d)
        return out.reshape(n_head_kv, group, n, values.shape[-1])

    def swiglu(self, gate_up: np.ndarray, n_ff: int) -> np.ndarray:
        return ops.swiglu(gate_up, n_ff, self.level)

    def __repr__(self) -> str:
        return f"GgmlNumerics({self.level.name})"
