"""Choosing the next token from logits: small pure functions on numpy arrays.

The order, as in llama.cpp's default sampler chain:

    repeat penalty -> (temperature 0: argmax) -> top-k -> top-p -> min-p -> temperature -> draw

Filters set the logits of excluded tokens to -inf; the draw uses a seeded
``np.random.Generator``, so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .checks import integer, number

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SAMPLING",
    "SamplingParams",
    "apply_repeat_penalty",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "log_softmax",
    "softmax",
    "sample",
]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, checked on construction (``ValueError`` naming the parameter)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        t = number("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None:
            integer("top_k", self.top_k, lo=1)
        if self.top_p is not None and not 0 < number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if self.min_p is not None and not 0 <= number("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1] (or None), got {self.min_p!r}")
        if number("repeat_penalty", self.repeat_penalty) <= 0:
            raise ValueError(f"repeat_penalty must be a number > 0 (1 = off), got {self.repeat_penalty!r}")
        integer("repeat_last_n", self.repeat_last_n, lo=0)


# The tutorial's settings (Candle's Phi-3 example), stated once: the defaults of generate(),
# Chat and the command line alike.
DEFAULT_SAMPLING = SamplingParams(temperature=1.0, repeat_penalty=1.2, repeat_last_n=64)
DEFAULT_MAX_TOKENS = 100  # a reply stops after this many tokens unless it ends sooner


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Penalize every token in ``recent`` once: positive logits divided by ``penalty``,
    negative ones multiplied (so the token always becomes less likely)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0 or len(recent) == 0:
        return out
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    values = out[ids]
    out[ids] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by ``temperature`` (> 0): below 1 sharpens the distribution, above 1 flattens
    it. A temperature too small for float32 divides by the smallest one float32 holds."""
    if number("temperature", temperature) <= 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy: use argmax), got {temperature}")
    t = max(np.float32(temperature), np.float32(np.finfo(np.float32).smallest_subnormal))
    with np.errstate(over="ignore"):  # a tiny temperature overflows to +-inf: sample() takes the argmax then
        return np.asarray(logits, dtype=np.float32) / t


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (float64) of logits; -inf entries get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of each entry along the last axis (float64): the model's own distribution, as
    log-probabilities are reported and compared (:attr:`phi3ref.GenerationResult.logprobs`,
    KL divergences)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the boundary kept too), -inf elsewhere."""
    x = np.asarray(logits, dtype=np.float32)
    if k >= x.size:
        return x.copy()
    threshold = np.partition(x, x.size - k)[x.size - k]
    return np.where(x >= threshold, x, np.float32(-np.inf))


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum
    to at least ``p``, including the token that crosses ``p``; -inf elsewhere."""
    x = np.asarray(logits, dtype=np.float32)
    if p >= 1.0:
        return x.copy()
    probs = softmax(x)
    # by logit, as llama.cpp sorts: logits that differ in float32 can round to the same
    # probability, and the most likely token must come first
    order = np.argsort(-x, kind="stable")
    cumulative = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cumulative, p, side="left")) + 1  # first index reaching p, inclusive
    keep = np.zeros(x.size, dtype=bool)
    keep[order[: min(n_keep, x.size)]] = True
    return np.where(keep, x, np.float32(-np.inf))


def min_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``p`` times the most likely one's."""
    x = np.asarray(logits, dtype=np.float32)
    if p <= 0:
        return x.copy()
    # prob_i / prob_max = exp(x_i - x_max)
    keep = x - np.max(x) >= np.float32(math.log(p))
    return np.where(keep, x, np.float32(-np.inf))


def _recent_ids(recent: Sequence[int], last_n: int) -> np.ndarray:
    """The last ``last_n`` ids of ``recent`` as an int64 array (``TypeError`` unless they
    are integers). Only the window is checked: ``recent`` is often the whole history."""
    if isinstance(recent, (str, bytes)) or not isinstance(recent, (Sequence, np.ndarray)) or getattr(recent, "ndim", 1) != 1:
        raise TypeError(f"recent must be a sequence of token ids, got {type(recent).__name__}")
    try:
        return np.asarray([integer("a recent token id", t) for t in recent[-last_n:]], dtype=np.int64)
    except OverflowError:
        raise ValueError("a recent token id is outside the logits") from None


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()) -> int:
    """The next token id: the filters in the module's order, then a draw (argmax when the
    temperature is 0). ``ValueError`` for logits that are NaN or +inf (no distribution),
    all -inf (no token allowed), or ``recent`` ids outside the logits."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    try:
        x = np.asarray(logits, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"logits must be a 1-D array of numbers, got {logits!r:.60}") from None
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"sample() takes a 1-D array of logits, got shape {x.shape}")
    bad = np.isnan(x) | (x == np.inf)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"the logits hold {x[i]} at token {i}: they give no distribution to sample from")
    if np.all(x == -np.inf):
        raise ValueError("every logit is -inf: no token is allowed")
    if params.repeat_last_n > 0 and params.repeat_penalty != 1.0:
        window = _recent_ids(recent, params.repeat_last_n)
        outside = (window < 0) | (window >= x.size)
        if outside.any():
            raise ValueError(f"recent token id {int(window[outside][0])} is outside the {x.size} logits")
        x = apply_repeat_penalty(x, window, params.repeat_penalty)
    if params.temperature == 0:
        return int(np.argmax(x))
    if params.top_k is not None:
        x = top_k_filter(x, params.top_k)
    if params.top_p is not None:
        x = top_p_filter(x, params.top_p)
    if params.min_p is not None:
        x = min_p_filter(x, params.min_p)
    scaled = apply_temperature(x, params.temperature)
    if not np.isfinite(np.max(scaled)):
        # a temperature so small that the largest logit overflowed (or all did, to -inf):
        # the limit of sampling as the temperature goes to 0 is the argmax
        return int(np.argmax(x))
    probs = softmax(scaled)
    return int(rng.choice(probs.size, p=probs))
