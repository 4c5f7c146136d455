"""The Phi-3 transformer, read top to bottom.

    Model: token embedding -> n_layer x Block -> final RMSNorm -> output head
      Block: x + Attention(RMSNorm(x)); then x + MLP(RMSNorm(x))
        Attention: fused qkv -> RoPE on q, k -> causal attention over its KV cache -> output
        MLP: fused [gate | up] -> SiLU(gate) * up -> down
      RotaryEmbedding: the rotation angles of a batch's positions (NEOX layout, LongRoPE)

Each layer is handed what it works on: its own slice of the KV cache (:class:`LayerCache`),
the batch's positions, mask and rotation angles (:class:`Batch`), and the hook points to
call (:mod:`phi3ref.hooks`); none reaches back into the model. How each operation is
computed is the :class:`phi3ref.numerics.Numerics` object the model was built with
("ggml": llama.cpp's arithmetic; "exact": transformers' float32; "numpy": plain numpy),
chosen once at load (:func:`phi3ref.loading.load`) and handed to every layer: this module
imports no kernel.

Shapes are commented as ``# (n_tokens, n_head, head_dim)``. Everything Phi-3-specific is
marked "Phi-3:".
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from .checks import flag, integer
from .config import Phi3Config
from .errors import ModelBusyError, NonFiniteError
from .gguf_file import GGUFError, GGUFFile
from .hooks import NO_HOOKS, HookFn, Hooks, hook_point_names
from .weights import Weight

if TYPE_CHECKING:
    from .numerics import Numerics
    from .tokenizer import Tokenizer

__all__ = ["Batch", "KVCache", "LayerCache", "Model", "check_finite", "DEFAULT_MAX_CTX", "DEFAULT_UBATCH", "TRACE_POINTS"]

# The KV cache is preallocated; without an explicit n_ctx it holds at most this many
# positions (Phi-3.5's 131072 would take 48 GB in float16 for the mini model).
DEFAULT_MAX_CTX = 4096
# Prompts run in batches of at most this many tokens: llama.cpp's default n_ubatch (its
# kernels, and so its sums, depend on a batch's size).
DEFAULT_UBATCH = 512


# Forward passes run one at a time in a process, whichever model they belong to: the
# kernels already use every core. A fork waits for the pass under way to end (a child
# must not inherit a half-written cache, nor a lock held by a thread it does not have).
PASS_LOCK = threading.RLock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=PASS_LOCK.acquire, after_in_parent=PASS_LOCK.release, after_in_child=PASS_LOCK.release)


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt():
    """A Ctrl-C whose handler runs as a Numba kernel returns surfaces as ``SystemError``
    ("... returned a result with an exception set"), a chain of them caused by the
    KeyboardInterrupt: it is re-raised as the KeyboardInterrupt it is."""
    try:
        yield
    except SystemError as e:
        cause: BaseException | None = e
        for _ in range(16):  # the chain is short; a loop in it must not hang us
            if cause is None or isinstance(cause, KeyboardInterrupt):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def check_finite(x: np.ndarray, name: str, source: str) -> np.ndarray:
    """``x`` unchanged, or :class:`NonFiniteError` naming ``name`` (llama.cpp's tensor name)
    and ``source`` (the weights it came from) if it holds inf or NaN."""
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise NonFiniteError(
            f"{name}: the forward pass produced {x[tuple(bad)]} at {tuple(int(i) for i in bad)} "
            f"({source}): the weights hold inf or NaN, or the activations overflowed float32"
        )
    return x


def _stacklevel_outside_phi3ref() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    import sys

    package, level, frame = os.path.dirname(os.path.abspath(__file__)), 1, sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    return level


# the interface Model uses (phi3ref.numerics.Numerics): checked by name, as this module
# does not import the numerics
_NUMERICS_ATTRIBUTES = ("name", "kv_dtype", "applies_sliding_window", "longrope_context", "matmul", "rms_norm",
                        "rope_angles", "rope", "store", "attention_scores", "softmax", "attention_values", "swiglu",
                        "warmup")


# What trace() records: the hook points llama.cpp names the same way and computes the same
# (its Qcur is the query after RoPE *and* scaling; it names no ffn_inp).
TRACE_POINTS = (
    "attn_norm-*", "wqkv-*", "kq-*", "kq_soft_max-*", "kqv_out-*", "attn_out-*", "ffn_norm-*", "ffn_up-*",
    "ffn_swiglu-*", "ffn_out-*", "l_out-*", "result_norm", "result_output",
)


# ======================================================================================
# KV cache
# ======================================================================================


@dataclass
class LayerCache:
    """One layer's keys (after RoPE) and values, position by position."""

    k: np.ndarray  # (n_ctx, n_head_kv, head_dim)
    v: np.ndarray  # (n_ctx, n_head_kv, head_dim)


def _lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros in an anonymous mapping whose pages become resident where written, 4 KB at a
    time. np.zeros maps zero pages lazily too, but numpy asks the kernel for transparent
    huge pages on large arrays: a cache's layers then became resident 2 MB at a time from
    their first positions on (8 positions of Phi-3-mini made two thirds of a 1,024-position
    cache resident, measured), memory the context had not reached."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    try:
        if hasattr(mmap, "MAP_PRIVATE"):  # private (mmap's default is shared: a forked child would write the parent's cache)
            pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:  # Windows: an anonymous mapping is private to the process
            pages = mmap.mmap(-1, nbytes)
    except OSError as e:  # ENOMEM (an address-space limit, strict overcommit): as numpy would say it
        raise MemoryError(f"{nbytes:,} bytes: {e}") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux (where THP may be on for every mapping)
        try:
            pages.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: nothing to turn off
            pass
    return np.frombuffer(pages, dtype=dtype).reshape(shape)  # (shape), the mapping its base


@dataclass
class KVCache:
    """Keys and values of every position seen, preallocated for ``n_ctx``."""

    k: np.ndarray  # (n_layer, n_ctx, n_head_kv, head_dim)
    v: np.ndarray  # (n_layer, n_ctx, n_head_kv, head_dim)

    @classmethod
    def allocate(cls, config: Phi3Config, n_ctx: int, dtype: type) -> "KVCache":
        # Position-major, so the positions written so far are one contiguous run per layer,
        # and only that run becomes resident (see _lazy_zeros).
        shape = (config.n_layer, n_ctx, config.n_head_kv, config.head_dim)
        return cls(_lazy_zeros(shape, dtype), _lazy_zeros(shape, dtype))

    @staticmethod
    def nbytes(config: Phi3Config, n_ctx: int, dtype: type) -> int:
        """Bytes of a cache for ``n_ctx`` positions (keys and values)."""
        return 2 * config.n_layer * n_ctx * config.n_head_kv * config.head_dim * np.dtype(dtype).itemsize

    @property
    def n_ctx(self) -> int:
        return self.k.shape[1]

    def layer(self, i: int) -> LayerCache:
        """Layer ``i``'s part (views: what a layer writes there is in the cache)."""
        return LayerCache(self.k[i], self.v[i])


@dataclass(frozen=True)
class Batch:
    """What every layer needs to know of the tokens of one pass: where they sit, which keys
    each may see, and the rotation angles of their positions."""

    positions: np.ndarray  # (n_tokens,)
    first_key: np.ndarray  # (n_tokens,) token t sees the keys first_key[t] .. positions[t]
    cos: np.ndarray  # (n_tokens, n_rot / 2)
    sin: np.ndarray  # (n_tokens, n_rot / 2)

    @property
    def start(self) -> int:
        return int(self.positions[0])

    @property
    def end(self) -> int:
        """One past the last position: the keys attended to are the cache's first ``end``."""
        return int(self.positions[-1]) + 1


# ======================================================================================
# The model
# ======================================================================================


class Model:
    """A Phi-3 family model over a memory-mapped GGUF file, computing with ``numerics``.

    ``logits(tokens)`` runs a fresh context and returns every position's logits;
    ``forward(tokens, start_pos)`` extends the cached context and returns the last
    position's logits (generation: prompt in one batched pass, then a token at a time).
    ``run_with_hooks`` / ``run_with_cache`` read and replace intermediates by name
    (:mod:`phi3ref.hooks`); ``trace`` returns those llama.cpp names alike. Build one with
    :func:`phi3ref.load`.
    """

    def __init__(
        self,
        gguf: GGUFFile,
        numerics: "Numerics",
        *,
        n_ctx: int | None = None,
        sliding_window: bool | None = None,
        n_ubatch: int = DEFAULT_UBATCH,
        tokenizer: "Callable[[], Tokenizer] | None" = None,
    ):
        if isinstance(numerics, type):
            raise TypeError(f"numerics must be a Numerics object, got the class {numerics.__name__}: pass {numerics.__name__}(...)")
        missing = [a for a in _NUMERICS_ATTRIBUTES if not hasattr(numerics, a)]
        if missing:
            raise TypeError(f"numerics must be a phi3ref.numerics.Numerics object (phi3ref.loading.numerics_named('exact'), ...), "
                            f"got {numerics!r:.60} (it has no {', '.join(missing[:3])}); phi3ref.load() takes a name")
        self.gguf = gguf
        self.config = config = Phi3Config.from_gguf(gguf)
        config.check_tensors(gguf)
        self.numerics = numerics
        n_ctx = min(config.n_ctx_train, DEFAULT_MAX_CTX) if n_ctx is None else integer("n_ctx", n_ctx, lo=1)
        if n_ctx > config.n_ctx_train:
            # as llama.cpp, allowed with a warning: positions past the trained context are
            # outside what the model has learned
            warnings.warn(
                f"n_ctx={n_ctx} is more than the {config.n_ctx_train} positions {gguf.path.name} was trained for",
                stacklevel=_stacklevel_outside_phi3ref(),
            )
        cache_bytes = KVCache.nbytes(config, n_ctx, numerics.kv_dtype)
        if cache_bytes > _physical_memory():
            raise ValueError(
                f"n_ctx={n_ctx} needs a KV cache of {cache_bytes / 2**30:,.1f} GiB, more than this machine's "
                f"{_physical_memory() / 2**30:,.1f} GiB of memory"
            )
        self.n_ctx = n_ctx
        self.n_ubatch = integer("n_ubatch", n_ubatch, lo=1)
        # Phi-3 files declare a sliding window (2047 for Phi-3-mini-4k); transformers
        # applies it, llama.cpp ignores it ("Phi SWA is currently disabled"): by default,
        # as the numerics' runtime does.
        if sliding_window is None:
            sliding_window = numerics.applies_sliding_window
        self.window = config.sliding_window if sliding_window else None

        def weight(name: str) -> Weight:
            info = gguf.tensor_info(name)
            return Weight(name, gguf.tensor_bytes(name), info.qtype, info.shape)

        def vector(name: str) -> np.ndarray:
            # norm weights and rope factors are read whole: a non-finite (or, for a rope
            # factor, non-positive) entry is refused now rather than becoming NaN logits
            v = np.ascontiguousarray(gguf.dequantize_tensor(name), dtype=np.float32)
            factor = name.startswith("rope_factors")
            bad = ~np.isfinite(v) | ((v <= 0) if factor else False)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise GGUFError(f"{gguf.path}: tensor {name!r} holds {v[i]} at index {i}; its values must be finite"
                                f"{' and positive' if factor else ''}")
            return v

        self.token_embd = weight("token_embd.weight")
        self.rope = RotaryEmbedding(
            config,
            numerics,
            short_factors=vector("rope_factors_short.weight") if config.has_rope_factors else None,
            long_factors=vector("rope_factors_long.weight") if config.has_rope_factors else None,
            context=numerics.longrope_context(n_ctx),
        )
        self.blocks = [Block(i, config, weight, vector, numerics) for i in range(config.n_layer)]
        self.output_norm = RMSNorm(vector("output_norm.weight"), config.rms_eps, numerics)
        # Tied embeddings (Phi-4-mini): the output head is the token embedding matrix.
        self.output = weight("output.weight") if "output.weight" in gguf.tensors else self.token_embd

        try:
            self.cache = KVCache.allocate(config, n_ctx, numerics.kv_dtype)
        except MemoryError:
            raise ValueError(f"n_ctx={n_ctx}: the KV cache of {cache_bytes / 2**30:,.1f} GiB cannot be allocated") from None
        # What the cache holds, position by position. Replaced, never mutated, and always
        # true of the cache: a pass cuts it to the positions it keeps before writing any
        # (see forward()).
        self.tokens: list[int] = []
        self.cache_uses_long_rope = False
        # One pass at a time (calls from several threads wait their turn); the version
        # changes with every change of the context, so that a generation can tell that
        # another caller moved it (ModelBusyError) instead of continuing on a wrong cache.
        self._lock = PASS_LOCK
        self._in_pass = False
        self._version = 0
        # held by a non-streaming generation from its first pass to its last: threads that
        # generate on one model take turns
        self.generation_lock = threading.Lock()
        self._make_tokenizer = tokenizer
        self._tokenizer: Tokenizer | None = None
        self._warm = False  # whether warmup() has run: the first pass runs it

    # -- public API ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> "Tokenizer":
        """The tokenizer load() chose (the file's own vocabulary unless given another),
        built when first used."""
        if self._tokenizer is None:
            if self._make_tokenizer is None:
                raise ValueError(f"this Model of {self.gguf.path.name} was built without a tokenizer: "
                                 "load it with phi3ref.load(), or set model.tokenizer")
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: "Tokenizer") -> None:
        self._tokenizer = tokenizer

    @property
    def context_version(self) -> int:
        """A number that changes whenever the cached context does (a pass, a reset)."""
        return self._version

    @property
    def hook_names(self) -> list[str]:
        """Every hook point of this model, in the order a pass reaches them (:mod:`phi3ref.hooks`)."""
        return hook_point_names(self.config.n_layer)

    def cached(self) -> tuple[list[int], int]:
        """The tokens the cache holds and the :attr:`context_version`, read together (a
        generation resumes from them: see :meth:`forward`'s ``expect_version``)."""
        with self._lock:
            return self.tokens, self._version

    def matrices(self) -> list[Weight]:
        """The weight matrices the passes multiply by (the output head last)."""
        mats = [w for b in self.blocks for w in (*b.attn.projections, b.attn.out, b.mlp.gate_up, b.mlp.down)]
        return mats + [self.output]

    def warmup(self) -> float:
        """Compile the kernels this model's passes take (or load them from the cache): its
        numerics' kernels for its weight types, and no others. The first pass calls it;
        call it before to keep the compile out of a measurement (``phi3ref warmup FILE``
        compiles ahead for a file). Returns the seconds it took: 0 once done. When a helper
        process shares a cold compile, it compiles one token's attention kernels last, while
        the prompt runs: the first one-token pass waits for them
        (:func:`phi3ref.jit.finish_background` waits at once)."""
        if self._warm:
            return 0.0
        seconds = self.numerics.warmup(self.matrices())
        self._warm = True
        return seconds

    def reset(self) -> None:
        """Forget the cached context."""
        with self._lock:
            self._refuse_reentry("reset")
            self.tokens = []
            self.cache_uses_long_rope = False
            self._version += 1

    def logits(self, tokens: Sequence[int], *, first: int = 0) -> np.ndarray:
        """Logits of every position for ``tokens`` in a fresh context: (len(tokens), n_vocab)
        float32; with ``first``, of the positions from ``first`` on, (len(tokens) - first,
        n_vocab): the others' last-layer feed-forward and head are skipped, as llama.cpp
        skips the positions whose logits are not asked for (``llama-perplexity`` asks for
        the second half of each chunk), so that the sums are the ones it computes."""
        ids = self._check_tokens(tokens, 0)
        if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or not 0 <= first < ids.size:
            raise ValueError(f"first must be a position of the {ids.size} tokens (0..{ids.size - 1}), got {first!r}")
        return self._fresh(ids, NO_HOOKS, outputs=int(first))

    def run_with_hooks(self, tokens: Sequence[int], hooks: Mapping[str, HookFn]) -> np.ndarray:
        """:meth:`logits`, calling ``hooks`` on the way: {hook point name or glob pattern
        (``"l_out-*"``): fn}. ``fn(value, name)`` gets a copy of the intermediate and
        returns its replacement (same shape, finite; -inf allowed in ``kq-i`` to mask a key)
        or None to leave it; the pass goes on with the replacement (and so does the KV
        cache, for keys and values). A prompt longer than ``n_ubatch`` runs in batches: fn
        is called once per batch, and not for a point that has no rows in it (the last
        layer's feed-forward of positions whose logits are not wanted). A pass crossing
        LongRoPE's original context ("exact", "numpy") recomputes the cached positions
        through the same hooks. Hooks run inside the pass: a pass on this model from a hook
        is an error (ModelBusyError); one on another model runs inside this one."""
        return self._fresh(self._check_tokens(tokens, 0), self._hooks(hooks, ()))

    def run_with_cache(self, tokens: Sequence[int], names: Iterable[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`logits` and the intermediates ``names`` (hook point names or glob patterns;
        None: every one) as float32 copies, in the order computed. The tokens run as one
        batch: at most ``n_ubatch`` of them."""
        return self._one_batch(tokens, ["*"] if names is None else names, "run_with_cache")

    def trace(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        """Run ``tokens`` (one batch: at most ``n_ubatch``) in a fresh context and return the
        intermediates that llama.cpp names alike (:data:`TRACE_POINTS`): ``attn_norm-0``,
        ``wqkv-0``, ``kq-0``, ``kq_soft_max-0``, ``kqv_out-0``, ``ffn_norm-0``, ``ffn_up-0``,
        ``ffn_swiglu-0``, ``ffn_out-0``, ``l_out-0``, ..., ``result_norm``,
        ``result_output``, plus ``attn_out-0`` (unnamed in llama.cpp)."""
        return self._one_batch(tokens, TRACE_POINTS, "trace()")[1]

    def forward(self, tokens: Sequence[int], start_pos: int, *, expect_version: int | None = None,
                hooks: Mapping[str, HookFn] | None = None, all_logits: bool = False) -> np.ndarray:
        """Process ``tokens`` at positions ``start_pos...`` (the cache must hold the first
        ``start_pos`` positions; anything after is overwritten). Returns the last position's
        logits, (n_vocab,) float32, or with ``all_logits`` every position's, (n_tokens,
        n_vocab) (the output head then runs on every row, as llama.cpp's does when every
        position's logits are asked for). ``hooks``: as for :meth:`run_with_hooks`.

        A pass that does not finish (an error, Ctrl-C) leaves ``tokens`` and the cache in
        agreement: appending (``start_pos == len(tokens)``) leaves the model as it was; an
        overwrite leaves the first ``start_pos`` positions. ``expect_version``: refuse
        (:class:`ModelBusyError`) unless :attr:`context_version` still has this value, so
        that a caller continuing its own context notices another caller's pass; after a
        successful pass the version is ``expect_version + 1``."""
        start_pos = integer("start_pos", start_pos, lo=0)
        flag("all_logits", all_logits)
        if expect_version is not None:
            integer("expect_version", expect_version)
        ids = self._check_tokens(tokens, start_pos)
        run_hooks = NO_HOOKS if hooks is None else self._hooks(hooks, ())
        with self._lock, _interrupts_as_keyboard_interrupt():
            if expect_version is not None and expect_version != self._version:
                raise ModelBusyError(
                    "the model's context was changed by another call while a generation was using it "
                    "(two generations at once on one model: finish or close one stream before starting "
                    "another, or give each thread its own Model)"
                )
            if not 0 <= start_pos <= len(self.tokens):
                raise ValueError(f"start_pos {start_pos} is past the {len(self.tokens)} cached positions")
            logits = self._run(ids, int(start_pos), run_hooks, outputs=0 if all_logits else ids.size - 1)
            return logits if all_logits else logits[-1]

    # -- the forward pass --------------------------------------------------------------

    def _hooks(self, functions: Mapping[str, HookFn], keep: Iterable[str]) -> Hooks:
        if not isinstance(functions, Mapping):
            raise TypeError(f"hooks must be a mapping of hook point names to functions, got {type(functions).__name__}")
        if isinstance(keep, str):
            keep = [keep]
        elif isinstance(keep, (bytes, bytearray)):
            raise TypeError(f"names must be hook point names or glob patterns (str), got {type(keep).__name__}")
        return Hooks(functions, keep, known=self.hook_names)

    def _refuse_reentry(self, what: str) -> None:
        if self._in_pass:  # only a hook can get here: passes are serialised by the lock
            raise ModelBusyError(f"a hook {what} the model it is hooking{' (generate() and Chat start so)' if what == 'reset' else ''}: "
                                 "the pass under way would go on with a KV cache and tokens changed under it")

    def _one_batch(self, tokens: Sequence[int], names: Iterable[str], what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = self._check_tokens(tokens, 0)
        if ids.size > self.n_ubatch:
            raise ValueError(f"{what} runs one batch: {ids.size} tokens is more than n_ubatch={self.n_ubatch}")
        hooks = self._hooks({}, names)
        return self._fresh(ids, hooks), hooks.kept

    def _fresh(self, ids: np.ndarray, hooks: Hooks, outputs: int = 0) -> np.ndarray:
        """A fresh context through ``hooks``; ``ids`` checked by _check_tokens; the logits
        of the positions from ``outputs`` on."""
        with self._lock, _interrupts_as_keyboard_interrupt():
            self._refuse_reentry("ran a pass on")
            self.reset()
            return self._run(ids, 0, hooks, outputs)

    def _check_tokens(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        # any iterable of integers (not bools) in order: not a set or a dict (no order)
        if isinstance(tokens, (str, bytes, Mapping, set, frozenset)) or (isinstance(tokens, np.ndarray) and tokens.ndim != 1):
            raise TypeError(f"tokens must be a sequence of integer token ids, got {tokens!r:.80}")
        try:
            items = list(tokens)
            ids = np.asarray([operator.index(t) for t in items if not isinstance(t, (bool, np.bool_))], dtype=object)
            if ids.size != len(items):  # a bool among them
                raise TypeError
        except TypeError:
            raise TypeError(f"tokens must be a sequence of integer token ids, got {tokens!r:.80}") from None
        if ids.size == 0:
            raise ValueError("tokens is empty")
        bad = (ids < 0) | (ids >= self.config.n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        ids = ids.astype(np.int64)
        if start_pos + ids.size > self.n_ctx:
            raise ValueError(
                f"{start_pos + ids.size} positions do not fit the context of {self.n_ctx} "
                f"(load with a larger n_ctx, up to the model's {self.config.n_ctx_train})"
            )
        return ids

    def _run(self, ids: np.ndarray, start_pos: int, hooks: Hooks, outputs: int) -> np.ndarray:
        self._refuse_reentry("ran a pass on")
        if not self._warm:  # every kernel the passes take, compiled in one go (said on stderr when slow)
            self.warmup()
        self._in_pass = True
        try:
            return self._run_pass(ids, start_pos, hooks, outputs)
        finally:
            self._in_pass = False

    def _run_pass(self, ids: np.ndarray, start_pos: int, hooks: Hooks, outputs: int) -> np.ndarray:
        # The positions from start_pos on are about to be overwritten: from now on the
        # cache holds only the first start_pos positions, whatever interrupts the pass.
        kept = self.tokens[:start_pos]
        self.tokens = kept
        self._version += 1
        end = start_pos + ids.size
        long_rope = self.rope.use_long(end)
        if long_rope != self.cache_uses_long_rope:
            if start_pos > 0:
                # Phi-3 LongRoPE: crossing the original context switches every position to
                # the long factors (transformers computes all positions with the factors of
                # the full length), so the cached keys are recomputed with them first
                # (through the same hooks: a patch applies to them too).
                self.tokens = []  # no cached key is valid until they all are
                self._batches(np.asarray(kept, dtype=np.int64), 0, long_rope, hooks, outputs=None)
            self.cache_uses_long_rope = long_rope
            self.tokens = kept
        logits = self._batches(ids, start_pos, long_rope, hooks, outputs)
        self.tokens = kept + ids.tolist()
        return logits

    def _batches(self, ids: np.ndarray, start_pos: int, long_rope: bool, hooks: Hooks, outputs: int | None) -> np.ndarray:
        """Run ``ids`` from ``start_pos`` in batches of at most ``n_ubatch`` tokens, as
        llama.cpp splits a prompt into micro-batches (the kernels it picks, and so the
        sums, depend on a batch's size). Logits of the positions from index ``outputs`` of
        ``ids`` on (0: every one), or (None) of none: like llama.cpp, the last layer's
        feed-forward and the head run only for the positions whose logits are wanted."""
        pieces = []
        for s in range(0, ids.size, self.n_ubatch):
            batch_ids = ids[s : s + self.n_ubatch]
            wanted = outputs is not None and outputs < s + batch_ids.size
            keep = slice(max(outputs - s, 0), None) if wanted else slice(0, 0)
            x = self._layers(batch_ids, start_pos + s, long_rope, hooks, keep)  # (kept positions, n_embd)
            if x.shape[0]:
                x = hooks("result_norm", self.output_norm(x))
                logits = self.numerics.matmul(self.output, x)  # (kept, n_vocab)
                check_finite(logits, "result_output", f"the product with {self.output.name}")
                pieces.append(hooks("result_output", logits))
        return np.concatenate(pieces) if pieces else np.empty((0, self.config.n_vocab), np.float32)

    def _layers(self, ids: np.ndarray, start_pos: int, long_rope: bool, hooks: Hooks, keep: slice) -> np.ndarray:
        positions = np.arange(start_pos, start_pos + ids.size)
        # the causal mask, narrowed by the sliding window when one applies
        first_key = np.zeros_like(positions) if self.window is None else np.maximum(positions - self.window + 1, 0)
        cos, sin = self.rope.angles(positions, long_rope)  # (n_tokens, n_rot / 2) each
        batch = Batch(positions, first_key, cos, sin)
        x = check_finite(self.token_embd.rows(ids), "inp_embd", "rows of token_embd.weight")  # (n_tokens, n_embd)
        x = hooks("inp_embd", x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, batch, self.cache.layer(i), hooks, keep if i == last else slice(None))
        return x


# ======================================================================================
# Transformer block
# ======================================================================================


class Block:
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, index: int, config: Phi3Config, weight: Callable[[str], Weight], vector: Callable[[str], np.ndarray],
                 numerics: "Numerics"):
        p = f"blk.{index}."
        self.index = index
        self.attn_norm = RMSNorm(vector(p + "attn_norm.weight"), config.rms_eps, numerics)
        self.attn = Attention(index, config, weight, numerics)
        self.ffn_norm = RMSNorm(vector(p + "ffn_norm.weight"), config.rms_eps, numerics)
        self.mlp = MLP(index, weight(p + "ffn_up.weight"), weight(p + "ffn_down.weight"), config.n_ff, numerics)

    def __call__(self, x: np.ndarray, batch: Batch, cache: LayerCache, hooks: Hooks, keep: slice = slice(None)) -> np.ndarray:
        """The block for the tokens of ``batch``; ``keep`` selects the rows that go on
        through the feed-forward (the last layer keeps only the positions whose logits are
        wanted, as llama.cpp does)."""
        i = self.index
        h = hooks(f"attn_norm-{i}", self.attn_norm(x))
        a = hooks(f"attn_out-{i}", self.attn(h, batch, cache, hooks))
        x = check_finite((x + a)[keep], f"attn_out-{i}", f"layer {i}'s attention, blk.{i}.attn_*")  # (kept tokens, n_embd)
        x = hooks(f"ffn_inp-{i}", x)
        h = hooks(f"ffn_norm-{i}", self.ffn_norm(x))
        f = hooks(f"ffn_out-{i}", self.mlp(h, hooks))
        x = check_finite(x + f, f"l_out-{i}", f"layer {i}'s feed-forward, blk.{i}.ffn_*")  # (kept tokens, n_embd)
        return hooks(f"l_out-{i}", x)


# ======================================================================================
# Attention
# ======================================================================================


class Attention:
    """Causal multi-head attention with grouped KV heads over one layer's KV cache."""

    def __init__(self, index: int, config: Phi3Config, weight: Callable[[str], Weight], numerics: "Numerics"):
        p = f"blk.{index}."
        self.layer = index
        self.numerics = numerics
        self.n_head, self.n_head_kv, self.head_dim, self.n_rot = config.n_head, config.n_head_kv, config.head_dim, config.n_rot
        if config.fused_qkv:
            # Phi-3: one fused projection, output rows [q | k | v]
            self.projections = [weight(p + "attn_qkv.weight")]
        else:
            self.projections = [weight(p + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")]
        self.out = weight(p + "attn_output.weight")

    def __call__(self, x: np.ndarray, batch: Batch, cache: LayerCache, hooks: Hooks) -> np.ndarray:
        i, num, n_tok, d = self.layer, self.numerics, x.shape[0], self.head_dim
        q_dim, kv_dim = self.n_head * d, self.n_head_kv * d
        parts = [num.matmul(w, x) for w in self.projections]
        qkv = hooks(f"wqkv-{i}", parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))  # (n_tokens, q_dim + 2 kv_dim)
        q = qkv[:, :q_dim].reshape(n_tok, self.n_head, d)  # (n_tokens, n_head, head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n_tok, self.n_head_kv, d)  # (n_tokens, n_head_kv, head_dim)
        v = qkv[:, q_dim + kv_dim :].reshape(n_tok, self.n_head_kv, d)  # (n_tokens, n_head_kv, head_dim)
        q = hooks(f"Qcur-{i}", num.rope(q, batch.cos, batch.sin, self.n_rot))
        k = hooks(f"Kcur-{i}", num.rope(k, batch.cos, batch.sin, self.n_rot))
        v = hooks(f"Vcur-{i}", v)

        # store this step's keys and values; attend over everything cached so far
        num.store(cache.k[batch.start : batch.end], k)
        num.store(cache.v[batch.start : batch.end], v)
        first, last, end = batch.first_key, batch.positions, batch.end
        scores = num.attention_scores(q, cache.k, end, first, last, every=hooks.wants(f"kq-{i}"))
        scores = hooks(f"kq-{i}", scores)  # (n_head_kv, group, n_tokens, end)
        probs = hooks(f"kq_soft_max-{i}", num.softmax(scores, first, last))  # (n_head_kv, group, n_tokens, end)
        out = num.attention_values(probs, cache.v, end, first, last)  # (n_head_kv, group, n_tokens, head_dim)
        out = out.reshape(self.n_head, n_tok, d).transpose(1, 0, 2)  # (n_tokens, n_head, head_dim)
        merged = hooks(f"kqv_out-{i}", out.reshape(n_tok, q_dim))  # (n_tokens, n_head * head_dim)
        return num.matmul(self.out, merged)  # (n_tokens, n_embd)


# ======================================================================================
# MLP
# ======================================================================================


class MLP:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, index: int, up: Weight, down: Weight, n_ff: int, numerics: "Numerics"):
        self.gate_up = up  # Phi-3: gate and up fused in one weight, output rows [gate | up]
        self.down = down
        self.n_ff = n_ff
        self.index, self.numerics = index, numerics

    def __call__(self, x: np.ndarray, hooks: Hooks) -> np.ndarray:
        i, num = self.index, self.numerics
        gate_up = hooks(f"ffn_up-{i}", num.matmul(self.gate_up, x))  # (n_tokens, 2 n_ff)
        h = hooks(f"ffn_swiglu-{i}", num.swiglu(gate_up, self.n_ff))  # (n_tokens, n_ff)
        return num.matmul(self.down, h)  # (n_tokens, n_embd)


# ======================================================================================
# RMSNorm
# ======================================================================================


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight, per row."""

    def __init__(self, weight: np.ndarray, eps: float, numerics: "Numerics"):
        self.weight = weight  # (n_embd,)
        self.eps = np.float32(eps)
        self.numerics = numerics

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.numerics.rms_norm(x, self.weight, self.eps)


# ======================================================================================
# Rotary position embedding
# ======================================================================================


class RotaryEmbedding:
    """The angles of RoPE in the NEOX layout: within the first ``n_rot`` dims of a head,
    dim i is rotated with dim i + n_rot/2 by angle pos * base^(-2i / n_rot); dims from
    n_rot on pass through (partial rotary, Phi-4-mini: 96 of 128).

    Phi-3 LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): the angles are divided by per-dim
    factors, the "short" ones while the sequence fits the original context and the "long"
    ones beyond it, and cos / sin are scaled by the attention factor.
    """

    def __init__(
        self, config: Phi3Config, numerics: "Numerics", *, short_factors: np.ndarray | None,
        long_factors: np.ndarray | None, context: int | None = None,
    ):
        self.n_rot = config.n_rot
        self.base = config.rope_base
        self.orig_ctx = config.rope_orig_ctx
        self.short, self.long = short_factors, long_factors
        self.attn_factor = np.float32(config.longrope_attn_factor)
        self.numerics = numerics
        self.context = context  # when given, the factors follow the context size, not the sequence

    def use_long(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` positions takes the long factors (with a fixed
        ``context``, as llama.cpp decides it: whether that context exceeds the original)."""
        length = seq_len if self.context is None else self.context
        return self.long is not None and self.orig_ctx is not None and length > self.orig_ctx

    def angles(self, positions: np.ndarray, long: bool) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the rotation angles, (n_tokens, n_rot / 2) float32 each."""
        half = self.n_rot // 2
        factors = (self.long if long else self.short) if self.short is not None else np.ones(half, np.float32)
        cos, sin = self.numerics.rope_angles(positions, self.n_rot, self.base, factors)
        return cos * self.attn_factor, sin * self.attn_factor


def _physical_memory() -> int:
    """Bytes of RAM (a KV cache larger than this cannot be used; unknown: no limit)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**63
