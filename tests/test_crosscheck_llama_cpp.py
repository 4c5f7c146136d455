"""phi3ref's "ggml" numerics against llama.cpp, bit for bit: logits of prompts and of
generation, traces layer by layer, greedy generation, and llama.cpp's failures.

Tier ``crosscheck``: needs llama-cpp-python (the ``crosscheck`` extra); tier ``levels``
builds llama.cpp for the other instruction-set levels this CPU runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import phi3ref
from phi3ref import isa
from phi3ref.crosscheck import compare, compare_traces, generation_logits, llama_cpp_calls, llama_cpp_quantize
from phi3ref.synthetic import write_model

pytestmark = pytest.mark.crosscheck


def test_compare_traces_finds_the_first_difference():
    """compare_traces reports a changed tensor, by name and size of the change; kq tensors
    are compared without llama.cpp's padding of the KV length."""
    ours = {"a-0": np.ones((2, 3), np.float32), "c-0": np.ones(3, np.float32), "kq-0": np.zeros((1, 2, 2, 3), np.float32)}
    theirs = {"a-0": np.ones((1, 1, 2, 3), np.float32), "c-0": np.ones(3, np.float32), "kq-0": np.zeros((1, 2, 2, 256), np.float32)}
    theirs["c-0"][1] = 1.5
    ours["kq-0"][0, 0, 0, 0] = theirs["kq-0"][0, 0, 0, 0] = np.nan
    theirs["kq-0"][0, 0, 0, 100] = 7  # padding
    got = compare_traces(ours, theirs)
    assert [(m.name, m.equal, m.max_abs) for m in got] == [("a-0", True, 0.0), ("c-0", False, 0.5), ("kq-0", True, 0.0)]
    with pytest.raises(ValueError, match=r"trace tensor a-0: \(2, 3\) here, \(4,\) in llama.cpp"):
        compare_traces({"a-0": ours["a-0"]}, {"a-0": np.ones(4, np.float32)})



# the tests below run llama.cpp (compare_traces above needs nothing)
NEEDS_LLAMA_CPP = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install phi3ref[crosscheck])")
# ---- phi3ref's "ggml" numerics against llama.cpp, bit for bit, at every level this CPU runs
# The default run checks the host's level against the installed (native) llama-cpp-python
# where that build computes at a phi3ref level, else against llama.cpp built at the host's
# level. Every other level this CPU runs is tier ``levels`` (pytest -m levels): llama.cpp
# is built for it from the installed llama-cpp-python's sources (phi3ref.llama_builds,
# cached; minutes per level) and runs in a child process; phi3ref runs the same level in
# this one. The shapes keep each model's real head size (96, 128; partial rotary 96 of
# 128; GQA ratios), plus a head size of 40 that no lane count divides.

HOST = isa.host_features()
INSTALLED_IS_HOST_LEVEL = not isa.native_gaps(HOST)


def _level_param(level: isa.Level):
    missing = sorted(level.features - HOST)
    if missing:
        return pytest.param(None, id=level.name, marks=pytest.mark.skip(
            reason=f"this CPU cannot run llama.cpp built for {level.name} (lacks {', '.join(missing)})"))
    if level != isa.host_level():
        return pytest.param(level, id=level.name, marks=pytest.mark.levels)
    return pytest.param(level, id=level.name)


LEVEL_PARAMS = [_level_param(level) for level in isa.LEVELS.values()]


def _llama_cpp_at(level: isa.Level) -> isa.Level | None:
    """The ``level`` argument of llama_cpp_calls for phi3ref's ``level``: None (the
    installed build, no compile) where that build computes at this level."""
    return None if INSTALLED_IS_HOST_LEVEL and level == isa.host_level() else level


# the llama.cpp that computes at the host's level: the installed one, or built for it (the
# installed one is built natively: on a CPU with AMX it takes paths no level follows)
HOST_BUILD = _llama_cpp_at(isa.host_level())


PRESETS_HERE = ["phi3-mini", "phi3-medium", "phi3.5-mini", "phi4", "phi4-mini"]  # size "heads": the real head sizes
WRITTEN = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
LLAMA_QUANTIZED = ["Q2_K", "Q3_K_M", "IQ4_NL", "IQ4_XS"]  # types phi3ref cannot write: llama.cpp's quantizer makes them
ALL_QUANTS = WRITTEN + LLAMA_QUANTIZED
N_CTX = 2048


