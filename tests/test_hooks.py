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
    return model._fresh(model._check_tokens(PROMPT, 0), hooks), hooks.kept


@pytest.mark.parametrize("hooks,error,match", [
    ({"l_out-99": lambda v, n: None}, ValueError, r"no hook point is called 'l_out-99' \(names: inp_embd, attn_norm-0"),
    ({"lout-*": lambda v, n: None}, ValueError, "no hook point is called 'lout-\\*'"),
    ({"l_out-0": "not a function"}, TypeError, "the hook for 'l_out-0' is not callable"),
    ({3: lambda v, n: None}, TypeError, "hook names must be strings"),
    ([("l_out-0", print)], TypeError, "hooks must be a mapping"),
    ({"l_out-0": lambda v, n: v[:, :3]}, ValueError, r"the hook at l_out-0 returned shape \(16, 3\); the point's value has shape \(16, "),
    ({"l_out-0": lambda v, n: "abc"}, TypeError, "the hook at l_out-0 returned str, not an array of real numbers"),
    ({"l_out-0": lambda v, n: v * np.nan}, ValueError, r"the hook at l_out-0 returned nan at \(0, 0\): replacements must be finite"),
    ({"attn_norm-1": lambda v, n: v - np.inf}, ValueError, "the hook at attn_norm-1 returned -inf"),
    ({"kq-0": lambda v, n: v + np.inf}, ValueError, r"the hook at kq-0 returned inf .* \(-inf masks a key here; \+inf and NaN do not\)"),
])
def test_hook_mistakes_are_named(model, hooks, error, match):
    with pytest.raises(error, match=match):
        model.run_with_hooks(PROMPT, hooks)
    assert model.logits(PROMPT).shape == (len(PROMPT), model.config.n_vocab)  # the model is still usable


def test_run_with_cache_refuses_more_than_one_batch(model):
    small = phi3ref.load(model.gguf.path, numerics=model.numerics.name, n_ctx=64, n_ubatch=8)
    with pytest.raises(ValueError, match="run_with_cache runs one batch: 16 tokens is more than n_ubatch=8"):
        small.run_with_cache(PROMPT)
    with pytest.raises(ValueError, match="no hook point is called 'attn'"):
        model.run_with_cache(PROMPT, ["attn"])


def test_every_per_layer_point_is_documented():
    import phi3ref.hooks as h

    assert all(f"{name}-i" in h.__doc__ for name in PER_LAYER)
    assert all(name in h.__doc__ for name in (*h.BEFORE_LAYERS, *h.AFTER_LAYERS))


def test_minus_inf_in_the_scores_masks_a_key(model):
    """-inf at kq-i knocks a key out, as the causal mask does: token 5 attending to keys
    0..4 only gives the probabilities of the scores without key 5, renormalised."""
    def knock_out(value, name):
        value[:, :, 5, 5] = -np.inf
        return value

    _, plain = model.run_with_cache(PROMPT, ["kq-0", "kq_soft_max-0"])
    _, cache = _cache_with(model, {"kq-0": knock_out})
    probs = cache["kq_soft_max-0"][:, :, 5, :6]  # (n_head_kv, group, keys 0..5)
    assert not probs[..., 5].any()
    scores = plain["kq-0"][:, :, 5, :5].astype(np.float64)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    assert np.allclose(probs[..., :5], expected / expected.sum(-1, keepdims=True), rtol=1e-3, atol=1e-6)


def test_a_hook_cannot_run_a_pass_on_its_own_model(model):
    with pytest.raises(phi3ref.ModelBusyError, match="a hook ran a pass on the model it is hooking"):
        model.run_with_hooks(PROMPT, {"l_out-0": lambda v, n: model.logits(PROMPT[:2])})
    with pytest.raises(phi3ref.ModelBusyError, match="a hook reset the model it is hooking"):
        model.run_with_hooks(PROMPT, {"l_out-0": lambda v, n: model.reset()})
    assert np.array_equal(model.run_with_hooks(PROMPT, {}), model.logits(PROMPT))  # and the model goes on


def test_hooks_must_be_a_mapping_wherever_given(model):
    model.forward(PROMPT, 0)
    for bad in ([], 0, "l_out-0"):
        with pytest.raises(TypeError, match="hooks must be a mapping of hook point names to functions"):
            model.forward([5], len(PROMPT), hooks=bad)
    with pytest.raises(TypeError, match="tokens must be a sequence of integer token ids"):
        model.run_with_cache([1.5, 2])
    assert np.array_equal(model.run_with_cache(iter(PROMPT), ["result_output"])[0], model.logits(PROMPT))  # any iterable


def test_a_model_needs_a_numerics_object(tiny_model):
    from phi3ref.gguf_file import GGUFFile
    from phi3ref.model import Model
    from phi3ref.numerics import ExactNumerics

    with GGUFFile(tiny_model("phi3-mini", "Q8_0")) as gf:
        with pytest.raises(TypeError, match="numerics must be a phi3ref.numerics.Numerics object .* got 'exact'"):
            Model(gf, "exact")
        with pytest.raises(TypeError, match="got the class ExactNumerics: pass ExactNumerics"):
            Model(gf, ExactNumerics)
    with pytest.raises(ValueError, match="isa='avx2' picks the level of numerics by name"):
        phi3ref.load(tiny_model("phi3-mini", "Q8_0"), numerics=ExactNumerics(), isa="avx2")
    assert phi3ref.load(tiny_model("phi3-mini", "Q8_0"), numerics=ExactNumerics()).numerics.name == "exact"


def test_a_warning_points_at_the_callers_line(tiny_model):
    with pytest.warns(UserWarning, match="more than the 512 positions") as caught:
        phi3ref.load(tiny_model("phi3-mini", "Q8_0"), n_ctx=1024)
    assert caught[0].filename == __file__
