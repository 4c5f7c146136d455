"""phi3ref's "exact" numerics against HF transformers in float32: logits, LongRoPE past the
original context, the sliding window, and a pass patched through hook points.

Tier ``crosscheck``: needs torch and transformers (the ``crosscheck`` extra). llama.cpp:
tests/test_crosscheck_llama_cpp.py.

The reference is ``phi3ref.crosscheck.transformers_model``: transformers' ``Phi3ForCausalLM``
built from the file's hyperparameters as phi3ref reads them, with its weights. Not
transformers' own GGUF loader: that maps neither ``rope.dimension_count`` (partial rotary)
nor the LongRoPE factors nor the sliding window, so a Phi-4-mini file comes out as another
model — with transformers 5.25 on the tiny ``phi4-mini`` preset, rotary over all 128 of 128
dimensions instead of 96 and no LongRoPE: max |Δlogit| 11.4 from ``transformers_model``'s
logits, the same top token at 1 of 64 positions. (The tiny ``phi4`` preset comes out right —
full rotary, no window, the rope base read: the two agree within 1.1e-5.)
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_PRESETS

import phi3ref
from phi3ref.crosscheck import compare, transformers_logits

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
    from phi3ref.synthetic import write_model

    path = write_model(tmp_path / "sw.gguf", preset="phi3-mini", quant="Q8_0", sliding_window=16)
    c = compare(phi3ref.load(path, numerics="exact").logits(PROMPT), transformers_logits(path, PROMPT))
    assert c.max_rel <= 1e-3 and c.top1 == 1.0, c


@pytest.mark.parametrize("preset", ["phi3-mini", "phi3-medium", "phi4-mini"])
def test_a_patched_pass_matches_transformers_patched_alike(preset, tiny_model):
    """run_with_hooks in "exact": a vector added to the residual stream after layer 1 and
    one head's attention output zeroed in layer 0 give transformers' logits with the same
    patch made by PyTorch hooks (a forward hook on the layer, a pre-hook on o_proj)."""
    import torch

    from phi3ref.crosscheck import transformers_model

    path = tiny_model(preset, "Q8_0")
    model = phi3ref.load(path, numerics="exact")
    c = model.config
    vector = np.random.default_rng(5).standard_normal(c.n_embd).astype(np.float32)
    head = c.n_head - 1
    cols = slice(head * c.head_dim, (head + 1) * c.head_dim)

    def zero_head(value, name):
        value[:, cols] = 0
        return value

    ours = model.run_with_hooks(PROMPT, {"l_out-1": lambda value, name: value + vector, "kqv_out-0": zero_head})
    plain = model.logits(PROMPT)

    hf = transformers_model(path)

    def add_vector(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + torch.from_numpy(vector),) + tuple(output[1:])
        return output + torch.from_numpy(vector)

    def zero_head_input(module, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x,) + tuple(args[1:])

    handles = [hf.model.layers[1].register_forward_hook(add_vector),
               hf.model.layers[0].self_attn.o_proj.register_forward_pre_hook(zero_head_input)]
    try:
        with torch.no_grad():
            theirs = hf(torch.tensor([PROMPT], dtype=torch.long), use_cache=False).logits[0].float().numpy()
    finally:
        for handle in handles:
            handle.remove()
    got = compare(ours, theirs)
    print(f"{preset} patched, exact vs transformers: {got}")
    assert got.max_rel <= 1e-4 and got.top1 == 1.0, got  # float32 rounding (5e-7 measured), not a mismatch
    assert compare(plain, theirs).max_rel > 1e-2  # the patch itself is far from nothing


def test_separate_q_k_v_file_matches_transformers(tmp_path):
    """A file with attn_q / attn_k / attn_v: transformers_model stacks them into qkv_proj."""
    from phi3ref.synthetic import write_model

    path = write_model(tmp_path / "split.gguf", preset="phi3-medium", quant="Q4_K_M", seed=6, fused_qkv=False)
    c = compare(phi3ref.load(path, numerics="exact").logits(PROMPT), transformers_logits(path, PROMPT))
    assert c.max_rel <= 1e-3 and c.top1 == 1.0, c


@pytest.mark.parametrize("preset", ["phi3-mini", "phi4-mini"])
def test_diverge_against_transformers(preset, tiny_model):
    """Exact numerics against transformers: every op within float32 rounding (q and k after
    RoPE, attention probabilities included); a chat text that transformers' GGUF tokenizer
    encodes otherwise (it drops the rstrip of Phi-3's special tokens) stops at the tokens."""
    from phi3ref.diverge import diverge

    path = tiny_model(preset, "Q4_K_M")
    result = diverge(path, "transformers", tokens=PROMPT[:40], numerics="exact")
    assert result.first is None, result.format()
    compared = {e.op for e in result.table}
    assert {"inp_embd", "Qcur", "Kcur", "Vcur", "kq_soft_max", "ffn_inp", "ffn_swiglu", "l_out", "result_output"} <= compared
    assert max(e.rel_err for e in result.table) < 1e-4
    if preset == "phi3-mini":
        chat = diverge(path, "transformers", text="<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>", numerics="exact")
        if chat.tokens_differ is not None:  # where this transformers reads the file's tokenizer at all
            assert chat.table == [] and "tokenize the text differently" in chat.format()
