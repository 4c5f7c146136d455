"""phi3ref's logits against HF transformers (numerics="exact") and llama.cpp (numerics="ggml").

Tier ``crosscheck``: needs the ``crosscheck`` extra (torch, transformers, llama-cpp-python).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_PRESETS

import phi3ref
from phi3ref.crosscheck import compare, llama_cpp_logits, transformers_logits

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


llama_cpp = pytest.importorskip("llama_cpp")


def _ggml_case(preset: str, quant: str, tiny_model, n_tokens: int = 64):
    path = tiny_model(preset, quant)
    prompt = np.random.default_rng(7).integers(100, 32000, size=n_tokens).tolist()
    ggml = phi3ref.load(path, numerics="ggml", n_ctx=1024).logits(prompt)
    exact = phi3ref.load(path, numerics="exact", n_ctx=1024).logits(prompt)
    ref = llama_cpp_logits(path, prompt)
    return compare(ggml, ref), compare(exact, ref)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_ggml_is_closer_to_llama_cpp_than_float32(preset, quant, tiny_model):
    ours, fp32 = _ggml_case(preset, quant, tiny_model)
    print(f"{preset} {quant} vs llama.cpp: ggml {ours} | exact {fp32}")
    if quant != "F32":  # with float32 weights there are no activation codes to reproduce
        assert ours.max_abs < fp32.max_abs and ours.kl < fp32.kl


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_ggml_matches_llama_cpp(preset, quant, tiny_model):
    ours, _ = _ggml_case(preset, quant, tiny_model)
    print(f"{preset} {quant} ggml vs llama.cpp: {ours}")
    assert ours.max_abs <= 0.02 and ours.top1 == 1.0, ours


@pytest.mark.parametrize("preset", ["phi3.5-mini", "phi4-mini"])
def test_ggml_matches_llama_cpp_beyond_original_context(preset, tiny_model):
    ours, fp32 = _ggml_case(preset, "Q4_0", tiny_model, n_tokens=300)
    print(f"{preset} Q4_0 300 tokens vs llama.cpp: ggml {ours} | exact {fp32}")
    assert ours.max_abs <= 0.02 and ours.top1 == 1.0, ours


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("preset", ["phi3-mini", "phi4-mini"])
def test_ggml_decode_matches_llama_cpp(preset, quant, tiny_model):
    """The generation path: a prompt in one batch, then one token at a time through the KV
    cache, in both runtimes (llama.cpp takes other kernels for single tokens)."""
    path = tiny_model(preset, quant)
    prompt = PROMPT[:12]
    model = phi3ref.load(path, numerics="ggml", n_ctx=256)
    ours = [model.forward(prompt, 0)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False)
    try:
        llm.eval(prompt)
        theirs = [np.array(llm.scores[len(prompt) - 1])]
        for step in range(12):
            token = int(np.argmax(theirs[-1]))
            ours.append(model.forward([token], len(prompt) + step))
            llm.eval([token])
            theirs.append(np.array(llm.scores[llm.n_tokens - 1]))
    finally:
        llm.close()
    c = compare(np.array(ours), np.array(theirs))
    print(f"{preset} {quant} decode vs llama.cpp: {c}")
    assert c.max_abs <= 0.02 and c.top1 == 1.0, c


def test_trace_matches_llama_cpp_layer_by_layer(tiny_model):
    """Every intermediate phi3ref traces equals llama.cpp's tensor of the same name."""
    from phi3ref.crosscheck import llama_cpp_trace

    path = tiny_model("phi3-medium", "Q4_K_M")
    prompt = PROMPT[:24]
    ours = phi3ref.load(path, numerics="ggml").trace(prompt)
    theirs = llama_cpp_trace(path, prompt)
    compared = []
    for name, value in ours.items():
        if name not in theirs:
            continue
        ref = theirs[name]
        if name.startswith("kq"):  # (n_head_kv, group, n_tokens, n_kv) vs (1, n_head, n_tokens, padded n_kv)
            value = value.reshape(-1, len(prompt), value.shape[-1])
            ref = ref[0][:, :, : value.shape[-1]]
        elif ref.size != value.size:  # llama.cpp keeps only the last position after the last attention
            value = value[-1:]
        ref = ref.reshape(value.shape)
        assert np.max(np.abs(ref - value)) <= 1e-6 * max(float(np.abs(ref).max()), 1.0), name
        compared.append(name)
    assert {"wqkv-0", "kq_soft_max-1", "kqv_out-1", "ffn_swiglu-0", "l_out-1", "result_output"} <= set(compared)


@pytest.mark.parametrize("preset,quant", [("phi3-mini", "Q4_K_M"), ("phi4-mini", "Q4_0"), ("phi3-medium", "Q8_0")])
def test_greedy_generation_matches_llama_cpp(preset, quant, tiny_model):
    """phi3ref.generate(temperature=0) picks the same tokens as llama.cpp's own greedy
    sampler on the same file and prompt."""
    path = tiny_model(preset, quant)
    model = phi3ref.load(path, numerics="ggml", n_ctx=256)
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
