"""Sampler functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

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
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_last_n": -1}, "repeat_last_n"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