@pytest.fixture(scope="session")
def realistic_model(model_dir):
    """realistic_model(preset, quant): a synthetic model of size "heads", written once."""
    made: dict[tuple[str, str], Path] = {}

    def get(preset: str, quant: str) -> Path:
        key = (preset, quant)
        if key not in made:
            path = model_dir / f"real-{preset}-{quant}.gguf"
            if quant in LLAMA_QUANTIZED:
                llama_cpp_quantize(get(preset, "F32"), path, quant)
            elif preset == "phi3-mini-hd40":  # head size 40: no lane count divides it (32-blocks only)
                write_model(path, preset="phi3-mini", quant=quant, n_embd=320, n_head=8, n_head_kv=8, n_rot=40, n_ctx=N_CTX, seed=3)
            else:
                write_model(path, preset=preset, size="heads", quant=quant, seed=2)
            made[key] = path
        return made[key]

    return get


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 32000, size=n).tolist()


def _check(results: list[tuple[str, "object"]]) -> None:
    for label, c in results:
        print(f"  {label}: {c}")
    bad = [label for label, c in results if c.max_abs != 0]
    assert not bad, f"not bit-identical to llama.cpp: {bad}"


# The prompts' logits compared: those of the last LOGIT_ROWS positions, asked of both
# runtimes as llama-perplexity asks (llama.cpp then skips the others' last feed-forward and
# head). Every position still runs through the layers, and the output head — by far the
# largest product of these small-width models (Phi-4-mini's 200k rows of 768 outweigh its
# two layers many times over) — still meets a batch past the kernels' token tiles.
LOGIT_ROWS = 70  # past a tile of 64 tokens (the eight-row kernels'), and no multiple of four (the GEMM's groups)


@NEEDS_LLAMA_CPP
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS_HERE)
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_prompt_logits_equal_llama_cpp(level, preset, realistic_model):
    """Every weight type, a 300-token prompt, and a 600-token one in two micro-batches (the
    logits of their last LOGIT_ROWS positions): max |Δlogit| = 0."""
    cases = [(q, _prompt(300, 7)) for q in ALL_QUANTS] + [("Q4_K_M", _prompt(600, 8))]
    calls = [("logits", dict(path=str(realistic_model(preset, q)), tokens=p, n_ctx=N_CTX, first=len(p) - LOGIT_ROWS))
             for q, p in cases]
    theirs = llama_cpp_calls(calls, level=_llama_cpp_at(level))
    results = []
    for (quant, prompt), ref in zip(cases, theirs):
        ours = phi3ref.load(realistic_model(preset, quant), isa=level, n_ctx=N_CTX).logits(prompt, first=len(prompt) - LOGIT_ROWS)
        results.append((f"{level} {preset} {quant} {len(prompt)} tokens", compare(ours, ref)))
    _check(results)


def _generation(path: Path, level: isa.Level, prompt: list[int], continuation: list[int]) -> np.ndarray:
    return generation_logits(phi3ref.load(path, isa=level, n_ctx=N_CTX), prompt, continuation)


