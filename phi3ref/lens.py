"""Looking inside a forward pass: the logit lens and top-k tables of a distribution.

The **logit lens** reads the residual stream after each layer as if it were the last: the
final RMSNorm and the output head applied to ``inp_embd`` and to every ``l_out-i``, in the
model's own numerics. Its last row is the model's logits, bit for bit, so the lens shows
how the prediction forms over depth. :func:`top_tokens` lists the most likely tokens of
one distribution (the lens's, or the model's next-token one) with their probabilities.

Nothing here plots: the helpers return arrays and rows that a notebook (or a terminal)
shows as it likes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import Model
from .sampler import log_softmax
from .tokenizer import Tokenizer

__all__ = ["format_top", "logit_lens", "top_tokens"]


def logit_lens(model: Model, tokens: Sequence[int]) -> np.ndarray:
    """The logits each depth would give for ``tokens`` (one batch, a fresh context):
    (n_layer + 1, n_tokens, n_vocab) float32 — row 0 from the token embeddings, row i + 1
    from the residual stream after layer i; the last row is ``model.logits(tokens)``."""
    names = ["inp_embd", *(f"l_out-{i}" for i in range(model.config.n_layer))]
    _, cache = model.run_with_cache(tokens, names)
    rows = []
    for name in names:  # the head applied as the model applies it after its last layer
        rows.append(model.numerics.matmul(model.output, model.output_norm(cache[name])))  # (n_tokens, n_vocab)
    return np.stack(rows)


def top_tokens(logits: np.ndarray, tokenizer: Tokenizer, k: int = 10) -> list[tuple[int, str, float]]:
    """The ``k`` most likely tokens of one distribution's ``logits`` (n_vocab,):
    ``(token_id, text, probability)``, most likely first (ties: lower id first)."""
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size != tokenizer.n_vocab:
        raise ValueError(f"top_tokens takes one row of {tokenizer.n_vocab} logits, got shape {logits.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.size:
        raise ValueError(f"k must be an integer from 1 to {logits.size}, got {k!r}")
    logp = log_softmax(logits)
    best = np.lexsort((np.arange(logits.size), -logp))[:k]
    return [(int(t), tokenizer.decode([int(t)], continuation=True), float(np.exp(logp[t]))) for t in best]


def format_top(rows: list[tuple[int, str, float]]) -> str:
    """A plain-text table of :func:`top_tokens`' rows."""
    return "\n".join(f"{p:8.2%}  {t:>6}  {text!r}" for t, text, p in rows)
