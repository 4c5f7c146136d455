"""The Phi-3 transformer, read top to bottom.

    load() -> Model
      Model: KV cache, token embedding, n_layer x Block, final RMSNorm, output head
        Block: x + Attention(RMSNorm(x)); then x + MLP(RMSNorm(x))
          Attention: fused qkv -> RoPE on q, k -> causal attention over the KV cache -> output
          MLP: fused [gate | up] -> SiLU(gate) * up -> down
        RotaryEmbedding: NEOX-style rotation of the first n_rot dims of each head, LongRoPE

Shapes are commented as ``# (n_tokens, n_head, head_dim)``. Everything Phi-3-specific is
marked "Phi-3:". The matrix products go through :class:`phi3ref.weights.Weight`, which
reads the quantized blocks directly; ``numerics`` picks how (see weights.py):

* ``"exact"``: float32 everywhere, the numbers of HF transformers in float32;
* ``"ggml"``: llama.cpp's CPU numerics, which this module follows where they differ:
  Q scaled before the product, float16 KV cache, q and attention probabilities rounded
  to float16 for the two attention products, RoPE angles by repeated float32 products;
* ``"numpy"``: as "exact" with plain numpy matmuls (slow; the readable reference).
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import numba
import numpy as np

from . import ggml_ops
from .config import Phi3Config
from .errors import ModelBusyError, NonFiniteError
from .gguf_file import GGUFError, GGUFFile
from .isa import Level
from .isa import resolve as resolve_isa
from .tokenizer import Tokenizer
from .weights import NUMERICS, Weight

__all__ = ["KVCache", "Model", "check_finite", "load", "DEFAULT_MAX_CTX", "DEFAULT_UBATCH"]

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


# ======================================================================================
# KV cache
# ======================================================================================


@dataclass
class KVCache:
    """Keys (after RoPE) and values of every position seen, preallocated for ``n_ctx``."""

    k: np.ndarray  # (n_layer, n_ctx, n_head_kv, head_dim)
    v: np.ndarray  # (n_layer, n_ctx, n_head_kv, head_dim)

    @classmethod
    def allocate(cls, config: Phi3Config, n_ctx: int, dtype: type) -> "KVCache":
        # Position-major, so the positions written so far are one contiguous run per layer:
        # np.zeros maps zero pages lazily and only that run becomes resident (even with
        # transparent huge pages, which a head-major layout would touch everywhere).
        shape = (config.n_layer, n_ctx, config.n_head_kv, config.head_dim)
        return cls(np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype))

    @staticmethod
    def nbytes(config: Phi3Config, n_ctx: int, dtype: type) -> int:
        """Bytes of a cache for ``n_ctx`` positions (keys and values)."""
        return 2 * config.n_layer * n_ctx * config.n_head_kv * config.head_dim * np.dtype(dtype).itemsize

    @property
    def n_ctx(self) -> int:
        return self.k.shape[1]


# ======================================================================================
# The model
# ======================================================================================


class Model:
    """A Phi-3 family model over a memory-mapped GGUF file.

    ``logits(tokens)`` runs a fresh context and returns every position's logits;
    ``forward(tokens, start_pos)`` extends the cached context and returns the last
    position's logits (generation: prompt in one batched pass, then a token at a time).
    """

    def __init__(
        self,
        gguf: GGUFFile,
        *,
        n_ctx: int | None = None,
        numerics: str = "ggml",
        sliding_window: bool | None = None,
        isa: str | Level | None = None,
        n_ubatch: int = DEFAULT_UBATCH,
    ):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
        self.gguf = gguf
        self.config = config = Phi3Config.from_gguf(gguf)
        config.check_tensors(gguf)
        self.numerics = numerics
        self.ggml = numerics == "ggml"
        # which llama.cpp x86 build "ggml" follows (phi3ref.isa); chosen once, read by the kernels
        self.isa = resolve_isa(isa)
        if n_ctx is None:
            n_ctx = min(config.n_ctx_train, DEFAULT_MAX_CTX)
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if n_ctx > config.n_ctx_train:
            # as llama.cpp, allowed with a warning: positions past the trained context are
            # outside what the model has learned
            warnings.warn(
                f"n_ctx={n_ctx} is more than the {config.n_ctx_train} positions {gguf.path.name} was trained for",
                stacklevel=3,
            )
        cache_bytes = KVCache.nbytes(config, n_ctx, np.float16 if self.ggml else np.float32)
        if cache_bytes > _physical_memory():
            raise ValueError(
                f"n_ctx={n_ctx} needs a KV cache of {cache_bytes / 2**30:,.1f} GiB, more than this machine's "
                f"{_physical_memory() / 2**30:,.1f} GiB of memory"
            )
        self.n_ctx = n_ctx
        if not isinstance(n_ubatch, int) or isinstance(n_ubatch, bool) or n_ubatch <= 0:
            raise ValueError(f"n_ubatch must be a positive integer, got {n_ubatch!r}")
        self.n_ubatch = n_ubatch
        # Phi-3 files declare a sliding window (2047 for Phi-3-mini-4k); transformers
        # applies it, llama.cpp ignores it ("Phi SWA is currently disabled"): by default
        # "exact" / "numpy" apply it and "ggml" does not.
        if sliding_window is None:
            sliding_window = not self.ggml
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
            short_factors=vector("rope_factors_short.weight") if config.has_rope_factors else None,
            long_factors=vector("rope_factors_long.weight") if config.has_rope_factors else None,
            ggml=self.ggml,
            # llama.cpp picks the LongRoPE factors once, by its context size (which it
            # rounds up to a multiple of 256); transformers by the sequence's length
            context=-(-n_ctx // 256) * 256 if self.ggml else None,
        )
        self.blocks = [Block(i, config, weight, vector, self) for i in range(config.n_layer)]
        self.output_norm = RMSNorm(vector("output_norm.weight"), config.rms_eps, self.ggml)
        # Tied embeddings (Phi-4-mini): the output head is the token embedding matrix.
        self.output = weight("output.weight") if "output.weight" in gguf.tensors else self.token_embd

        # Every matrix a forward pass reads in full is mapped in now (the token embedding,
        # of which a pass reads a few rows, stays lazy unless it is the output head too).
        for name, info in gguf.tensors.items():
            if len(info.shape) == 2 and info.supported and (name != "token_embd.weight" or self.output is self.token_embd):
                gguf.populate(name)

        try:
            self.cache = KVCache.allocate(config, n_ctx, np.float16 if self.ggml else np.float32)
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
        self._version = 0
        # held by a non-streaming generation from its first pass to its last: threads that
        # generate on one model take turns
        self.generation_lock = threading.Lock()
        # trace(): intermediate results by llama.cpp's tensor names ("attn_norm-0", ...)
        self._trace: dict[str, np.ndarray] | None = None
        self._tokenizer: Tokenizer | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> "Tokenizer":
        """The tokenizer: from the file's own vocabulary unless load() was given another."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.gguf)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: "Tokenizer") -> None:
        self._tokenizer = tokenizer

    @property
    def context_version(self) -> int:
        """A number that changes whenever the cached context does (a pass, a reset)."""
        return self._version

    def cached(self) -> tuple[list[int], int]:
        """The tokens the cache holds and the :attr:`context_version`, read together (a
        generation resumes from them: see :meth:`forward`'s ``expect_version``)."""
        with self._lock:
            return self.tokens, self._version

    def reset(self) -> None:
        """Forget the cached context."""
        with self._lock:
            self.tokens = []
            self.cache_uses_long_rope = False
            self._version += 1

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position for ``tokens`` in a fresh context: (len(tokens), n_vocab) float32."""
        ids = self._check_tokens(tokens, 0)
        with self._lock, _interrupts_as_keyboard_interrupt():
            self.reset()
            return self._run(ids, 0, all_logits=True)

    def trace(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        """Run ``tokens`` in a fresh context and return the intermediate results of every
        layer, named as llama.cpp names its graph nodes (``attn_norm-0``, ``wqkv-0``, ``kq-0``,
        ``kq_soft_max-0``, ``kqv_out-0``, ``ffn_norm-0``, ``ffn_up-0``, ``ffn_swiglu-0``,
        ``ffn_out-0``, ``l_out-0``, ..., ``result_norm``, ``result_output``), plus
        ``attn_out-0`` (the attention output after its projection, unnamed in llama.cpp).
        The tokens run as one batch: at most ``n_ubatch`` of them."""
        if len(tokens) > self.n_ubatch:
            raise ValueError(f"trace() runs one batch: {len(tokens)} tokens is more than n_ubatch={self.n_ubatch}")
        with self._lock:
            self._trace = {}
            try:
                self.logits(tokens)
                return self._trace
            finally:
                self._trace = None

    @property
    def tracing(self) -> bool:
        return self._trace is not None

    def record(self, name: str, value: np.ndarray) -> np.ndarray:
        """Keep a copy of ``value`` under ``name`` while tracing; returns ``value``."""
        if self._trace is not None:
            self._trace[name] = np.array(value, dtype=np.float32)
        return value

    def forward(self, tokens: Sequence[int], start_pos: int, *, expect_version: int | None = None) -> np.ndarray:
        """Process ``tokens`` at positions ``start_pos...`` (the cache must hold the first
        ``start_pos`` positions; anything after is overwritten). Returns the last position's
        logits, (n_vocab,) float32.

        A pass that does not finish (an error, Ctrl-C) leaves ``tokens`` and the cache in
        agreement: appending (``start_pos == len(tokens)``) leaves the model as it was; an
        overwrite leaves the first ``start_pos`` positions. ``expect_version``: refuse
        (:class:`ModelBusyError`) unless :attr:`context_version` still has this value, so
        that a caller continuing its own context notices another caller's pass; after a
        successful pass the version is ``expect_version + 1``."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
            raise TypeError(f"start_pos must be an integer, got {start_pos!r}")
        ids = self._check_tokens(tokens, start_pos)
        with self._lock, _interrupts_as_keyboard_interrupt():
            if expect_version is not None and expect_version != self._version:
                raise ModelBusyError(
                    "the model's context was changed by another call while a generation was using it "
                    "(two generations at once on one model: finish or close one stream before starting "
                    "another, or give each thread its own Model)"
                )
            if not 0 <= start_pos <= len(self.tokens):
                raise ValueError(f"start_pos {start_pos} is past the {len(self.tokens)} cached positions")
            return self._run(ids, int(start_pos), all_logits=False)[-1]

    # -- the forward pass --------------------------------------------------------------

    def _check_tokens(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        try:
            ids = np.asarray([operator.index(t) for t in tokens], dtype=object)
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

    def _run(self, ids: np.ndarray, start_pos: int, all_logits: bool) -> np.ndarray:
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
                # the full length), so the cached keys are recomputed with them first.
                self.tokens = []  # no cached key is valid until they all are
                self._batches(np.asarray(kept, dtype=np.int64), 0, long_rope, all_logits=None)
            self.cache_uses_long_rope = long_rope
            self.tokens = kept
        logits = self._batches(ids, start_pos, long_rope, all_logits)
        self.tokens = kept + ids.tolist()
        return logits

    def _batches(self, ids: np.ndarray, start_pos: int, long_rope: bool, all_logits: bool | None) -> np.ndarray:
        """Run ``ids`` from ``start_pos`` in batches of at most ``n_ubatch`` tokens, as
        llama.cpp splits a prompt into micro-batches (the kernels it picks, and so the
        sums, depend on a batch's size). Logits of every position (``all_logits``), of the
        last one, or (None) of none: like llama.cpp, the last layer's feed-forward and the
        head run only for the positions whose logits are wanted."""
        outputs = []
        for s in range(0, ids.size, self.n_ubatch):
            batch = ids[s : s + self.n_ubatch]
            if all_logits:
                keep = slice(None)
            elif all_logits is None or s + self.n_ubatch < ids.size:
                keep = slice(0, 0)
            else:
                keep = slice(-1, None)
            x = self._layers(batch, start_pos + s, long_rope, keep)  # (kept positions, n_embd)
            if x.shape[0]:
                x = self.record("result_norm", self.output_norm(x))
                logits = self.output.matmul(x, self.numerics, self.isa)  # (kept, n_vocab)
                outputs.append(self.record("result_output", check_finite(logits, "result_output", f"the product with {self.output.name}")))
        return np.concatenate(outputs) if outputs else np.empty((0, self.config.n_vocab), np.float32)

    def _layers(self, ids: np.ndarray, start_pos: int, long_rope: bool, keep: slice) -> np.ndarray:
        positions = np.arange(start_pos, start_pos + ids.size)
        cos, sin = self.rope.cos_sin(positions, long_rope)  # (n_tokens, n_rot / 2) each
        x = check_finite(self.token_embd.rows(ids), "inp_embd", "rows of token_embd.weight")  # (n_tokens, n_embd)
        for block in self.blocks[:-1]:
            x = block(x, positions, cos, sin)
        return self.blocks[-1](x, positions, cos, sin, keep)


# ======================================================================================
# Transformer block
# ======================================================================================


class Block:
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, index: int, config: Phi3Config, weight, vector, model: Model):
        p = f"blk.{index}."
        self.attn_norm = RMSNorm(vector(p + "attn_norm.weight"), config.rms_eps, model.ggml)
        self.attn = Attention(index, config, weight, model)
        self.ffn_norm = RMSNorm(vector(p + "ffn_norm.weight"), config.rms_eps, model.ggml)
        self.mlp = MLP(index, weight(p + "ffn_up.weight"), weight(p + "ffn_down.weight"), config.n_ff, model)
        self.index, self.model = index, model

    def __call__(self, x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, keep: slice = slice(None)) -> np.ndarray:
        """The block for the tokens at ``positions``; ``keep`` selects the rows that go on
        through the feed-forward (the last layer keeps only the positions whose logits are
        wanted, as llama.cpp does)."""
        i, record = self.index, self.model.record
        h = record(f"attn_norm-{i}", self.attn_norm(x))
        x = (x + record(f"attn_out-{i}", self.attn(h, positions, cos, sin)))[keep]  # (kept tokens, n_embd)
        check_finite(x, f"attn_out-{i}", f"layer {i}'s attention, blk.{i}.attn_*")
        h = record(f"ffn_norm-{i}", self.ffn_norm(x))
        x = record(f"l_out-{i}", x + record(f"ffn_out-{i}", self.mlp(h)))  # (n_tokens, n_embd)
        return check_finite(x, f"l_out-{i}", f"layer {i}'s feed-forward, blk.{i}.ffn_*")


