"""phi3ref.lens: the logit lens and top-k tables, against the model's own numbers and a
plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref.lens import format_top, logit_lens, top_tokens

TOKENS = [1, 32010, 14350, 263, 447, 18282, 1048, 14890, 18881, 32007, 32001]


@pytest.mark.parametrize("numerics", ["ggml", "exact"])
def test_the_lens_ends_at_the_model_s_logits(numerics, tiny_model):
    model = phi3ref.load(tiny_model("phi4-mini", "Q4_K_M"), numerics=numerics)
    lens = logit_lens(model, TOKENS)
    assert lens.shape == (model.config.n_layer + 1, len(TOKENS), model.config.n_vocab) and lens.dtype == np.float32
    assert np.array_equal(lens[-1], model.logits(TOKENS))


def test_the_lens_is_norm_and_head_on_the_residual_stream(tiny_model):
    """Each row: RMSNorm then the output head (dequantized, in numpy) on that depth's
    residual stream."""
    path = tiny_model("phi3-mini", "Q8_0")
    model = phi3ref.load(path, numerics="exact")
    lens = logit_lens(model, TOKENS)
    _, cache = model.run_with_cache(TOKENS, ["inp_embd", "l_out-0"])
    with phi3ref.GGUFFile(path) as gf:
        norm = gf.dequantize_tensor("output_norm.weight")
        head = gf.dequantize_tensor("output.weight")
    for row, name in ((0, "inp_embd"), (1, "l_out-0")):
        x = cache[name].astype(np.float64)
        expected = (x / np.sqrt((x * x).mean(axis=1, keepdims=True) + model.config.rms_eps) * norm) @ head.T
        assert np.allclose(lens[row], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_top_tokens(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    logits = model.logits(TOKENS)[-1]
    rows = top_tokens(logits, model.tokenizer, k=5)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:5]
    assert [t for t, _, _ in rows] == order.tolist()
    assert np.allclose([q for _, _, q in rows], p[order]) and rows[0][1] == model.tokenizer.decode([rows[0][0]], continuation=True)
    assert len(format_top(rows).splitlines()) == 5
    with pytest.raises(ValueError, match="one row of 32064 logits"):
        top_tokens(logits[:10], model.tokenizer)
    with pytest.raises(ValueError, match="k must be an integer from 1 to 32064"):
        top_tokens(logits, model.tokenizer, k=0)
