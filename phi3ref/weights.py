"""Weight matrices as the file stores them, and the matrix product in each numerics.

A :class:`Weight` is a memmap view of a tensor's bytes plus its GGML type: nothing is
decoded when a model is loaded. Its :meth:`Weight.matmul` is where the three numerics part
ways:

* ``"numpy"``: decode a strip of rows to float32 with :func:`phi3ref.quants.dequantize`, then
  ``x @ strip.T``. Plain and slow; the readable reference.
* ``"exact"``: the same numbers from the Numba kernels, which decode one row at a time.
* ``"ggml"``: llama.cpp's CPU numerics (activations converted to ggml's ``vec_dot_type``,
  integer block dot products).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import kernels
from .isa import Level
from .isa import resolve as resolve_isa
from .quants import QUANT_TYPES, dequantize

__all__ = ["NUMERICS", "Weight"]

NUMERICS = ("ggml", "exact", "numpy")

_FLOAT_KINDS = {QT.F32: kernels.FLOAT_F32, QT.F16: kernels.FLOAT_F16, QT.BF16: kernels.FLOAT_BF16}

# rows decoded at a time by the numpy path: bounds its float32 scratch to ~32 MiB
_STRIP_ELEMENTS = 1 << 23


class Weight:
    """One weight tensor: ``raw`` (rows, row_bytes) uint8 view, ``qtype``, numpy ``shape``."""

    def __init__(self, name: str, raw: np.ndarray, qtype: QT, shape: tuple[int, ...]):
        self.name = name
        self.qtype = QT(qtype)
        self.shape = tuple(shape)
        self.raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim != 2 else raw
        t = QUANT_TYPES[self.qtype]
        self._block = t.block_size
        if self.qtype == QT.F32:
            self._float_view = self.raw.view(np.float32)
        elif self.qtype in (QT.F16, QT.BF16):
            self._float_view = self.raw.view(np.uint16)
        else:
            self._float_view = None

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def n_in(self) -> int:
        return self.shape[-1]

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` decoded to float32 (a strip; never call it for a whole big matrix)."""
        return dequantize(self.raw[start:stop], self.qtype)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` decoded to float32: the embedding lookup (ggml_get_rows)."""
        return dequantize(self.raw[np.asarray(ids)], self.qtype)

    def matmul(self, x: np.ndarray, numerics: str, isa: Level | None = None) -> np.ndarray:
        """``x @ W.T``: x (n_tokens, n_in) float32 -> (n_tokens, n_rows) float32. ``isa``:
        the instruction-set level "ggml" follows (default :func:`phi3ref.isa.resolve`'s)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"{self.name}: input of shape {x.shape} does not match weight shape {self.shape}")
        out = np.empty((x.shape[0], self.n_rows), dtype=np.float32)
        if numerics == "numpy":
            strip = max(1, _STRIP_ELEMENTS // self.n_in)
            for start in range(0, self.n_rows, strip):
                out[:, start : start + strip] = x @ self.dequantize(start, start + strip).T
            return out
        qt = int(self.qtype)
        if numerics == "exact":
            if self.qtype == QT.F32:
                kernels.matmul_f32(self._float_view, x, out, nb.get_num_threads())
            elif self._float_view is not None:
                kernels.matmul_f16(self._float_view, x, out, self._table(), nb.get_num_threads())
            else:
                kernels.matmul_exact(self.raw, qt, x, out, kernels.F16_TABLE, nb.get_num_threads())
            return out
        if numerics == "ggml":
            isa = resolve_isa(isa)
            act = kernels.activation_type(qt)
            q, d, s = kernels.quantize_activations(x, act)
            if self._float_view is not None:
                # ggml converts the activations to the weight's type (d holds them), then
                # sums in the level's lanes
                kernels.matmul_float_ggml(self._float_view, _FLOAT_KINDS[self.qtype], d, out, self._table(), isa.lanes, isa.bf16_dot, nb.get_num_threads())
            else:
                kernels.matmul_ggml(self.raw, qt, q, d, s, out, kernels.F16_TABLE, isa.repack_q2_k, nb.get_num_threads())
            return out
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")

    def _table(self) -> np.ndarray:
        return kernels.F16_TABLE if self.qtype == QT.F16 else kernels.BF16_TABLE

    def __repr__(self) -> str:
        return f"Weight({self.name!r}, {self.qtype.name}, {self.shape})"
