"""The errors phi3ref raises besides ``ValueError`` / ``TypeError`` for bad arguments and
:class:`phi3ref.gguf_file.GGUFError` for files it cannot use. A module of its own, so that
the command line can name them without importing Numba."""

from __future__ import annotations

__all__ = ["ModelBusyError", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """inf or NaN appeared in the forward pass; the message names the tensor and layer.

    Raised in every numerics at the same places (the token embedding rows, each layer's
    residual stream after its attention and after its feed-forward, the logits), so a
    corrupt weight or an overflow never reaches the sampler as NaN. The model's context
    is left as :meth:`phi3ref.model.Model.forward` describes for a pass that fails."""


class ModelBusyError(RuntimeError):
    """Another call changed a model's context while a generation was using it."""
