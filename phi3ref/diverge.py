"""Where two runtimes part: phi3ref's intermediates beside another runtime's, op by op.

:func:`diverge` runs phi3ref on some tokens with every hook point recorded
(:meth:`phi3ref.Model.run_with_cache`) and gets the other side's intermediates for the same
tokens — llama.cpp's graph tensors (through the eval callback), transformers' (forward
hooks on :func:`phi3ref.crosscheck.transformers_model`), or a directory / ``.npz`` of
arrays named by phi3ref's hook points (what a runtime being written dumps) — then walks
the points in the order a pass computes them and names the first whose relative error
(max |Δ| / max |theirs|) exceeds the tolerance. Every later point inherits the error, so
the first one is the op to look at; the table shows how it grows.

The name map (:data:`NAME_MAP`), phi3ref's point -> llama.cpp's graph node -> transformers'
module, states once how the two others lay the same tensor out; the reshapes applied are
in :func:`_align`:

* llama.cpp: the same names, but its last ``Qcur-i`` is after RoPE *and* the 1/sqrt(d)
  scaling (phi3ref's is scaled by 1.0f / sqrtf(d) before comparing); ``attn_out-i`` and
  ``ffn_inp-i`` are unnamed in its graph (not compared); ``kq-i`` / ``kq_soft_max-i`` are
  (1, n_head, n, n_kv padded to 256) there, (n_head_kv, group, n, n_kv) here.
* transformers: module outputs (inputs where noted); q and k after RoPE are read from its
  ``apply_rotary_pos_emb``, (1, heads, n, d) there; attention probabilities are its
  attention's weights, (1, n_head, n, n); ``model.norm``'s output is its last hidden
  state. Scores before the softmax (``kq-i``) are not exposed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .isa import Level

if TYPE_CHECKING:
    from .crosscheck import SavedArrays

__all__ = ["Divergence", "NAME_MAP", "OpError", "diverge", "transformers_intermediates"]

# phi3ref hook point (per layer: "-i" appended) -> (llama.cpp graph node, transformers module and what of it)
NAME_MAP: dict[str, tuple[str | None, str | None]] = {
    "inp_embd": ("inp_embd", "model.embed_tokens: output"),
    "attn_norm": ("attn_norm-i", "model.layers.i.input_layernorm: output"),
    "wqkv": ("wqkv-i", "model.layers.i.self_attn.qkv_proj: output"),
    "Qcur": ("Qcur-i (after RoPE and the 1/sqrt(d) scaling)", "apply_rotary_pos_emb in model.layers.i.self_attn: q_embed"),
    "Kcur": ("Kcur-i", "apply_rotary_pos_emb in model.layers.i.self_attn: k_embed"),
    "Vcur": ("Vcur-i", "model.layers.i.self_attn.qkv_proj: output, the v columns"),
    "kq": ("kq-i", None),
    "kq_soft_max": ("kq_soft_max-i", "model.layers.i.self_attn: attention weights"),
    "kqv_out": ("kqv_out-i", "model.layers.i.self_attn.o_proj: input"),
    "attn_out": (None, "model.layers.i.self_attn.o_proj: output"),
    "ffn_inp": (None, "model.layers.i.post_attention_layernorm: input"),
    "ffn_norm": ("ffn_norm-i", "model.layers.i.post_attention_layernorm: output"),
    "ffn_up": ("ffn_up-i", "model.layers.i.mlp.gate_up_proj: output"),
    "ffn_swiglu": ("ffn_swiglu-i", "model.layers.i.mlp.down_proj: input"),
    "ffn_out": ("ffn_out-i", "model.layers.i.mlp.down_proj: output"),
    "l_out": ("l_out-i", "model.layers.i: output"),
    "result_norm": ("result_norm", "model.norm: output"),
    "result_output": ("result_output", "lm_head: output"),
}


@dataclass(frozen=True)
class OpError:
    """One hook point held against the other side: ``rel_err`` = max |Δ| / max |theirs|."""

    name: str
    layer: int | None
    op: str
    rel_err: float
    max_abs: float
    equal: bool


@dataclass
class Divergence:
    """``first``: the first point past the tolerance (None: they agree); ``table``: every
    point compared, in the order computed; ``skipped``: points the other side lacks;
    ``tokens_differ``: the two sides' token ids when they tokenized a text differently
    (then nothing else was compared)."""

    first: OpError | None
    table: list[OpError]
    skipped: list[str]
    tokens_differ: tuple[list[int], list[int]] | None = None

    def as_json(self) -> dict:
        return {
            "first": None if self.first is None else dict(name=self.first.name, layer=self.first.layer, op=self.first.op,
                                                          rel_err=self.first.rel_err),
            "table": [dict(name=e.name, layer=e.layer, op=e.op, rel_err=e.rel_err, max_abs=e.max_abs, equal=e.equal) for e in self.table],
            "skipped": self.skipped,
            "tokens_differ": None if self.tokens_differ is None else {"ours": self.tokens_differ[0], "theirs": self.tokens_differ[1]},
        }

    def format(self) -> str:
        """The per-layer table (relative error of every op) and the verdict."""
        if self.tokens_differ is not None:
            ours, theirs = self.tokens_differ
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return (f"the two sides tokenize the text differently (from token {at}: ours {ours[at:at + 8]}, "
                    f"theirs {theirs[at:at + 8]}); compare token ids (--tokens) instead")
        ops = list(dict.fromkeys(e.op for e in self.table if e.layer is not None))
        layers = sorted({e.layer for e in self.table if e.layer is not None})
        cell = {(e.layer, e.op): e for e in self.table}
        lines = ["layer " + " ".join(f"{op:>12}" for op in ops)]
        for e in self.table:
            if e.layer is None and e.op in ("inp_embd",):
                lines.insert(0, f"{e.op}: {_fmt(e)}")
        for layer in layers:
            lines.append(f"{layer:>5} " + " ".join(f"{_fmt(cell[(layer, op)]) if (layer, op) in cell else '-':>12}" for op in ops))
        lines += [f"{e.op}: {_fmt(e)}" for e in self.table if e.layer is None and e.op != "inp_embd"]
        if self.first is None:
            lines.append("no point past the tolerance: the two sides agree")
        else:
            f = self.first
            where = f"layer {f.layer}, " if f.layer is not None else ""
            lines.append(f"first divergence: {f.name} ({where}op {f.op}): relative error {f.rel_err:.3g}, max |Δ| {f.max_abs:.3g}")
        if self.skipped:
            lines.append(f"not compared (the other side has no such tensor): {', '.join(self.skipped[:12])}"
                         + (" ..." if len(self.skipped) > 12 else ""))
        return "\n".join(lines)


def _fmt(e: OpError) -> str:
    return "0" if e.equal else f"{e.rel_err:.2e}"


def _split(name: str) -> tuple[str, int | None]:
    op, _, layer = name.rpartition("-")
    return (op, int(layer)) if op and layer.isdigit() else (name, None)


def _align(name: str, ours: np.ndarray, theirs: np.ndarray, source: str, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides in phi3ref's layout (see the module docstring)."""
    op, _ = _split(name)
    if op in ("kq", "kq_soft_max") and ours.ndim == 4:
        ours = ours.reshape(-1, ours.shape[2], ours.shape[3])  # (n_head, n, n_kv)
        theirs = theirs.reshape(-1, theirs.shape[-2], theirs.shape[-1])[:, :, : ours.shape[-1]]  # (n_head, n, n_kv): padding cut
    if op == "Qcur" and source == "llama.cpp":
        ours = ours * (np.float32(1) / np.sqrt(np.float32(head_dim)))  # llama.cpp's last Qcur is scaled, as its attention uses it
    if op in ("Qcur", "Kcur") and source == "transformers" and theirs.ndim == 4:
        theirs = theirs[0].transpose(1, 0, 2)  # (1, heads, n, d) -> (n, heads, d)
    if theirs.size != ours.size:
        raise ValueError(f"{name}: {ours.shape} here, {theirs.shape} on the other side")
    return ours, theirs.reshape(ours.shape)


