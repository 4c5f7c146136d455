"""From a file (or a Hub repository) to a ready :class:`phi3ref.model.Model`.

Everything around the transformer that a load decides once: where the file comes from
(:mod:`phi3ref.hub`), how many threads the kernels use, which numerics compute
(:func:`numerics_named`), which tokenizer goes with the model, and which
weight matrices are mapped into memory before the first pass.
"""

from __future__ import annotations

import os

import numba

from .checks import integer
from .gguf_file import GGUFFile
from .isa import Level
from .model import DEFAULT_UBATCH, Model
from .ggml import GgmlNumerics
from .isa import resolve as resolve_isa
from .numerics import ExactNumerics, Numerics, NumpyNumerics
from .tokenizer import Tokenizer

__all__ = ["NUMERICS", "load", "model_from_file", "numerics_named"]


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    filename: str | None = None,
    revision: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    n_ctx: int | None = None,
    numerics: str | Numerics = "ggml",
    threads: int | None = None,
    sliding_window: bool | None = None,
    isa: str | Level | None = None,
    n_ubatch: int = DEFAULT_UBATCH,
) -> Model:
    """Open a Phi-3 family GGUF file as a :class:`~phi3ref.model.Model`.

    ``path``: a local .gguf file, or a Hugging Face Hub repository id (default
    ``microsoft/Phi-3-mini-4k-instruct-gguf``; ``filename`` / ``revision`` pick the file),
    downloaded into huggingface_hub's cache. The file is memory-mapped and its weight
    matrices mapped in at load (read from disk if need be); no weight is decoded ahead of
    use. ``tokenizer``: None uses the file's own vocabulary; a path to a
    ``tokenizer.json``, or ``"hub"`` to fetch the base model's from the Hub. ``n_ctx`` is
    the KV cache size (default: the model's context, at most
    :data:`phi3ref.model.DEFAULT_MAX_CTX`). ``numerics``: ``"ggml"`` (llama.cpp's, the
    default), ``"exact"`` (float32, transformers' numbers) or ``"numpy"`` (exact, plain
    numpy), or a :class:`phi3ref.numerics.Numerics`; see :mod:`phi3ref.numerics`. ``threads``: Numba threads (default: all cores).
    ``sliding_window``: apply the file's sliding window (default: with "exact" and
    "numpy", as transformers does; not with "ggml", as llama.cpp does not). ``isa``: the
    instruction-set level of the llama.cpp build that ``numerics="ggml"`` reproduces
    (``"avx2"``, ``"avx512"``, ``"avx512bf16"``; default $PHI3REF_ISA, else what a native
    build on this CPU uses; see :mod:`phi3ref.isa`). ``n_ubatch``: prompts run in batches
    of at most this many tokens, as llama.cpp's micro-batches (default 512, its default).
    """
    from . import hub

    chosen = _numerics(numerics, isa)  # a wrong name is refused before any download
    if tokenizer is not None and tokenizer != "hub" and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be None, 'hub' or the path of a tokenizer.json, got {tokenizer!r:.60}")
    if threads is not None:
        numba.set_num_threads(integer("threads", threads, lo=1, hi=numba.config.NUMBA_NUM_THREADS))
    local = hub.resolve_model(hub.DEFAULT_REPO if path is None else path, filename=filename, revision=revision)
    gguf = GGUFFile(local)
    try:
        model = model_from_file(gguf, numerics=chosen, n_ctx=n_ctx, sliding_window=sliding_window, n_ubatch=n_ubatch)
        if tokenizer is not None:
            source = hub.tokenizer_json(str(hub.DEFAULT_REPO if path is None else path), revision) if tokenizer == "hub" else tokenizer
            chosen_tokenizer = Tokenizer.from_file(source, gguf=gguf)
            if chosen_tokenizer.n_vocab != model.config.n_vocab:
                # (from_file pads a shorter JSON with the file's own tokens): ids past the
                # model's would fail mid-generation
                raise ValueError(f"tokenizer {source}: {chosen_tokenizer.n_vocab} tokens, not the {model.config.n_vocab} "
                                 f"of {gguf.path.name}: not this model's vocabulary")
            model.tokenizer = chosen_tokenizer
    except BaseException:
        gguf.close()
        raise
    return model


def model_from_file(
    gguf: GGUFFile,
    *,
    numerics: str | Numerics = "ggml",
    isa: str | Level | None = None,
    n_ctx: int | None = None,
    sliding_window: bool | None = None,
    n_ubatch: int = DEFAULT_UBATCH,
) -> Model:
    """A :class:`~phi3ref.model.Model` of an open GGUF file, with the file's own tokenizer
    (built when first used). ``numerics``: a name (see :func:`load`) or a
    :class:`phi3ref.numerics.Numerics`."""
    chosen = _numerics(numerics, isa)
    model = Model(gguf, chosen, n_ctx=n_ctx, sliding_window=sliding_window, n_ubatch=n_ubatch,
                  tokenizer=lambda: Tokenizer.from_gguf(gguf))
    # Every matrix a forward pass reads in full is mapped in now (the token embedding, of
    # which a pass reads a few rows, stays lazy unless it is the output head too).
    for name, info in gguf.tensors.items():
        if len(info.shape) == 2 and info.supported and (name != "token_embd.weight" or model.output is model.token_embd):
            gguf.populate(name)
    return model


def _numerics(numerics: str | Numerics, isa: str | Level | None) -> Numerics:
    """The numerics a load asked for: by name (``isa``: the level "ggml" follows), or as given."""
    if isinstance(numerics, str):
        return numerics_named(numerics, isa)
    if isa is not None:
        raise ValueError(f"isa={isa!r} picks the level of numerics by name; {numerics!r} is already built "
                         "(give GgmlNumerics its level instead)")
    return numerics  # Model checks that it is one


NUMERICS = ("ggml", "exact", "numpy")  # the names a load takes


def numerics_named(name: str, isa: str | Level | None = None) -> Numerics:
    """The numerics called ``name`` (one of :data:`NUMERICS`); ``isa``: the level "ggml"
    follows (default :func:`phi3ref.isa.resolve`'s; checked for the others too)."""
    if name not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {name!r}")
    level = resolve_isa(isa)
    return {"ggml": lambda: GgmlNumerics(level), "exact": ExactNumerics, "numpy": NumpyNumerics}[name]()
