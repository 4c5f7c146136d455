"""Other runtimes' logits for the same GGUF file, to compare phi3ref against.

* :func:`transformers_logits`: HF transformers' ``Phi3ForCausalLM`` in float32, built from
  the file's config and phi3ref-dequantized weights. (transformers' own GGUF loader does
  not read partial rotary, LongRoPE or the sliding window, so the model is assembled here;
  its weights are bit-identical to what that loader produces — see the tests.)
* :func:`llama_cpp_logits`: llama.cpp through llama-cpp-python, every position's logits;
  :func:`llama_cpp_generation_logits`: a prompt, then one token at a time through the KV
  cache (llama.cpp takes other kernels for single tokens).
* :func:`llama_cpp_trace`: llama.cpp's intermediate tensors by name, to hold beside
  :meth:`phi3ref.Model.trace` layer by layer.
* each of them in a child process (a crash in llama.cpp is an error here, not the end of
  this process): the installed llama-cpp-python, or with ``level=`` llama.cpp built at a
  phi3ref.isa level (:mod:`phi3ref.llama_builds`).
* :func:`compare`: max |Δ|, top-1 agreement and KL divergence between two logit arrays;
  :func:`compare_traces`: a phi3ref trace against llama.cpp's, tensor by tensor.

The runtimes are optional dependencies (``pip install phi3ref[crosscheck]``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .config import Phi3Config
from .gguf_file import GGUFFile
from .isa import Level
from .isa import resolve as resolve_isa
from .sampler import log_softmax

__all__ = [
    "Comparison", "TensorMatch", "compare", "compare_traces", "generation_logits", "llama_cpp_calls", "llama_cpp_generation_logits", "llama_cpp_logits", "llama_cpp_trace",
    "llama_cpp_quantize", "SavedArrays", "transformers_config", "transformers_logits", "transformers_model",
]


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
    log_pa, log_pb = log_softmax(a), log_softmax(b)
    kl = (np.exp(log_pb) * (log_pb - log_pa)).sum(axis=-1).mean()
    return Comparison(
        max_abs=float(diff.max()),
        max_rel=float(diff.max() / max(b.max() - b.min(), 1e-30)),
        top1=float((a.argmax(-1) == b.argmax(-1)).mean()),
        kl=float(kl),
    )


@dataclass(frozen=True)
class TensorMatch:
    """One intermediate tensor of a trace held against llama.cpp's of the same name."""

    name: str  # llama.cpp's graph node name, e.g. "kqv_out-3"
    equal: bool  # bit for bit (NaNs in the same places count as equal)
    max_abs: float  # max |ours - theirs|