def _errors(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], source: str, head_dim: int) -> tuple[list[OpError], list[str]]:
    table, skipped = [], []
    for name, value in ours.items():
        if name not in theirs:
            skipped.append(name)
            continue
        a, b = _align(name, np.asarray(value, np.float32), np.asarray(theirs[name], np.float32), source, head_dim)
        equal = bool(np.array_equal(a, b, equal_nan=True))
        finite = np.isfinite(a) & np.isfinite(b)
        if not np.array_equal(np.isfinite(a), np.isfinite(b)):
            max_abs = rel = float("inf")
        else:
            diff = np.abs(a[finite].astype(np.float64) - b[finite]) if finite.any() else np.zeros(1)
            scale = float(np.abs(b[finite]).max()) if finite.any() else 0.0
            max_abs = float(diff.max())
            rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        op, layer = _split(name)
        table.append(OpError(name, layer, op, 0.0 if equal else rel, 0.0 if equal else max_abs, equal))
    return table, skipped


def transformers_intermediates(path: str | os.PathLike[str], tokens: Sequence[int]) -> dict[str, np.ndarray]:
    """transformers' intermediates for ``tokens`` (float32, on :func:`phi3ref.crosscheck.transformers_model`),
    by phi3ref's hook point names (:data:`NAME_MAP`)."""
    import torch
    from transformers.models.phi3 import modeling_phi3

    from .crosscheck import transformers_model

    model = transformers_model(path)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    out: dict[str, np.ndarray] = {}
    handles = []
    layer_of_call: list[int] = []

    def hook_on(module, name: str, what: str) -> None:
        def hook(mod, args, result):
            if what == "input":
                value = args[0][0]  # the batch of one
            elif what == "attention weights":  # Phi3Attention returns (output, weights (1, n_head, n, n))
                value = result[1] if isinstance(result, tuple) and len(result) > 1 else None
            else:
                value = (result[0] if isinstance(result, tuple) else result)[0]
            if value is not None:
                out[name] = value.detach().float().numpy().copy()
        handles.append(module.register_forward_hook(hook))

    # the module hooks, read off NAME_MAP ("module path: input | output | attention weights";
    # "i" is the layer); q and k after RoPE, and v, are taken below
    for op, (_, where) in NAME_MAP.items():
        path_, _, what = (where or "").partition(": ")
        if what not in ("input", "output", "attention weights"):
            continue
        if "layers.i" in path_:
            for i in range(config.num_hidden_layers):
                hook_on(model.get_submodule(path_.replace("layers.i", f"layers.{i}")), f"{op}-{i}", what)
        else:
            hook_on(model.get_submodule(path_), op, what)
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(lambda mod, args, i=i: layer_of_call.append(i)))
    original = modeling_phi3.apply_rotary_pos_emb

    def recording(q, k, *args, **kwargs):
        q_embed, k_embed = original(q, k, *args, **kwargs)
        i = layer_of_call[-1]
        out[f"Qcur-{i}"] = q_embed.detach().float().numpy().copy()
        out[f"Kcur-{i}"] = k_embed.detach().float().numpy().copy()
        return q_embed, k_embed

    modeling_phi3.apply_rotary_pos_emb = recording
    try:
        with torch.no_grad():
            model(torch.tensor([list(tokens)], dtype=torch.long), use_cache=False, output_attentions=True)
    finally:
        modeling_phi3.apply_rotary_pos_emb = original
        for h in handles:
            h.remove()
    for i in range(config.num_hidden_layers):
        out[f"Vcur-{i}"] = out[f"wqkv-{i}"][:, q_dim + kv_dim :].reshape(len(tokens), -1, head_dim)  # (n, n_head_kv, d)
    return out