@NEEDS_LLAMA_CPP
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS_HERE)
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_generation_logits_equal_llama_cpp(level, preset, realistic_model):
    """The generation path (prompt in one batch, then a token at a time through the KV
    cache; llama.cpp's kernels for single tokens differ): every weight type for 24 steps,
    and Q4_K_M 44 steps past 1,000 positions (a 980-token prompt in two micro-batches
    before them: one token's attention over a long cache, without a thousand head products)."""
    cases = [(q, _prompt(40, 9), _prompt(24, 10)) for q in ALL_QUANTS] + [("Q4_K_M", _prompt(980, 11), _prompt(44, 12))]
    calls = [("generation", dict(path=str(realistic_model(preset, q)), prompt=p, continuation=c, n_ctx=N_CTX)) for q, p, c in cases]
    theirs = llama_cpp_calls(calls, level=_llama_cpp_at(level))
    results = []
    for (quant, prompt, cont), ref in zip(cases, theirs):
        ours = _generation(realistic_model(preset, quant), level, prompt, cont)
        results.append((f"{level} {preset} {quant} to position {len(prompt) + len(cont)}", compare(ours, ref)))
    _check(results)


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_head_size_no_lane_count_divides(level, realistic_model):
    """Head size 40: llama.cpp's tinyBLAS declines the attention scores of a batch (40 is no
    multiple of 8 or 16) and ggml_vec_dot_f16 takes them, with a double tail."""
    cases = [(q, _prompt(100, 13)) for q in ("Q8_0", "F16")]
    calls = [("logits", dict(path=str(realistic_model("phi3-mini-hd40", q)), tokens=p, n_ctx=N_CTX)) for q, p in cases]
    calls += [("generation", dict(path=str(realistic_model("phi3-mini-hd40", "Q8_0")), prompt=_prompt(20, 14), continuation=_prompt(30, 15), n_ctx=N_CTX))]
    theirs = llama_cpp_calls(calls, level=_llama_cpp_at(level))
    results = []
    for (quant, prompt), ref in zip(cases, theirs[:2]):
        results.append((f"{level} head 40 {quant}", compare(phi3ref.load(realistic_model("phi3-mini-hd40", quant), isa=level, n_ctx=N_CTX).logits(prompt), ref)))
    ours = _generation(realistic_model("phi3-mini-hd40", "Q8_0"), level, _prompt(20, 14), _prompt(30, 15))
    results.append((f"{level} head 40 Q8_0 generation", compare(ours, theirs[2])))
    _check(results)


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_the_demo_model_equals_llama_cpp(level):
    """The trained demo model (trained weights, tied embeddings, Q4_K_M): the tutorial's chat
    prompt and its generation, a 300-token prompt of its own training text."""
    from phi3ref.hub import demo_path
    from phi3ref.training import documents

    path = demo_path()
    model = phi3ref.load(path, isa=level)
    chat = model.tokenizer.encode("<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>\n")
    text = model.tokenizer.encode(documents()[0].text)[:300]
    theirs = llama_cpp_calls([("logits", dict(path=str(path), tokens=text, n_ctx=model.n_ctx)),
                              ("generation", dict(path=str(path), prompt=chat, continuation=text[:40], n_ctx=model.n_ctx))],
                             level=_llama_cpp_at(level))
    _check([(f"{level} demo model, 300 tokens of text", compare(model.logits(text), theirs[0])),
            (f"{level} demo model, chat prompt and 40 tokens", compare(generation_logits(model, chat, text[:40]), theirs[1]))])


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_separate_q_k_v_projections_equal_llama_cpp(level, tmp_path):
    """A file with attn_q / attn_k / attn_v instead of attn_qkv (llama.cpp's phi3 graph takes
    either; its three products run as three matmuls here too): prompt and generation."""
    path = write_model(tmp_path / "split-qkv.gguf", preset="phi3-medium", size="heads", quant="Q4_K_M", seed=5, fused_qkv=False)
    prompt, continuation = _prompt(100, 17), _prompt(20, 18)
    theirs = llama_cpp_calls([("logits", dict(path=str(path), tokens=prompt, n_ctx=N_CTX)),
                              ("generation", dict(path=str(path), prompt=prompt[:30], continuation=continuation, n_ctx=N_CTX))],
                             level=_llama_cpp_at(level))
    ours = phi3ref.load(path, isa=level, n_ctx=N_CTX).logits(prompt)
    _check([(f"{level} separate q/k/v prompt", compare(ours, theirs[0])),
            (f"{level} separate q/k/v generation", compare(_generation(path, level, prompt[:30], continuation), theirs[1]))])


NATIVE = pytest.mark.skipif(
    bool(isa.native_gaps(HOST)), reason="the installed llama-cpp-python is built natively: " + " / ".join(isa.native_gaps(HOST)))