def compare_traces(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> list[TensorMatch]:
    """phi3ref's :meth:`~phi3ref.Model.trace` against :func:`llama_cpp_trace` of the same
    tokens: one TensorMatch per tensor both name, in phi3ref's order (the order computed,
    so the first unequal one is where the two runtimes part)."""
    matches = []
    for name, value in ours.items():
        if name not in theirs:
            continue
        ref = theirs[name]
        if name.startswith("kq") and value.ndim == 4:
            # ours (n_head_kv, group, n_tokens, n_kv); llama.cpp's (1, n_head, n_tokens, n_kv
            # padded to a multiple of 256) with the padding masked
            value = value.reshape(-1, value.shape[2], value.shape[3])  # (n_head, n_tokens, n_kv)
            ref = ref.reshape(-1, ref.shape[-2], ref.shape[-1])[:, :, : value.shape[-1]]  # (n_head, n_tokens, n_kv)
        if ref.size != value.size:
            raise ValueError(f"trace tensor {name}: {value.shape} here, {ref.shape} in llama.cpp")
        ref = ref.reshape(value.shape)
        finite = np.isfinite(value) & np.isfinite(ref)
        same_bits = np.array_equal(value.view(np.uint32), ref.view(np.uint32))
        equal = same_bits or np.array_equal(value, ref, equal_nan=True)
        diff = np.abs(value[finite].astype(np.float64) - ref[finite]) if finite.any() else np.zeros(1)
        max_abs = float(diff.max()) if np.array_equal(np.isfinite(value), np.isfinite(ref)) else float("inf")
        matches.append(TensorMatch(name, bool(equal), 0.0 if equal else max_abs))
    return matches


def transformers_config(c: Phi3Config, *, short_factors: Sequence[float] | None = None,
                        long_factors: Sequence[float] | None = None, sliding_window: bool = True):
    """``transformers.Phi3Config`` of a model of config ``c`` (eager attention); LongRoPE's
    factors (the file's ``rope_factors_*`` tensors) when ``c`` has them."""
    import transformers

    rope: dict = {"rope_type": "default", "rope_theta": c.rope_base, "partial_rotary_factor": c.n_rot / c.head_dim}
    if c.has_rope_factors:
        if short_factors is None or long_factors is None:
            raise ValueError("a LongRoPE config needs its short and long factors")
        rope.update(
            rope_type="longrope", short_factor=list(short_factors), long_factor=list(long_factors),
            original_max_position_embeddings=c.rope_orig_ctx, attention_factor=c.longrope_attn_factor,
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
    return hf_config


def transformers_model(path: str | os.PathLike[str], *, sliding_window: bool = True):
    """``transformers.Phi3ForCausalLM`` (float32, eager attention) with the file's config
    and weights dequantized by phi3ref."""
    import torch
    import transformers

    with GGUFFile(path) as gf:
        c = Phi3Config.from_gguf(gf)
        factors = {}
        if c.has_rope_factors:
            factors = dict(short_factors=gf.dequantize_tensor("rope_factors_short.weight").tolist(),
                           long_factors=gf.dequantize_tensor("rope_factors_long.weight").tolist())
        hf_config = transformers_config(c, sliding_window=sliding_window, **factors)
        model = transformers.Phi3ForCausalLM(hf_config).to(torch.float32).eval()
        state = {hf: torch.from_numpy(np.ascontiguousarray(gf.dequantize_tensor(g))) for hf, g in c.transformers_names().items()}
        if not c.fused_qkv:  # qkv_proj: the file's attn_q / attn_k / attn_v rows stacked
            for i in range(c.n_layer):
                rows = [gf.dequantize_tensor(f"blk.{i}.{p}.weight") for p in ("attn_q", "attn_k", "attn_v")]
                state[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.from_numpy(np.ascontiguousarray(np.concatenate(rows)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (c.tied_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"transformers model does not match the file: missing {missing}, unexpected {unexpected}")
        if c.tied_embeddings:
            model.tie_weights()
    return model


def transformers_logits(path: str | os.PathLike[str], tokens: Sequence[int], *, sliding_window: bool = True) -> np.ndarray:
    """Every position's logits from transformers in float32: (len(tokens), n_vocab)."""
    return _transformers_run(transformers_model(path, sliding_window=sliding_window), tokens)


def _transformers_run(model, tokens: Sequence[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


# ---- llama.cpp --------------------------------------------------------------------------
# Through llama-cpp-python's low-level API, with llama.cpp's defaults where phi3ref has the
# same knob (micro-batches of 512, no flash attention, as llama_cpp.Llama) and phi3ref's
# own default context (which picks LongRoPE's factors in llama.cpp). Every request runs in a
# child process (a process loads one libllama, and a crash in it stays there): ``level``
# None loads the installed llama-cpp-python (built natively for this CPU), a phi3ref.isa
# level (or its name) llama.cpp built at that level (phi3ref.llama_builds).


def _default_ctx(path: str | os.PathLike[str]) -> int:
    from .model import DEFAULT_MAX_CTX

    with GGUFFile(path) as gf:
        return min(Phi3Config.from_gguf(gf).n_ctx_train, DEFAULT_MAX_CTX)


class _LlamaCpp:
    """One llama.cpp context over a file (n_ctx, micro-batch, threads, an eval callback)."""

    def __init__(self, path, n_ctx, n_ubatch, threads, callback=None):
        import logging

        import llama_cpp as lc

        # llama-cpp-python prints llama.cpp's log unless its logger says otherwise
        quiet = logging.getLogger("llama-cpp-python")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        n_ctx = n_ctx or _default_ctx(path)
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # a whole request is one logical batch, split into micro-batches
        params.n_ubatch = min(n_ubatch, n_ctx)
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama sets it
        if callback is not None:
            params.cb_eval = callback
            params.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} for {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_past = 0

    def decode(self, tokens: Sequence[int], first: int) -> np.ndarray:
        """Run ``tokens`` after what the context holds; the logits of the positions from
        index ``first`` of ``tokens`` on (0: every one; len - 1: the last)."""
        lc, n = self.lc, len(tokens)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), self.n_past + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i >= first else 0
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            lc.llama_batch_free(batch)
        self.n_past += n
        rows = n - first
        return np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(rows, self.n_vocab)).copy()

    def close(self) -> None:
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _logits_here(path, tokens, n_ctx=None, n_ubatch=512, threads=None, first=0):
    runtime = _LlamaCpp(path, n_ctx, n_ubatch, threads)
    try:
        return runtime.decode(list(tokens), first=first)
    finally:
        runtime.close()


def _tokenize_here(path, text, threads=None):
    """llama.cpp's token ids of ``text``: special tokens parsed, BOS as the file says."""
    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    try:
        data = text.encode("utf-8")
        room = len(data) + 16
        ids = (lc.llama_token * room)()
        n = lc.llama_tokenize(lc.llama_model_get_vocab(model), data, len(data), ids, room, True, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needed {-n} tokens")
        return [int(ids[i]) for i in range(n)]
    finally:
        lc.llama_model_free(model)


def _generation_here(path, prompt, continuation, n_ctx=None, n_ubatch=512, threads=None):
    runtime = _LlamaCpp(path, n_ctx, n_ubatch, threads)
    try:
        rows = [runtime.decode(list(prompt), first=len(prompt) - 1)[0]]
        rows += [runtime.decode([tok], first=0)[0] for tok in continuation]
        return np.array(rows)
    finally:
        runtime.close()


# Byte offsets in ggml's `struct ggml_tensor` (ggml.h of the llama.cpp that llama-cpp-python
# 0.3.36 vendors): type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src,
# view_offs, data, name[64].
_T_TYPE, _T_NE, _T_NB, _T_DATA, _T_NAME = 0, 16, 48, 248, 256


def _trace_here(path, tokens, n_ctx=None, n_ubatch=512, threads=None):
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

    runtime = _LlamaCpp(path, n_ctx, n_ubatch, threads, callback=collect)
    try:
        runtime.decode(list(tokens), first=0)
    finally:
        runtime.close()
    return store


_HERE = {"logits": _logits_here, "chunk_logits": _logits_here, "generation": _generation_here, "trace": _trace_here,
         "tokenize": _tokenize_here}


def llama_cpp_calls(calls: Sequence[tuple[str, dict]], *, level: str | Level | None = None, threads: int | None = None) -> list:
    """Several llama.cpp requests at once — ("logits" | "generation" | "trace", keyword
    arguments of :func:`llama_cpp_logits` / :func:`llama_cpp_generation_logits` /
    :func:`llama_cpp_trace`; or "chunk_logits": ``path``, ``tokens``, ``first`` and
    ``n_ctx``, the logits of the positions from ``first`` on, as llama-perplexity asks
    for them; "tokenize": ``path``, ``text``, llama.cpp's token ids) — in one child process, so that a crash inside llama.cpp
    (``RuntimeError`` naming the signal) cannot take this process down: the installed
    llama-cpp-python (``level`` None) or llama.cpp built at ``level`` (built first if need
    be; :mod:`phi3ref.llama_builds`)."""
    import pickle
    import signal
    import subprocess
    import sys
    import tempfile

    calls = [(kind, {"threads": threads, **kwargs}) for kind, kwargs in calls]
    for kind, _ in calls:
        if kind not in _HERE:
            raise ValueError(f"unknown llama.cpp request {kind!r}; one of {', '.join(_HERE)}")
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    what = "the installed llama-cpp-python"
    if level is not None:
        from . import llama_builds

        level = resolve_isa(level)
        lib = llama_builds.build(level)
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
        what = f"llama.cpp built for {level} ({lib})"
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = os.path.join(tmp, "calls.pkl"), os.path.join(tmp, "results.pkl")
        with open(request, "wb") as f:
            pickle.dump(calls, f)
        done = subprocess.run([sys.executable, "-m", "phi3ref.crosscheck", request, answer], env=env, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            how = f"exit status {done.returncode}"
            if done.returncode < 0:
                try:
                    how = f"killed by {signal.Signals(-done.returncode).name}"
                except ValueError:
                    how = f"killed by signal {-done.returncode}"
            raise RuntimeError(f"{what} failed ({how})" + (f":\n{done.stderr[-3000:]}" if done.stderr.strip() else ""))
        with open(answer, "rb") as f:
            return pickle.load(f)


def llama_cpp_logits(
    path: str | os.PathLike[str], tokens: Sequence[int], *, n_ctx: int | None = None, n_ubatch: int = 512,
    threads: int | None = None, level: str | Level | None = None,
) -> np.ndarray:
    """Every position's logits from llama.cpp for ``tokens`` in one request: (len(tokens),
    n_vocab). ``n_ctx`` defaults to phi3ref's (the model's context, at most
    phi3ref.model.DEFAULT_MAX_CTX); ``level``: see :func:`llama_cpp_calls`."""
    kwargs = {"path": str(path), "tokens": list(tokens), "n_ctx": n_ctx, "n_ubatch": n_ubatch}
    return llama_cpp_calls([("logits", kwargs)], level=level, threads=threads)[0]


def llama_cpp_generation_logits(
    path: str | os.PathLike[str], prompt: Sequence[int], continuation: Sequence[int], *, n_ctx: int | None = None,
    n_ubatch: int = 512, threads: int | None = None, level: str | Level | None = None,
) -> np.ndarray:
    """The generation path: ``prompt`` in one request (its last logits), then each token of
    ``continuation`` alone through the KV cache: (1 + len(continuation), n_vocab), row i the
    logits after the prompt and i continuation tokens."""
    kwargs = {"path": str(path), "prompt": list(prompt), "continuation": list(continuation), "n_ctx": n_ctx, "n_ubatch": n_ubatch}
    return llama_cpp_calls([("generation", kwargs)], level=level, threads=threads)[0]


def llama_cpp_trace(
    path: str | os.PathLike[str], tokens: Sequence[int], *, n_ctx: int | None = None, n_ubatch: int = 512,
    threads: int | None = None, level: str | Level | None = None,
) -> dict[str, np.ndarray]:
    """llama.cpp's float32 intermediate tensors for one batch of ``tokens`` (every position
    output), by graph node name (``attn_norm-0``, ``wqkv-0``, ``kq_soft_max-0``, ...
    ``result_output``), through the scheduler's eval callback. Arrays come in ggml's order
    (innermost dimension last after numpy's reversal): e.g. ``wqkv-0`` is (1, 1, n_tokens,
    n_qkv). Where a name repeats (several micro-batches), the last tensor of that name is kept."""
    kwargs = {"path": str(path), "tokens": list(tokens), "n_ctx": n_ctx, "n_ubatch": n_ubatch}
    return llama_cpp_calls([("trace", kwargs)], level=level, threads=threads)[0]


def generation_logits(model, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
    """phi3ref's side of :func:`llama_cpp_generation_logits`: ``prompt`` in one forward pass
    of ``model`` (a :class:`phi3ref.Model`, its cache reset), then each token of
    ``continuation`` alone through the KV cache: (1 + len(continuation), n_vocab)."""
    model.reset()
    rows = [model.forward(list(prompt), 0)]
    rows += [model.forward([int(tok)], len(prompt) + i) for i, tok in enumerate(continuation)]
    return np.array(rows)


def llama_cpp_quantize(source: str | os.PathLike[str], dest: str | os.PathLike[str], ftype: str, *, threads: int = 2) -> str:
    """Quantize the GGUF ``source`` to ``dest`` with llama.cpp's own quantizer
    (``llama_model_quantize``), ``ftype`` a llama.cpp file type name such as ``"Q2_K"``,
    ``"Q3_K_M"``, ``"IQ4_NL"``, ``"IQ4_XS"`` (the types phi3ref cannot write itself)."""
    import ctypes

    import llama_cpp as lc

    code = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        raise ValueError(f"llama.cpp has no file type {ftype!r} (LLAMA_FTYPE_MOSTLY_{ftype})")
    params = lc.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads
    if lc.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
    return str(dest)


if __name__ == "__main__":  # the child of llama_cpp_calls: requests in, results out
    import pickle
    import sys

    with open(sys.argv[1], "rb") as f:
        requests = pickle.load(f)
    results = [_HERE[kind](**kwargs) for kind, kwargs in requests]
    with open(sys.argv[2], "wb") as f:
        pickle.dump(results, f)


# ---- one model against another runtime, as llama-perplexity --kl-divergence reports it ------

RUNTIMES = ("llama.cpp", "transformers")  # or a saved file: .npy / .npz logits, a KL-divergence base


def compare_runtimes(
    path: str | os.PathLike[str], against: str | os.PathLike[str] | None, *, text: str | None = None,
    tokens: Sequence[int] | None = None, n_ctx: int = 512, n_chunks: int | None = None, numerics: str = "ggml",
    against_model: str | os.PathLike[str] | None = None, save_kld_base: str | os.PathLike[str] | None = None,
    threads: int | None = None, level: str | Level | None = None, progress=None,
):
    """phi3ref on the file ``path`` against ``against``: "llama.cpp", "transformers" (on
    ``against_model`` if given, else the same file), an ``.npy`` / ``.npz`` of logits
    (every position of ``tokens``, (n_tokens, n_vocab); or of each chunk of ``text``,
    (n_chunks, n_ctx, n_vocab)), or a KL-divergence base file that llama-perplexity (or
    phi3ref) wrote — its chunks then give the tokens. Positions compared: with ``text``,
    llama-perplexity's (the second half of each chunk of ``n_ctx``); with ``tokens``, every
    position but the last. Returns :class:`phi3ref.perplexity.KLStatistics`, or None when
    only ``save_kld_base`` (phi3ref's log-probabilities in that format) was asked for.
    ``level``: llama.cpp built at this instruction-set level (:mod:`phi3ref.llama_builds`)
    instead of the installed llama-cpp-python, and phi3ref's ggml numerics at the same
    level. ``progress(done, total)`` per chunk."""
    from .loading import load
    from .perplexity import KLBaseWriter, chunk_bos, chunk_logits, chunks, kl_statistics, read_kld_base, text_tokens

    if against is None and save_kld_base is None:
        raise ValueError("compare against a runtime (llama.cpp, transformers) or a saved file, or save a KL base file")
    kind = None if against is None else str(against) if str(against) in RUNTIMES else Path(against).suffix.lower()
    if kind not in (None, *RUNTIMES, ".npy", ".npz", ".kld", ".bin", ".dat"):
        raise ValueError(f"--against {against}: neither a runtime ({', '.join(RUNTIMES)}) nor a .npy / .npz / KL base file")
    base = read_kld_base(against) if kind in (".kld", ".bin", ".dat") else None
    if base is not None:
        if text is not None or tokens is not None or n_chunks is not None:
            raise ValueError(f"{against}: a KL base file brings its own tokens and chunks; give no text, tokens or chunk count")
        n_ctx = base.n_ctx
    elif (text is None) == (tokens is None):
        raise ValueError("give a text or token ids")
    if save_kld_base is not None and tokens is not None:
        raise ValueError("a KL base file holds chunks of a text: give a text, not token ids")
    if against_model is not None and kind not in RUNTIMES:
        raise ValueError("--against-model names the file the other runtime runs: llama.cpp or transformers")
    if kind in (".npy", ".npz") and not Path(against).is_file():
        raise FileNotFoundError(f"--against {against}: no such file")
    if save_kld_base is not None and against is not None and Path(save_kld_base).resolve() == Path(against).resolve():
        raise ValueError(f"--save-kld-base {save_kld_base} is the file compared against")
    if tokens is not None and len(tokens) < 2:
        raise ValueError("comparing token ids needs at least 2 of them (each position predicts the next)")
    other = str(against_model or path)

    if tokens is not None:
        n_ctx = len(tokens)
    model = load(path, n_ctx=n_ctx, numerics=numerics, threads=threads, isa=level)
    if base is not None:
        if base.n_vocab != model.config.n_vocab:
            raise ValueError(f"{against}: a vocabulary of {base.n_vocab} tokens, the model's has {model.config.n_vocab}")
        bos = chunk_bos(model.tokenizer)
        stream_tokens = base.tokens.reshape(-1).tolist()
        pieces = [[int(row[0]) if bos is None else bos, *row[1:].tolist()] for row in base.tokens]  # BOS first, as there
    elif text is not None:
        stream_tokens = text_tokens(model.tokenizer, text)
        pieces = chunks(stream_tokens, n_ctx, n_chunks, chunk_bos(model.tokenizer))
    else:
        stream_tokens, pieces = list(tokens), [list(tokens)]
    first = 0 if tokens is not None else n_ctx // 2

    targets = [piece[first + 1 :] for piece in pieces]
    saved = _saved_logits(Path(against), pieces, first, model.config.n_vocab) if kind in (".npy", ".npz") else None

    def theirs() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(log-probabilities, raw logits or None) of the other side, chunk after chunk."""
        if base is not None:
            for c in range(len(pieces)):
                yield base.log_probs(c), None
        elif kind == "llama.cpp":
            group = 8  # chunks per llama.cpp child process: its logits held at once
            for g in range(0, len(pieces), group):
                calls = [("chunk_logits", dict(path=other, tokens=p, first=first, n_ctx=n_ctx)) for p in pieces[g : g + group]]
                for block in llama_cpp_calls(calls, threads=threads, level=level):
                    yield log_softmax(block[:-1]), block[:-1]
        elif kind == "transformers":
            hf = transformers_model(other)  # built once: it holds every weight in float32
            for p in pieces:
                block = _transformers_run(hf, p)[first:-1]
                yield log_softmax(block), block
        else:
            for block in saved:
                yield log_softmax(block), block

    writer = None if save_kld_base is None else KLBaseWriter(save_kld_base, stream_tokens, n_ctx, len(pieces), model.config.n_vocab)
    try:
        stats = None
        mine = chunk_logits(model, pieces, first, progress)
        if writer is not None:
            mine = writer.passing(mine)
        if against is None:
            for _ in mine:
                pass
        else:
            stats = kl_statistics((q, logp, tok, raw) for q, (logp, raw), tok in zip(mine, theirs(), targets))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return stats


class SavedArrays:
    """Arrays that numpy saved — the members of an ``.npz``, one ``.npy`` (named
    "logits"), or a folder's ``.npy`` files (by file stem) — opened without reading them:
    :attr:`headers` gives each one's shape and dtype, checked to be numbers that the file
    holds in full; :meth:`read` reads one, never unpickling, after the caller has seen its
    header (a header may claim gigabytes that a small compressed file inflates to).
    ``ValueError`` naming the file for anything numpy cannot read as such."""

    def __init__(self, path: str | os.PathLike[str]):
        import zipfile

        self.path = path = Path(path)
        self.headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        self._files: dict[str, Path] = {}
        try:
            if path.is_dir():
                for f in sorted(path.glob("*.npy")):
                    self._add(f.stem, f)
            elif path.suffix.lower() == ".npz":
                self._zip = zipfile.ZipFile(path)
                for info in self._zip.infolist():
                    if info.filename.endswith(".npy"):
                        name = info.filename[: -len(".npy")]
                        with self._zip.open(info) as f:
                            shape, dtype = self._header(f, name)
                        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
                            raise ValueError(f"{name} claims more bytes than the archive holds for it")
                        self.headers[name], self._members[name] = (shape, dtype), info.filename
            else:
                self._add("logits", path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not an array file numpy can read without unpickling ({e})") from None

    def _add(self, name: str, file: Path) -> None:
        with open(file, "rb") as f:
            shape, dtype = self._header(f, name)
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > file.stat().st_size:
                raise ValueError(f"{name} claims more bytes than the file holds")
        self.headers[name], self._files[name] = (shape, dtype), file

    @staticmethod
    def _header(f, name: str) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        if dtype.kind not in "biuf":
            raise ValueError(f"{name} holds {dtype}, not numbers")
        return tuple(shape), dtype

    def read(self, name: str) -> np.ndarray:
        """The array ``name``: a read-only memory map of an ``.npy`` file, or an ``.npz``
        member read whole."""
        try:
            if name in self._files:
                return np.load(self._files[name], mmap_mode="r", allow_pickle=False)
            assert self._zip is not None
            with self._zip.open(self._members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{self.path}: {name} cannot be read ({e})") from None


def _saved_logits(path, pieces: list[list[int]], first: int, n_vocab: int) -> list[np.ndarray]:
    """The blocks of scored positions from a saved logits file (.npy, or .npz with one
    array or a "logits" array), checked against the positions compared before it is read."""
    arrays = SavedArrays(path)
    names = list(arrays.headers)
    if "logits" not in names and len(names) != 1:
        raise ValueError(f"{path}: holds {names}; name the logits array 'logits'")
    name = "logits" if "logits" in names else names[0]
    shape, dtype = arrays.headers[name]
    n, length = len(pieces), len(pieces[0])
    if not (shape == (n, length, n_vocab) or (n == 1 and shape == (length, n_vocab))) or dtype.kind != "f":
        want = f"({length}, {n_vocab})" if n == 1 else f"({n}, {length}, {n_vocab})"
        raise ValueError(f"{path}: logits of shape {shape} ({dtype}); the positions compared need {want} floats")
    saved = arrays.read(name).reshape(n, length, n_vocab)
    return [saved[i, first:-1] for i in range(n)]
