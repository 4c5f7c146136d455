"""phi3ref.perplexity: llama-perplexity's chunks, scores and estimate; the command line.
Against llama.cpp: tests/test_crosscheck_llama_cpp.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phi3ref
from phi3ref.perplexity import chunks, perplexity, text_tokens, token_nll

TEXT = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")  # a few thousand tokens of prose and code


def test_token_nll_is_minus_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 4).astype(np.float32)
    targets = rng.integers(0, 300, size=5)
    x = logits.astype(np.float64)
    expected = -(x[np.arange(5), targets] - x.max(axis=1) - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)))
    assert np.allclose(token_nll(logits, targets), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="token_nll takes logits"):
        token_nll(logits, targets[:3])


def test_chunks_are_llama_perplexity_s():
    tokens = list(range(100, 100 + 50))
    got = chunks(tokens, 16, None, bos_id=1)
    assert [c[0] for c in got] == [1, 1, 1] and got[1][1:] == tokens[17:32]  # whole chunks only, BOS first
    assert len(chunks(tokens, 16, 2, bos_id=None)) == 2 and chunks(tokens, 16, 2, None)[1][0] == 116
    with pytest.raises(ValueError, match="needs at least 64 tokens; the text tokenizes to only 50"):
        chunks(tokens, 32, None, 1)
    for bad in (dict(n_ctx=2), dict(n_ctx=16.0), dict(n_ctx=16, n_chunks=0)):
        with pytest.raises(ValueError):
            chunks(tokens, bad["n_ctx"], bad.get("n_chunks"), 1)


def test_perplexity_scores_the_second_half_of_each_chunk(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"), n_ctx=64, numerics="exact")
    tokens = text_tokens(model.tokenizer, TEXT)
    assert tokens[0] == model.tokenizer.bos_id and tokens == model.tokenizer.encode(TEXT.removesuffix("\n"), special=False)
    seen = []
    result = perplexity(model, tokens, 64, n_chunks=3, progress=lambda c, n, p: seen.append((c, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and result.n_chunks == 3 and result.tokens_scored == 3 * 31
    nll = []
    for chunk in chunks(tokens, 64, 3, model.tokenizer.bos_id):
        every = model.logits(chunk)  # every position; the scored ones are 32 .. 62, predicting 33 .. 63
        x = every[32:63].astype(np.float64)
        nll += list(np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1) - x[np.arange(31), chunk[33:64]])
    assert result.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    assert result.running[-1] == result.ppl and np.allclose(result.nll, nll, rtol=1e-6)
    sd = np.sqrt((np.mean(np.square(nll)) - np.mean(nll) ** 2) / (len(nll) - 1))
    assert result.ppl_err == pytest.approx(result.ppl * sd, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than the chunks' 128"):
        perplexity(model, tokens, 128)


def test_logits_from_a_position_skip_the_others(tiny_model):
    """logits(tokens, first=k) are the rows k.. of every position's logits (exact numerics:
    each row's sums do not depend on the others)."""
    model = phi3ref.load(tiny_model("phi4-mini", "Q4_K_M"), numerics="exact")
    tokens = list(range(300, 340))
    assert np.array_equal(model.logits(tokens, first=25), model.logits(tokens)[25:])
    for bad in (40, -1, 2.0, True):
        with pytest.raises(ValueError, match="first must be a position of the 40 tokens"):
            model.logits(tokens, first=bad)


