"""Other runtimes' logits for the same GGUF file, to compare phi3ref against.

* :func:`transformers_logits`: HF transformers' ``Phi3ForCausalLM`` in float32, built from
  the file's config and phi3ref-dequantized weights. (transformers' own GGUF loader does
  not read partial rotary, LongRoPE or the sliding window, so the model is assembled here;
  its weights are bit-identical to what that loader produces — see the tests.)
* :func:`llama_cpp_logits`: llama.cpp through llama-cpp-python, every position's logits.
* :func:`llama_cpp_trace`: llama.cpp's intermediate tensors by name, to hold beside
  :meth:`phi3ref.Model.trace` layer by layer.
* :func:`compare`: max |Δ|, top-1 agreement and KL divergence between two logit arrays.

The runtimes are optional dependencies (``pip install phi3ref[crosscheck]``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import Phi3Config
from .gguf_file import GGUFFile

__all__ = ["Comparison", "compare", "llama_cpp_logits", "llama_cpp_trace", "transformers_logits", "transformers_model"]


@dataclass(frozen=True)
class Comparison:
    """How far ``a`` is from reference ``b`` (both (n_positions, n_vocab) logits)."""

    max_abs: float  # max |a - b|
    max_rel: float  # max |a - b| / (max b - min b): relative to the logit range
    top1: float  # share of positions whose argmax agrees
    kl: float  # mean KL(softmax(b) || softmax(a)) over positions, nats

    def __str__(self) -> str:
        return f"max|Δ| {self.max_abs:.3g} (rel {self.max_rel:.2g}), top-1 {100 * self.top1:.1f}%, KL {self.kl:.2g}"


def compare(a: np.ndarray, b: np.ndarray) -> Comparison:
    """Compare logits ``a`` against reference logits ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    log_pa = a - a.max(axis=-1, keepdims=True)
    log_pa -= np.log(np.exp(log_pa).sum(axis=-1, keepdims=True))
    log_pb = b - b.max(axis=-1, keepdims=True)
    log_pb -= np.log(np.exp(log_pb).sum(axis=-1, keepdims=True))
    kl = (np.exp(log_pb) * (log_pb - log_pa)).sum(axis=-1).mean()
    return Comparison(
        max_abs=float(diff.max()),
        max_rel=float(diff.max() / max(b.max() - b.min(), 1e-30)),
        top1=float((a.argmax(-1) == b.argmax(-1)).mean()),
        kl=float(kl),
    )


