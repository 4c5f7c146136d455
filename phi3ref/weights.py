"""Weight matrices as the file stores them.

A :class:`Weight` is a memmap view of a tensor's bytes plus its GGML type: nothing is
decoded when a model is loaded. Its product with activations is the numerics' to compute
(:meth:`phi3ref.numerics.Numerics.matmul`): each reads the blocks directly.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .quants import dequantize

__all__ = ["Weight"]


class Weight:
    """One weight tensor: ``raw`` (rows, row_bytes) uint8 view, ``qtype``, numpy ``shape``."""

    def __init__(self, name: str, raw: np.ndarray, qtype: QT, shape: tuple[int, ...]):
        self.name = name
        self.qtype = QT(qtype)
        self.shape = tuple(shape)
        self.raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim != 2 else raw
        # float weights, element by element: float32, or the uint16 bits of float16 / bfloat16
        self.float_view: np.ndarray | None
        if self.qtype == QT.F32:
            self.float_view = self.raw.view(np.float32)
        elif self.qtype in (QT.F16, QT.BF16):
            self.float_view = self.raw.view(np.uint16)
        else:
            self.float_view = None

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

    def __repr__(self) -> str:
        return f"Weight({self.name!r}, {self.qtype.name}, {self.shape})"
