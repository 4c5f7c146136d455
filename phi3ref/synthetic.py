"""Synthetic Phi-3 family models: the real file layout and vocabulary, random weights.

The machines phi3ref is developed and tested on cannot reach a model hub, so tests and
benchmarks run on models this module writes: the tensor names, shapes, types, metadata and
vocabulary are those of llama.cpp's ``phi3`` GGUF files; only the weight values are random
(so the text they generate is noise).

    >>> from phi3ref.synthetic import write_model
    >>> write_model("tiny.gguf", preset="phi3-mini", size="tiny", quant="Q4_K_M")

Each preset's vocabulary, special tokens and chat template are its model's
(:func:`preset_vocab`): for the Phi-3 presets ``phi3ref/data/ggml-vocab-phi-3.gguf``
(llama.cpp's vocab-only Phi-3 file; see ``phi3ref/data/README.md`` for attribution), for
``phi4`` and ``phi4-mini`` the vocabularies :mod:`phi3ref.tiktoken_vocab` makes from
tiktoken's rank files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from .config import ARCHITECTURE, Phi3Config
from .gguf_file import GGUFFile
from .quants import QUANT_TYPES, quantize
from .tiktoken_vocab import VOCABULARIES, vocab_file

__all__ = ["ModelShape", "PRESETS", "QUANT_MIXES", "TensorPlan", "check_output_path", "preset_shape", "preset_vocab", "tensor_plan", "tensor_type", "vocab_path", "write_model", "write_weights"]


def vocab_path() -> Path:
    """The bundled vocab-only Phi-3 GGUF (tokens, scores, types, special ids, chat template)."""
    return Path(str(resources.files("phi3ref") / "data" / "ggml-vocab-phi-3.gguf"))


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters of a synthetic model (what ``phi3.*`` metadata will say)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_rot: int
    n_ctx: int = 4096
    rope_orig_ctx: int | None = None  # set (< n_ctx) for LongRoPE
    sliding_window: int | None = 2047  # None: the file has no phi3.attention.sliding_window; 0: it says 0 (none)
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    longrope: bool = False
    fused_qkv: bool = True  # attn_qkv, as llama.cpp's converter writes Phi-3; else attn_q / attn_k / attn_v

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def config(self, n_vocab: int) -> Phi3Config:
        """The :class:`~phi3ref.config.Phi3Config` a file of this shape declares (its tensor
        layout is the one :func:`write_model` writes)."""
        return Phi3Config(
            n_vocab=n_vocab, n_ctx_train=self.n_ctx, n_embd=self.n_embd, n_ff=self.n_ff, n_layer=self.n_layer,
            n_head=self.n_head, n_head_kv=self.n_head_kv, head_dim=self.head_dim, n_rot=self.n_rot,
            # the file stores the floats as float32, and always an original context length
            rope_base=float(np.float32(self.rope_base)), rms_eps=float(np.float32(self.rms_eps)),
            sliding_window=self.sliding_window or None, rope_orig_ctx=self.rope_orig_ctx or self.n_ctx, has_rope_factors=self.longrope,
            tied_embeddings=self.tied_embeddings, fused_qkv=self.fused_qkv,
        )


# The family's shapes (from the models' config.json files) and a tiny size of each that
# keeps every structural feature: fused qkv/gate_up, GQA ratio, partial rotary, LongRoPE,
# tied embeddings. Tiny sizes keep rows a multiple of 256 so every K-quant applies.
PRESETS: dict[str, dict[str, ModelShape]] = {
    "phi3-mini": {  # Phi-3-mini-4k-instruct, 3.8B
        "full": ModelShape(n_layer=32, n_embd=3072, n_ff=8192, n_head=32, n_head_kv=32, n_rot=96),
        "tiny": ModelShape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_rot=64, n_ctx=512, sliding_window=None),
    },
    "phi3-medium": {  # Phi-3-medium-4k-instruct, 14B, grouped-query attention 40/10
        "full": ModelShape(n_layer=40, n_embd=5120, n_ff=17920, n_head=40, n_head_kv=10, n_rot=128),
        "tiny": ModelShape(n_layer=2, n_embd=256, n_ff=768, n_head=8, n_head_kv=2, n_rot=32, n_ctx=512, sliding_window=None),
    },
    "phi3.5-mini": {  # Phi-3.5-mini-instruct (and Phi-3-mini-128k): LongRoPE 4k -> 128k
        "full": ModelShape(
            n_layer=32, n_embd=3072, n_ff=8192, n_head=32, n_head_kv=32, n_rot=96,
            n_ctx=131072, rope_orig_ctx=4096, sliding_window=262144, longrope=True,
        ),
        # original context 256: llama.cpp rounds its context up to a multiple of 256 and
        # takes the short factors only when that does not exceed the original context
        "tiny": ModelShape(
            n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_rot=64,
            n_ctx=1024, rope_orig_ctx=256, sliding_window=None, longrope=True,
        ),
    },
    "phi4": {  # Phi-4 (14B; also Phi-4-reasoning and -reasoning-plus): GQA 40/10, rope base 250,000, no sliding window
        "full": ModelShape(n_layer=40, n_embd=5120, n_ff=17920, n_head=40, n_head_kv=10, n_rot=128, n_ctx=16384,
                           rope_base=250000.0, sliding_window=0),
        "tiny": ModelShape(n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=1, n_rot=64, n_ctx=512,
                           rope_base=250000.0, sliding_window=0),
    },
    "phi4-mini": {  # Phi-4-mini-instruct: GQA 24/8, partial rotary (96 of 128), tied embeddings, LongRoPE
        "full": ModelShape(
            n_layer=32, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8, n_rot=96,
            n_ctx=131072, rope_orig_ctx=4096, sliding_window=262144, tied_embeddings=True, longrope=True,
        ),
        "tiny": ModelShape(
            n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_rot=48,
            n_ctx=1024, rope_orig_ctx=256, sliding_window=None, tied_embeddings=True, longrope=True,
        ),
    },
}


# "heads": tiny depth and width but each model's real attention geometry (head size 96 or
# 128, partial rotary 96 of 128, the GQA ratio) and a 2048 context, so that the attention
# kernels meet the head sizes, lane counts and KV lengths of the real files (the crosscheck
# tier, `phi3ref selfcheck`).
_REAL_HEADS = {
    "phi3-mini": dict(n_embd=768, n_head=8, n_head_kv=8, n_rot=96),  # head 96
    "phi3-medium": dict(n_embd=512, n_head=4, n_head_kv=1, n_rot=128),  # head 128, GQA 4
    "phi3.5-mini": dict(n_embd=768, n_head=8, n_head_kv=8, n_rot=96),  # head 96, LongRoPE
    "phi4": dict(n_embd=512, n_head=4, n_head_kv=1, n_rot=128),  # head 128, GQA 4
    "phi4-mini": dict(n_embd=768, n_head=6, n_head_kv=2, n_rot=96),  # head 128, rotary 96, GQA 3
}
for _name, _heads in _REAL_HEADS.items():
    PRESETS[_name]["heads"] = replace(PRESETS[_name]["tiny"], n_ctx=2048, **_heads)


def preset_vocab(preset: str) -> Path:
    """The vocabulary-only GGUF that ``preset``'s models take their tokenizer from: the
    bundled Phi-3 one, or for the Phi-4 generation (a preset named as a key of
    :data:`phi3ref.tiktoken_vocab.VOCABULARIES`) the one
    :func:`phi3ref.tiktoken_vocab.vocab_file` makes from tiktoken's ranks (cached)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return vocab_file(preset) if preset in VOCABULARIES else vocab_path()


