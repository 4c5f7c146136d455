"""Sampler functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from phi3ref.sampler import (
    SamplingParams,
    apply_repeat_penalty,
    apply_temperature,
    min_p_filter,
    sample,
    softmax,
    top_k_filter,
    top_p_filter,
)

NEG = -np.inf


def test_repeat_penalty_vector():
    out = apply_repeat_penalty(np.array([2.0, -2.0, 0.0], np.float32), [0, 1, 2], 1.1)
    assert np.allclose(out, [1.8181818, -2.2, 0.0])


def test_repeat_penalty_counts_each_token_once_and_leaves_others():
    out = apply_repeat_penalty(np.array([4.0, 3.0, -1.0], np.float32), [0, 0, 0, 2], 2.0)
    assert out.tolist() == [2.0, 3.0, -2.0]
    assert apply_repeat_penalty(np.array([1.0]), [], 2.0).tolist() == [1.0]


def test_temperature():
    assert np.allclose(apply_temperature(np.array([1.0, 2.0]), 0.5), [2.0, 4.0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(np.array([1.0]), 0)


def test_top_k():
    out = top_k_filter(np.array([1.0, 5.0, 3.0, 4.0]), 2)
    assert out.tolist() == [NEG, 5.0, NEG, 4.0]
    assert top_k_filter(np.array([1.0, 2.0]), 5).tolist() == [1.0, 2.0]


def probs_logits(p):
    return np.log(np.array(p, dtype=np.float64)).astype(np.float32)


def test_top_p_keeps_the_token_that_crosses():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert np.isfinite(top_p_filter(logits, 0.6)).tolist() == [True, True, False, False]  # 0.5 < 0.6 <= 0.8
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [True, False, False, False]  # reaches exactly: stop
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert np.isfinite(top_p_filter(logits, 1.0)).all()
    assert np.isfinite(top_p_filter(logits, 1e-9)).tolist() == [True, False, False, False]


def test_top_p_order_is_by_probability_not_position():
    logits = probs_logits([0.1, 0.6, 0.3])
    assert np.isfinite(top_p_filter(logits, 0.7)).tolist() == [False, True, True]


def test_min_p():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert np.isfinite(min_p_filter(logits, 0.3)).tolist() == [True, True, True, False]  # >= 0.15
    assert np.isfinite(min_p_filter(logits, 0.0)).all()


def test_softmax_of_filtered():
    p = softmax(np.array([0.0, NEG, 0.0], np.float32))
    assert p.tolist() == [0.5, 0.0, 0.5]


def test_greedy_and_seeded_draws():
    logits = np.array([0.1, 3.0, 0.2, 2.9], np.float32)
    assert sample(logits, SamplingParams(temperature=0), np.random.default_rng(0)) == 1
    params = SamplingParams(temperature=1.0)
    a = [sample(logits, params, np.random.default_rng(7)) for _ in range(3)]
    b = [sample(logits, params, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    draws = [sample(logits, params, rng) for rng in [np.random.default_rng(0)] for _ in range(2000)]
    freq = np.bincount(draws, minlength=4) / 2000
    assert np.allclose(freq, softmax(logits), atol=0.03)


def test_sample_applies_the_penalty_over_the_last_n():
    logits = np.array([5.0, 4.9, 0.0], np.float32)
    params = SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2)
    assert sample(logits, params, np.random.default_rng(0), recent=[0]) == 1  # 5/1.5 < 4.9
    assert sample(logits, params, np.random.default_rng(0), recent=[0, 2, 2]) == 0  # 0 fell out of the window


def test_filters_restrict_the_draw():
    logits = np.array([3.0, 2.9, 2.8, -5.0], np.float32)
    params = SamplingParams(temperature=5.0, top_k=2)
    rng = np.random.default_rng(1)
    assert {sample(logits, params, rng) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),

        ({"min_p": -0.1}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_last_n": -1}, "repeat_last_n"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"top_k": 2.5}, TypeError, "top_k must be an integer, got 2.5"),
        ({"top_k": True}, TypeError, "top_k must be an integer"),
        ({"temperature": "0.5"}, TypeError, "temperature must be a number"),
        ({"temperature": 10**400}, ValueError, "temperature must be a finite number, got an integer of 1329 bits"),
        ({"top_p": 1 + 2j}, TypeError, "top_p must be a number"),
        ({"repeat_last_n": np.int64(-1)}, ValueError, "repeat_last_n must be an integer >= 0"),
    ],
)
def test_values_of_the_wrong_kind_name_the_parameter(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), repeat_last_n=np.uint8(8))
    assert sample(np.array([1.0, 2.0, 3.0], np.float32), p, np.random.default_rng(0)) in (0, 1, 2)


def test_careless_sample_arguments():
    logits, rng = np.zeros(3, np.float32), np.random.default_rng(0)
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):
        sample(logits, SamplingParams(), None)
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        sample(logits, {"temperature": 1.0}, rng)
    with pytest.raises(TypeError, match="recent must be a sequence of token ids"):
        sample(logits, SamplingParams(repeat_penalty=1.2), rng, None)
    with pytest.raises(TypeError, match="a recent token id must be an integer, got 'a'"):
        sample(logits, SamplingParams(repeat_penalty=1.2), rng, ["a"])
    with pytest.raises(ValueError, match="outside the logits"):
        sample(logits, SamplingParams(repeat_penalty=1.2), rng, [2**70])
    with pytest.raises(TypeError, match="logits must be a 1-D array of numbers"):
        sample(["a", "b"], SamplingParams(), rng)


# -- refusals and properties ------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits,message",
    [
        (np.array([0.0, np.nan, 1.0], np.float32), "hold nan at token 1"),
        (np.array([0.0, np.inf], np.float32), "hold inf at token 1"),
        (np.full(4, -np.inf, np.float32), "every logit is -inf"),
    ],
)
def test_logits_without_a_distribution_are_refused(logits, message):
    with pytest.raises(ValueError, match=message):
        sample(logits, SamplingParams(), np.random.default_rng(0))


def test_recent_ids_outside_the_logits_are_refused():
    with pytest.raises(ValueError, match="recent token id 99 is outside the 3 logits"):
        sample(np.zeros(3, np.float32), SamplingParams(repeat_penalty=1.3), np.random.default_rng(0), [99])


def test_a_vanishing_temperature_is_argmax():
    logits = np.array([1e30, 3e30, -2e30], np.float32)
    assert sample(logits, SamplingParams(temperature=1e-30), np.random.default_rng(0)) == 1
    # logits all below 0 divided by a temperature float32 cannot hold (or that makes them -inf)
    for temperature in (1e-40, 1e-50, 1e-300):
        assert sample(np.array([-2.0, -1.0, -3.0], np.float32), SamplingParams(temperature=temperature), np.random.default_rng(0)) == 1
        assert sample(np.array([0.0, -1.0], np.float32), SamplingParams(temperature=temperature), np.random.default_rng(0)) == 0


_LOGITS = hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e4, 1e4, width=32))
_PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(1e-3, 5.0)),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
    top_p=st.one_of(st.none(), st.floats(1e-3, 1.0)),
    min_p=st.one_of(st.none(), st.floats(0.0, 1.0)),
    repeat_penalty=st.floats(0.5, 2.0),
    repeat_last_n=st.integers(0, 8),
)


@settings(max_examples=400, deadline=None)
@given(logits=_LOGITS, params=_PARAMS, seed=st.integers(0, 2**32), recent=st.lists(st.integers(0, 39), max_size=10))
def test_sample_draws_an_allowed_token(logits, params, seed, recent):
    """Whatever the settings, the token is an index of the logits that the filters kept,
    and the same seed draws it again."""
    recent = [r for r in recent if r < logits.size]
    token = sample(logits, params, np.random.default_rng(seed), recent)
    assert 0 <= token < logits.size
    assert token == sample(logits, params, np.random.default_rng(seed), recent)
    if params.top_k is not None:
        penalized = apply_repeat_penalty(logits, recent[-params.repeat_last_n:] if params.repeat_last_n else [], params.repeat_penalty)
        kept = top_k_filter(penalized, params.top_k)
        assert kept[token] > -np.inf or params.temperature == 0


@settings(max_examples=300, deadline=None)
@given(logits=_LOGITS, k=st.integers(1, 50), p=st.floats(1e-3, 1.0))
def test_filters_keep_the_best_token(logits, k, p):
    best = int(np.argmax(logits))
    for filtered in (top_k_filter(logits, k), top_p_filter(logits, p), min_p_filter(logits, p)):
        assert filtered[best] == logits[best]
        assert np.all((filtered == logits) | (filtered == -np.inf))
    assert np.count_nonzero(top_k_filter(logits, k) > -np.inf) >= min(k, logits.size)
