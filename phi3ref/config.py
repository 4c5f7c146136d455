"""Phi-3 hyperparameters from GGUF metadata, and the tensor layout they imply.

llama.cpp's converter writes every Phi-3 family model (Phi-3-mini-4k/128k, Phi-3.5-mini,
Phi-3-medium, Phi-4-mini) with ``general.architecture = "phi3"``; the variants differ
only in the values below and in which optional tensors are present.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .gguf_file import GGUFError, GGUFFile

__all__ = ["ARCHITECTURE", "Phi3Config", "TensorSpec"]

ARCHITECTURE = "phi3"
# Bounds of the integer hyperparameters: llama.cpp keeps them in int32, and refuses more
# than LLAMA_MAX_LAYERS blocks (a file claiming millions would otherwise make phi3ref
# build millions of tensor specs before noticing the first missing tensor).
MAX_INT = 2**31 - 1
MAX_LAYERS = 512


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the model expects: name and numpy-order shape."""

    name: str
    shape: tuple[int, ...]
    required: bool = True


@dataclass(frozen=True)
class Phi3Config:
    """Hyperparameters of a Phi-3 family model (GGUF keys ``phi3.*``)."""

    n_vocab: int
    n_ctx_train: int  # phi3.context_length: the longest context the model was made for
    n_embd: int  # phi3.embedding_length
    n_ff: int  # phi3.feed_forward_length (the SwiGLU hidden size)
    n_layer: int  # phi3.block_count
    n_head: int  # phi3.attention.head_count
    n_head_kv: int  # phi3.attention.head_count_kv (< n_head: grouped-query attention)
    head_dim: int  # phi3.attention.key_length, else n_embd // n_head
    n_rot: int  # phi3.rope.dimension_count: rotated dims per head (< head_dim: partial rotary)
    rope_base: float  # phi3.rope.freq_base
    rms_eps: float  # phi3.attention.layer_norm_rms_epsilon
    sliding_window: int | None = None  # phi3.attention.sliding_window
    # Phi-3-specific LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): per-dimension frequency
    # factors (tensors rope_factors_short / rope_factors_long) switched at this length,
    rope_orig_ctx: int | None = None  # phi3.rope.scaling.original_context_length
    # and cos/sin scaled by this factor (derived from the lengths if the file has none).
    rope_attn_factor: float | None = None  # phi3.rope.scaling.attn_factor
    has_rope_factors: bool = False
    tied_embeddings: bool = False  # no `output.weight`: the head reuses token_embd
    fused_qkv: bool = True  # attn_qkv (llama.cpp's converter) vs separate attn_q/k/v

    @property
    def partial_rotary(self) -> bool:
        return self.n_rot < self.head_dim

    @property
    def gqa(self) -> bool:
        return self.n_head_kv < self.n_head

    @property
    def longrope(self) -> bool:
        return self.has_rope_factors

    @property
    def longrope_attn_factor(self) -> float:
        """The LongRoPE cos/sin scale: the file's value, else sqrt(1 + ln(s)/ln(orig)) with
        s = n_ctx_train / orig (as transformers and llama.cpp's converter compute it)."""
        if self.rope_attn_factor is not None:
            return self.rope_attn_factor
        if not self.has_rope_factors or not self.rope_orig_ctx:
            return 1.0
        scale = self.n_ctx_train / self.rope_orig_ctx
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1.0 + math.log(scale) / math.log(self.rope_orig_ctx))

    @property
    def n_params(self) -> int:
        """Parameter count implied by the shapes (the head counted once if tied)."""
        return sum(math.prod(spec.shape) for spec in self.tensor_specs() if spec.required)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> "Phi3Config":
        """Read the hyperparameters of a ``phi3`` GGUF (tensors are not needed: a vocab-only
        file has them too). ``GGUFError`` for another architecture or inconsistent values."""
        arch = gf.architecture
        if arch is None:
            raise GGUFError(f"{gf.path}: general.architecture is missing: not a model file")
        if arch != ARCHITECTURE:
            raise GGUFError(f"{gf.path}: architecture is {arch!r}; phi3ref runs {ARCHITECTURE!r} models (the Phi-3 family)")

        def key(name: str) -> str:
            return f"{ARCHITECTURE}.{name}"

        def integer(name: str, default: int | None = None, lo: int = 1, hi: int = MAX_INT) -> int:
            """An integer key (required unless a default is given), refused outside lo..hi."""
            value = gf.get_int(key(name)) if default is None else gf.get_int(key(name), default)
            if not lo <= value <= hi:
                raise GGUFError(f"{gf.path}: {key(name)} = {value} is out of range (it must be from {lo} to {hi})")
            return int(value)

        def real(name: str, default: float | None = None) -> float:
            """A positive number, finite and not 0 as float32 (required unless a default is
            given): the forward pass computes with it in float32, as llama.cpp does."""
            value = gf.get_float(key(name)) if default is None else gf.get_float(key(name), default)
            with np.errstate(over="ignore", under="ignore"):
                as_f32 = np.float32(value)
            if not (math.isfinite(value) and value > 0 and np.isfinite(as_f32) and as_f32 > 0):
                raise GGUFError(f"{gf.path}: {key(name)} = {value} must be a positive finite number that float32 holds "
                                f"(from {np.finfo(np.float32).smallest_subnormal:.1e} to {np.finfo(np.float32).max:.1e})")
            return float(value)

        n_embd = integer("embedding_length")
        n_head = integer("attention.head_count")
        n_head_kv = integer("attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise GGUFError(f"{gf.path}: {n_head} attention heads cannot be shared among {n_head_kv} KV heads")
        if key("attention.key_length") in gf:
            head_dim = integer("attention.key_length")
        elif n_embd % n_head:
            raise GGUFError(f"{gf.path}: embedding length {n_embd} is not a multiple of the {n_head} heads")
        else:
            head_dim = n_embd // n_head
        value_dim = integer("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise GGUFError(f"{gf.path}: key length {head_dim} != value length {value_dim} is not a Phi-3 layout")
        n_rot = integer("rope.dimension_count", head_dim, hi=head_dim)
        if n_rot % 2:
            raise GGUFError(f"{gf.path}: {key('rope.dimension_count')} = {n_rot} must be even (RoPE rotates pairs)")

        # The vocabulary: the embedding's rows, the tokenizer's tokens and phi3.vocab_size
        # must agree where the file has them (a token without text, or text without a row,
        # would fail mid-generation).
        sizes = {}
        if key("vocab_size") in gf:
            sizes[key("vocab_size")] = integer("vocab_size")
        if "tokenizer.ggml.tokens" in gf:
            sizes["tokenizer.ggml.tokens"] = len(gf.get_array("tokenizer.ggml.tokens"))
        if "token_embd.weight" in gf.tensors:
            sizes["token_embd.weight"] = gf.tensors["token_embd.weight"].shape[0]
        if not sizes:
            raise GGUFError(f"{gf.path}: cannot tell the vocabulary size (no {key('vocab_size')}, tokens or token_embd)")
        if len(set(sizes.values())) > 1:
            told = ", ".join(f"{where}: {n}" for where, n in sizes.items())
            raise GGUFError(f"{gf.path}: the vocabulary sizes disagree ({told})")
        n_vocab = next(iter(sizes.values()))
        if not 1 <= n_vocab <= MAX_INT:
            raise GGUFError(f"{gf.path}: a vocabulary of {n_vocab} tokens is out of range")

        n_ctx_train = integer("context_length")
        sliding_window = integer("attention.sliding_window", 0, lo=0) or None  # 0: none
        orig_ctx = integer("rope.scaling.original_context_length", 0, lo=0) or None
        if orig_ctx == 1:  # LongRoPE divides by log(original length)
            raise GGUFError(f"{gf.path}: {key('rope.scaling.original_context_length')} = 1 is not a context length")
        # an attention factor of 0 is llama.cpp's "not set"
        attn_factor = real("rope.scaling.attn_factor") if gf.get_float(key("rope.scaling.attn_factor"), 0.0) else None
        has_long = "rope_factors_long.weight" in gf.tensors
        has_short = "rope_factors_short.weight" in gf.tensors
        if has_long != has_short:
            present = "rope_factors_long" if has_long else "rope_factors_short"
            raise GGUFError(f"{gf.path}: LongRoPE needs both rope_factors_long and rope_factors_short; only {present} is present")
        if has_long and not orig_ctx:
            raise GGUFError(f"{gf.path}: LongRoPE factors present but {key('rope.scaling.original_context_length')} is missing")

        return cls(
            n_vocab=n_vocab,
            n_ctx_train=n_ctx_train,
            n_embd=n_embd,
            n_ff=integer("feed_forward_length"),
            n_layer=integer("block_count", hi=MAX_LAYERS),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_base=real("rope.freq_base", 10000.0),
            rms_eps=real("attention.layer_norm_rms_epsilon"),
            sliding_window=sliding_window,
            rope_orig_ctx=orig_ctx,
            rope_attn_factor=attn_factor,
            has_rope_factors=has_long,
            # (a vocab-only file has neither tensor: not "tied")
            tied_embeddings="token_embd.weight" in gf.tensors and "output.weight" not in gf.tensors,
            fused_qkv="blk.0.attn_q.weight" not in gf.tensors,
        )

    # -- the tensor layout -----------------------------------------------------------------

    def tensor_specs(self) -> list[TensorSpec]:
        """Every tensor of the model, in file order, with numpy-order shapes."""
        e, q_dim, kv_dim = self.n_embd, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        specs = [TensorSpec("token_embd.weight", (self.n_vocab, e))]
        if self.has_rope_factors:
            specs += [
                TensorSpec("rope_factors_long.weight", (self.n_rot // 2,)),
                TensorSpec("rope_factors_short.weight", (self.n_rot // 2,)),
            ]
        for i in range(self.n_layer):
            p = f"blk.{i}."
            specs.append(TensorSpec(p + "attn_norm.weight", (e,)))
            if self.fused_qkv:
                # Phi-3: one fused projection whose rows are [q | k | v]
                specs.append(TensorSpec(p + "attn_qkv.weight", (q_dim + 2 * kv_dim, e)))
            else:
                specs += [
                    TensorSpec(p + "attn_q.weight", (q_dim, e)),
                    TensorSpec(p + "attn_k.weight", (kv_dim, e)),
                    TensorSpec(p + "attn_v.weight", (kv_dim, e)),
                ]
            specs += [
                TensorSpec(p + "attn_output.weight", (e, q_dim)),
                TensorSpec(p + "ffn_norm.weight", (e,)),
                # Phi-3: gate and up projections fused, rows [gate | up]
                TensorSpec(p + "ffn_up.weight", (2 * self.n_ff, e)),
                TensorSpec(p + "ffn_down.weight", (e, self.n_ff)),
            ]
        specs.append(TensorSpec("output_norm.weight", (e,)))
        specs.append(TensorSpec("output.weight", (self.n_vocab, e), required=not self.tied_embeddings))
        return specs

    def transformers_names(self) -> dict[str, str]:
        """transformers' ``Phi3ForCausalLM`` parameter names -> this layout's tensor names
        (the same matrices in the same numpy order: Phi-3's fused ``qkv_proj`` is
        ``attn_qkv``, its fused ``gate_up_proj`` is ``ffn_up``; with separate
        ``attn_q`` / ``attn_k`` / ``attn_v`` the ``qkv_proj`` rows are the three stacked,
        which this map leaves out). No ``lm_head`` when the embeddings are tied."""
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
        if not self.tied_embeddings:
            names["lm_head.weight"] = "output.weight"
        for i in range(self.n_layer):
            hf, g = f"model.layers.{i}.", f"blk.{i}."
            names.update({
                hf + "input_layernorm.weight": g + "attn_norm.weight",
                hf + "self_attn.o_proj.weight": g + "attn_output.weight",
                hf + "post_attention_layernorm.weight": g + "ffn_norm.weight",
                hf + "mlp.gate_up_proj.weight": g + "ffn_up.weight",
                hf + "mlp.down_proj.weight": g + "ffn_down.weight",
            })
            if self.fused_qkv:
                names[hf + "self_attn.qkv_proj.weight"] = g + "attn_qkv.weight"
        return names

    def check_tensors(self, gf: GGUFFile) -> None:
        """Check that ``gf`` holds every tensor this config needs, with the right shape and
        a type phi3ref computes with. ``GGUFError`` naming the first offending tensor."""
        for spec in self.tensor_specs():
            if spec.name not in gf.tensors:
                if spec.required:
                    raise GGUFError(f"{gf.path}: tensor {spec.name!r} is missing")
                continue
            info = gf.tensors[spec.name]
            if info.shape != spec.shape:
                raise GGUFError(
                    f"{gf.path}: tensor {spec.name!r} has shape {list(info.shape)}, but the config "
                    f"(n_embd={self.n_embd}, n_ff={self.n_ff}, n_head={self.n_head}, n_head_kv={self.n_head_kv}, "
                    f"head_dim={self.head_dim}, n_vocab={self.n_vocab}) needs {list(spec.shape)}"
                )
            if not info.supported:
                gf.tensor_bytes(spec.name)  # raises the unsupported-type error
