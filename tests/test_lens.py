"""phi3ref.lens: the logit lens and top-k tables, against the model's own numbers and a
plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref.lens import attention_patterns, format_top, induction_scores, logit_lens, previous_token_scores, repeated_tokens, top_tokens

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
    with pytest.raises(TypeError, match="k must be an integer, got True"):
        top_tokens(logits, model.tokenizer, k=True)


# -- attention patterns and the heads they reveal ----------------------------------------------


@pytest.mark.parametrize("preset", ["phi3-mini", "phi3-medium"])  # (GQA: 8 query heads on 2 KV heads)
def test_attention_patterns_are_the_model_s_probabilities_per_query_head(preset, tiny_model):
    model = phi3ref.load(tiny_model(preset, "Q8_0"), numerics="exact")
    c = model.config
    patterns = attention_patterns(model, TOKENS)
    assert patterns.shape == (c.n_layer, c.n_head, len(TOKENS), len(TOKENS))
    _, cache = model.run_with_cache(TOKENS, ["kq_soft_max-*"])
    group = c.n_head // c.n_head_kv
    for layer in range(c.n_layer):
        for head in range(c.n_head):  # query head h is the (h % group)-th of KV head h // group
            assert np.array_equal(patterns[layer, head], cache[f"kq_soft_max-{layer}"][head // group, head % group])
    assert np.allclose(patterns.sum(-1), 1, atol=1e-5) and np.all(np.triu(patterns, 1) == 0)  # causal rows


def test_head_scores_on_made_up_patterns():
    """A head that looks one back scores 1 as a previous-token head; one that looks at the
    token after the current token's twin, 1 as an induction head; uniform heads score less."""
    n, period = 1 + 2 * 5, 5
    prev = np.zeros((n, n), np.float32)
    prev[0, 0] = 1
    prev[np.arange(1, n), np.arange(0, n - 1)] = 1
    induction = np.tril(np.ones((n, n), np.float32)) / np.arange(1, n + 1)[:, None]
    q = np.arange(1 + period + 1, n)
    induction[q] = 0
    induction[q, q - period + 1] = 1
    patterns = np.stack([prev, induction])[None]  # (1 layer, 2 heads, n, n)
    assert np.allclose(previous_token_scores(patterns), [[1.0, np.mean(induction[np.arange(1, n), np.arange(0, n - 1)])]])
    assert np.allclose(induction_scores(patterns, period), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="not a probe of 1 \\+ 2 x 4 tokens"):
        induction_scores(patterns, 4)
    with pytest.raises(ValueError, match="patterns must be .n_layer, n_head, n, n."):
        previous_token_scores(prev)


def test_the_induction_probe(tiny_model):
    tok = phi3ref.load(tiny_model("phi3-mini", "Q4_0")).tokenizer
    probe = repeated_tokens(tok, 30, seed=3)
    assert probe[0] == tok.bos_id and probe[1:31] == probe[31:] and len(set(probe[1:31])) == 30
    assert not any(tok.is_special(t) or tok.token_text(t).startswith("<0x") for t in probe[1:])
    assert repeated_tokens(tok, 30, seed=3) == probe and repeated_tokens(tok, 30, seed=4) != probe
    with pytest.raises(ValueError, match="period must be an integer >= 2"):
        repeated_tokens(tok, 1)
    with pytest.raises(TypeError, match="period must be an integer, got 4.0"):
        repeated_tokens(tok, 4.0)


def test_the_induction_probe_from_given_tokens(tiny_model):
    tok = phi3ref.load(tiny_model("phi3-mini", "Q4_0")).tokenizer
    text = tok.encode("The for statement is used to iterate over the elements of a sequence, such as a string or a list.")
    probe = repeated_tokens(tok, 8, seed=2, candidates=text)
    assert set(probe[1:]) <= set(text) - {tok.bos_id} and probe[1:9] == probe[9:] and len(set(probe[1:9])) == 8
    with pytest.raises(ValueError, match="the candidates' ordinary tokens are only 3: too few to draw 8"):
        repeated_tokens(tok, 8, candidates=[500, 600, 700, 1])
    with pytest.raises(ValueError, match="a token id of candidates must be an integer from 0 to 32063, got 1000000"):
        repeated_tokens(tok, 2, candidates=[10**6, 5])
    assert not set(repeated_tokens(tok, 2, candidates=[3, 4, 5, 600, 700])) & {3, 4, 5}  # byte tokens are not drawn
    with pytest.raises(TypeError, match="tokenizer must be a phi3ref Tokenizer"):
        repeated_tokens("tok", 2)
