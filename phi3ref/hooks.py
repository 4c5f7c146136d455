"""Hook points: every intermediate of a forward pass has a name, and can be read or replaced.

The names are llama.cpp's graph-node names (``examples/eval-callback`` prints them), the
layer after a dash, so that a phi3ref run and a llama.cpp run can be laid side by side
(:func:`phi3ref.crosscheck.compare_traces`) — but for three: ``attn_out`` and ``ffn_inp``
are phi3ref's own (llama.cpp names neither), and llama.cpp's last ``Qcur`` is the query
after RoPE *and* the 1/sqrt(d) scaling, where phi3ref's is after RoPE only::

    inp_embd                     (n, n_embd)        the token embeddings
    attn_norm-i                  (n, n_embd)        RMSNorm before attention
    wqkv-i                       (n, q + 2 kv)      the fused q | k | v projection
    Qcur-i                       (n, n_head, d)     queries after RoPE
    Kcur-i                       (n, n_head_kv, d)  keys after RoPE (as the cache stores them)
    Vcur-i                       (n, n_head_kv, d)  values
    kq-i                         (n_head_kv, group, n, end)  scaled scores, before the mask
    kq_soft_max-i                (n_head_kv, group, n, end)  attention probabilities
    kqv_out-i                    (n, n_head * d)    heads merged, before the output projection
    attn_out-i                   (n, n_embd)        after the output projection (unnamed in llama.cpp)
    ffn_inp-i                    (n, n_embd)        the residual stream after attention
    ffn_norm-i                   (n, n_embd)        RMSNorm before the feed-forward
    ffn_up-i                     (n, 2 n_ff)        the fused gate | up projection
    ffn_swiglu-i                 (n, n_ff)          silu(gate) * up
    ffn_out-i                    (n, n_embd)        the down projection
    l_out-i                      (n, n_embd)        the residual stream after layer i
    result_norm                  (n, n_embd)        the final RMSNorm
    result_output                (n, n_vocab)       the logits

n: the tokens of a batch (for the last layer's feed-forward and the head: only the
positions whose logits are wanted); end: the positions attended to; group = n_head /
n_head_kv; d = head_dim.

A :class:`Hooks` is what a pass calls at each point: ``hooks(name, value)`` returns the
value the pass goes on with. :data:`NO_HOOKS` is the pass without any (the model checks
nothing else: a pass without hooks pays for one method call per point). A replacement is
checked before the pass uses it (the kernels behind the numerics index arrays without
bounds checks): an array of the point's shape, finite — but for ``kq-i``, where -inf masks
a key as the causal mask does.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Mapping

import numpy as np

__all__ = ["AFTER_LAYERS", "BEFORE_LAYERS", "PER_LAYER", "HookFn", "Hooks", "NO_HOOKS", "hook_point_names"]

HookFn = Callable[[np.ndarray, str], "np.ndarray | None"]

# the points in the order a pass reaches them: before the layers, in each layer, after
BEFORE_LAYERS = ("inp_embd",)
PER_LAYER = (
    "attn_norm", "wqkv", "Qcur", "Kcur", "Vcur", "kq", "kq_soft_max", "kqv_out", "attn_out",
    "ffn_inp", "ffn_norm", "ffn_up", "ffn_swiglu", "ffn_out", "l_out",
)
AFTER_LAYERS = ("result_norm", "result_output")


def hook_point_names(n_layer: int) -> list[str]:
    """Every hook point of a model with ``n_layer`` layers, in the order a pass reaches them."""
    return [*BEFORE_LAYERS, *(f"{name}-{i}" for i in range(n_layer) for name in PER_LAYER), *AFTER_LAYERS]


class Hooks:
    """Functions to call and values to keep at named points of a pass.

    ``functions``: {name or glob pattern: fn}; ``fn(value, name)`` gets a copy of the
    value and returns its replacement, or None to leave it. ``keep``: names or patterns
    whose values are kept (:attr:`kept`, after any replacement). ``known``: every valid
    name; a pattern that matches none of them is an error (a typo must not silently do
    nothing)."""

    def __init__(self, functions: Mapping[str, HookFn] | None = None, keep: Iterable[str] = (), *, known: Iterable[str] = ()):
        self._functions = dict(functions or {})
        try:
            self._keep = list(keep)
        except TypeError:
            raise TypeError(f"names must be hook point names or glob patterns, got {keep!r:.60}") from None
        known = list(known)
        for pattern, fn in self._functions.items():
            if not isinstance(pattern, str):
                raise TypeError(f"hook names must be strings, got {pattern!r}")
            if not callable(fn):
                raise TypeError(f"the hook for {pattern!r} is not callable: {fn!r}")
        for pattern in [*self._functions, *self._keep]:
            if not isinstance(pattern, str):
                raise TypeError(f"hook point names must be strings, got {pattern!r}")
            if known and not fnmatch.filter(known, pattern):
                raise ValueError(f"no hook point is called {pattern!r} (names: {_summary(known)})")
        self._matchers = [(re.compile(fnmatch.translate(p)), fn) for p, fn in self._functions.items()]
        self._keepers = [re.compile(fnmatch.translate(p)) for p in self._keep]
        self._wanted: dict[str, bool] = {}
        self.kept: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        """Whether the point ``name`` is read or replaced (a numerics may then compute
        values it would otherwise skip, as the scores of masked keys)."""
        wanted = self._wanted.get(name)
        if wanted is None:
            wanted = self._wanted[name] = any(m.match(name) for m, _ in self._matchers) or any(m.match(name) for m in self._keepers)
        return wanted

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        if value.size == 0 or not self.wants(name):  # no rows here (positions whose logits are not wanted)
            return value
        for matcher, fn in self._matchers:
            if matcher.match(name):
                replaced = fn(np.array(value, dtype=np.float32), name)
                if replaced is not None:
                    value = _replacement(name, value, replaced)
        if any(m.match(name) for m in self._keepers):
            self.kept[name] = np.array(value, dtype=np.float32)
        return value


class _NoHooks(Hooks):
    """A pass without hooks."""

    def wants(self, name: str) -> bool:
        return False

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        return value


NO_HOOKS: Hooks = _NoHooks()


def _replacement(name: str, value: np.ndarray, replaced: object) -> np.ndarray:
    """A hook's return value as the pass's own: a fresh C-contiguous float32 array of the
    point's shape (anything else is refused, naming the point)."""
    try:
        given = np.asarray(replaced)
        # complex would lose its imaginary part, strings of digits would be read as numbers
        if given.dtype.kind not in "biuf":
            raise TypeError(f"dtype {given.dtype}")
        out = np.array(given, dtype=np.float32, order="C")  # a copy: the pass owns it
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"the hook at {name} returned {type(replaced).__name__}, not an array of real numbers ({e})") from None
    if out.shape != value.shape:
        raise ValueError(f"the hook at {name} returned shape {out.shape}; the point's value has shape {value.shape}")
    bad = np.isnan(out) | ((out == np.inf) if name.startswith("kq-") else np.isinf(out))
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = " (-inf masks a key here; +inf and NaN do not)" if name.startswith("kq-") else ""
        raise ValueError(f"the hook at {name} returned {out[at]} at {at}: replacements must be finite{allowed}")
    return out


def _summary(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
