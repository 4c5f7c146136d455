"""The model on its own: numerics agreeing with each other, the KV cache, LongRoPE switching,
the sliding window, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_PRESETS

import phi3ref
from phi3ref.crosscheck import compare
from phi3ref.testing import write_model

TOKENS = [1, 32010, 1724, 338, 263, 6432, 1048, 29973, 32007, 32001, 450, 4799, 338, 7254, 29889, 32007]


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_exact_matches_plain_numpy(preset, tiny_model):
    """The Numba path and the plain numpy reference compute the same model."""
    path = tiny_model(preset, "Q4_K_M")
    exact = phi3ref.load(path, numerics="exact").logits(TOKENS)
    plain = phi3ref.load(path, numerics="numpy").logits(TOKENS)
    assert exact.shape == (len(TOKENS), 32064) and exact.dtype == np.float32
    c = compare(exact, plain)
    assert c.max_rel < 1e-5 and c.top1 == 1.0, c


@pytest.mark.parametrize("numerics", ["exact", "ggml"])
@pytest.mark.parametrize("preset", ["phi3-medium", "phi4-mini"])
def test_incremental_forward_equals_full_pass(preset, numerics, tiny_model):
    """Prompt in one batched pass, then one token at a time through the KV cache: each
    step's logits equal the corresponding row of a fresh full pass."""
    model = phi3ref.load(tiny_model(preset, "Q4_K_M"), numerics=numerics)
    full = model.logits(TOKENS)
    model.reset()
    steps = [model.forward(TOKENS[:10], 0)]
    for pos in range(10, len(TOKENS)):
        steps.append(model.forward([TOKENS[pos]], pos))
    c = compare(np.array(steps), full[9:])
    # activations are quantized row by row, so both passes see the same codes; in ggml
    # numerics batches and single tokens take different kernels (as in llama.cpp), whose
    # float sums differ in the last bits
    assert c.max_rel < 1e-5 and c.top1 == 1.0, c


def test_rewind_overwrites_the_cache(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_0"), numerics="exact")
    a = model.forward(TOKENS, 0)
    model.forward([5, 6, 7], 4)  # rewind to position 4 and branch
    b = model.forward(TOKENS[4:], 4)  # and back: same as the original continuation
    assert np.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("preset", ["phi3.5-mini", "phi4-mini"])
def test_longrope_switch_recomputes_the_cache(preset, tiny_model):
    """A generation that crosses the original context (256 in the tiny presets) switches
    every position to the long factors: the result equals a fresh pass over the whole
    sequence, which uses the long factors throughout."""
    model = phi3ref.load(tiny_model(preset, "Q8_0"), numerics="exact")
    orig = model.config.rope_orig_ctx
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 32000, size=orig + 8).tolist()
    fresh = model.logits(tokens)
    model.reset()
    model.forward(tokens[: orig - 2], 0)  # short factors
    assert model.cache_uses_long_rope is False
    steps = [model.forward([t], pos) for pos, t in enumerate(tokens[orig - 2 :], start=orig - 2)]
    assert model.cache_uses_long_rope is True
    c = compare(np.array(steps[2:]), fresh[orig:])
    assert c.max_rel < 1e-5, c
    # and the short factors do matter: below the original context the logits differ from
    # what the long factors give
    short = model.logits(tokens[:orig])
    assert compare(short, fresh[:orig]).max_abs > 1e-2


def test_sliding_window(tmp_path):
    plain = write_model(tmp_path / "plain.gguf", preset="phi3-mini", quant="F16")
    windowed = write_model(tmp_path / "w8.gguf", preset="phi3-mini", quant="F16", sliding_window=8)
    no_window = phi3ref.load(plain, numerics="exact").logits(TOKENS)
    with_window = phi3ref.load(windowed, numerics="exact").logits(TOKENS)
    ignored = phi3ref.load(windowed, numerics="exact", sliding_window=False).logits(TOKENS)
    assert np.array_equal(with_window[:8], no_window[:8])  # inside the window: identical
    assert compare(with_window[8:], no_window[8:]).max_abs > 1e-3  # beyond it, early positions drop out
    assert np.array_equal(ignored, no_window)


def test_bad_input(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=32)
    with pytest.raises(ValueError, match="token id 40000 is outside the vocabulary"):
        model.logits([1, 40000])
    with pytest.raises(ValueError, match="token id -1"):
        model.logits([-1])
    with pytest.raises(ValueError, match="tokens is empty"):
        model.logits([])
    with pytest.raises(ValueError, match="40 positions do not fit the context of 32"):
        model.logits(list(range(40)))
    model.forward([1, 2, 3], 0)
    with pytest.raises(ValueError, match="start_pos 5 is past the 3 cached positions"):
        model.forward([4], 5)
    with pytest.raises(ValueError, match="numerics must be one of"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), numerics="fast")
    with pytest.raises(ValueError, match="n_ctx must be a positive integer"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=0)
    with pytest.raises(ValueError, match="threads must be an integer"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), threads=0)


def test_load_refuses_files_it_cannot_run(tmp_path):
    from phi3ref.testing import vocab_path

    with pytest.raises(phi3ref.GGUFError, match="tensor 'token_embd.weight' is missing"):
        phi3ref.load(vocab_path())
    with pytest.raises(phi3ref.GGUFError, match="not a GGUF file"):
        (tmp_path / "x.gguf").write_bytes(b"hello")
        phi3ref.load(tmp_path / "x.gguf")


def test_memory_is_mapped_not_copied(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    w = model.blocks[0].mlp.gate_up
    assert isinstance(w.raw.base, np.memmap) or isinstance(w.raw, np.memmap)
