"""phi3ref's logits against HF transformers (numerics="exact") and llama.cpp (numerics="ggml").

Tier ``crosscheck``: needs the ``crosscheck`` extra (torch, transformers, llama-cpp-python).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_PRESETS

import phi3ref
from phi3ref.crosscheck import compare, compare_traces, generation_logits, transformers_logits

pytestmark = pytest.mark.crosscheck
pytest.importorskip("torch")
pytest.importorskip("transformers")

QUANTS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]
PROMPT = np.random.default_rng(42).integers(100, 32000, size=64).tolist()




@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_exact_matches_transformers(preset, quant, tiny_model):
    path = tiny_model(preset, quant)
    ours = phi3ref.load(path, numerics="exact").logits(PROMPT)
    theirs = transformers_logits(path, PROMPT)
    c = compare(ours, theirs)
    print(f"{preset} {quant} exact vs transformers: {c}")
    assert c.max_rel <= 1e-3 and c.top1 == 1.0, c


@pytest.mark.parametrize("preset", ["phi3.5-mini", "phi4-mini"])
def test_exact_matches_transformers_beyond_original_context(preset, tiny_model):
    """LongRoPE with the long factors: 300 positions > the original 256."""
    path = tiny_model(preset, "Q4_K_M")
    prompt = np.random.default_rng(1).integers(100, 32000, size=300).tolist()
    c = compare(phi3ref.load(path, numerics="exact").logits(prompt), transformers_logits(path, prompt))
    print(f"{preset} beyond original context, exact vs transformers: {c}")
    assert c.max_rel <= 1e-3 and c.top1 == 1.0, c


def test_exact_matches_transformers_with_sliding_window(tmp_path):
    from phi3ref.testing import write_model

    path = write_model(tmp_path / "sw.gguf", preset="phi3-mini", quant="Q8_0", sliding_window=16)
    c = compare(phi3ref.load(path, numerics="exact").logits(PROMPT), transformers_logits(path, PROMPT))
    assert c.max_rel <= 1e-3 and c.top1 == 1.0, c


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


llama_cpp = pytest.importorskip("llama_cpp")

from phi3ref import isa  # noqa: E402
from phi3ref.crosscheck import llama_cpp_calls, llama_cpp_quantize  # noqa: E402
from phi3ref.testing import write_model  # noqa: E402

# ---- phi3ref's "ggml" numerics against llama.cpp, bit for bit, at every level this CPU runs
# Each level's llama.cpp is built from the installed llama-cpp-python's sources
# (phi3ref.llama_builds, cached) and runs in a child process; phi3ref runs the same level
# in this one. The shapes keep each model's real head size (96, 128; partial rotary 96 of
# 128; GQA ratios), plus a head size of 40 that no lane count divides.

HOST = isa.host_features()


def _level_param(level: isa.Level):
    missing = sorted(level.features - HOST)
    return pytest.param(level, id=level.name, marks=pytest.mark.skipif(
        bool(missing), reason=f"this CPU cannot run llama.cpp built for {level.name} (lacks {', '.join(missing)})"))


LEVEL_PARAMS = [_level_param(level) for level in isa.LEVELS.values()]

PRESETS_HERE = ["phi3-mini", "phi3-medium", "phi3.5-mini", "phi4-mini"]  # size "heads": the real head sizes
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


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS_HERE)
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_prompt_logits_equal_llama_cpp(level, preset, realistic_model):
    """Every weight type, a 300-token prompt (every position's logits), and a 600-token one
    in two micro-batches: max |Δlogit| = 0."""
    cases = [(q, _prompt(300, 7)) for q in ALL_QUANTS] + [("Q4_K_M", _prompt(600, 8))]
    calls = [("logits", dict(path=str(realistic_model(preset, q)), tokens=p, n_ctx=N_CTX)) for q, p in cases]
    theirs = llama_cpp_calls(calls, level=level)
    results = []
    for (quant, prompt), ref in zip(cases, theirs):
        ours = phi3ref.load(realistic_model(preset, quant), isa=level, n_ctx=N_CTX).logits(prompt)
        results.append((f"{level} {preset} {quant} {len(prompt)} tokens", compare(ours, ref)))
    _check(results)


def _generation(path: Path, level: isa.Level, prompt: list[int], continuation: list[int]) -> np.ndarray:
    return generation_logits(phi3ref.load(path, isa=level, n_ctx=N_CTX), prompt, continuation)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS_HERE)
@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_generation_logits_equal_llama_cpp(level, preset, realistic_model):
    """The generation path (prompt in one batch, then a token at a time through the KV
    cache; llama.cpp's kernels for single tokens differ): every weight type for 24 steps,
    and Q4_K_M past 1,000 positions."""
    cases = [(q, _prompt(40, 9), _prompt(24, 10)) for q in ALL_QUANTS] + [("Q4_K_M", _prompt(300, 11), _prompt(724, 12))]
    calls = [("generation", dict(path=str(realistic_model(preset, q)), prompt=p, continuation=c, n_ctx=N_CTX)) for q, p, c in cases]
    theirs = llama_cpp_calls(calls, level=level)
    results = []
    for (quant, prompt, cont), ref in zip(cases, theirs):
        ours = _generation(realistic_model(preset, quant), level, prompt, cont)
        results.append((f"{level} {preset} {quant} to position {len(prompt) + len(cont)}", compare(ours, ref)))
    _check(results)


@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_head_size_no_lane_count_divides(level, realistic_model):
    """Head size 40: llama.cpp's tinyBLAS declines the attention scores of a batch (40 is no
    multiple of 8 or 16) and ggml_vec_dot_f16 takes them, with a double tail."""
    cases = [(q, _prompt(100, 13)) for q in ("Q8_0", "F16")]
    calls = [("logits", dict(path=str(realistic_model("phi3-mini-hd40", q)), tokens=p, n_ctx=N_CTX)) for q, p in cases]
    calls += [("generation", dict(path=str(realistic_model("phi3-mini-hd40", "Q8_0")), prompt=_prompt(20, 14), continuation=_prompt(30, 15), n_ctx=N_CTX))]
    theirs = llama_cpp_calls(calls, level=level)
    results = []
    for (quant, prompt), ref in zip(cases, theirs[:2]):
        results.append((f"{level} head 40 {quant}", compare(phi3ref.load(realistic_model("phi3-mini-hd40", quant), isa=level, n_ctx=N_CTX).logits(prompt), ref)))
    ours = _generation(realistic_model("phi3-mini-hd40", "Q8_0"), level, _prompt(20, 14), _prompt(30, 15))
    results.append((f"{level} head 40 Q8_0 generation", compare(ours, theirs[2])))
    _check(results)


NATIVE = pytest.mark.skipif(
    bool(isa.native_gaps(HOST)), reason="the installed llama-cpp-python is built natively: " + " / ".join(isa.native_gaps(HOST)))


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


@pytest.mark.parametrize("level", LEVEL_PARAMS)
def test_trace_matches_llama_cpp_layer_by_layer(level, realistic_model):
    """Every intermediate phi3ref traces equals llama.cpp's tensor of the same name, on a
    prompt past every batch threshold (GQA, head 128)."""
    path = realistic_model("phi3-medium", "Q4_K_M")
    prompt = _prompt(300, 16)
    (theirs,) = llama_cpp_calls([("trace", dict(path=str(path), tokens=prompt, n_ctx=N_CTX))], level=level)
    matches = compare_traces(phi3ref.load(path, isa=level, n_ctx=N_CTX).trace(prompt), theirs)
    assert [m.name for m in matches if not m.equal] == []
    assert {"wqkv-0", "kq-0", "kq_soft_max-1", "kqv_out-1", "ffn_up-0", "ffn_swiglu-0", "l_out-1", "result_output"} <= {m.name for m in matches}


@NATIVE
@pytest.mark.parametrize("preset,quant", [("phi3-mini", "Q4_K_M"), ("phi4-mini", "Q4_0"), ("phi3-medium", "Q8_0")])
def test_greedy_generation_matches_llama_cpp(preset, quant, tiny_model):
    """phi3ref.generate(temperature=0) picks the same tokens as llama.cpp's own greedy
    sampler on the same file and prompt."""
    path = tiny_model(preset, quant)
    model = phi3ref.load(path, n_ctx=256)
    ours = phi3ref.generate("Write a haiku about ice hockey", model=model, temperature=0, repeat_penalty=1.0, max_tokens=24)
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


def test_a_failing_llama_cpp_is_an_error_here(tmp_path):
    """llama.cpp runs in a child process: its failure (or crash) raises, naming how it ended."""
    with pytest.raises(RuntimeError, match=r"the installed llama-cpp-python failed \(exit status 1\)"):
        llama_cpp_calls([("logits", dict(path=str(tmp_path / "missing.gguf"), tokens=[1, 2]))])
