"""Phi3Config: every hyperparameter checked for type and range before anything is
allocated, with a GGUFError that names the key and the value."""

from __future__ import annotations

import time

import numpy as np
import pytest
from craft import rewrite_gguf
from gguf import GGUFValueType as VT

import phi3ref
from phi3ref.config import Phi3Config
from phi3ref.gguf_file import GGUFError, GGUFFile


@pytest.mark.parametrize(
    "key,spec,message",
    [
        # negative windows once reached the ggml softmax kernel as an index (a heap overwrite)
        ("phi3.attention.sliding_window", (VT.INT32, -1), "sliding_window = -1 is out of range"),
        ("phi3.attention.sliding_window", (VT.INT32, -5), "sliding_window = -5 is out of range"),
        ("phi3.attention.sliding_window", (VT.UINT64, 2**63), "sliding_window = 9223372036854775808 is out of range"),
        # millions of layers once made the loader build millions of tensor specs first
        ("phi3.block_count", (VT.UINT32, 2**31 - 1), "block_count = 2147483647 is out of range"),
        ("phi3.block_count", (VT.UINT32, 10**7), "block_count = 10000000 is out of range"),
        ("phi3.block_count", (VT.UINT32, 0), "block_count = 0 is out of range"),
        ("phi3.embedding_length", (VT.FLOAT32, 256.0), "should be an integer, but it is float32"),
        ("phi3.context_length", (VT.INT64, -4096), "context_length = -4096 is out of range"),
        ("phi3.rope.dimension_count", (VT.UINT32, 65), "rope.dimension_count = 65 is out of range"),
        ("phi3.rope.dimension_count", (VT.UINT32, 63), "must be even"),
        ("phi3.rope.freq_base", (VT.FLOAT32, float("inf")), "freq_base = inf must be a positive finite number"),
        ("phi3.rope.freq_base", (VT.FLOAT32, float("nan")), "freq_base = nan must be a positive finite number"),
        ("phi3.attention.layer_norm_rms_epsilon", (VT.FLOAT32, 0.0), "epsilon = 0.0 must be a positive"),
        ("phi3.attention.layer_norm_rms_epsilon", (VT.FLOAT32, -1e-5), "must be a positive finite number"),
        # a vocabulary larger than the tokens once failed mid-generation at decode
        ("phi3.vocab_size", (VT.UINT32, 32066), "vocabulary sizes disagree (phi3.vocab_size: 32066, tokenizer.ggml.tokens: 32064"),
        ("phi3.rope.scaling.attn_factor", (VT.FLOAT32, float("nan")), "attn_factor = nan must be a positive finite number"),
        ("phi3.rope.scaling.attn_factor", (VT.FLOAT32, -1.0), "attn_factor = -1.0 must be a positive finite number"),
        # finite as float64 but not as float32, in which the pass computes: inf or 0
        ("phi3.attention.layer_norm_rms_epsilon", (VT.FLOAT64, 1e300), "epsilon = 1e.300 must be a positive finite number that float32 holds"),
        ("phi3.attention.layer_norm_rms_epsilon", (VT.FLOAT64, 1e-300), "must be a positive finite number that float32 holds"),
        ("phi3.rope.freq_base", (VT.FLOAT64, 1e-300), "freq_base = 1e-300 must be a positive finite number that float32 holds"),
        ("phi3.rope.scaling.attn_factor", (VT.FLOAT64, 1e300), "attn_factor = 1e.300 must be a positive finite number"),
    ],
)
def test_lies_in_the_hyperparameters(key, spec, message, tiny_model, tmp_path):
    path = rewrite_gguf(tiny_model("phi3-mini", "Q4_0"), tmp_path / "lie.gguf", set_kv={key: spec})
    start = time.perf_counter()
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        Phi3Config.from_gguf(gf)
    assert str(path) in str(e.value)
    with pytest.raises(GGUFError):
        phi3ref.load(path)
    assert time.perf_counter() - start < 10


def test_longrope_original_context_of_one(tiny_model, tmp_path):
    """log(1) = 0 divided the LongRoPE attention factor (ZeroDivisionError) before."""
    path = rewrite_gguf(tiny_model("phi3.5-mini", "Q4_0"), tmp_path / "lie.gguf",
                        set_kv={"phi3.rope.scaling.original_context_length": (VT.UINT32, 1)})
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="original_context_length = 1 is not a context length"):
        Phi3Config.from_gguf(gf)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("tensor", ["blk.1.attn_norm.weight", "output_norm.weight", "rope_factors_long.weight"])
def test_non_finite_vectors_refused_at_load(tensor, value, tiny_model, tmp_path):
    """A norm weight of +inf once gave a ZeroDivisionError in the Q8_K quantizer or NaN
    logits; now the load names the tensor."""
    src = tiny_model("phi3.5-mini", "Q4_K_M")
    with GGUFFile(src) as gf:
        n = gf.tensors[tensor].n_bytes // 4
    data = np.ones(n, np.float32)
    data[n // 2] = value
    path = rewrite_gguf(src, tmp_path / "bad.gguf", tensor_data={tensor: data.tobytes()})
    with pytest.raises(GGUFError, match=f"tensor '{tensor}' holds {value} at index {n // 2}"):
        phi3ref.load(path)


def test_rope_factors_must_be_positive(tiny_model, tmp_path):
    src = tiny_model("phi4-mini", "Q4_0")
    with GGUFFile(src) as gf:
        n = gf.tensors["rope_factors_short.weight"].n_bytes // 4
    path = rewrite_gguf(src, tmp_path / "bad.gguf", tensor_data={"rope_factors_short.weight": np.zeros(n, np.float32).tobytes()})
    with pytest.raises(GGUFError, match="must be finite and positive"):
        phi3ref.load(path)


def test_a_valid_rewrite_changes_nothing(tiny_model, tmp_path):
    """The rewriter the lies above are made with copies a file faithfully."""
    src = tiny_model("phi3-medium", "Q4_0")
    copy = rewrite_gguf(src, tmp_path / "copy.gguf")
    assert np.array_equal(phi3ref.load(src).logits([1, 2, 3]), phi3ref.load(copy).logits([1, 2, 3]))