def _saved_intermediates(path: Path) -> "SavedArrays":
    from .crosscheck import SavedArrays

    if not path.exists():
        raise FileNotFoundError(f"--against {path}: no such file or directory")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise ValueError(f"--against {path}: neither llama.cpp, transformers, a directory of .npy files nor an .npz")
    found = SavedArrays(path)  # headers only: nothing is read before it is checked against ours
    if not found.headers:
        raise ValueError(f"--against {path}: no arrays in it")
    return found


def _read_saved(saved: "SavedArrays", ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The saved arrays named like ours, each read only once its header matches ours in
    size (attention scores may carry llama.cpp's padding of the keys to 256)."""
    out = {}
    for name, value in ours.items():
        if name not in saved.headers:
            continue
        shape = saved.headers[name][0]
        size = int(np.prod(shape, dtype=np.int64))
        padded = _split(name)[0] in ("kq", "kq_soft_max") and value.ndim == 4 and len(shape) >= 2 \
            and size // max(1, shape[-1]) * value.shape[-1] == value.size and value.shape[-1] <= shape[-1] < value.shape[-1] + 256
        if size != value.size and not padded:
            raise ValueError(f"{name}: {value.shape} here, {shape} on the other side")
        out[name] = saved.read(name)
    return out


def diverge(path: str | os.PathLike[str], against: str | os.PathLike[str], *, tokens: Sequence[int] | None = None,
            text: str | None = None, numerics: str = "ggml", against_model: str | os.PathLike[str] | None = None,
            tolerance: float = 1e-3, threads: int | None = None, level: str | Level | None = None) -> Divergence:
    """phi3ref on ``path`` against ``against`` ("llama.cpp", "transformers", or a
    directory / ``.npz`` of arrays named by phi3ref's hook points) on ``tokens`` or on
    ``text`` (encoded as it is, BOS as the file says; each side's token ids are compared
    first). One batch: at most 512 tokens. ``level``: llama.cpp built at this
    instruction-set level instead of the installed llama-cpp-python, and phi3ref's ggml
    numerics at the same level."""
    from .crosscheck import llama_cpp_calls, llama_cpp_trace
    from .loading import load

    if (tokens is None) == (text is None):
        raise ValueError("give a text or token ids")
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    source = str(against)
    if source not in ("llama.cpp", "transformers"):
        if against_model is not None:
            raise ValueError("--against-model names the file the other runtime runs: llama.cpp or transformers")
        saved = _saved_intermediates(Path(against))
    other = str(against_model or path)
    with_tokens = list(tokens) if tokens is not None else None
    model = load(path, numerics=numerics, threads=threads, isa=level)  # the default context, which llama.cpp is given too
    if text is not None:
        with_tokens = model.tokenizer.encode(text)
        theirs_tokens = None
        if source == "llama.cpp":
            (theirs_tokens,) = llama_cpp_calls([("tokenize", dict(path=other, text=text))], threads=threads, level=level)
        elif source == "transformers":
            theirs_tokens = _transformers_tokens(other, text)
        if theirs_tokens is not None and list(theirs_tokens) != with_tokens:
            return Divergence(None, [], [], (with_tokens, list(theirs_tokens)))
    _, ours = model.run_with_cache(with_tokens)  # one batch; checks the ids
    if source == "llama.cpp":
        theirs = llama_cpp_trace(other, with_tokens, n_ctx=model.n_ctx, threads=threads, level=level)
    elif source == "transformers":
        theirs = transformers_intermediates(other, with_tokens)
    else:
        theirs = _read_saved(saved, ours)
    table, skipped = _errors(ours, theirs, source, model.config.head_dim)
    if not table:
        raise ValueError(f"--against {against}: none of its tensors is named like a phi3ref hook point "
                         f"({', '.join(list(ours)[:4])}, ...): nothing to compare")
    first = next((e for e in table if e.rel_err > tolerance), None)
    return Divergence(first, table, skipped)


def _transformers_tokens(path: str, text: str) -> list[int] | None:
    """transformers' own GGUF tokenizer's ids for ``text`` (None where it cannot load one)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    except Exception:  # no GGUF tokenizer support in this transformers, or none for this file
        return None
    return list(tok(text)["input_ids"])