def preset_shape(preset: str, size: str = "tiny") -> ModelShape:
    """The shape of a preset (``ValueError`` naming the choices for an unknown one)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if size not in PRESETS[preset]:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(PRESETS[preset])}")
    return PRESETS[preset][size]


# llama.cpp file types that write_model can produce: base type of the 2D weights.
QUANT_MIXES: dict[str, tuple[QT, LlamaFileType]] = {
    "F32": (QT.F32, LlamaFileType.ALL_F32),
    "F16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (QT.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (QT.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (QT.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q4_K_S": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (QT.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}

# When a row is not a whole number of 256-element super-blocks llama.cpp falls back to a
# legacy type of similar size (llama_tensor_get_type's fallback).
_K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers whose ffn_down gets more bits in *_K_M mixes:
    the first and last eighth, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], mix: str, n_layer: int, *, pure: bool = False, tied: bool = False) -> QT:
    """The type llama.cpp's quantizer gives tensor ``name`` in file type ``mix``.

    1-D tensors stay F32. Float mixes store every matrix in that float type. Quantized
    mixes follow ``llama_tensor_get_type``: the output head (``token_embd`` when embeddings
    are tied) in Q6_K unless the mix is Q8_0; in Q4_K_M / Q5_K_M ``attn_qkv`` one step up
    (Q5_K / Q6_K, as the quantizer of the Phi-3 files on the Hub did), and ``ffn_down`` and
    a separate ``attn_v`` in Q6_K on the layers :func:`_use_more_bits` picks; in Q4_K_S
    ``ffn_down`` in Q5_K on the first eighth of the layers and ``attn_v`` on the first four. ``pure`` puts every
    matrix in the base type (``llama-quantize --pure``).
    """
    if mix not in QUANT_MIXES:
        raise ValueError(f"unknown quant {mix!r}; choose one of {', '.join(QUANT_MIXES)}")
    base = QUANT_MIXES[mix][0]
    if len(shape) == 1:
        return QT.F32
    chosen = base
    if not pure and base not in (QT.F32, QT.F16, QT.BF16):
        is_head = name == "output.weight" or (tied and name == "token_embd.weight")
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if is_head:
            chosen = base if base == QT.Q8_0 else QT.Q6_K
        elif name.endswith("attn_qkv.weight") and mix in ("Q4_K_M", "Q5_K_M"):
            chosen = QT.Q5_K if mix == "Q4_K_M" else QT.Q6_K
        elif name.endswith("ffn_down.weight") and mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layer):
            chosen = QT.Q6_K
        elif name.endswith("ffn_down.weight") and mix == "Q4_K_S" and layer < n_layer // 8:
            chosen = QT.Q5_K
        elif name.endswith("attn_v.weight") and mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layer):
            chosen = QT.Q6_K
        elif name.endswith("attn_v.weight") and mix == "Q4_K_S" and layer < 4:
            chosen = QT.Q5_K
    if shape[-1] % QUANT_TYPES[chosen].block_size:
        chosen = _K_FALLBACK.get(chosen, chosen)
    if shape[-1] % QUANT_TYPES[chosen].block_size:
        raise ValueError(f"tensor {name}: rows of {shape[-1]} elements cannot be stored as {chosen.name}")
    return chosen


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of a synthetic model: name, numpy-order shape, GGML type."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    kind: str  # how to draw its values: "embed", "norm", "linear", "rope_long", "rope_short"
    fan_in: int = 1


def tensor_plan(shape: ModelShape, n_vocab: int, mix: str, pure: bool = False) -> list[TensorPlan]:
    """Every tensor :func:`write_model` writes for ``shape`` in file type ``mix``, in file
    order: the layout :meth:`phi3ref.config.Phi3Config.tensor_specs` states (llama.cpp's
    converter's: fused qkv and gate_up), each with what its values are like."""
    config = shape.config(n_vocab)
    kinds = {"token_embd.weight": "embed", "rope_factors_long.weight": "rope_long", "rope_factors_short.weight": "rope_short"}
    items = []
    for spec in config.tensor_specs():
        if not spec.required:  # the output head of tied embeddings
            continue
        kind = kinds.get(spec.name, "norm" if spec.name.endswith("norm.weight") else "linear")
        items.append((spec.name, spec.shape, kind, 1 if kind in ("norm", "rope_long", "rope_short") else spec.shape[-1]))
    return [
        TensorPlan(name, shp, tensor_type(name, shp, mix, shape.n_layer, pure=pure, tied=shape.tied_embeddings), kind, fan_in)
        for name, shp, kind, fan_in in items
    ]


def _values(plan: TensorPlan, rng: np.random.Generator) -> np.ndarray:
    """Random values shaped like trained weights: unit-ish norms, 1/sqrt(fan_in) matrices
    (so activations keep their scale through the layers), monotone LongRoPE factors."""
    if plan.kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(plan.shape, dtype=np.float32)).astype(np.float32)
    if plan.kind in ("rope_long", "rope_short"):
        # Real factors rise from 1 at the fastest-rotating dims to ~1-3 (short) or
        # ~10-60 (long) at the slowest.
        top = 40.0 if plan.kind == "rope_long" else 2.5
        n = plan.shape[0]
        ramp = np.geomspace(1.0, top, n) * (1.0 + 0.02 * rng.standard_normal(n))
        return np.maximum(ramp, 1.0).astype(np.float32)
    # Embeddings and the head at 2/sqrt(n_embd): logits (tied or not) spread over a few
    # units, and the residual stream starts small next to what the layers add, as in
    # trained models.
    scale = (2.0 if plan.kind == "embed" or plan.name == "output.weight" else 1.0) / math.sqrt(plan.fan_in)
    out = np.empty(plan.shape, dtype=np.float32)
    rows_per_chunk = max(1, (1 << 24) // plan.shape[-1])
    for r in range(0, plan.shape[0], rows_per_chunk):
        chunk = out[r : r + rows_per_chunk]
        rng.standard_normal(chunk.shape, dtype=np.float32, out=chunk)
        chunk *= np.float32(scale)
    return out


def _encode(values: np.ndarray, qtype: QT) -> np.ndarray:
    """Values -> the bytes the file stores, a bounded strip of rows at a time."""
    rows = values.reshape(-1, values.shape[-1])
    out_cols = values.shape[-1] // QUANT_TYPES[qtype].block_size * QUANT_TYPES[qtype].type_size
    out = np.empty((rows.shape[0], out_cols), dtype=np.uint8)
    step = max(1, (1 << 22) // values.shape[-1])
    for r in range(0, rows.shape[0], step):
        out[r : r + step] = quantize(rows[r : r + step], qtype)
    return out


def _copy_vocab(writer: GGUFWriter, source: Path) -> int:
    """Copy every ``tokenizer.*`` key of the vocab file; return the vocabulary size."""
    with GGUFFile(source) as vocab:
        for key, value in vocab.metadata.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = vocab.value_types[key]
            if vtype.startswith("array["):
                item = GGUFValueType[vtype[6:-1].upper()]
                seq = value if isinstance(value, list) else value.tolist()
                writer.add_key_value(key, seq, GGUFValueType.ARRAY, sub_type=item)
            else:
                writer.add_key_value(key, value, GGUFValueType[vtype.upper()])
        return len(vocab.get_array("tokenizer.ggml.tokens"))


def write_model(
    path: str | os.PathLike[str],
    *,
    preset: str = "phi3-mini",
    size: str = "tiny",
    quant: str = "Q4_K_M",
    pure: bool = False,
    seed: int = 0,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_ff: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_rot: int | None = None,
    tied_embeddings: bool | None = None,
    longrope: bool | None = None,
    sliding_window: int | None = None,
    n_ctx: int | None = None,
    fused_qkv: bool | None = None,
    vocab: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Path:
    """Write a synthetic Phi-3 family GGUF with random weights; return its path.

    ``preset`` (:data:`PRESETS`) and ``size`` (``"tiny"``, ``"heads"`` or ``"full"``) give the shape; the
    keyword overrides change single hyperparameters (``sliding_window=0``: none, as Phi-4 says;
    ``n_ctx``: the training context; ``fused_qkv=False``: separate q, k and v projections,
    drawn as the same values as the fused one, row for row). ``vocab``: a GGUF file whose
    ``tokenizer.*`` keys are copied (default: the preset's, :func:`preset_vocab`). ``quant`` is a llama.cpp file type from
    :data:`QUANT_MIXES` (``"Q4_K_M"`` mixes Q4_K, Q5_K, Q6_K and F32 as llama.cpp does);
    ``pure`` stores every matrix in the mix's base type. The same arguments and ``seed``
    write the same bytes. Tensors are drawn, quantized and written one at a time, so a
    full-size model needs memory for its largest tensor only.
    """
    check_output_path(path)  # before a vocabulary is made for it
    shape = preset_shape(preset, size)
    if name is not None and preset in VOCABULARIES and vocab is None and any(k in name.lower() for k in ("phi3", "phi-3")):
        raise ValueError(f"name {name!r}: llama.cpp gives a file whose name holds 'phi3' or 'phi-3' Phi-3's special tokens, "
                         f"which {preset}'s vocabulary lacks (it would refuse the file); name it otherwise")
    overrides = {
        k: v
        for k, v in dict(
            n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
            n_rot=n_rot, tied_embeddings=tied_embeddings, longrope=longrope, sliding_window=sliding_window, n_ctx=n_ctx,
            fused_qkv=fused_qkv,
        ).items()
        if v is not None
    }
    shape = replace(shape, **overrides)
    if shape.longrope and not shape.rope_orig_ctx:
        shape = replace(shape, rope_orig_ctx=max(1, shape.n_ctx // 8))
    _check_shape(shape, quant)

    rng = np.random.default_rng(seed)
    # the preset leads the name: llama.cpp gives a file whose general.name holds "phi3" or
    # "phi-3" Phi-3's special-token handling (its special tokens swallow the spaces after
    # them; it looks up "</s>", "<unk>" and "<s>", which a Phi-4 vocabulary has not)
    return _write(path, shape, quant, pure, name or f"{preset} synthetic ({quant}, random weights)",
                  Path(vocab) if vocab else preset_vocab(preset), lambda plan: _values(plan, rng))


def write_weights(
    path: str | os.PathLike[str],
    shape: ModelShape,
    weights: Mapping[str, np.ndarray],
    *,
    quant: str = "Q4_K_M",
    pure: bool = False,
    name: str,
    description: str | None = None,
    vocab: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a Phi-3 GGUF of ``shape`` holding ``weights`` ({tensor name: float32 array in
    numpy order}, every tensor of :func:`tensor_plan`, e.g. a trained model's, converted
    with :meth:`~phi3ref.config.Phi3Config.transformers_names`), stored in ``quant``'s
    types as llama.cpp's quantizer would; the vocabulary of ``vocab`` (default: the bundled
    Phi-3 one). ``ValueError`` naming the tensor for a missing, extra, misshapen or
    non-finite one, before anything is written."""
    _check_shape(shape, quant)
    vocab = Path(vocab) if vocab else vocab_path()
    with GGUFFile(vocab) as v:
        n_vocab = len(v.get_array("tokenizer.ggml.tokens"))
    plans = tensor_plan(shape, n_vocab, quant, pure)
    expected = {p.name: p.shape for p in plans}
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"weights holds tensors a {shape} model does not have: {', '.join(extra[:5])}")
    for tensor, want in expected.items():
        if tensor not in weights:
            raise ValueError(f"weights has no tensor {tensor!r}")
        got = np.shape(weights[tensor])
        if tuple(got) != want:
            raise ValueError(f"tensor {tensor!r} has shape {list(got)}, the model needs {list(want)}")
        if not np.isfinite(weights[tensor]).all():
            raise ValueError(f"tensor {tensor!r} holds inf or NaN")
    return _write(path, shape, quant, pure, name, vocab,
                  lambda plan: np.ascontiguousarray(weights[plan.name], dtype=np.float32), description)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path``, refused (``ValueError``) unless a model can be written there:
    not a folder or a device (the rename at the end would replace it), in a folder that exists."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}; a model is written to a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    return path


def _write(path: str | os.PathLike[str], shape: ModelShape, quant: str, pure: bool, name: str, vocab: Path,
           values: Callable[[TensorPlan], np.ndarray], description: str | None = None) -> Path:
    """Write the file: header, then each tensor's ``values(plan)`` encoded, one at a time
    (a full-size model needs memory for its largest tensor only), through a ``.partial``
    file renamed at the end."""
    path = check_output_path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, ARCHITECTURE)
    try:
        n_vocab = _write_header(writer, shape, quant, name, description, vocab)
        plans = tensor_plan(shape, n_vocab, quant, pure)
        for plan in plans:
            qt = QUANT_TYPES[plan.qtype]
            n_bytes = math.prod(plan.shape) // qt.block_size * qt.type_size
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), n_bytes, raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(_encode(values(plan), plan.qtype))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return path


def _check_shape(shape: ModelShape, quant: str) -> None:
    if quant not in QUANT_MIXES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_MIXES)}")
    for field in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_rot", "n_ctx"):
        if getattr(shape, field) <= 0:
            raise ValueError(f"{field} must be positive, got {getattr(shape, field)}")
    if shape.sliding_window is not None and shape.sliding_window < 0:
        raise ValueError(f"sliding_window must be 0 (none) or positive, got {shape.sliding_window}")
    if shape.n_embd % shape.n_head:
        raise ValueError(f"n_embd={shape.n_embd} is not a multiple of n_head={shape.n_head}")
    if shape.n_head % shape.n_head_kv:
        raise ValueError(f"n_head={shape.n_head} is not a multiple of n_head_kv={shape.n_head_kv}")
    if shape.n_rot % 2 or shape.n_rot > shape.head_dim:
        raise ValueError(f"n_rot={shape.n_rot} must be even and at most head_dim={shape.head_dim}")
    if shape.longrope and not (0 < (shape.rope_orig_ctx or 0) < shape.n_ctx):
        raise ValueError(f"LongRoPE needs 0 < rope_orig_ctx < n_ctx, got {shape.rope_orig_ctx} and {shape.n_ctx}")


def _write_header(writer: GGUFWriter, shape: ModelShape, quant: str, name: str, description: str | None, vocab: Path) -> int:
    a = ARCHITECTURE
    writer.add_name(name)
    if description:
        writer.add_description(description)
    writer.add_uint32(f"{a}.context_length", shape.n_ctx)
    # llama.cpp's converter writes the original context for every Phi-3 (= context_length
    # unless the model uses LongRoPE).
    writer.add_uint32(f"{a}.rope.scaling.original_context_length", shape.rope_orig_ctx or shape.n_ctx)
    writer.add_uint32(f"{a}.embedding_length", shape.n_embd)
    writer.add_uint32(f"{a}.feed_forward_length", shape.n_ff)
    writer.add_uint32(f"{a}.block_count", shape.n_layer)
    writer.add_uint32(f"{a}.attention.head_count", shape.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", shape.n_head_kv)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.rms_eps)
    writer.add_uint32(f"{a}.rope.dimension_count", shape.n_rot)
    writer.add_float32(f"{a}.rope.freq_base", shape.rope_base)
    if shape.sliding_window is not None:
        writer.add_uint32(f"{a}.attention.sliding_window", shape.sliding_window)
    if shape.longrope:
        assert shape.rope_orig_ctx
        scale = shape.n_ctx / shape.rope_orig_ctx
        writer.add_float32(f"{a}.rope.scaling.attn_factor", math.sqrt(1 + math.log(scale) / math.log(shape.rope_orig_ctx)))
    writer.add_uint32("general.file_type", int(QUANT_MIXES[quant][1]))
    writer.add_uint32("general.quantization_version", 2)
    return _copy_vocab(writer, vocab)

