"""Pictures of a forward pass, with matplotlib (``pip install phi3ref[notebook]``).

Each function draws one of the numbers of :mod:`phi3ref.lens` or :mod:`phi3ref.sampler`
on a matplotlib ``Axes`` (a new figure when none is given) and returns the axes, so that a
notebook can lay several side by side. Nothing else in phi3ref imports this module or
matplotlib.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .checks import integer
from .lens import top_tokens
from .sampler import log_softmax
from .tokenizer import Tokenizer

__all__ = ["plot_attention", "plot_distribution", "plot_head_scores", "plot_logit_lens", "plot_rotation", "token_labels"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("phi3ref.plots draws with matplotlib: pip install 'phi3ref[notebook]'") from None
    return plt


def _axes(ax, size: tuple[float, float]):
    if ax is None:
        _, ax = _pyplot().subplots(figsize=size)
    return ax


def token_labels(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[str]:
    """Short labels for a plot's axis: each token's text, whitespace made visible."""
    out = []
    for t in tokens:
        text = tokenizer.token_text(t).replace("\u2581", "\u00b7").replace("\n", "\u21b5").replace(" ", "\u00b7")  # (token_text checks the id)
        out.append(text if len(text) <= 12 else text[:11] + "\u2026")
    return out


def plot_attention(pattern: np.ndarray, labels: Sequence[str] | None = None, *, ax=None, title: str | None = None):
    """One head's attention pattern (n_query, n_key), queries down, keys across, as an
    image whose pixels are the probabilities (``ax.images[0]`` holds them). ``labels``
    name the keys; the queries are the last n_query of them (a pass that continued a
    cache has queries for its new tokens only)."""
    pattern = np.asarray(pattern)
    if pattern.ndim != 2 or pattern.shape[0] > pattern.shape[1]:
        raise ValueError(f"plot_attention takes one head's (n_query, n_key) pattern, n_query <= n_key, got shape {pattern.shape}")
    if labels is not None and len(labels) != pattern.shape[1]:
        raise ValueError(f"{len(labels)} labels for {pattern.shape[1]} keys")
    ax = _axes(ax, (6, 5))
    image = ax.imshow(pattern, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(pattern.shape[0]), labels[len(labels) - pattern.shape[0]:], fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return ax


def plot_head_scores(scores: np.ndarray, *, ax=None, title: str | None = None):
    """A score per head (n_layer, n_head) — :func:`phi3ref.lens.previous_token_scores`,
    :func:`phi3ref.lens.induction_scores` — as an annotated grid, layers down."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"plot_head_scores takes (n_layer, n_head) scores, got shape {scores.shape}")
    ax = _axes(ax, (1.2 + 0.6 * scores.shape[1], 0.8 + 0.5 * scores.shape[0]))
    ax.imshow(scores, cmap="magma", vmin=0.0, vmax=1.0)
    for (layer, head), v in np.ndenumerate(scores):
        ax.text(head, layer, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(scores.shape[1]))
    ax.set_yticks(range(scores.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    return ax


def plot_logit_lens(lens: np.ndarray, tokenizer: Tokenizer, position: int = -1, k: int = 5, *, ax=None, title: str | None = None):
    """The logit lens at one position (``lens``: :func:`phi3ref.lens.logit_lens`'s
    (depth, n_tokens, n_vocab)): for each depth, the probability of the ``k`` tokens most
    likely at the last depth, as lines over depth (``ax.lines[j]`` is the j-th token's)."""
    lens = np.asarray(lens)
    if lens.ndim != 3:
        raise ValueError(f"plot_logit_lens takes the lens's (depth, n_tokens, n_vocab), got shape {lens.shape}")
    position = integer("position", position, lo=-lens.shape[1], hi=lens.shape[1] - 1)
    k = integer("k", k, lo=1, hi=lens.shape[2])
    rows = lens[:, position]  # (depth, n_vocab)
    final = top_tokens(rows[-1], tokenizer, k)
    probs = np.exp(log_softmax(rows))  # (depth, n_vocab)
    ax = _axes(ax, (6, 3.5))
    depth = np.arange(rows.shape[0])
    for t, text, _ in final:
        ax.plot(depth, probs[:, t], marker="o", label=repr(text))
    ax.set_xticks(depth, ["embed", *(f"l_out-{i}" for i in range(rows.shape[0] - 1))], rotation=45, fontsize=8)
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_distribution(probs: np.ndarray, tokenizer: Tokenizer, k: int = 15, *, ax=None, title: str | None = None):
    """The ``k`` most likely tokens of a probability vector (n_vocab,) as bars (the bars'
    heights are the probabilities, most likely first)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 1 or probs.size != tokenizer.n_vocab:
        raise ValueError(f"plot_distribution takes one row of {tokenizer.n_vocab} probabilities, got shape {probs.shape}")
    k = integer("k", k, lo=1, hi=probs.size)
    best = np.lexsort((np.arange(probs.size), -probs))[:k]
    ax = _axes(ax, (7, 3))
    ax.bar(range(len(best)), probs[best])
    ax.set_xticks(range(len(best)), [repr(tokenizer.decode([int(t)], continuation=True)) for t in best], rotation=60, fontsize=8)
    ax.set_ylabel("probability")
    if title:
        ax.set_title(title)
    return ax


def plot_rotation(cos: np.ndarray, sin: np.ndarray, pairs: Sequence[int] = (0, 4, 16), *, ax=None, title: str | None = None):
    """RoPE as rotations: for a few dimension pairs (i, i + n_rot/2), the point (1, 0)
    rotated by each position's angle (``cos``, ``sin``: (n_positions, n_rot / 2), as
    :meth:`phi3ref.model.RotaryEmbedding.angles` returns them). Fast pairs go round many
    times over the positions; slow ones barely move."""
    cos, sin = np.asarray(cos), np.asarray(sin)
    if cos.shape != sin.shape or cos.ndim != 2:
        raise ValueError(f"cos and sin must be (n_positions, n_rot / 2) alike, got {cos.shape} and {sin.shape}")
    pairs = [integer("pair", i, lo=0, hi=cos.shape[1] - 1) for i in pairs]
    ax = _axes(ax, (4.5, 4.5))
    for i in pairs:
        ax.plot(cos[:, i], sin[:, i], marker=".", label=f"pair {i}")
    ax.set_aspect("equal")
    ax.set_xlabel("cos")
    ax.set_ylabel("sin")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax
