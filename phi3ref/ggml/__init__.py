"""llama.cpp's CPU arithmetic, reproduced bit for bit: everything phi3ref does to compute as
a llama.cpp build does lives in this package, behind this one face.

* :class:`GgmlNumerics` — the numerics ``"ggml"`` (``phi3ref.load(..., numerics="ggml")``),
  at one instruction-set level of llama.cpp's build (:mod:`phi3ref.isa`);
* the operations it is made of, callable alone to check one step of another runtime:
  :func:`quantize_activations` (ggml's ``vec_dot_type`` conversion before a product),
  :func:`rms_norm`, :func:`rope` with :func:`cos_sin`, :func:`swiglu`, :func:`expf`,
  :func:`softmax`, :func:`round_to_f16` / :func:`store_f16` (the float16 KV cache),
  :func:`attention_scores` and :func:`attention_values`; :func:`log_sum_exp`, the
  log-softmax of llama.cpp's perplexity tool.

Inside, read top-down: ``numerics.py`` (the interface's methods in ggml's terms),
``ops.py`` (each operation's arithmetic in words, one kernel call each), ``kernels.py``
(the Numba kernels: quantized, float and attention products, the pointwise passes) and
``simd.py`` (the 8-bit multiply-add intrinsics of the quantized products, as LLVM IR).
"""

from __future__ import annotations

from .kernels import activation_type, quantize_activations
from .numerics import GgmlNumerics
from .ops import (
    attention_scores, attention_values, cos_sin, expf, log_sum_exp, rms_norm, rope, round_to_f16, softmax, store_f16, swiglu,
)

__all__ = [
    "GgmlNumerics", "activation_type", "attention_scores", "attention_values", "cos_sin", "expf", "log_sum_exp",
    "quantize_activations", "rms_norm", "rope", "round_to_f16", "softmax", "store_f16", "swiglu",
]