@pytest.mark.slow  # a child process
def test_cli_perplexity(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    env_cmd = [sys.executable, "-m", "phi3ref.cli", "perplexity", "demo", "--text", str(text), "--n-ctx", "64", "--chunks", "2"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run(env_cmd + ["--json"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"ppl", "ppl_err", "n_chunks", "n_ctx", "tokens_scored"} <= set(result)
    assert result["n_chunks"] == 2 and result["n_ctx"] == 64 and result["tokens_scored"] == 62 and result["ppl"] > 1
    plain = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 0 and f"Final estimate: PPL = {result['ppl']:.4f} +/- " in plain.stdout
    (tmp_path / "short.txt").write_text("Write a haiku about ice hockey", encoding="utf-8")
    short = subprocess.run(env_cmd[:5] + ["--text", str(tmp_path / "short.txt"), "--n-ctx", "64"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert short.returncode == 2 and "needs at least 128 tokens" in short.stderr
    missing = subprocess.run(env_cmd[:6] + [str(tmp_path / "none.txt")], capture_output=True, text=True, timeout=600, env=env)
    assert missing.returncode == 1 and "no such file" in missing.stderr


# ---- KL-divergence base files and statistics


def test_kld_base_round_trip(tmp_path):
    from phi3ref.perplexity import KLD_MAGIC, quantize_log_probs, read_kld_base, write_kld_base

    rng = np.random.default_rng(1)
    n_ctx, n_vocab, n_chunks = 16, 301, 2  # an odd vocabulary: each record is padded to an even length
    blocks = [(rng.standard_normal((7, n_vocab)) * 3).astype(np.float32) for _ in range(n_chunks)]
    tokens = rng.integers(0, n_vocab, size=40).tolist()
    path = write_kld_base(tmp_path / "base.kld", tokens, n_ctx, n_chunks, n_vocab, iter(blocks))
    raw = path.read_bytes()
    assert raw[:8] == KLD_MAGIC and len(raw) == 20 + 4 * n_ctx * n_chunks + 2 * n_chunks * 7 * (302 + 4)
    base = read_kld_base(path)
    assert base.n_ctx == n_ctx and base.n_vocab == n_vocab and base.tokens.reshape(-1).tolist() == tokens[:32]
    for c, block in enumerate(blocks):
        x = block.astype(np.float64)
        logp = x - x.max(axis=1, keepdims=True) - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))
        got = base.log_probs(c)
        scale = np.ascontiguousarray(quantize_log_probs(block)[:, :2]).view(np.float32)[:, 0]
        above = logp > logp.max(axis=1, keepdims=True) - 16
        assert np.all(np.abs(got - logp)[above] <= (scale[:, None] * 0.51 + 1e-5).repeat(n_vocab, 1)[above])
    path.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="but its header .* means"):
        read_kld_base(path)
    path.write_bytes(b"not a base file at all")
    with pytest.raises(ValueError, match="not a llama-perplexity KL-divergence base file"):
        read_kld_base(path)
    with pytest.raises(ValueError, match="expected \\(7, 301\\) for 2 chunks"):
        write_kld_base(tmp_path / "x.kld", tokens, n_ctx, n_chunks, n_vocab, iter([blocks[0][:3]]))


def test_kl_statistics():
    from phi3ref.perplexity import kl_statistics

    rng = np.random.default_rng(2)
    q = (rng.standard_normal((30, 50)) * 2).astype(np.float32)
    base = q.astype(np.float64) + rng.standard_normal((30, 50)) * 0.3
    logp = base - base.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    targets = rng.integers(0, 50, size=30)
    same = kl_statistics([(q, q - np.log(np.exp(q.astype(np.float64)).sum(axis=1, keepdims=True)), targets, q)])
    assert same.kl_max < 1e-12 and same.top1 == 1.0 and same.max_abs == 0 and same.first_top1_diff is None
    s = kl_statistics([(q[:10], logp[:10], targets[:10], None), (q[10:], logp[10:], targets[10:], None)])
    logq = q - q.max(axis=1, keepdims=True)
    logq = logq - np.log(np.exp(logq.astype(np.float64)).sum(axis=1, keepdims=True))
    kl = (np.exp(logp) * (logp - logq)).sum(axis=1)
    assert s.count == 30 and s.kl_mean == pytest.approx(kl.mean()) and s.kl_max == pytest.approx(kl.max())
    assert s.kl_median == pytest.approx(np.median(kl)) and s.top1 == pytest.approx(np.mean(q.argmax(1) == logp.argmax(1)))
    assert s.ppl_against == pytest.approx(np.exp(-logp[np.arange(30), targets].mean()))
    differs = np.flatnonzero(q.argmax(1) != logp.argmax(1))
    assert s.first_top1_diff == (int(differs[0]) if differs.size else None)


def test_compare_against_saved_logits_and_a_base_file(tiny_model, tmp_path):
    from phi3ref.crosscheck import compare_runtimes

    path = tiny_model("phi3-mini", "Q4_K_M")
    ids = list(range(200, 240))
    np.save(tmp_path / "mine.npy", phi3ref.load(path, n_ctx=64).logits(ids))
    s = compare_runtimes(path, tmp_path / "mine.npy", tokens=ids)
    assert s.count == 39 and s.kl_max == 0 and s.top1 == 1 and s.max_abs == 0 and s.ppl_model == s.ppl_against
    other = compare_runtimes(path, tmp_path / "mine.npy", tokens=ids, numerics="exact")
    assert 0 < other.kl_mean < 1e-2 and other.max_abs > 0  # exact against ggml: quantized activations part them
    assert compare_runtimes(path, None, text=TEXT, n_ctx=64, n_chunks=2, save_kld_base=tmp_path / "b.kld") is None
    back = compare_runtimes(path, tmp_path / "b.kld")
    assert back.count == 2 * 31 and back.top1 == 1 and abs(back.kl_mean) < 1e-5 and back.max_abs is None
    np.savez(tmp_path / "wrong.npz", logits=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="logits of shape \\(3, 5\\) \\(float32\\); the positions compared need \\(40, 32064\\)"):
        compare_runtimes(path, tmp_path / "wrong.npz", tokens=ids)
    for kwargs, message in [(dict(against=None), "compare against a runtime"), (dict(against="vllm", tokens=ids), "neither a runtime"),
                            (dict(against=tmp_path / "b.kld", tokens=ids), "brings its own tokens"),
                            (dict(against="llama.cpp"), "give a text or token ids"),
                            (dict(against="llama.cpp", tokens=ids, save_kld_base=tmp_path / "c.kld"), "give a text, not token ids")]:
        with pytest.raises(ValueError, match=message):
            compare_runtimes(path, **kwargs)


def test_careless_comparisons(tiny_model, tmp_path):
    from phi3ref.crosscheck import compare_runtimes
    from phi3ref.perplexity import KLBaseWriter

    path = tiny_model("phi3-mini", "Q4_K_M")
    with pytest.raises(ValueError, match="needs at least 2 of them"):
        compare_runtimes(path, "llama.cpp", tokens=[5])
    with pytest.raises(ValueError, match="a target outside the vocabulary"):
        token_nll(np.zeros((2, 10), np.float32), [3, 10])
    np.save(tmp_path / "vocab.npy", np.zeros((40, 100), np.float32))
    with pytest.raises(ValueError, match=r"\(40, 100\) \(float32\); the positions compared need \(40, 32064\)"):
        compare_runtimes(path, tmp_path / "vocab.npy", tokens=list(range(200, 240)))
    compare_runtimes(path, None, text=TEXT, n_ctx=64, n_chunks=2, save_kld_base=tmp_path / "b.kld")
    with pytest.raises(ValueError, match="is the file compared against"):
        compare_runtimes(path, tmp_path / "b.kld", save_kld_base=tmp_path / "b.kld")
    with pytest.raises(ValueError, match="give no text, tokens or chunk count"):
        compare_runtimes(path, tmp_path / "b.kld", n_chunks=1)
    writer = KLBaseWriter(tmp_path / "partial.kld", list(range(64)), 16, 2, 50)
    writer.add(np.zeros((7, 50), np.float32))
    with pytest.raises(ValueError, match="1 chunks of logits for a base file of 2"):
        writer.close()
    assert not (tmp_path / "partial.kld").exists()