# ======================================================================================
# Attention
# ======================================================================================


class Attention:
    """Causal multi-head attention with grouped KV heads over the model's KV cache."""

    def __init__(self, index: int, config: Phi3Config, weight, model: Model):
        p = f"blk.{index}."
        self.layer = index
        self.model = model
        self.n_head, self.n_head_kv, self.head_dim = config.n_head, config.n_head_kv, config.head_dim
        if config.fused_qkv:
            # Phi-3: one fused projection, output rows [q | k | v]
            self.qkv = weight(p + "attn_qkv.weight")
            self.q = self.k = self.v = None
        else:
            self.qkv = None
            self.q, self.k, self.v = (weight(p + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"))
        self.out = weight(p + "attn_output.weight")

    def _project(self, x: np.ndarray, numerics: str, isa: Level) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        if self.qkv is not None:
            qkv = self.qkv.matmul(x, numerics, isa)  # (n_tokens, q_dim + 2 kv_dim)
            return qkv[:, :q_dim], qkv[:, q_dim : q_dim + kv_dim], qkv[:, q_dim + kv_dim :]
        return self.q.matmul(x, numerics, isa), self.k.matmul(x, numerics, isa), self.v.matmul(x, numerics, isa)

    def __call__(self, x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        model = self.model
        n_tok = x.shape[0]
        q, k, v = self._project(x, model.numerics, model.isa)
        if model.tracing:
            model.record(f"wqkv-{self.layer}", np.concatenate([q, k, v], axis=1))
        q = q.reshape(n_tok, self.n_head, self.head_dim)  # (n_tokens, n_head, head_dim)
        k = k.reshape(n_tok, self.n_head_kv, self.head_dim)  # (n_tokens, n_head_kv, head_dim)
        v = v.reshape(n_tok, self.n_head_kv, self.head_dim)  # (n_tokens, n_head_kv, head_dim)
        q = model.rope.apply(q, cos, sin)
        k = model.rope.apply(k, cos, sin)
        # 1 / sqrt(head_dim): transformers in double, then float32; llama.cpp 1.0f / sqrtf()
        # (for a head size of 96 they differ in the last bit)
        if model.ggml:
            scale = np.float32(1) / np.sqrt(np.float32(self.head_dim))
        else:
            scale = np.float32(1.0 / math.sqrt(self.head_dim))

        # store this step's keys and values; attend over everything cached so far
        start, end = int(positions[0]), int(positions[-1]) + 1
        cache = model.cache
        if model.ggml:
            ggml_ops.store_f16(cache.k[self.layer, start:end], k)  # rounded as ggml rounds to float16
            ggml_ops.store_f16(cache.v[self.layer, start:end], v)
        else:
            cache.k[self.layer, start:end] = k
            cache.v[self.layer, start:end] = v

        # causal mask, narrowed by the sliding window when one applies: the token at
        # positions[t] sees the keys first_key[t] .. positions[t]
        if model.window is None:
            first_key = np.zeros_like(positions)
        else:
            first_key = np.maximum(positions - model.window + 1, 0)

        group = self.n_head // self.n_head_kv  # query heads per KV head
        qh = q.transpose(1, 0, 2).reshape(self.n_head_kv, group * n_tok, self.head_dim)  # (n_head_kv, group * n_tokens, head_dim)
        if model.ggml:
            # llama.cpp scales q before the product, then converts it to the cache's float16
            qh = ggml_ops.round_to_f16(np.ascontiguousarray(qh) * scale)
            # The mask is applied inside the kernels (rows cycle over the tokens): masked
            # scores are not computed unless traced (llama.cpp's kq holds them all).
            seen = (None, None) if model.tracing else (first_key, positions)
            # llama.cpp's kernels for both products differ for one token and for a batch
            isa, batched = model.isa, n_tok >= 2
            scores = ggml_ops.attention_scores(qh, cache.k[self.layer], end, isa, batched=batched, first=seen[0], last=seen[1])  # (n_head_kv, group * n_tokens, end)
            model.record(f"kq-{self.layer}", scores.reshape(self.n_head_kv, group, n_tok, end))
            probs = ggml_ops.softmax(scores, isa, first_key, positions)  # (n_head_kv, group * n_tokens, end)
            model.record(f"kq_soft_max-{self.layer}", probs.reshape(self.n_head_kv, group, n_tok, end))
            probs = ggml_ops.round_to_f16(probs)  # converted for the float16 V product
            out = ggml_ops.attention_values(probs, cache.v[self.layer], end, isa, batched=batched, first=first_key, last=positions)  # (n_head_kv, group * n_tokens, head_dim)
        else:
            keys = cache.k[self.layer, :end].transpose(1, 0, 2)  # (n_head_kv, end, head_dim)
            values = cache.v[self.layer, :end].transpose(1, 0, 2)  # (n_head_kv, end, head_dim)
            key_pos = np.arange(end)
            allowed = (key_pos >= first_key[:, None]) & (key_pos <= positions[:, None])  # (n_tokens, end)
            mask = np.where(allowed, np.float32(0), np.float32(-np.inf))
            scores = (qh @ keys.transpose(0, 2, 1)) * scale
            scores = model.record(f"kq-{self.layer}", scores.reshape(self.n_head_kv, group, n_tok, end)) + mask  # (n_head_kv, group, n_tokens, end)
            probs = model.record(f"kq_soft_max-{self.layer}", softmax(scores))
            out = probs.reshape(self.n_head_kv, group * n_tok, end) @ values  # (n_head_kv, group * n_tokens, head_dim)
        out = out.reshape(self.n_head, n_tok, self.head_dim).transpose(1, 0, 2)  # (n_tokens, n_head, head_dim)
        merged = model.record(f"kqv_out-{self.layer}", out.reshape(n_tok, self.n_head * self.head_dim))  # (n_tokens, n_head * head_dim)
        return self.out.matmul(merged, model.numerics, model.isa)  # (n_tokens, n_embd)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (masked entries are -inf)."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ======================================================================================
# MLP
# ======================================================================================


class MLP:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, index: int, up: Weight, down: Weight, n_ff: int, model: Model):
        self.gate_up = up  # Phi-3: gate and up fused in one weight, output rows [gate | up]
        self.down = down
        self.n_ff = n_ff
        self.index, self.model = index, model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        numerics, record = self.model.numerics, self.model.record
        gate_up = record(f"ffn_up-{self.index}", self.gate_up.matmul(x, numerics, self.model.isa))  # (n_tokens, 2 n_ff)
        if numerics == "ggml":
            h = ggml_ops.swiglu(gate_up, self.n_ff, self.model.isa)  # (n_tokens, n_ff)
        else:
            gate, up = gate_up[:, : self.n_ff], gate_up[:, self.n_ff :]  # (n_tokens, n_ff) each
            h = silu(gate) * up
        record(f"ffn_swiglu-{self.index}", h)
        return self.down.matmul(h, numerics, self.model.isa)  # (n_tokens, n_embd)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x << 0: silu -> -0
        return x / (np.float32(1) + np.exp(-x))


# ======================================================================================
# RMSNorm
# ======================================================================================


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight, per row."""

    def __init__(self, weight: np.ndarray, eps: float, ggml: bool):
        self.weight = weight  # (n_embd,)
        self.eps = np.float32(eps)
        self.ggml = ggml

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.ggml:
            return ggml_ops.rms_norm(x, self.weight, self.eps)
        mean_sq = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
        scale = 1 / np.sqrt(mean_sq + self.eps)  # (n_tokens, 1), torch.rsqrt
        return (x * scale) * self.weight


# ======================================================================================
# Rotary position embedding
# ======================================================================================


class RotaryEmbedding:
    """RoPE in the NEOX layout: within the first ``n_rot`` dims of a head, dim i is rotated
    with dim i + n_rot/2 by angle pos * inv_freq[i]; dims from n_rot on pass through
    (partial rotary, Phi-4-mini: 96 of 128).

    Phi-3 LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): inv_freq is divided by per-dim
    factors, the "short" ones while the sequence fits the original context and the "long"
    ones beyond it, and cos / sin are scaled by the attention factor.
    """

    def __init__(
        self, config: Phi3Config, *, short_factors: np.ndarray | None, long_factors: np.ndarray | None, ggml: bool,
        context: int | None = None,
    ):
        self.n_rot = config.n_rot
        self.base = config.rope_base
        self.orig_ctx = config.rope_orig_ctx
        self.short, self.long = short_factors, long_factors
        self.attn_factor = np.float32(config.longrope_attn_factor)
        self.ggml = ggml
        self.context = context  # when given, the factors follow the context size, not the sequence

    def use_long(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` positions takes the long factors (with a fixed
        ``context``, as llama.cpp decides it: whether that context exceeds the original)."""
        length = seq_len if self.context is None else self.context
        return self.long is not None and self.orig_ctx is not None and length > self.orig_ctx

    def cos_sin(self, positions: np.ndarray, long: bool) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the rotation angles, (n_tokens, n_rot / 2) float32 each."""
        half = self.n_rot // 2
        factors = (self.long if long else self.short) if self.short is not None else np.ones(half, np.float32)
        if self.ggml:
            # ggml_rope_cache_init: theta = pos * base^(-2i/n_rot), built by repeated float32
            # products, divided by the factor; cosf / sinf times the attention factor.
            theta_scale = np.float32(self.base) ** np.float32(-2.0 / self.n_rot)
            theta = np.empty((positions.size, half), dtype=np.float32)
            running = positions.astype(np.float32)
            for i in range(half):
                theta[:, i] = running / factors[i]
                running = running * theta_scale
        else:
            # transformers: inv_freq = 1 / (factor * base^(2i/n_rot)) in float32
            exponent = np.arange(0, self.n_rot, 2, dtype=np.float32) / np.float32(self.n_rot)
            inv_freq = (np.float32(1) / (factors * np.float32(self.base) ** exponent)).astype(np.float32)
            theta = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (n_tokens, n_rot / 2)
        if self.ggml:
            cos, sin = ggml_ops.cos_sin(theta)  # the C library's cosf / sinf
        else:
            cos, sin = np.cos(theta.astype(np.float64)).astype(np.float32), np.sin(theta.astype(np.float64)).astype(np.float32)
        return cos * self.attn_factor, sin * self.attn_factor

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate x (n_tokens, n_heads, head_dim) by the angles of each token."""
        if self.ggml:
            # ggml's rotate_pairs, compiled with contraction: the first product of each
            # line is fused into the addition of the second (rounded) one
            return ggml_ops.rope(x, cos, sin, self.n_rot)
        half = self.n_rot // 2
        c, s = cos[:, None, :], sin[:, None, :]  # (n_tokens, 1, n_rot / 2)
        x1, x2 = x[..., :half], x[..., half : self.n_rot]  # (n_tokens, n_heads, n_rot / 2) each
        out = x.copy()
        out[..., :half] = x1 * c - x2 * s
        out[..., half : self.n_rot] = x2 * c + x1 * s
        return out


# ======================================================================================
# Loading
# ======================================================================================


def _physical_memory() -> int:
    """Bytes of RAM (a KV cache larger than this cannot be used; unknown: no limit)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**63


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    filename: str | None = None,
    revision: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    n_ctx: int | None = None,
    numerics: str = "ggml",
    threads: int | None = None,
    sliding_window: bool | None = None,
    isa: str | Level | None = None,
    n_ubatch: int = DEFAULT_UBATCH,
) -> Model:
    """Open a Phi-3 family GGUF file as a :class:`Model`.

    ``path``: a local .gguf file, or a Hugging Face Hub repository id (default
    ``microsoft/Phi-3-mini-4k-instruct-gguf``; ``filename`` / ``revision`` pick the file),
    downloaded into huggingface_hub's cache. The file is memory-mapped and its weight
    matrices mapped in at load (read from disk if need be); no weight is decoded ahead of use. ``tokenizer``: None uses the file's own vocabulary; a path to a
    ``tokenizer.json``, or ``"hub"`` to fetch the base model's from the Hub. ``n_ctx`` is the
    KV cache size (default: the model's context, at most :data:`DEFAULT_MAX_CTX`).
    ``numerics``: ``"ggml"`` (llama.cpp's, the default), ``"exact"`` (float32, transformers'
    numbers) or ``"numpy"`` (exact, plain numpy). ``threads``: Numba threads (default: all
    cores). ``sliding_window``: apply the file's sliding window (default: with "exact" and
    "numpy", as transformers does; not with "ggml", as llama.cpp does not).
    ``isa``: the instruction-set level of the llama.cpp build that ``numerics="ggml"``
    reproduces (``"avx2"``, ``"avx512"``, ``"avx512bf16"``; default $PHI3REF_ISA, else what a
    native build on this CPU uses; see :mod:`phi3ref.isa`). ``n_ubatch``: prompts run in
    batches of at most this many tokens, as llama.cpp's micro-batches (default 512, its
    default).
    """
    from . import hub

    if threads is not None:
        if not isinstance(threads, int) or not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be an integer from 1 to {numba.config.NUMBA_NUM_THREADS}, got {threads!r}")
        numba.set_num_threads(threads)
    local = hub.resolve_model(path or hub.DEFAULT_REPO, filename=filename, revision=revision)
    gguf = GGUFFile(local)
    try:
        model = Model(gguf, n_ctx=n_ctx, numerics=numerics, sliding_window=sliding_window, isa=isa, n_ubatch=n_ubatch)
    except (GGUFError, ValueError):
        gguf.close()
        raise
    if tokenizer == "hub":
        model.tokenizer = Tokenizer.from_file(hub.tokenizer_json(str(path or hub.DEFAULT_REPO), revision), gguf=gguf)
    elif tokenizer is not None:
        model.tokenizer = Tokenizer.from_file(tokenizer, gguf=gguf)
    return model
