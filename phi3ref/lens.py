"""Looking inside a forward pass: the logit lens, attention patterns and the heads they
reveal, top-k tables of a distribution.

The **logit lens** reads the residual stream after each layer as if it were the last: the
final RMSNorm and the output head applied to ``inp_embd`` and to every ``l_out-i``, in the
model's own numerics. Its last row is the model's logits, bit for bit, so the lens shows
how the prediction forms over depth. :func:`top_tokens` lists the most likely tokens of
one distribution (the lens's, or the model's next-token one) with their probabilities.

**Attention patterns** (:func:`attention_patterns`) are the ``kq_soft_max-i`` hook points
laid out per query head. Two kinds of head are easy to find by a score:

* a **previous-token head** puts its weight on the token just before the query
  (:func:`previous_token_scores`);
* an **induction head** (Olsson et al., 2022) looks for the previous occurrence of the
  current token and attends to the token that *followed* it — on a run of random tokens
  repeated (:func:`repeated_tokens`), query position i of the second copy attends to
  position i - period + 1 (:func:`induction_scores`). It is what lets a model continue a
  pattern it has seen earlier in its context.

Nothing here plots (:mod:`phi3ref.plots` does, with matplotlib): the helpers return arrays
and rows that a notebook (or a terminal) shows as it likes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .checks import integer
from .model import Model
from .sampler import log_softmax
from .tokenizer import Tokenizer

__all__ = [
    "attention_patterns", "format_top", "induction_scores", "logit_lens", "previous_token_scores", "repeated_tokens", "top_tokens",
]


def logit_lens(model: Model, tokens: Sequence[int]) -> np.ndarray:
    """The logits each depth would give for ``tokens`` (one batch, a fresh context):
    (n_layer + 1, n_tokens, n_vocab) float32 — row 0 from the token embeddings, row i + 1
    from the residual stream after layer i; the last row is ``model.logits(tokens)``."""
    _check_model(model)
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
    k = integer("k", k, lo=1, hi=logits.size)
    logp = log_softmax(logits)
    best = np.lexsort((np.arange(logits.size), -logp))[:k]
    return [(int(t), tokenizer.decode([int(t)], continuation=True), float(np.exp(logp[t]))) for t in best]


def format_top(rows: list[tuple[int, str, float]]) -> str:
    """A plain-text table of :func:`top_tokens`' rows."""
    return "\n".join(f"{p:8.2%}  {t:>6}  {text!r}" for t, text, p in rows)


def attention_patterns(model: Model, tokens: Sequence[int]) -> np.ndarray:
    """Every layer's attention probabilities for ``tokens`` (one batch, a fresh context):
    (n_layer, n_head, n_tokens, n_tokens) float32, [layer, head, query, key]; each row sums
    to 1 over the keys up to the query (the causal mask: later keys are 0). Query head h
    shares KV head h // (n_head / n_head_kv), as the model computes it."""
    _check_model(model)
    names = [f"kq_soft_max-{i}" for i in range(model.config.n_layer)]
    _, cache = model.run_with_cache(tokens, names)
    # each (n_head_kv, group, n, n) -> (n_head, n, n): query heads in the order of the q rows
    return np.stack([cache[name].reshape(model.config.n_head, *cache[name].shape[2:]) for name in names])  # (n_layer, n_head, n, n)


def _check_model(model: Model) -> None:
    if not isinstance(model, Model):
        raise TypeError(f"model must be a phi3ref Model (phi3ref.load(...)), got {type(model).__name__}")


def _check_patterns(patterns: np.ndarray) -> np.ndarray:
    patterns = np.asarray(patterns)
    if patterns.ndim != 4 or patterns.shape[2] != patterns.shape[3]:
        raise ValueError(f"patterns must be (n_layer, n_head, n, n) as attention_patterns() returns, got shape {patterns.shape}")
    return patterns


def previous_token_scores(patterns: np.ndarray) -> np.ndarray:
    """Per head, the mean attention a query pays to the token just before it (positions 1
    on): (n_layer, n_head); 1.0 is a perfect previous-token head."""
    patterns = _check_patterns(patterns)
    n = patterns.shape[2]
    if n < 2:
        raise ValueError("previous-token scores need at least 2 tokens")
    q = np.arange(1, n)
    return patterns[:, :, q, q - 1].mean(axis=-1)


def repeated_tokens(tokenizer: Tokenizer, period: int, *, seed: int = 0, pool: int = 5000,
                    candidates: Sequence[int] | None = None) -> list[int]:
    """The probe for induction heads: BOS (if the vocabulary adds one), then a run of
    ``period`` random tokens, then the same run again. The tokens are drawn without
    repetition (each occurs once per copy) from the ordinary (not special, not byte)
    tokens of ``candidates`` (say, the tokens of a text the model knows), else from the
    first ``pool`` ordinary tokens after the first 1000 ids (after the first half of a
    vocabulary smaller than 2000)."""
    period = integer("period", period, lo=2)
    seed = integer("seed", seed, lo=0)
    pool = integer("pool", pool, lo=1)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a phi3ref Tokenizer, got {type(tokenizer).__name__}")
    ordinary = lambda t: not tokenizer.is_special(t) and not tokenizer.token_text(t).startswith("<0x")  # noqa: E731
    if candidates is None:
        candidates = [t for t in range(min(1000, tokenizer.n_vocab // 2), tokenizer.n_vocab) if ordinary(t)][:pool]
        where = f"the first {pool} ordinary tokens" if len(candidates) == pool else "the vocabulary's ordinary tokens"
    else:
        ids = {integer("a token id of candidates", t, lo=0, hi=tokenizer.n_vocab - 1) for t in candidates}
        candidates, where = sorted(t for t in ids if ordinary(t)), "the candidates' ordinary tokens"
    if len(candidates) < period:
        raise ValueError(f"{where} are only {len(candidates)}: too few to draw {period} distinct ones from")
    run = np.random.default_rng(seed).choice(candidates, size=period, replace=False).tolist()
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return bos + run + run


def induction_scores(patterns: np.ndarray, period: int, offset: int = 1) -> np.ndarray:
    """Per head, on the probe of :func:`repeated_tokens` (a run of ``period`` tokens twice,
    after ``offset`` tokens — 1 for BOS): the mean attention that each query of the second
    copy but its first pays to the key just after the same token's occurrence in the first
    copy, (n_layer, n_head); 1.0 is a perfect induction head."""
    patterns = _check_patterns(patterns)
    period, offset = integer("period", period, lo=2), integer("offset", offset, lo=0)
    if patterns.shape[2] != offset + 2 * period:
        raise ValueError(f"patterns of {patterns.shape[2]} tokens are not a probe of {offset} + 2 x {period} tokens")
    q = np.arange(offset + period + 1, offset + 2 * period)  # the second copy, from its second token
    return patterns[:, :, q, q - period + 1].mean(axis=-1)