@NEEDS_LLAMA_CPP
@NATIVE
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_K_M", "F16"])
def test_installed_llama_cpp_is_the_host_level(quant, tiny_model):
    """The installed (native) llama-cpp-python computes at phi3ref.isa.host_level()."""
    path = tiny_model("phi3-mini", quant)
    prompt = _prompt(64, 7)
    ours = phi3ref.load(path, n_ctx=512).logits(prompt)
    c = compare(ours, llama_cpp_calls([("logits", dict(path=str(path), tokens=prompt, n_ctx=512))])[0])
    print(f"{isa.host_level()} {quant} vs the installed llama.cpp: {c}")
    assert c.max_abs == 0, c


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("preset", ["phi3-medium", "phi4-mini"])
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_trace_matches_llama_cpp_layer_by_layer(level, preset, realistic_model):
    """Every intermediate phi3ref traces equals llama.cpp's tensor of the same name, on a
    prompt past every batch threshold (GQA, head 128; Phi-4-mini: partial rotary, the
    200k-row tied output head)."""
    path = realistic_model(preset, "Q4_K_M")
    prompt = _prompt(300, 16)
    (theirs,) = llama_cpp_calls([("trace", dict(path=str(path), tokens=prompt, n_ctx=N_CTX))], level=_llama_cpp_at(level))
    matches = compare_traces(phi3ref.load(path, isa=level, n_ctx=N_CTX).trace(prompt), theirs)
    assert [m.name for m in matches if not m.equal] == []
    assert {"wqkv-0", "kq-0", "kq_soft_max-1", "kqv_out-1", "ffn_up-0", "ffn_swiglu-0", "l_out-1", "result_output"} <= {m.name for m in matches}


@NEEDS_LLAMA_CPP
@NATIVE
@pytest.mark.parametrize("preset,quant", [("phi3-mini", "Q4_K_M"), ("phi4-mini", "Q4_0"), ("phi3-medium", "Q8_0"), ("phi4", "Q4_K_M")])
def test_greedy_generation_matches_llama_cpp(preset, quant, tiny_model):
    """phi3ref.generate(temperature=0) picks the same tokens as llama.cpp's own greedy
    sampler on the same file and prompt."""
    path = tiny_model(preset, quant)
    model = phi3ref.load(path, n_ctx=256)
    ours = phi3ref.generate("Write a haiku about ice hockey", model=model, temperature=0, repeat_penalty=1.0, max_tokens=24)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, verbose=False)
    try:
        theirs = []
        for token in llm.generate(ours.prompt_tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            if token in model.tokenizer.eog_ids or len(theirs) == 24:
                break
            theirs.append(token)
    finally:
        llm.close()
    assert ours.tokens == theirs


@NEEDS_LLAMA_CPP
@NATIVE
@pytest.mark.parametrize("preset,quant", [("phi3-mini", "Q4_K_M"), ("phi4-mini", "Q8_0")])
def test_greedy_logprobs_match_llama_cpp(preset, quant, tiny_model):
    """generate(tokens=..., temperature=0, logprobs=5) against llama-cpp-python's
    create_completion(logprobs=5) on a model with every position's logits (logits_all,
    which its logprobs need; echo=True here runs the prompt pass the same way): the same
    text and log-probabilities (llama-cpp-python computes them in float32). Its echo
    cannot take a prompt of token ids (a TypeError inside create_completion)."""
    import llama_cpp

    path = tiny_model(preset, quant)
    prompt = _prompt(12, 19)
    model = phi3ref.load(path, n_ctx=256)
    ours = phi3ref.generate(tokens=prompt, model=model, temperature=0, repeat_penalty=1.0, max_tokens=12, logprobs=5, echo=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False)
    try:
        theirs = llm.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1, repeat_penalty=1.0, logprobs=5)
    finally:
        llm.close()
    choice = theirs["choices"][0]
    got = [r.logprob for r in ours.logprobs]
    expected = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(expected) == 12 and ours.finish_reason == "length"
    assert np.allclose(got, expected, rtol=0, atol=2e-5), (got, expected)
    assert [max(top.values()) for top in choice["logprobs"]["top_logprobs"]] == pytest.approx([r.top[0][1] for r in ours.logprobs], abs=2e-5)
    assert choice["text"] == ours.text


# ---- perplexity as llama.cpp computes it


