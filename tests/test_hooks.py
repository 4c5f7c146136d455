"""Hook points (phi3ref.hooks): every intermediate named, readable and replaceable."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref.hooks import PER_LAYER, Hooks, hook_point_names
from phi3ref.model import TRACE_POINTS

PROMPT = list(range(300, 316))


@pytest.fixture(scope="module", params=["ggml", "exact"])
def model(request, tiny_model):
    return phi3ref.load(tiny_model("phi3-medium", "Q8_0"), numerics=request.param, n_ctx=64)


def test_run_with_cache_names_every_point_in_pass_order(model):
    logits, cache = model.run_with_cache(PROMPT)
    assert list(cache) == model.hook_names == hook_point_names(model.config.n_layer)
    c, n = model.config, len(PROMPT)
    group = c.n_head // c.n_head_kv
    shapes = {
        "inp_embd": (n, c.n_embd), "attn_norm-0": (n, c.n_embd), "wqkv-0": (n, (c.n_head + 2 * c.n_head_kv) * c.head_dim),
        "Qcur-0": (n, c.n_head, c.head_dim), "Kcur-0": (n, c.n_head_kv, c.head_dim), "Vcur-0": (n, c.n_head_kv, c.head_dim),
        "kq-0": (c.n_head_kv, group, n, n), "kq_soft_max-0": (c.n_head_kv, group, n, n), "kqv_out-0": (n, c.n_head * c.head_dim),
        "ffn_up-1": (n, 2 * c.n_ff), "ffn_swiglu-1": (n, c.n_ff), "l_out-1": (n, c.n_embd), "result_output": (n, c.n_vocab),
    }
    assert {k: cache[k].shape for k in shapes} == shapes
    assert np.array_equal(cache["result_output"], logits)
    # what each point holds: the residual stream adds up, the cache holds Kcur
    assert np.array_equal(cache["ffn_inp-0"], cache["inp_embd"] + cache["attn_out-0"])
    assert np.array_equal(cache["l_out-0"], cache["ffn_inp-0"] + cache["ffn_out-0"])
    stored = model.cache.k[0, :n].astype(np.float32)
    assert np.array_equal(stored, cache["Kcur-0"].astype(model.numerics.kv_dtype).astype(np.float32))
    assert np.array_equal(cache["wqkv-0"][:, -c.n_head_kv * c.head_dim:].reshape(cache["Vcur-0"].shape), cache["Vcur-0"])
    # the values are copies: changing them changes nothing
    cache["l_out-1"][:] = 0
    assert np.array_equal(model.run_with_cache(PROMPT, ["l_out-1"])[1]["l_out-1"], model.run_with_cache(PROMPT)[1]["l_out-1"])


def test_a_pass_with_hooks_that_change_nothing_is_the_plain_pass(model):
    seen = []
    logits = model.run_with_hooks(PROMPT, {"*": lambda value, name: seen.append(name)})
    assert seen == model.hook_names
    assert np.array_equal(logits.view(np.uint32), model.logits(PROMPT).view(np.uint32))


def test_trace_is_run_with_cache_of_the_llama_cpp_names(model):
    trace = model.trace(PROMPT)
    _, cache = model.run_with_cache(PROMPT)
    assert list(trace) == [n for n in cache if any(__import__("fnmatch").fnmatch(n, p) for p in TRACE_POINTS)]
    assert all(np.array_equal(trace[n], cache[n]) for n in trace)


def test_a_replacement_changes_what_follows(model):
    """Zeroing layer 1's attention output: l_out-1 is then ffn_inp-1 + the feed-forward of
    it, and the logits change; the hook sees the value it replaces."""
    got = {}

    def zero(value, name):
        got[name] = value.copy()
        return np.zeros_like(value)

    _, plain = model.run_with_cache(PROMPT)
    logits = model.run_with_hooks(PROMPT, {"attn_out-1": zero})
    assert np.array_equal(got["attn_out-1"], plain["attn_out-1"])
    _, patched = _cache_with(model, {"attn_out-1": zero})
    assert np.array_equal(patched["ffn_inp-1"], plain["l_out-0"])
    assert not np.allclose(logits, model.logits(PROMPT))


def test_patched_keys_and_values_go_into_the_kv_cache(model):
    """A replaced Kcur is what the cache keeps: the next token attends to it."""
    c = model.config
    model.forward(PROMPT, 0, hooks={"Kcur-0": lambda v, n: v * 0, "Vcur-0": lambda v, n: v * 0})
    assert not model.cache.k[0, : len(PROMPT)].any() and not model.cache.v[0, : len(PROMPT)].any()
    # with every key of layer 0 zero, its scores are all 0 and the probabilities uniform
    _, cache = _cache_with(model, {"Kcur-0": lambda v, n: v * 0})
    probs = cache["kq_soft_max-0"][0, 0]  # (n, n)
    for t in range(len(PROMPT)):
        assert np.allclose(probs[t, : t + 1], 1 / (t + 1), rtol=1e-3) and not probs[t, t + 1 :].any()
    assert c.n_layer >= 2


def test_a_decoded_token_can_be_hooked(model):
    model.forward(PROMPT, 0)
    seen = {}

    def look(value, name):
        seen[name] = value.shape

    model.forward([400], len(PROMPT), hooks={"kq-*": look})
    c = model.config
    assert seen == {f"kq-{i}": (c.n_head_kv, c.n_head // c.n_head_kv, 1, len(PROMPT) + 1) for i in range(c.n_layer)}


def _cache_with(model, functions):
    """run_with_hooks and every point's value after the hooks (the pass's own view)."""
    hooks = Hooks(functions, ["*"], known=model.hook_names)
    return model._fresh(PROMPT, hooks), hooks.kept


@pytest.mark.parametrize("hooks,error,match", [
    ({"l_out-99": lambda v, n: None}, ValueError, r"no hook point is called 'l_out-99' \(names: inp_embd, attn_norm-0"),
    ({"lout-*": lambda v, n: None}, ValueError, "no hook point is called 'lout-\\*'"),
    ({"l_out-0": "not a function"}, TypeError, "the hook for 'l_out-0' is not callable"),
    ({3: lambda v, n: None}, TypeError, "hook names must be strings"),
    ([("l_out-0", print)], TypeError, "hooks must be a mapping"),
    ({"l_out-0": lambda v, n: v[:, :3]}, ValueError, r"the hook at l_out-0 returned shape \(16, 3\); the point's value has shape \(16, "),
    ({"l_out-0": lambda v, n: "abc"}, TypeError, "the hook at l_out-0 returned str, not an array of numbers"),
])
def test_hook_mistakes_are_named(model, hooks, error, match):
    with pytest.raises(error, match=match):
        model.run_with_hooks(PROMPT, hooks)
    assert model.logits(PROMPT).shape == (len(PROMPT), model.config.n_vocab)  # the model is still usable


def test_run_with_cache_refuses_more_than_one_batch(model):
    with pytest.raises(ValueError, match="run_with_cache runs one batch: 600 tokens is more than n_ubatch=512"):
        model.run_with_cache([5] * 600)
    with pytest.raises(ValueError, match="no hook point is called 'attn'"):
        model.run_with_cache(PROMPT, ["attn"])


def test_every_per_layer_point_is_documented():
    import phi3ref.hooks as h

    assert all(f"{name}-i" in h.__doc__ for name in PER_LAYER)
    assert all(name in h.__doc__ for name in (*h.BEFORE_LAYERS, *h.AFTER_LAYERS))