def transformers_model(path: str | os.PathLike[str], *, sliding_window: bool = True):
    """``transformers.Phi3ForCausalLM`` (float32, eager attention) with the file's config
    and weights dequantized by phi3ref."""
    import torch
    import transformers

    with GGUFFile(path) as gf:
        c = Phi3Config.from_gguf(gf)
        rope: dict = {"rope_type": "default", "rope_theta": c.rope_base, "partial_rotary_factor": c.n_rot / c.head_dim}
        if c.has_rope_factors:
            rope.update(
                rope_type="longrope",
                short_factor=gf.dequantize_tensor("rope_factors_short.weight").tolist(),
                long_factor=gf.dequantize_tensor("rope_factors_long.weight").tolist(),
                original_max_position_embeddings=c.rope_orig_ctx,
                attention_factor=c.longrope_attn_factor,
            )
        hf_config = transformers.Phi3Config(
            vocab_size=c.n_vocab,
            hidden_size=c.n_embd,
            intermediate_size=c.n_ff,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_head_kv,
            max_position_embeddings=c.n_ctx_train,
            original_max_position_embeddings=c.rope_orig_ctx or c.n_ctx_train,
            rms_norm_eps=c.rms_eps,
            rope_parameters=rope,
            sliding_window=c.sliding_window if sliding_window else None,
            tie_word_embeddings=c.tied_embeddings,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )
        hf_config._attn_implementation = "eager"
        model = transformers.Phi3ForCausalLM(hf_config).to(torch.float32).eval()
        names = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
        }
        if not c.tied_embeddings:
            names["lm_head.weight"] = "output.weight"
        for i in range(c.n_layer):
            hf, g = f"model.layers.{i}.", f"blk.{i}."
            names.update({
                hf + "input_layernorm.weight": g + "attn_norm.weight",
                hf + "self_attn.qkv_proj.weight": g + "attn_qkv.weight",
                hf + "self_attn.o_proj.weight": g + "attn_output.weight",
                hf + "post_attention_layernorm.weight": g + "ffn_norm.weight",
                hf + "mlp.gate_up_proj.weight": g + "ffn_up.weight",
                hf + "mlp.down_proj.weight": g + "ffn_down.weight",
            })
        state = {hf: torch.from_numpy(np.ascontiguousarray(gf.dequantize_tensor(g))) for hf, g in names.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (c.tied_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"transformers model does not match the file: missing {missing}, unexpected {unexpected}")
        if c.tied_embeddings:
            model.tie_weights()
    return model


def transformers_logits(path: str | os.PathLike[str], tokens: Sequence[int], *, sliding_window: bool = True) -> np.ndarray:
    """Every position's logits from transformers in float32: (len(tokens), n_vocab)."""
    import torch

    model = transformers_model(path, sliding_window=sliding_window)
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def llama_cpp_logits(path: str | os.PathLike[str], tokens: Sequence[int], *, n_ctx: int | None = None, threads: int | None = None) -> np.ndarray:
    """Every position's logits from llama.cpp (llama-cpp-python, ``logits_all=True``)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx or max(len(tokens), 16),
        n_batch=max(len(tokens), 16),
        n_ubatch=max(len(tokens), 16),
        logits_all=True,
        n_threads=threads or os.cpu_count() or 1,
        verbose=False,
    )
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


# Byte offsets in ggml's `struct ggml_tensor` (ggml.h of the llama.cpp that llama-cpp-python
# 0.3.36 vendors): type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src,
# view_offs, data, name[64].
_T_TYPE, _T_NE, _T_NB, _T_DATA, _T_NAME = 0, 16, 48, 248, 256


def llama_cpp_trace(path: str | os.PathLike[str], tokens: Sequence[int], *, n_ctx: int | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """llama.cpp's float32 intermediate tensors for one batch of ``tokens``, by graph node
    name (``attn_norm-0``, ``wqkv-0``, ``kq_soft_max-0``, ... ``result_output``), through the
    scheduler's eval callback. Arrays come in ggml's order (innermost dimension last after
    numpy's reversal): e.g. ``wqkv-0`` is (1, 1, n_tokens, n_qkv). Where a name repeats, the
    last tensor of that name is kept."""
    import ctypes

    import llama_cpp as lc

    store: dict[str, np.ndarray] = {}

    @lc.ggml_backend_sched_eval_callback
    def collect(tensor, ask, _user_data):
        if ask:
            return True
        base = ctypes.cast(tensor, ctypes.c_void_p).value
        if ctypes.c_int32.from_address(base + _T_TYPE).value != 0:  # GGML_TYPE_F32 only
            return True
        ne = [ctypes.c_int64.from_address(base + _T_NE + 8 * i).value for i in range(4)]
        nb = [ctypes.c_size_t.from_address(base + _T_NB + 8 * i).value for i in range(4)]
        data = ctypes.c_void_p.from_address(base + _T_DATA).value
        if data:
            extent = sum((n - 1) * stride for n, stride in zip(ne, nb)) + 4
            flat = np.frombuffer((ctypes.c_char * extent).from_address(data), dtype=np.float32)
            view = np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1])
            store[ctypes.string_at(base + _T_NAME).decode()] = view.copy()
        return True

    n = len(tokens)
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    params = lc.llama_context_default_params()
    params.n_ctx = n_ctx or max(n, 16)
    params.n_batch = params.n_ubatch = max(n, 16)
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama sets it
    params.cb_eval = collect
    params.cb_eval_user_data = None
    ctx = lc.llama_init_from_model(model, params)
    try:
        ids = (lc.llama_token * n)(*tokens)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(ids, n)) != 0:
            raise RuntimeError("llama_decode failed")
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return store