PERPLEXITY_TEXT = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("preset,quant,n_ctx", [("phi3-mini", "Q4_K_M", 128), ("phi3.5-mini", "Q8_0", 320)])
def test_perplexity_logits_are_llama_cpp_s(preset, quant, n_ctx, tiny_model):
    """Each chunk's scored half has llama.cpp's logits bit for bit (asked for as
    llama-perplexity asks: outputs from n_ctx / 2 on), so its perplexity is llama.cpp's
    (phi3.5-mini at 320: LongRoPE's long factors, as llama.cpp picks them for that context)."""
    from phi3ref.perplexity import chunks, perplexity, text_tokens, token_nll

    path = tiny_model(preset, quant)
    model = phi3ref.load(path, n_ctx=n_ctx)
    tokens = text_tokens(model.tokenizer, PERPLEXITY_TEXT)
    pieces = chunks(tokens, n_ctx, 3, model.tokenizer.bos_id)
    theirs = llama_cpp_calls([("chunk_logits", dict(path=str(path), tokens=c, first=n_ctx // 2, n_ctx=n_ctx)) for c in pieces],
                             level=HOST_BUILD)
    _check([(f"{preset} {quant} chunk {i}", compare(model.logits(c, first=n_ctx // 2), t)) for i, (c, t) in enumerate(zip(pieces, theirs))])
    nll = np.concatenate([token_nll(t[:-1], c[n_ctx // 2 + 1 :]) for c, t in zip(pieces, theirs)])
    assert perplexity(model, tokens, n_ctx, 3).ppl == pytest.approx(float(np.exp(nll.mean())), rel=1e-12)


@pytest.fixture(scope="session")
def llama_perplexity():
    """llama.cpp's own llama-perplexity at this CPU's level, built once from the installed
    llama-cpp-python's sources (phi3ref.llama_builds; about five minutes on two cores, then
    cached); skipped where it cannot be built (no compiler, no package index)."""
    from phi3ref.llama_builds import BuildError, build_tool

    try:
        return build_tool("llama-perplexity", isa.host_level())
    except BuildError as e:
        pytest.skip(f"llama-perplexity could not be built: {str(e)[:300]}")


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("preset,quant,n_ctx", [("phi3-mini", "Q4_K_M", 128), ("phi4-mini", "Q4_0", 256)])
def test_perplexity_equals_llama_perplexity(preset, quant, n_ctx, tiny_model, tmp_path, llama_perplexity):
    """`phi3ref perplexity` against llama.cpp's own llama-perplexity (built from the
    installed llama-cpp-python's sources at this CPU's level, -fa off): the same running
    estimates and final PPL = x +/- err, to the digits it prints."""
    import re
    import subprocess

    from phi3ref.perplexity import perplexity, text_tokens

    path = tiny_model(preset, quant)
    text = tmp_path / "text.txt"
    text.write_text(PERPLEXITY_TEXT, encoding="utf-8")
    done = subprocess.run([str(llama_perplexity), "-m", str(path), "-f", str(text), "-c", str(n_ctx), "--chunks", "4",
                           "-fa", "off", "-t", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", log)]
    model = phi3ref.load(path, n_ctx=n_ctx)
    ours = perplexity(model, text_tokens(model.tokenizer, PERPLEXITY_TEXT), n_ctx, 4)
    assert final, log[-2000:]
    assert f"{ours.ppl:.4f}" == final.group(1) and f"{ours.ppl_err:.5f}" == final.group(2)
    assert [f"{p:.4f}" for p in ours.running] == [f"{p:.4f}" for p in running]


@NEEDS_LLAMA_CPP
def test_compare_against_llama_cpp(tiny_model, tmp_path):
    """compare_runtimes against llama.cpp on a quantized file: KL 0, top-1 100%, max |Δ| 0
    in ggml numerics; against llama.cpp on another file of the same weights, a KL > 0."""
    from phi3ref.crosscheck import compare_runtimes

    path = tiny_model("phi3-mini", "Q4_K_M")
    same = compare_runtimes(path, "llama.cpp", text=PERPLEXITY_TEXT, n_ctx=128, n_chunks=2, level=HOST_BUILD)
    assert same.count == 126 and same.kl_max == 0 and same.top1 == 1 and same.max_abs == 0 and same.ppl_model == same.ppl_against
    tokens = compare_runtimes(path, "llama.cpp", tokens=_prompt(50, 20), level=HOST_BUILD)
    assert tokens.count == 49 and tokens.max_abs == 0
    other = compare_runtimes(path, "llama.cpp", text=PERPLEXITY_TEXT, n_ctx=128, n_chunks=2, against_model=tiny_model("phi3-mini", "Q8_0"),
                             level=HOST_BUILD)
    assert other.kl_mean > 0 and other.max_abs > 0


def _kl_report(log: str) -> dict[str, float]:
    import re

    found = {key: re.search(pattern, log) for key, pattern in
             {"kl_mean": r"Mean    KLD:\s+(-?[0-9.]+)", "kl_max": r"Maximum KLD:\s+(-?[0-9.]+)",
              "top1": r"Same top p:\s+([0-9.]+)", "ppl_model": r"Mean PPL\(Q\)\s+:\s+([0-9.]+)",
              "ppl_against": r"Mean PPL\(base\)\s+:\s+([0-9.]+)"}.items()}
    assert all(found.values()), log[-3000:]
    return {key: float(m.group(1)) for key, m in found.items()}


@NEEDS_LLAMA_CPP
def test_kl_base_files_go_both_ways_with_llama_perplexity(tiny_model, tmp_path, llama_perplexity):
    """phi3ref's KL-divergence base file is byte for byte llama-perplexity's for the same
    model and text; llama-perplexity reads phi3ref's and reports KL ~ 0 for the same model
    and, for another file, the KL phi3ref reports; phi3ref reads llama-perplexity's."""
    import subprocess

    from phi3ref.crosscheck import compare_runtimes

    text = tmp_path / "text.txt"
    text.write_text(PERPLEXITY_TEXT, encoding="utf-8")
    a, b = tiny_model("phi3-mini", "Q4_K_M"), tiny_model("phi3-mini", "Q8_0")

    def llama(*args):
        done = subprocess.run([str(llama_perplexity), "-f", str(text), "-c", "128", "--chunks", "4", "-fa", "off", "-t", "2", *args],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    llama("-m", str(a), "--kl-divergence-base", str(tmp_path / "theirs.kld"))
    assert compare_runtimes(a, None, text=PERPLEXITY_TEXT, n_ctx=128, n_chunks=4, save_kld_base=tmp_path / "ours.kld") is None
    assert (tmp_path / "ours.kld").read_bytes() == (tmp_path / "theirs.kld").read_bytes()
    same = _kl_report(llama("-m", str(a), "--kl-divergence-base", str(tmp_path / "ours.kld"), "--kl-divergence"))
    assert abs(same["kl_mean"]) < 1e-4 and same["top1"] == 100.0
    theirs = _kl_report(llama("-m", str(b), "--kl-divergence-base", str(tmp_path / "ours.kld"), "--kl-divergence"))
    ours = compare_runtimes(b, tmp_path / "theirs.kld")
    assert ours.count == 4 * 63 and theirs["kl_mean"] > 1e-4
    assert ours.kl_mean == pytest.approx(theirs["kl_mean"], rel=2e-3, abs=2e-6)
    assert ours.kl_max == pytest.approx(theirs["kl_max"], rel=2e-3, abs=2e-6)
    assert 100 * ours.top1 == pytest.approx(theirs["top1"], abs=1e-3)
    assert ours.ppl_model == pytest.approx(theirs["ppl_model"], rel=1e-5) and ours.ppl_against == pytest.approx(theirs["ppl_against"], rel=1e-5)


@NEEDS_LLAMA_CPP
def test_diverge_names_the_layer_and_op_of_an_altered_weight(tiny_model, tmp_path):
    """diverge against llama.cpp: the same file agrees bit for bit at every op; a copy of the
    file with one weight of layer 1 changed parts at that layer's op (ffn_up-1), and tokens
    of a text are compared first."""
    import shutil

    from gguf import GGUFReader

    from phi3ref.diverge import diverge

    path = tiny_model("phi3-mini", "Q8_0")
    same = diverge(path, "llama.cpp", text="<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>", level=HOST_BUILD)
    assert same.tokens_differ is None and same.first is None and all(e.equal for e in same.table)
    broken = tmp_path / "broken.gguf"
    shutil.copy(path, broken)
    reader = GGUFReader(broken, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == "blk.1.ffn_up.weight"]
    tensor.data[3, 2:40] = 0  # the int8 codes of the first block of row 3 (after its float16 scale)
    reader.data.flush()
    del reader
    parted = diverge(path, "llama.cpp", tokens=_prompt(40, 21), against_model=broken, level=HOST_BUILD)
    assert parted.first is not None and (parted.first.layer, parted.first.op) == (1, "ffn_up"), parted.format()


@NEEDS_LLAMA_CPP
def test_a_failing_llama_cpp_is_an_error_here(tmp_path):
    """llama.cpp runs in a child process: its failure (or crash) raises, naming how it ended."""
    with pytest.raises(RuntimeError, match=r"the installed llama-cpp-python failed \(exit status 1\)"):
        llama_cpp_calls([("logits", dict(path=str(tmp_path / "missing.gguf"), tokens=[1, 2]))])
