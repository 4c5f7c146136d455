"""phi3ref.plots: each picture holds the numbers it was given (read back from the axes)."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref.lens import logit_lens, top_tokens

matplotlib = pytest.importorskip("matplotlib", reason="phi3ref.plots draws with matplotlib (pip install phi3ref[notebook])")
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402
from phi3ref import plots  # noqa: E402

TOKENS = [1, 32010, 14350, 263, 447, 18282, 1048, 14890, 18881, 32007, 32001]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


@pytest.fixture(scope="module")
def model(tiny_model):
    return phi3ref.load(tiny_model("phi3-mini", "Q8_0"), numerics="exact")


def test_attention_pattern(model):
    pattern = model.run_with_cache(TOKENS, ["kq_soft_max-1"])[1]["kq_soft_max-1"][2, 0]  # (n, n)
    labels = plots.token_labels(model.tokenizer, TOKENS)
    ax = plots.plot_attention(pattern, labels, title="head 1.2")
    assert np.array_equal(np.asarray(ax.images[0].get_array()), pattern)
    assert [t.get_text() for t in ax.get_xticklabels()] == labels and labels[2] == "\u00b7Write"
    with pytest.raises(ValueError, match="one head's .n_query, n_key. pattern"):
        plots.plot_attention(pattern[None])
    with pytest.raises(ValueError, match="10 labels for 11 keys"):
        plots.plot_attention(pattern, labels[:10])
    with pytest.raises(ValueError, match="n_query <= n_key"):
        plots.plot_attention(pattern.T[:, :4])
    # a continued pass: the queries are the last tokens, the labels name every key
    ax = plots.plot_attention(pattern[-3:], labels)
    assert [t.get_text() for t in ax.get_yticklabels()] == labels[-3:]


def test_head_scores():
    scores = np.array([[0.1, 0.9], [0.5, 0.25]])
    ax = plots.plot_head_scores(scores)
    assert np.array_equal(np.asarray(ax.images[0].get_array()), scores)
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.90", "0.50", "0.25"]


def test_logit_lens(model):
    lens = logit_lens(model, TOKENS)
    ax = plots.plot_logit_lens(lens, model.tokenizer, position=-1, k=3)
    with pytest.raises(ValueError, match="position must be an integer from -11 to 10, got 11"):
        plots.plot_logit_lens(lens, model.tokenizer, position=11)
    best = top_tokens(lens[-1, -1], model.tokenizer, 3)
    assert len(ax.lines) == 3
    for line, (t, text, p) in zip(ax.lines, best):
        assert line.get_label() == repr(text)
        assert np.isclose(line.get_ydata()[-1], p)  # the last depth is the model's own distribution
        row = lens[0, -1].astype(np.float64)
        assert np.isclose(line.get_ydata()[0], np.exp(row[t] - row.max()) / np.exp(row - row.max()).sum())


def test_distribution(model):
    logits = model.logits(TOKENS)[-1]
    probs = phi3ref.sampler.softmax(logits)
    ax = plots.plot_distribution(probs, model.tokenizer, k=5)
    heights = [bar.get_height() for bar in ax.patches]
    assert np.allclose(heights, [p for _, _, p in top_tokens(logits, model.tokenizer, 5)])
    with pytest.raises(ValueError, match="one row of 32064 probabilities"):
        plots.plot_distribution(probs[:5], model.tokenizer)
    with pytest.raises(ValueError, match="k must be an integer from 1 to 32064, got -1"):
        plots.plot_distribution(probs, model.tokenizer, k=-1)
    with pytest.raises(TypeError, match="k must be an integer, got True"):
        plots.plot_distribution(probs, model.tokenizer, k=True)


def test_rotation(model):
    cos, sin = model.rope.angles(np.arange(20), False)
    ax = plots.plot_rotation(cos, sin, pairs=(0, 5))
    assert np.array_equal(ax.lines[1].get_xdata(), cos[:, 5]) and np.array_equal(ax.lines[1].get_ydata(), sin[:, 5])
    assert np.allclose(np.hypot(ax.lines[0].get_xdata(), ax.lines[0].get_ydata()), 1, atol=1e-6)  # rotations keep lengths
    with pytest.raises(ValueError, match="pair must be an integer from 0 to 31, got 99"):
        plots.plot_rotation(cos, sin, pairs=(99,))
    with pytest.raises(TypeError, match="pair must be an integer, got 1.5"):
        plots.plot_rotation(cos, sin, pairs=(1.5,))


def test_nothing_else_imports_matplotlib():
    import subprocess
    import sys

    code = "import sys, phi3ref, phi3ref.lens, phi3ref.cli, phi3ref.training; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
